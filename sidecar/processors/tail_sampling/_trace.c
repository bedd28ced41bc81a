/* Tail sampling's buffered trace as a C object: the fields of sidecar.processors.tail_sampling.buffer.Trace.

A buffered trace is made for every trace the sidecar receives and lives for its decision wait (seconds).
As a Python object with slots it was made by an __init__ setting eighteen attributes and tracked by the cyclic
garbage collector, whose passes walk every survivor (0.17 of 4.8 s of CPU in a run of the light default at
800 requests, 0.06 after this type); this type is made in C with its defaults, and is not tracked: it holds only ids, numbers, bytes, tuples and lists of those,
never a reference back to itself or to another trace, so it can be in no reference cycle.

The Python class ``Trace`` subclasses it with no slots of its own and adds the methods; being a class made
by ``class``, it is a collected type, so a new trace is untracked as it is made.

sort_spans and sort_logs sort a request's runs (sidecar.wire.span_runs / log_runs) into the buffer: the
processor's per-trace loop (in one process, with the scanner: 3.5 µs a trace of four spans and two log
records in Python, 2.45 here). They read and write the trace's fields
directly and make new traces here while the buffer has room; what is rare (a trace's second run, a full
buffer, randomness from a tracestate, attribute checks on a span's value) calls the Python methods.
decide runs the policies over the traces that are due: the simple kinds (policies.Policy.plan) on the fields
here, the others by their Python evaluate.

``sidecar/processors/tail_sampling/_trace_py.py`` is the pure-Python twin of all three (SIDECAR_PURE_PYTHON=1
or no compiler): the same fields, defaults and results (tests/sidecar/tail_sampling/test_trace_fields.py and
test_trace_parity.py, which runs both over random traffic; every tail sampling test runs on both).
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

/* bytes a buffered trace costs before any item, and an item beyond its encoding: _trace_py's
   TRACE_OVERHEAD and ITEM_OVERHEAD, checked equal by the tests */
#define TRACE_OVERHEAD 960
#define ITEM_OVERHEAD 48

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

static TraceObject *trace_make(PyTypeObject *type, PyObject *trace_id, double now);

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
    return (PyObject *)trace_make(type, trace_id, now);
}

