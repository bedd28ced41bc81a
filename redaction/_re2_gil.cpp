/*
 * redaction._re2_gil: RE2 matching that keeps the GIL on short texts.
 *
 * google-re2's binding releases the GIL around every Match. A request's redaction makes a few dozen
 * calls of a few microseconds each; in a sidecar whose other threads wait for the GIL, each release
 * hands it to one of them and each return waits to get it back: on a 2-core VM that cost 55.7 µs of
 * CPU per call against 2.2 alone (docs/benchmarks.md). Here a text shorter than GIL_HELD_BYTES is
 * matched with the GIL held, as CPython's own `re` does; a longer one releases it, so a big scan
 * does not stall the other threads. RE2 objects are thread-safe and never call back into Python,
 * so holding the GIL while RE2 waits on its own cache lock cannot deadlock.
 *
 * The subset of google-re2's raw objects that redaction/_engine.py calls, with the same results:
 *
 *   RE2(pattern: bytes, options: tuple) .Match(anchor, text, pos, endpos) -> [(start, end), ...]
 *       group 0 and every capture group, (-1, -1) for a group that did not take part (all of them
 *       when there is no match, or when pos and endpos are not 0 <= pos <= endpos <= len(text)); anchor: 0 unanchored, 1 at the start, 2 both ends (an int or
 *       google-re2's _Anchor).
 *   Set(anchor, options: tuple) .Add(pattern: bytes) -> int, .Compile() -> bool,
 *       .Match(text) -> [index, ...] (empty when nothing matches, or when the DFA ran out of memory)
 *
 * options: (max_mem, latin1, posix_syntax, longest_match, literal, never_nl, dot_nl, never_capture,
 * case_sensitive, perl_classes, word_boundary, one_line), as redaction._regex passes them from a
 * google-re2 Options. RE2 never logs (log_errors is off). A pattern RE2 refuses raises ValueError.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <re2/re2.h>
#include <re2/set.h>

#include <new>
#include <string>
#include <vector>

/* texts at least this long are matched with the GIL released (about a millisecond of DFA work) */
static const Py_ssize_t GIL_HELD_BYTES = 256 * 1024;

static int read_options(PyObject *opts, RE2::Options *o)
{
    long long v[12];
    if (!PyTuple_Check(opts) || PyTuple_GET_SIZE(opts) != 12) {
        PyErr_SetString(PyExc_TypeError, "options must be a tuple of 12 values");
        return -1;
    }
    for (int i = 0; i < 12; i++) {
        v[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(opts, i));
        if (v[i] == -1 && PyErr_Occurred())
            return -1;
    }
    o->set_max_mem(v[0]);
    o->set_encoding(v[1] ? RE2::Options::EncodingLatin1 : RE2::Options::EncodingUTF8);
    o->set_posix_syntax(v[2] != 0);
    o->set_longest_match(v[3] != 0);
    o->set_literal(v[4] != 0);
    o->set_never_nl(v[5] != 0);
    o->set_dot_nl(v[6] != 0);
    o->set_never_capture(v[7] != 0);
    o->set_case_sensitive(v[8] != 0);
    o->set_perl_classes(v[9] != 0);
    o->set_word_boundary(v[10] != 0);
    o->set_one_line(v[11] != 0);
    o->set_log_errors(false);
    return 0;
}

static int read_anchor(PyObject *obj, RE2::Anchor *anchor)
{
    Py_ssize_t a = PyNumber_AsSsize_t(obj, PyExc_OverflowError);
    if (a == -1 && PyErr_Occurred())
        return -1;
    if (a < 0 || a > 2) {
        PyErr_SetString(PyExc_ValueError, "anchor must be 0 (unanchored), 1 (start) or 2 (both ends)");
        return -1;
    }
    *anchor = static_cast<RE2::Anchor>(a);
    return 0;
}

