/*
 * sidecar._gil_io: a log record written to a file without handing the GIL over.
 *
 *   write_all(fd: int, header: bytes-like, payload: bytes-like) -> None
 *       writev() until every byte of header then payload is written; OSError (with its errno) on failure,
 *       after which part of the record may be in the file (the caller cuts it back).
 *
 * os.writev releases the GIL around every call. Tail sampling's log writes each request under the log's
 * lock: the release let another receiver run into that lock and sleep, and the writer then waited to get
 * the GIL back (docs/benchmarks.md, thirteenth round). A write into the page cache is a copy; below
 * GIL_HELD_BYTES it is done with the GIL held, as CPython's zlib and RE2 binding do for short inputs.
 * A longer record releases it. The C half of sidecar/gil_io.py's facade; the pure-Python half is the
 * os.writev loop, with the same bytes in the file and the same errors.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <sys/uio.h>

/* records at least this long are written with the GIL released (as os.writev does) */
static const Py_ssize_t GIL_HELD_BYTES = 1024 * 1024;

static PyObject *write_all(PyObject *self, PyObject *args)
{
    int fd;
    Py_buffer header, payload;
    if (!PyArg_ParseTuple(args, "iy*y*:write_all", &fd, &header, &payload))
        return NULL;
    struct iovec iov[2] = {{header.buf, (size_t)header.len}, {payload.buf, (size_t)payload.len}};
    struct iovec *v = iov;
    int n = payload.len ? 2 : 1;
    int held = header.len + payload.len < GIL_HELD_BYTES;
    PyObject *result = Py_None;
    while (n > 0) {
        ssize_t written;
        if (held) {
            written = writev(fd, v, n);
        } else {
            Py_BEGIN_ALLOW_THREADS
            written = writev(fd, v, n);
            Py_END_ALLOW_THREADS
        }
        if (written < 0) {
            if (errno == EINTR) {
                if (PyErr_CheckSignals() < 0) { /* a signal handler raised: as os.writev does */
                    result = NULL;
                    break;
                }
                continue;
            }
            PyErr_SetFromErrno(PyExc_OSError);
            result = NULL;
            break;
        }
        while (n > 0 && (size_t)written >= v->iov_len) {
            written -= (ssize_t)v->iov_len;
            v++;
            n--;
        }
        if (n > 0 && written > 0) {
            v->iov_base = (char *)v->iov_base + written;
            v->iov_len -= (size_t)written;
        }
    }
    PyBuffer_Release(&header);
    PyBuffer_Release(&payload);
    Py_XINCREF(result);
    return result;
}

static PyMethodDef methods[] = {
    {"write_all", write_all, METH_VARARGS,
     "write_all(fd, header, payload): write header then payload entirely, holding the GIL below 1 MiB."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sidecar._gil_io",
    "A log record written without handing the GIL over (see sidecar/gil_io.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__gil_io(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "GIL_HELD_BYTES", (long)GIL_HELD_BYTES) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