static TraceObject *
trace_make(PyTypeObject *type, PyObject *trace_id, double now)
{
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
    return t;
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

/* --- sorting a request's runs into the buffer --------------------------------------------------------- */

static PyObject *s_traces, *s_create, *s_note_created, *s_trace_type, *s_num_traces, *s_segment, *s_roots,
    *s_root_wait, *s_move_to_end, *s_add_spans, *s_add_logs, *s_note_tracestate, *s_append, *s_rv, *empty_str;

/* The buffer as one sort sees it (read once per request). New traces are made here while it has room and
   told to the buffer in one note_created(n) (its bytes; the durable buffer's count of traces to pin)
   before anything else of the buffer runs: its create() when it is full, and the end of the sort. */
typedef struct {
    PyObject *traces, *create, *note_created; /* owned */
    PyTypeObject *trace_type;                 /* owned */
    Py_ssize_t num_traces, segment, pending;
    PyObject *now_obj;                        /* borrowed */
    double now;
    /* borrowed, the sort's arguments both signals share: the decision caches' maps, and where the traces this
       request brings older data to (``older``) and those a full buffer takes out (``evicted``) are appended */
    PyObject *sampled, *not_sampled, *older, *evicted;
} Buf;

static Py_ssize_t attr_ssize(PyObject *o, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(o, name);
    if (v == NULL)
        return -1;
    Py_ssize_t n = PyLong_AsSsize_t(v);
    Py_DECREF(v);
    return n;
}

static int list_arg(PyObject *o, const char *what);

/* The buffer and the arguments both sorts share, checked: args[0] runs, [1] buf, [2] now, [3] sampled,
   [4] not_sampled; ``older`` and ``evicted`` are the lists the sort's last two arguments name. */
static int buf_open(Buf *b, PyObject *const *args, PyObject *older, PyObject *evicted)
{
    memset(b, 0, sizeof(*b));
    PyObject *buf = args[1], *now = args[2];
    b->sampled = args[3];
    b->not_sampled = args[4];
    b->older = older;
    b->evicted = evicted;
    if (list_arg(args[0], "runs") < 0 || list_arg(older, "older") < 0 || list_arg(evicted, "evicted") < 0)
        return -1;
    if (!PyDict_Check(b->sampled) || !PyDict_Check(b->not_sampled)) {
        PyErr_SetString(PyExc_TypeError, "sort: sampled and not_sampled must be dicts");
        return -1;
    }
    b->now_obj = now;
    b->now = PyFloat_AsDouble(now);
    if (b->now == -1.0 && PyErr_Occurred())
        return -1;
    if ((b->traces = PyObject_GetAttr(buf, s_traces)) == NULL || (b->create = PyObject_GetAttr(buf, s_create)) == NULL
        || (b->note_created = PyObject_GetAttr(buf, s_note_created)) == NULL
        || (b->trace_type = (PyTypeObject *)PyObject_GetAttr(buf, s_trace_type)) == NULL)
        return -1;
    if (!PyDict_Check(b->traces) || !PyType_Check(b->trace_type)
        || !PyType_IsSubtype(b->trace_type, &TraceBaseType)) {
        PyErr_SetString(PyExc_TypeError, "sort: the buffer's traces must be a dict and its trace_type a TraceBase");
        return -1;
    }
    if ((b->num_traces = attr_ssize(buf, s_num_traces)) == -1 && PyErr_Occurred())
        return -1;
    if ((b->segment = attr_ssize(buf, s_segment)) == -1 && PyErr_Occurred())
        return -1;
    return 0;
}

static int buf_flush(Buf *b)
{
    if (!b->pending)
        return 0;
    PyObject *r = PyObject_CallFunction(b->note_created, "n", b->pending);
    b->pending = 0;
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

/* Tell the buffer what was made (on failure too: those traces are in it), then let go. */
static int buf_close(Buf *b, int ok)
{
    if (b->pending && b->note_created != NULL) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        if (buf_flush(b) < 0)
            ok = 0;
        if (type != NULL)
            PyErr_Restore(type, value, tb);
    }
    Py_XDECREF(b->traces);
    Py_XDECREF(b->create);
    Py_XDECREF(b->note_created);
    Py_XDECREF(b->trace_type);
    return ok ? 0 : -1;
}

/* A new trace for ``tid`` (a new reference): made here while the buffer has room, else by its create(),
   which takes out the oldest (appended to ``evicted``). */
static TraceObject *buf_new_trace(Buf *b, PyObject *tid)
{
    if (PyDict_GET_SIZE(b->traces) < b->num_traces) {
        TraceObject *t = trace_make(b->trace_type, tid, b->now);
        if (t == NULL)
            return NULL;
        t->segment = b->segment;
        if (PyObject_SetItem(b->traces, tid, (PyObject *)t) < 0) { /* the OrderedDict's own: it keeps the order */
            Py_DECREF(t);
            return NULL;
        }
        b->pending++;
        return t;
    }
    if (buf_flush(b) < 0)
        return NULL;
    PyObject *t = PyObject_CallFunctionObjArgs(b->create, tid, b->now_obj, b->evicted, NULL);
    if (t != NULL && !PyObject_TypeCheck(t, &TraceBaseType)) {
        Py_DECREF(t);
        PyErr_SetString(PyExc_TypeError, "sort: the buffer's create() must return a TraceBase");
        return NULL;
    }
    return (TraceObject *)t;
}

/* The buffered trace of ``tid`` (a new reference), or NULL: none (no error set) or an error. */
static TraceObject *buf_get(Buf *b, PyObject *tid)
{
    PyObject *t = PyDict_GetItemWithError(b->traces, tid);
    if (t == NULL)
        return NULL;
    if (!PyObject_TypeCheck(t, &TraceBaseType)) {
        PyErr_SetString(PyExc_TypeError, "sort: a buffered trace must be a TraceBase");
        return NULL;
    }
    Py_INCREF(t);
    return (TraceObject *)t;
}

static int append3(PyObject *list, PyObject *a, PyObject *b, PyObject *c)
{
    PyObject *item = PyTuple_Pack(3, a, b, c);
    if (item == NULL)
        return -1;
    int rc = PyList_Append(list, item);
    Py_DECREF(item);
    return rc;
}

static int unpack(PyObject *o, Py_ssize_t n, const char *what)
{
    if (!PyTuple_Check(o) || PyTuple_GET_SIZE(o) != n) {
        PyErr_Format(PyExc_TypeError, "sort: a %s must be a tuple of %zd", what, n);
        return -1;
    }
    return 0;
}

static int list_arg(PyObject *o, const char *what)
{
    if (!PyList_Check(o)) {
        PyErr_Format(PyExc_TypeError, "sort: %s must be a list", what);
        return -1;
    }
    return 0;
}

/* What one sort does at each level of the scanner's output (ResourceGroup > ScopeGroup > runs). */
typedef struct {
    PyObject *(*resource_bits)(void *ctx, PyObject *values);   /* a new reference; NULL: none (the int 0) */
    PyObject *(*scope_key)(PyObject *rhead, PyObject *shead);  /* the scope's group key, a new reference */
    int (*run)(void *ctx, PyObject *rhead, PyObject *shead, PyObject *key, PyObject **ts_keys, PyObject *bits,
               PyObject *run);
} Visit;

static int sort_resource(PyObject *group, const Visit *v, void *ctx)
{
    if (unpack(group, 3, "ResourceGroup") < 0)
        return -1;
    PyObject *rhead = PyTuple_GET_ITEM(group, 0), *scopes = PyTuple_GET_ITEM(group, 1);
    if (list_arg(scopes, "a resource's scopes") < 0)
        return -1;
    PyObject *bits = zero;
    if (v->resource_bits == NULL)
        Py_INCREF(bits);
    else if ((bits = v->resource_bits(ctx, PyTuple_GET_ITEM(group, 2))) == NULL)
        return -1;
    int rc = 0;
    for (Py_ssize_t i = 0; rc == 0 && i < PyList_GET_SIZE(scopes); i++) {
        PyObject *scope = PyList_GET_ITEM(scopes, i); /* a tuple: holds its head and runs while its list is held */
        if ((rc = unpack(scope, 2, "ScopeGroup")) < 0)
            break;
        PyObject *shead = PyTuple_GET_ITEM(scope, 0), *runs = PyTuple_GET_ITEM(scope, 1);
        if ((rc = list_arg(runs, "a scope's runs")) < 0)
            break;
        PyObject *key = v->scope_key(rhead, shead), *ts_keys = NULL;
        if (key == NULL) {
            rc = -1;
            break;
        }
        Py_INCREF(runs);
        for (Py_ssize_t j = 0; rc == 0 && j < PyList_GET_SIZE(runs); j++) {
            PyObject *run = PyList_GET_ITEM(runs, j);
            Py_INCREF(run); /* held: Python methods run in between */
            rc = v->run(ctx, rhead, shead, key, &ts_keys, bits, run);
            Py_DECREF(run);
        }
        Py_DECREF(runs);
        Py_DECREF(key);
        Py_XDECREF(ts_keys);
    }
    Py_DECREF(bits);
    return rc;
}

/* Every run of a request's ResourceGroups, in order. */
static int sort_groups(PyObject *runs, const Visit *v, void *ctx)
{
    int rc = 0;
    Py_INCREF(runs);
    for (Py_ssize_t i = 0; rc == 0 && i < PyList_GET_SIZE(runs); i++) {
        PyObject *group = PyList_GET_ITEM(runs, i);
        Py_INCREF(group);
        rc = sort_resource(group, v, ctx);
        Py_DECREF(group);
    }
    Py_DECREF(runs);
    return rc;
}

/* A trace's first run of spans or records (Trace.add_spans / add_logs, inlined): ``key`` and the ``k`` items into
   its slots; the bytes it adds (the items' ``nbytes`` and their overhead). */
static Py_ssize_t first_group(TraceObject *t, PyObject **key_slot, PyObject **items_slot, Py_ssize_t *count,
                              PyObject *key, PyObject *items, Py_ssize_t k, Py_ssize_t nbytes)
{
    Py_INCREF(key);
    Py_XSETREF(*key_slot, key);
    Py_INCREF(items);
    Py_XSETREF(*items_slot, items);
    *count = k;
    Py_ssize_t size = nbytes + k * ITEM_OVERHEAD;
    t->nbytes += size;
    return size;
}

/* A later run: the trace's Python ``method`` (add_spans / add_logs) joins it to its groups; the bytes it added,
   or -1 with an error set. */
static Py_ssize_t later_run(TraceObject *t, PyObject *method, PyObject *key, PyObject *items, PyObject *nbytes)
{
    PyObject *r = PyObject_CallMethodObjArgs((PyObject *)t, method, key, items, nbytes, NULL);
    if (r == NULL)
        return -1;
    Py_ssize_t size = PyLong_AsSsize_t(r);
    Py_DECREF(r);
    return size;
}

typedef struct {
    Buf b;
    PyObject *late_kept, *passthrough, *roots; /* roots owned */
    int need_status, need_times, need_rv;
    PyObject *all_checks, *no_hits, *resource_matches, *matched; /* NULL: no attribute checks */
    PyObject *root_deadline;                                       /* owned */
    Py_ssize_t added, n_late_kept, late_dropped;
} SpanSort;

/* One run (a SpanRun) of a scope: the body of _trace_py.sort_spans's innermost loop. */
static int sort_span_run(void *ctx, PyObject *rhead, PyObject *shead, PyObject *plain_key, PyObject **keys,
                         PyObject *res_matched, PyObject *run)
{
    SpanSort *c = ctx;
    if (unpack(run, 9, "SpanRun") < 0)
        return -1;
    PyObject *tid = PyTuple_GET_ITEM(run, 0), *ts = PyTuple_GET_ITEM(run, 1), *blobs = PyTuple_GET_ITEM(run, 2),
             *nbytes = PyTuple_GET_ITEM(run, 3), *hits = PyTuple_GET_ITEM(run, 8);
    int has_ts = PyObject_IsTrue(ts);
    if (has_ts < 0)
        return -1;
    PyObject *key = plain_key; /* borrowed */
    if (has_ts) {
        if (*keys == NULL && (*keys = PyDict_New()) == NULL)
            return -1;
        key = PyDict_GetItemWithError(*keys, ts);
        if (key == NULL) {
            if (PyErr_Occurred() || (key = PyTuple_Pack(3, rhead, shead, ts)) == NULL)
                return -1;
            int rc = PyDict_SetItem(*keys, ts, key);
            Py_DECREF(key); /* the dict holds it */
            if (rc < 0)
                return -1;
        }
    }
    Py_ssize_t k = PyObject_Length(blobs);
    if (k < 0)
        return -1;
    TraceObject *t = buf_get(&c->b, tid);
    if (t == NULL) {
        if (PyErr_Occurred())
            return -1;
        PyObject *decision = PyDict_GetItemWithError(c->b.sampled, tid);
        if (decision != NULL) { /* a late span of a kept trace follows its decision */
            PyObject *item = PyTuple_Pack(5, rhead, shead, blobs, ts, decision);
            if (item == NULL)
                return -1;
            int rc = PyList_Append(c->late_kept, item);
            Py_DECREF(item);
            if (rc < 0)
                return -1;
            PyObject *r = PyObject_CallMethodOneArg(c->b.sampled, s_move_to_end, tid);
            if (r == NULL)
                return -1;
            Py_DECREF(r);
            c->n_late_kept += k;
            return 0;
        }
        if (PyErr_Occurred())
            return -1;
        int dropped = PyDict_Contains(c->b.not_sampled, tid);
        if (dropped < 0)
            return -1;
        if (dropped) {
            c->late_dropped += k;
            return 0;
        }
        int has_tid = PyObject_IsTrue(tid);
        if (has_tid < 0)
            return -1;
        if (!has_tid)
            return append3(c->passthrough, rhead, shead, blobs);
        Py_ssize_t size = PyLong_AsSsize_t(nbytes);
        if ((size == -1 && PyErr_Occurred()) || (t = buf_new_trace(&c->b, tid)) == NULL)
            return -1;
        c->added += first_group(t, &t->spans_key, &t->spans, &t->n_spans, key, blobs, k, size);
    } else {
        Py_ssize_t size = later_run(t, s_add_spans, key, blobs, nbytes);
        if (size == -1 && PyErr_Occurred())
            goto fail;
        c->added += size;
        if (t->segment > c->b.segment && PyList_Append(c->b.older, (PyObject *)t) < 0)
            goto fail;
    }
    if (c->need_rv && has_ts && (t->rv == NULL || t->rv == Py_None)) {
        int found = PyUnicode_Contains(ts, s_rv);
        if (found < 0)
            goto fail;
        if (found) {
            PyObject *r = PyObject_CallMethodOneArg((PyObject *)t, s_note_tracestate, ts);
            if (r == NULL)
                goto fail;
            Py_DECREF(r);
        }
    }
    if (c->need_status) {
        long mask = PyLong_AsLong(PyTuple_GET_ITEM(run, 4));
        if (mask == -1 && PyErr_Occurred())
            goto fail;
        t->status_mask |= mask;
    }
    if (c->need_times) {
        unsigned long long start = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(run, 5));
        if (start == (unsigned long long)-1 && PyErr_Occurred())
            goto fail;
        unsigned long long end = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(run, 6));
        if (end == (unsigned long long)-1 && PyErr_Occurred())
            goto fail;
        if (start && (!t->start || start < t->start))
            t->start = start;
        if (end > t->end)
            t->end = end;
    }
    if (c->all_checks != NULL) {
        PyObject *matched = t->matched != NULL ? t->matched : zero;
        Py_INCREF(matched); /* held: matched() is Python */
        int open = PyObject_RichCompareBool(matched, c->all_checks, Py_NE), none = 0;
        PyObject *bits = NULL, *both = NULL;
        if (open > 0 && (none = PyObject_RichCompareBool(hits, c->no_hits, Py_EQ)) >= 0) {
            if (none) { /* no span of the run has any checked key: the resource decides */
                Py_INCREF(res_matched);
                bits = res_matched;
            } else {
                bits = PyObject_CallFunctionObjArgs(c->matched, hits, res_matched, NULL);
            }
            if (bits != NULL && (both = PyNumber_Or(matched, bits)) != NULL)
                Py_XSETREF(t->matched, both);
            Py_XDECREF(bits);
        }
        Py_DECREF(matched);
        if (open < 0 || none < 0 || (open && both == NULL))
            goto fail;
    }
    int root = PyObject_IsTrue(PyTuple_GET_ITEM(run, 7));
    if (root < 0)
        goto fail;
    if (root && (t->root_deadline == NULL || t->root_deadline == Py_None)) {
        /* the local root ended (TraceBuffer.root_arrived, inlined) */
        Py_INCREF(c->root_deadline);
        Py_XSETREF(t->root_deadline, c->root_deadline);
        PyObject *r = PyObject_CallMethodOneArg(c->roots, s_append, (PyObject *)t);
        if (r == NULL)
            goto fail;
        Py_DECREF(r);
    }
    Py_DECREF(t);
    return 0;