/* --- RE2 ---------------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    RE2 *re;
    int groups;
} Regex;

static void Regex_dealloc(Regex *self)
{
    delete self->re;
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Regex_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Py_buffer pattern;
    PyObject *opts;
    if (!PyArg_ParseTuple(args, "y*O:RE2", &pattern, &opts))
        return NULL;
    RE2::Options o;
    if (read_options(opts, &o) < 0) {
        PyBuffer_Release(&pattern);
        return NULL;
    }
    RE2 *re = new (std::nothrow) RE2(re2::StringPiece((const char *)pattern.buf, (size_t)pattern.len), o);
    PyBuffer_Release(&pattern);
    if (re == NULL)
        return PyErr_NoMemory();
    if (!re->ok()) {
        PyErr_Format(PyExc_ValueError, "%s", re->error().c_str());
        delete re;
        return NULL;
    }
    Regex *self = (Regex *)type->tp_alloc(type, 0);
    if (self == NULL) {
        delete re;
        return NULL;
    }
    self->re = re;
    self->groups = re->NumberOfCapturingGroups();
    return (PyObject *)self;
}

static PyObject *Regex_Match(Regex *self, PyObject *args)
{
    PyObject *anchor_obj;
    Py_buffer text;
    Py_ssize_t pos, endpos;
    if (!PyArg_ParseTuple(args, "Oy*nn:Match", &anchor_obj, &text, &pos, &endpos))
        return NULL;
    RE2::Anchor anchor;
    if (read_anchor(anchor_obj, &anchor) < 0) {
        PyBuffer_Release(&text);
        return NULL;
    }
    int n = self->groups + 1;
    std::vector<re2::StringPiece> groups((size_t)n);
    const char *base = (const char *)text.buf;
    bool matched = false;
    if (0 <= pos && pos <= endpos && endpos <= text.len) { /* else no match, as RE2::Match answers */
        re2::StringPiece whole(base, (size_t)text.len);
        if (endpos - pos >= GIL_HELD_BYTES) {
            Py_BEGIN_ALLOW_THREADS
            matched = self->re->Match(whole, (size_t)pos, (size_t)endpos, anchor, groups.data(), n);
            Py_END_ALLOW_THREADS
        } else {
            matched = self->re->Match(whole, (size_t)pos, (size_t)endpos, anchor, groups.data(), n);
        }
    }
    PyObject *out = PyList_New(n);
    if (out == NULL) {
        PyBuffer_Release(&text);
        return NULL;
    }
    for (int i = 0; i < n; i++) {
        Py_ssize_t s = -1, e = -1;
        if (matched && groups[(size_t)i].data() != NULL) {
            s = groups[(size_t)i].data() - base;
            e = s + (Py_ssize_t)groups[(size_t)i].size();
        }
        PyObject *pair = Py_BuildValue("(nn)", s, e);
        if (pair == NULL) {
            Py_DECREF(out);
            PyBuffer_Release(&text);
            return NULL;
        }
        PyList_SET_ITEM(out, i, pair);
    }
    PyBuffer_Release(&text);
    return out;
}

static PyObject *Regex_groups(Regex *self, void *closure)
{
    return PyLong_FromLong(self->groups);
}

