/* Tail sampling's buffered trace as a C object: the fields of sidecar.processors.tail_sampling.buffer.Trace.

A buffered trace is made for every trace the sidecar receives and lives for its decision wait (seconds).
As a Python object with slots it costs about 0.6 µs to make (its __init__ sets seventeen attributes) and
it is tracked by the cyclic garbage collector, whose passes walk every survivor; this type is made in C
with its defaults, and is not tracked: it holds only ids, numbers, bytes, tuples and lists of those,
never a reference back to itself or to another trace, so it can be in no reference cycle.

The Python class ``Trace`` subclasses it with no slots of its own (so it stays untracked) and adds the
methods; ``sidecar/processors/tail_sampling/_trace_py.py`` is the pure-Python twin (SIDECAR_PURE_PYTHON=1
or no compiler), tested for the same fields and defaults (tests/sidecar/tail_sampling/test_trace_base.py).
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

/* bytes a buffered trace costs before any item: buffer.TRACE_OVERHEAD, checked equal by the tests */
#define TRACE_OVERHEAD 960

typedef struct {
    PyObject_HEAD
    PyObject *trace_id;
    double first_seen;
    PyObject *root_deadline;
    PyObject *spans_key;
    PyObject *spans;
    PyObject *more_spans;
    PyObject *logs_key;
    PyObject *logs;
    PyObject *more_logs;
    Py_ssize_t n_spans;
    Py_ssize_t n_logs;
    Py_ssize_t nbytes;
    long status_mask;
    unsigned long long start;
    unsigned long long end;
    PyObject *matched;
    PyObject *rv;
    Py_ssize_t segment;
} TraceObject;

static PyObject *zero;  /* the int 0: matched's default */

static PyObject *
trace_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (!PyTuple_CheckExact(args) || PyTuple_GET_SIZE(args) != 2 || (kwds != NULL && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "Trace(trace_id, now): two positional arguments");
        return NULL;
    }
    PyObject *trace_id = PyTuple_GET_ITEM(args, 0);
    double now = PyFloat_AsDouble(PyTuple_GET_ITEM(args, 1));
    if (now == -1.0 && PyErr_Occurred())
        return NULL;
    TraceObject *t = (TraceObject *)type->tp_alloc(type, 0);
    if (t == NULL)
        return NULL;
    /* A Python subclass is a collected type (every class made by `class` is): untracked now, so the
       collector never walks a buffered trace (it can be in no cycle: see the top of this file). */
    if (PyObject_IS_GC((PyObject *)t))
        PyObject_GC_UnTrack(t);
    Py_INCREF(trace_id);
    t->trace_id = trace_id;
    t->first_seen = now;
    Py_INCREF(Py_None); t->root_deadline = Py_None;
    Py_INCREF(Py_None); t->spans_key = Py_None;
    Py_INCREF(Py_None); t->spans = Py_None;
    Py_INCREF(Py_None); t->more_spans = Py_None;
    Py_INCREF(Py_None); t->logs_key = Py_None;
    Py_INCREF(Py_None); t->logs = Py_None;
    Py_INCREF(Py_None); t->more_logs = Py_None;
    t->nbytes = TRACE_OVERHEAD;
    Py_INCREF(zero); t->matched = zero;
    Py_INCREF(Py_None); t->rv = Py_None;
    t->segment = -1;
    return (PyObject *)t;
}

static void
trace_dealloc(TraceObject *t)
{
    Py_XDECREF(t->trace_id);
    Py_XDECREF(t->root_deadline);
    Py_XDECREF(t->spans_key);
    Py_XDECREF(t->spans);
    Py_XDECREF(t->more_spans);
    Py_XDECREF(t->logs_key);
    Py_XDECREF(t->logs);
    Py_XDECREF(t->more_logs);
    Py_XDECREF(t->matched);
    Py_XDECREF(t->rv);
    Py_TYPE(t)->tp_free((PyObject *)t);  /* a Python subclass's dealloc drops its type's reference */
}

#define OBJ(name) {#name, T_OBJECT, offsetof(TraceObject, name), 0, NULL}
static PyMemberDef trace_members[] = {
    OBJ(trace_id),
    {"first_seen", T_DOUBLE, offsetof(TraceObject, first_seen), 0, NULL},
    OBJ(root_deadline),
    OBJ(spans_key),
    OBJ(spans),
    OBJ(more_spans),
    OBJ(logs_key),
    OBJ(logs),
    OBJ(more_logs),
    {"n_spans", T_PYSSIZET, offsetof(TraceObject, n_spans), 0, NULL},
    {"n_logs", T_PYSSIZET, offsetof(TraceObject, n_logs), 0, NULL},
    {"nbytes", T_PYSSIZET, offsetof(TraceObject, nbytes), 0, NULL},
    {"status_mask", T_LONG, offsetof(TraceObject, status_mask), 0, NULL},
    {"start", T_ULONGLONG, offsetof(TraceObject, start), 0, NULL},
    {"end", T_ULONGLONG, offsetof(TraceObject, end), 0, NULL},
    OBJ(matched),
    OBJ(rv),
    {"segment", T_PYSSIZET, offsetof(TraceObject, segment), 0, NULL},
    {NULL}
};

static PyTypeObject TraceBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sidecar.processors.tail_sampling._trace.TraceBase",
    .tp_basicsize = sizeof(TraceObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "A buffered trace's fields (see buffer.Trace): made in C, not tracked by the garbage collector.",
    .tp_new = trace_new,
    .tp_dealloc = (destructor)trace_dealloc,
    .tp_members = trace_members,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_trace", "Tail sampling's buffered trace as a C object (see TraceBase).", -1, NULL,
};

PyMODINIT_FUNC
PyInit__trace(void)
{
    if (PyType_Ready(&TraceBaseType) < 0)
        return NULL;
    zero = PyLong_FromLong(0);
    if (zero == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&TraceBaseType);
    if (PyModule_AddObject(m, "TraceBase", (PyObject *)&TraceBaseType) < 0
        || PyModule_AddIntConstant(m, "TRACE_OVERHEAD", TRACE_OVERHEAD) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