fail:
    Py_DECREF(t);
    return -1;
}

static PyObject *span_resource_bits(void *ctx, PyObject *values)
{
    SpanSort *c = ctx; /* the attribute checks the resource's own values pass (spans without the key inherit) */
    if (c->all_checks == NULL) {
        Py_INCREF(zero);
        return zero;
    }
    return PyObject_CallOneArg(c->resource_matches, values);
}

static PyObject *span_scope_key(PyObject *rhead, PyObject *shead)
{
    return PyTuple_Pack(3, rhead, shead, empty_str); /* spans without a tracestate; others get theirs per run */
}

static const Visit span_visit = {span_resource_bits, span_scope_key, sort_span_run};

PyDoc_STRVAR(sort_spans_doc,
"sort_spans(runs, buf, now, sampled, not_sampled, needs, checks, late_kept, passthrough, older, evicted)\n"
"-> (bytes added, late kept spans, late dropped spans): see _trace_py.sort_spans.");

static PyObject *sort_spans(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError, "sort_spans takes 11 arguments");
        return NULL;
    }
    SpanSort c;
    memset(&c, 0, sizeof(c));
    PyObject *needs = args[5], *checks = args[6];
    c.late_kept = args[7];
    c.passthrough = args[8];
    if (list_arg(c.late_kept, "late_kept") < 0 || list_arg(c.passthrough, "passthrough") < 0
        || unpack(needs, 3, "needs") < 0)
        return NULL;
    if ((c.need_status = PyObject_IsTrue(PyTuple_GET_ITEM(needs, 0))) < 0
        || (c.need_times = PyObject_IsTrue(PyTuple_GET_ITEM(needs, 1))) < 0
        || (c.need_rv = PyObject_IsTrue(PyTuple_GET_ITEM(needs, 2))) < 0)
        return NULL;
    if (checks != Py_None) {
        if (unpack(checks, 4, "checks") < 0)
            return NULL;
        c.all_checks = PyTuple_GET_ITEM(checks, 0);
        c.no_hits = PyTuple_GET_ITEM(checks, 1);
        c.resource_matches = PyTuple_GET_ITEM(checks, 2);
        c.matched = PyTuple_GET_ITEM(checks, 3);
    }
    int ok = 0;
    if (buf_open(&c.b, args, args[9], args[10]) == 0 && (c.roots = PyObject_GetAttr(args[1], s_roots)) != NULL) {
        PyObject *wait = PyObject_GetAttr(args[1], s_root_wait);
        if (wait != NULL) {
            c.root_deadline = PyNumber_Add(args[2], wait); /* now + buf.root_wait, as Python adds them */
            Py_DECREF(wait);
        }
        if (c.root_deadline != NULL)
            ok = sort_groups(args[0], &span_visit, &c) == 0;
    }
    Py_XDECREF(c.roots);
    Py_XDECREF(c.root_deadline);
    if (buf_close(&c.b, ok) < 0)
        return NULL;
    return Py_BuildValue("(nnn)", c.added, c.n_late_kept, c.late_dropped);
}