static PyMethodDef Regex_methods[] = {
    {"Match", (PyCFunction)Regex_Match, METH_VARARGS,
     "Match(anchor, text, pos, endpos) -> [(start, end), ...] for group 0 and each capture group"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Regex_getset[] = {
    {"groups", (getter)Regex_groups, NULL, "the number of capture groups", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RegexType = {PyVarObject_HEAD_INIT(NULL, 0)};

/* --- Set ---------------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    RE2::Set *set;
    bool compiled;
} RegexSet;

static void RegexSet_dealloc(RegexSet *self)
{
    delete self->set;
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *RegexSet_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *anchor_obj, *opts;
    if (!PyArg_ParseTuple(args, "OO:Set", &anchor_obj, &opts))
        return NULL;
    RE2::Anchor anchor;
    RE2::Options o;
    if (read_anchor(anchor_obj, &anchor) < 0 || read_options(opts, &o) < 0)
        return NULL;
    RE2::Set *set = new (std::nothrow) RE2::Set(o, anchor);
    if (set == NULL)
        return PyErr_NoMemory();
    RegexSet *self = (RegexSet *)type->tp_alloc(type, 0);
    if (self == NULL) {
        delete set;
        return NULL;
    }
    self->set = set;
    self->compiled = false;
    return (PyObject *)self;
}

static PyObject *RegexSet_Add(RegexSet *self, PyObject *args)
{
    Py_buffer pattern;
    if (!PyArg_ParseTuple(args, "y*:Add", &pattern))
        return NULL;
    if (self->compiled) {
        PyBuffer_Release(&pattern);
        PyErr_SetString(PyExc_ValueError, "Add after Compile");
        return NULL;
    }
    std::string error;
    int index = self->set->Add(re2::StringPiece((const char *)pattern.buf, (size_t)pattern.len), &error);
    PyBuffer_Release(&pattern);
    if (index < 0) {
        PyErr_Format(PyExc_ValueError, "%s", error.c_str());
        return NULL;
    }
    return PyLong_FromLong(index);
}

static PyObject *RegexSet_Compile(RegexSet *self, PyObject *unused)
{
    if (self->compiled) {
        PyErr_SetString(PyExc_ValueError, "Compile called twice");
        return NULL;
    }
    self->compiled = true;
    return PyBool_FromLong(self->set->Compile());
}

static PyObject *RegexSet_Match(RegexSet *self, PyObject *args)
{
    Py_buffer text;
    if (!PyArg_ParseTuple(args, "y*:Match", &text))
        return NULL;
    if (!self->compiled) {
        PyBuffer_Release(&text);
        PyErr_SetString(PyExc_ValueError, "Match before Compile");
        return NULL;
    }
    std::vector<int> hits;
    re2::StringPiece piece((const char *)text.buf, (size_t)text.len);
    if (text.len >= GIL_HELD_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        self->set->Match(piece, &hits);
        Py_END_ALLOW_THREADS
    } else {
        self->set->Match(piece, &hits);
    }
    PyBuffer_Release(&text);
    PyObject *out = PyList_New((Py_ssize_t)hits.size());
    if (out == NULL)
        return NULL;
    for (size_t i = 0; i < hits.size(); i++) {
        PyObject *v = PyLong_FromLong(hits[i]);
        if (v == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)i, v);
    }
    return out;
}

static PyMethodDef RegexSet_methods[] = {
    {"Add", (PyCFunction)RegexSet_Add, METH_VARARGS, "Add(pattern) -> index"},
    {"Compile", (PyCFunction)RegexSet_Compile, METH_NOARGS, "Compile() -> bool"},
    {"Match", (PyCFunction)RegexSet_Match, METH_VARARGS, "Match(text) -> [index of each pattern that matches]"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RegexSetType = {PyVarObject_HEAD_INIT(NULL, 0)};

/* --- module ------------------------------------------------------------------------------------- */

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_re2_gil",
                                    "RE2 matching that keeps the GIL on short texts (see redaction/_regex.py).", -1,
                                    NULL};

PyMODINIT_FUNC PyInit__re2_gil(void)
{
    RegexType.tp_name = "redaction._re2_gil.RE2";
    RegexType.tp_basicsize = sizeof(Regex);
    RegexType.tp_flags = Py_TPFLAGS_DEFAULT;
    RegexType.tp_doc = "RE2(pattern, options): a compiled RE2";
    RegexType.tp_new = Regex_new;
    RegexType.tp_dealloc = (destructor)Regex_dealloc;
    RegexType.tp_methods = Regex_methods;
    RegexType.tp_getset = Regex_getset;
    RegexSetType.tp_name = "redaction._re2_gil.Set";
    RegexSetType.tp_basicsize = sizeof(RegexSet);
    RegexSetType.tp_flags = Py_TPFLAGS_DEFAULT;
    RegexSetType.tp_doc = "Set(anchor, options): an RE2::Set";
    RegexSetType.tp_new = RegexSet_new;
    RegexSetType.tp_dealloc = (destructor)RegexSet_dealloc;
    RegexSetType.tp_methods = RegexSet_methods;
    if (PyType_Ready(&RegexType) < 0 || PyType_Ready(&RegexSetType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RegexType);
    Py_INCREF(&RegexSetType);
    if (PyModule_AddObject(m, "RE2", (PyObject *)&RegexType) < 0 ||
        PyModule_AddObject(m, "Set", (PyObject *)&RegexSetType) < 0 ||
        PyModule_AddIntConstant(m, "GIL_HELD_BYTES", (long)GIL_HELD_BYTES) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