typedef struct {
    Buf b;
    PyObject *rng, *immediate;
    double fraction;
    Py_ssize_t added, n_immediate, late_kept, late_dropped, traceless_dropped;
} LogSort;

static int log_immediate(LogSort *c, PyObject *rhead, PyObject *shead, PyObject *blobs, Py_ssize_t k)
{
    c->n_immediate += k;
    return append3(c->immediate, rhead, shead, blobs);
}

/* One run (a LogRun) of a scope: the body of _trace_py.sort_logs's innermost loop. */
static int sort_log_run(void *ctx, PyObject *rhead, PyObject *shead, PyObject *key, PyObject **unused_keys,
                        PyObject *unused_bits, PyObject *run)
{
    LogSort *c = ctx;
    (void)unused_keys;
    (void)unused_bits;
    if (unpack(run, 4, "LogRun") < 0)
        return -1;
    PyObject *tid = PyTuple_GET_ITEM(run, 0), *blobs = PyTuple_GET_ITEM(run, 1), *nbytes = PyTuple_GET_ITEM(run, 2);
    Py_ssize_t k = PyObject_Length(blobs);
    int has_tid = PyObject_IsTrue(tid);
    if (k < 0 || has_tid < 0 || (PyLong_AsSsize_t(nbytes) == -1 && PyErr_Occurred()))
        return -1;
    if (!has_tid) { /* records without a trace: kept with probability traceless_fraction */
        if (c->fraction < 1.0) {
            PyObject *kept = PyList_New(0), *iter = kept ? PyObject_GetIter(blobs) : NULL, *b;
            if (iter == NULL) {
                Py_XDECREF(kept);
                return -1;
            }
            while ((b = PyIter_Next(iter)) != NULL) {
                PyObject *r = PyObject_CallNoArgs(c->rng);
                double x = r != NULL ? PyFloat_AsDouble(r) : -1.0;
                Py_XDECREF(r);
                if ((r == NULL || (x == -1.0 && PyErr_Occurred())) || (x < c->fraction && PyList_Append(kept, b) < 0)) {
                    Py_DECREF(b);
                    break;
                }
                Py_DECREF(b);
            }
            Py_DECREF(iter);
            if (PyErr_Occurred()) {
                Py_DECREF(kept);
                return -1;
            }
            Py_ssize_t n = PyList_GET_SIZE(kept);
            c->traceless_dropped += k - n;
            int rc = n ? log_immediate(c, rhead, shead, kept, n) : 0;
            Py_DECREF(kept);
            return rc;
        }
        return k ? log_immediate(c, rhead, shead, blobs, k) : 0;
    }
    int keep = PyObject_IsTrue(PyTuple_GET_ITEM(run, 3));
    if (keep < 0)
        return -1;
    if (keep) /* at or above the always-keep severity */
        return log_immediate(c, rhead, shead, blobs, k);
    TraceObject *t = buf_get(&c->b, tid);
    if (t == NULL) {
        if (PyErr_Occurred())
            return -1;
        int kept = PyDict_Contains(c->b.sampled, tid);
        if (kept < 0)
            return -1;
        if (kept) { /* late records of a kept trace follow its decision */
            PyObject *r = PyObject_CallMethodOneArg(c->b.sampled, s_move_to_end, tid);
            if (r == NULL)
                return -1;
            Py_DECREF(r);
            c->late_kept += k;
            return log_immediate(c, rhead, shead, blobs, k);
        }
        int dropped = PyDict_Contains(c->b.not_sampled, tid);
        if (dropped < 0)
            return -1;
        if (dropped) {
            c->late_dropped += k;
            return 0;
        }
        if ((t = buf_new_trace(&c->b, tid)) == NULL)
            return -1;
    } else if (t->segment > c->b.segment && PyList_Append(c->b.older, (PyObject *)t) < 0) {
        goto fail; /* its first records too may come from an older segment than its spans */
    }
    if (t->logs == NULL || t->logs == Py_None) { /* nbytes was checked before the trace was made (above) */
        c->added += first_group(t, &t->logs_key, &t->logs, &t->n_logs, key, blobs, k, PyLong_AsSsize_t(nbytes));
    } else {
        Py_ssize_t size = later_run(t, s_add_logs, key, blobs, nbytes);
        if (size == -1 && PyErr_Occurred())
            goto fail;
        c->added += size;
    }
    Py_DECREF(t);
    return 0;
fail:
    Py_DECREF(t);
    return -1;
}

static PyObject *log_scope_key(PyObject *rhead, PyObject *shead)
{
    return PyTuple_Pack(2, rhead, shead);
}

static const Visit log_visit = {NULL, log_scope_key, sort_log_run};

PyDoc_STRVAR(sort_logs_doc,
"sort_logs(runs, buf, now, sampled, not_sampled, traceless_fraction, rng, immediate, older, evicted)\n"
"-> (bytes added, immediate records, late kept, late dropped, traceless dropped): see _trace_py.sort_logs.");

static PyObject *sort_logs(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "sort_logs takes 10 arguments");
        return NULL;
    }
    LogSort c;
    memset(&c, 0, sizeof(c));
    c.rng = args[6];
    c.immediate = args[7];
    if (list_arg(c.immediate, "immediate") < 0)
        return NULL;
    c.fraction = PyFloat_AsDouble(args[5]);
    if (c.fraction == -1.0 && PyErr_Occurred())
        return NULL;
    int ok = 0;
    if (buf_open(&c.b, args, args[8], args[9]) == 0)
        ok = sort_groups(args[0], &log_visit, &c) == 0;
    if (buf_close(&c.b, ok) < 0)
        return NULL;
    return Py_BuildValue("(nnnnn)", c.added, c.n_immediate, c.late_kept, c.late_dropped, c.traceless_dropped);
}

/* --- deciding ------------------------------------------------------------------------------------------ */

/* the kinds of policies.Policy.plan() (PLAN_CALL ...): checked equal by the tests */
enum { PLAN_CALL, PLAN_ALWAYS, PLAN_STATUS, PLAN_LATENCY, PLAN_ATTRIBUTE, PLAN_PROBABILISTIC, PLAN_KINDS };

typedef struct {
    int kind;
    PyObject *name, *evaluate, *a, *b;     /* borrowed from the plan tuple */
    long mask;                             /* STATUS */
    unsigned long long lower, upper;       /* LATENCY (upper: b is None = no bound) */
    unsigned long long threshold;          /* PROBABILISTIC */
} Plan;

static int read_plans(PyObject *plans, Plan **out, Py_ssize_t *n)
{
    if (list_arg(plans, "plans") < 0)
        return -1;
    *n = PyList_GET_SIZE(plans);
    *out = PyMem_Calloc(*n ? (size_t)*n : 1, sizeof(Plan));
    if (*out == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < *n; i++) {
        PyObject *p = PyList_GET_ITEM(plans, i);
        Plan *q = &(*out)[i];
        if (unpack(p, 5, "plan") < 0)
            return -1;
        long kind = PyLong_AsLong(PyTuple_GET_ITEM(p, 0));
        if (kind == -1 && PyErr_Occurred())
            return -1;
        if (kind < 0 || kind >= PLAN_KINDS) {
            PyErr_Format(PyExc_ValueError, "decide: unknown plan kind %ld", kind);
            return -1;
        }
        q->kind = (int)kind;
        q->name = PyTuple_GET_ITEM(p, 1);
        q->evaluate = PyTuple_GET_ITEM(p, 2);
        q->a = PyTuple_GET_ITEM(p, 3);
        q->b = PyTuple_GET_ITEM(p, 4);
        if (q->kind == PLAN_STATUS && (q->mask = PyLong_AsLong(q->a)) == -1 && PyErr_Occurred())
            return -1;
        if (q->kind == PLAN_LATENCY) {
            if ((q->lower = PyLong_AsUnsignedLongLong(q->a)) == (unsigned long long)-1 && PyErr_Occurred())
                return -1;
            if (q->b != Py_None && (q->upper = PyLong_AsUnsignedLongLong(q->b)) == (unsigned long long)-1
                && PyErr_Occurred())
                return -1;
        }
        if (q->kind == PLAN_PROBABILISTIC
            && (q->threshold = PyLong_AsUnsignedLongLong(q->a)) == (unsigned long long)-1 && PyErr_Occurred())
            return -1;
    }
    return 0;
}

/* The threshold ``plan`` keeps ``t`` with (a new reference), Py_None (a new reference) when it does not keep it,
   or NULL on error: policies.py's evaluate of each kind, on the trace's fields. */
static PyObject *run_plan(Plan *q, TraceObject *t, PyObject *now)
{
    switch (q->kind) {
    case PLAN_ALWAYS:
        Py_INCREF(zero);
        return zero;
    case PLAN_STATUS:
        if (t->status_mask & q->mask) {
            Py_INCREF(zero);
            return zero;
        }
        Py_RETURN_NONE;
    case PLAN_LATENCY: {
        unsigned long long d = t->start && t->end > t->start ? t->end - t->start : 0; /* Trace.duration_ns */
        if (d >= q->lower && (q->b == Py_None || d <= q->upper) && t->n_spans) {
            Py_INCREF(zero);
            return zero;
        }
        Py_RETURN_NONE;
    }
    case PLAN_ATTRIBUTE: {
        PyObject *both = PyNumber_And(t->matched != NULL ? t->matched : zero, q->a);
        if (both == NULL)
            return NULL;
        int found = PyObject_IsTrue(both);
        Py_DECREF(both);
        int invert = PyObject_IsTrue(q->b);
        if (found < 0 || invert < 0)
            return NULL;
        if (found != invert) {
            Py_INCREF(zero);
            return zero;
        }
        Py_RETURN_NONE;
    }
    case PLAN_PROBABILISTIC: {
        unsigned long long r = 0; /* Trace.randomness: rv, else the trace id's rightmost 56 bits */
        if (t->rv != NULL && t->rv != Py_None) {
            r = PyLong_AsUnsignedLongLong(t->rv);
            if (r == (unsigned long long)-1 && PyErr_Occurred())
                return NULL;
        } else if (PyBytes_Check(t->trace_id) && PyBytes_GET_SIZE(t->trace_id) == 16) {
            const unsigned char *id = (const unsigned char *)PyBytes_AS_STRING(t->trace_id);
            for (int i = 9; i < 16; i++)
                r = r << 8 | id[i];
        } else {
            break; /* an id the receiver would not have let in: as Python computes it */
        }
        if (r >= q->threshold) {
            Py_INCREF(q->a);
            return q->a;
        }
        Py_RETURN_NONE;
    }
    default:
        break;
    }
    return PyObject_CallFunctionObjArgs(q->evaluate, (PyObject *)t, now, NULL);
}

static int append_pair(PyObject *list, PyObject *a, PyObject *b)
{
    PyObject *item = PyTuple_Pack(2, a, b);
    if (item == NULL)
        return -1;
    int rc = PyList_Append(list, item);
    Py_DECREF(item);
    return rc;
}

static int append4(PyObject *list, PyObject *a, PyObject *b, PyObject *c, PyObject *d)
{
    PyObject *item = PyTuple_Pack(4, a, b, c, d);
    if (item == NULL)
        return -1;
    int rc = PyList_Append(list, item);
    Py_DECREF(item);
    return rc;
}

/* One trace: drop policies veto, then the first keep policy that keeps decides. */
static int decide_one(TraceObject *t, Plan *drops, Py_ssize_t nd, Plan *keeps, Py_ssize_t nk, PyObject *now,
                      PyObject *labels, PyObject *out, PyObject *kept, PyObject *dropped)
{
    for (Py_ssize_t i = 0; i < nd; i++) {
        PyObject *r = run_plan(&drops[i], t, now);
        if (r == NULL)
            return -1;
        int hit = r != Py_None;
        Py_DECREF(r);
        if (hit) {
            if (append4(out, (PyObject *)t, PyTuple_GET_ITEM(labels, 0), drops[i].name, zero) < 0)
                return -1;
            return append_pair(dropped, t->trace_id, Py_True);
        }
    }
    for (Py_ssize_t i = 0; i < nk; i++) {
        PyObject *threshold = run_plan(&keeps[i], t, now);
        if (threshold == NULL)
            return -1;
        if (threshold != Py_None) {
            PyObject *decision = PyTuple_Pack(2, keeps[i].name, threshold);
            int rc = decision == NULL ? -1
                : append4(out, (PyObject *)t, PyTuple_GET_ITEM(labels, 1), keeps[i].name, threshold);
            if (rc == 0)
                rc = append_pair(kept, t->trace_id, decision);
            Py_XDECREF(decision);
            Py_DECREF(threshold);
            return rc;
        }
        Py_DECREF(threshold);
    }
    if (append4(out, (PyObject *)t, PyTuple_GET_ITEM(labels, 2), PyTuple_GET_ITEM(labels, 3), zero) < 0)
        return -1;
    return append_pair(dropped, t->trace_id, Py_True);
}

PyDoc_STRVAR(decide_doc,
"decide(traces, drops, keeps, now, labels) -> (decisions, kept, dropped): see _trace_py.decide.");

static PyObject *decide(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "decide takes 5 arguments");
        return NULL;
    }
    PyObject *traces = args[0], *now = args[3], *labels = args[4];
    if (list_arg(traces, "traces") < 0 || unpack(labels, 4, "labels") < 0)
        return NULL;
    Plan *drops = NULL, *keeps = NULL;
    Py_ssize_t nd = 0, nk = 0;
    PyObject *out = NULL, *kept = NULL, *dropped = NULL, *result = NULL;
    if (read_plans(args[1], &drops, &nd) < 0 || read_plans(args[2], &keeps, &nk) < 0)
        goto done;
    if ((out = PyList_New(0)) == NULL || (kept = PyList_New(0)) == NULL || (dropped = PyList_New(0)) == NULL)
        goto done;
    Py_INCREF(traces);
    int rc = 0;
    for (Py_ssize_t i = 0; rc == 0 && i < PyList_GET_SIZE(traces); i++) {
        PyObject *t = PyList_GET_ITEM(traces, i);
        if (!PyObject_TypeCheck(t, &TraceBaseType)) {
            PyErr_SetString(PyExc_TypeError, "decide: a trace must be a TraceBase");
            rc = -1;
            break;
        }
        Py_INCREF(t);
        rc = decide_one((TraceObject *)t, drops, nd, keeps, nk, now, labels, out, kept, dropped);
        Py_DECREF(t);
    }
    Py_DECREF(traces);
    if (rc == 0)
        result = PyTuple_Pack(3, out, kept, dropped);
done:
    PyMem_Free(drops);
    PyMem_Free(keeps);
    Py_XDECREF(out);
    Py_XDECREF(kept);
    Py_XDECREF(dropped);
    return result;
}

static PyMethodDef methods[] = {
    {"sort_spans", (PyCFunction)(void (*)(void))sort_spans, METH_FASTCALL, sort_spans_doc},
    {"sort_logs", (PyCFunction)(void (*)(void))sort_logs, METH_FASTCALL, sort_logs_doc},
    {"decide", (PyCFunction)(void (*)(void))decide, METH_FASTCALL, decide_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_trace", "Tail sampling's buffered trace as a C object, and the sort of a request into "
    "the buffer (see the top of _trace.c).", -1, methods, NULL, NULL, NULL, NULL,
};

static int intern_names(void)
{
#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return -1
    INTERN(s_traces, "traces");
    INTERN(s_create, "create");
    INTERN(s_note_created, "note_created");
    INTERN(s_trace_type, "trace_type");
    INTERN(s_num_traces, "num_traces");
    INTERN(s_segment, "segment");
    INTERN(s_roots, "roots");
    INTERN(s_root_wait, "root_wait");
    INTERN(s_move_to_end, "move_to_end");
    INTERN(s_add_spans, "add_spans");
    INTERN(s_add_logs, "add_logs");
    INTERN(s_note_tracestate, "note_tracestate");
    INTERN(s_append, "append");
    INTERN(s_rv, "rv:");
    INTERN(empty_str, "");
#undef INTERN
    return 0;
}

PyMODINIT_FUNC
PyInit__trace(void)
{
    if (PyType_Ready(&TraceBaseType) < 0)
        return NULL;
    zero = PyLong_FromLong(0);
    if (zero == NULL || intern_names() < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&TraceBaseType);
    if (PyModule_AddObject(m, "TraceBase", (PyObject *)&TraceBaseType) < 0
        || PyModule_AddIntConstant(m, "TRACE_OVERHEAD", TRACE_OVERHEAD) < 0
        || PyModule_AddIntConstant(m, "ITEM_OVERHEAD", ITEM_OVERHEAD) < 0
        || PyModule_AddIntConstant(m, "PLAN_KINDS", PLAN_KINDS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
