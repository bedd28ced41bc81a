/*
 * sidecar._wire: one C pass over an encoded OTLP Export{Trace,Logs}ServiceRequest that returns
 * the few facts per span / log record the span_metrics and tail_sampling hot loops need, so
 * Python does only dict work instead of ~100 ns per protobuf field read.
 *
 * Input is what upb's SerializeToString() produced, but it is parsed defensively: every read
 * is bounds-checked and a bad varint, length or wire type raises ValueError (invalid UTF-8 in
 * a string raises UnicodeDecodeError, a ValueError). Fields with an unexpected wire type are
 * skipped as unknown fields, as protobuf parsers do. No global state; the GIL is held throughout.
 *
 * Field numbers (opentelemetry-proto):
 *   Export*ServiceRequest: 1 Resource{Spans,Logs}
 *   Resource{Spans,Logs}:  1 resource, 2 Scope{Spans,Logs}, 3 schema_url
 *   Scope{Spans,Logs}:     1 scope, 2 spans / log_records, 3 schema_url
 *   Span: 1 trace_id, 2 span_id, 3 trace_state, 4 parent_span_id, 5 name, 6 kind, 7 start (fixed64),
 *         8 end (fixed64), 9 attributes, 15 status (3 code), 16 flags (fixed32)
 *   LogRecord: 2 severity_number, 9 trace_id
 *   KeyValue: 1 key, 2 value;  AnyValue: 1 string, 2 bool, 3 int, 4 double, 5 array, 6 kvlist, 7 bytes
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Most attribute keys one call can look for (span_metrics dimensions + 3, tail_sampling checks). */
#define MAX_KEYS 64

enum { WT_VARINT = 0, WT_I64 = 1, WT_LEN = 2, WT_I32 = 5 };

typedef struct {
    const uint8_t *p;
    const uint8_t *end;
} Reader;

typedef struct {
    const uint8_t *p;
    Py_ssize_t n;
} Slice;

static int bad(const char *what)
{
    PyErr_Format(PyExc_ValueError, "malformed protobuf: %s", what);
    return -1;
}

static Reader reader_of(Slice s)
{
    Reader r = {s.p, s.p + s.n};
    return r;
}

static inline int rd_varint(Reader *r, uint64_t *out)
{
    if (r->p < r->end && *r->p < 0x80) { /* the common case: tags, small lengths, enums */
        *out = *r->p++;
        return 0;
    }
    uint64_t v = 0;
    for (int shift = 0; shift < 70; shift += 7) {
        if (r->p >= r->end)
            return bad("truncated varint");
        uint8_t b = *r->p++;
        v |= (uint64_t)(b & 0x7F) << (shift < 64 ? shift : 63);
        if (!(b & 0x80)) {
            *out = v;
            return 0;
        }
    }
    return bad("varint longer than 10 bytes");
}

static inline int rd_fixed(Reader *r, int nbytes, uint64_t *out)
{
    if (r->end - r->p < nbytes)
        return bad("truncated fixed-width field");
    uint64_t v = 0;
    for (int i = nbytes - 1; i >= 0; i--)
        v = (v << 8) | r->p[i]; /* little-endian on the wire */
    r->p += nbytes;
    *out = v;
    return 0;
}

/* One field: its number, wire type and value (a number, or the payload of a length-delimited field). */
static inline int rd_field(Reader *r, uint32_t *field, int *wt, uint64_t *num, Slice *s)
{
    uint64_t tag, n;
    if (rd_varint(r, &tag) < 0)
        return -1;
    if ((tag >> 3) == 0 || (tag >> 3) > 0x1FFFFFFF)
        return bad("invalid field number");
    *field = (uint32_t)(tag >> 3);
    *wt = (int)(tag & 7);
    switch (*wt) {
    case WT_VARINT:
        return rd_varint(r, num);
    case WT_I64:
        return rd_fixed(r, 8, num);
    case WT_I32:
        return rd_fixed(r, 4, num);
    case WT_LEN:
        if (rd_varint(r, &n) < 0)
            return -1;
        if (n > (uint64_t)(r->end - r->p))
            return bad("length past the end of the buffer");
        s->p = r->p;
        s->n = (Py_ssize_t)n;
        r->p += n;
        return 0;
    default: /* groups (3, 4) never occur in OTLP; 6 and 7 are invalid */
        return bad("unsupported wire type");
    }
}

static PyObject *bytes_of(Slice s) { return PyBytes_FromStringAndSize((const char *)s.p, s.n); }

static PyObject *str_of(Slice s) { return PyUnicode_DecodeUTF8((const char *)s.p, s.n, "strict"); }

static int slice_eq(Slice a, Slice b) { return a.n == b.n && (a.n == 0 || memcmp(a.p, b.p, (size_t)a.n) == 0); }

/* --- heads -------------------------------------------------------------------------------------- */

/* A Resource{Spans,Logs} or Scope{Spans,Logs} without its children: its fields 1 and 3 as encoded, with
 * an empty field 1 in front when absent. That is exactly what the Python fallback's
 * ``ResourceSpans(resource=rs.resource, schema_url=rs.schema_url).SerializeToString()`` gives. */
static PyObject *head_of(Slice msg)
{
    Reader r = reader_of(msg);
    Py_ssize_t size = 0;
    int has_first = 0;
    uint32_t f;
    int wt;
    uint64_t num;
    Slice s;
    while (r.p < r.end) {
        const uint8_t *at = r.p;
        if (rd_field(&r, &f, &wt, &num, &s) < 0)
            return NULL;
        if ((f == 1 || f == 3) && wt == WT_LEN) {
            size += r.p - at;
            has_first |= f == 1;
        }
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, size + (has_first ? 0 : 2));
    if (out == NULL)
        return NULL;
    char *w = PyBytes_AS_STRING(out);
    if (!has_first) {
        *w++ = 0x0a;
        *w++ = 0x00;
    }
    r = reader_of(msg);
    while (r.p < r.end) { /* cannot fail: the first pass read the same bytes */
        const uint8_t *at = r.p;
        rd_field(&r, &f, &wt, &num, &s);
        if ((f == 1 || f == 3) && wt == WT_LEN) {
            memcpy(w, at, (size_t)(r.p - at));
            w += r.p - at;
        }
    }
    return out;
}

/* --- spans -------------------------------------------------------------------------------------- */

typedef struct {
    Slice whole, trace_id, span_id, trace_state, name;
    int has_parent;
    uint32_t flags;
    long kind, status;
    uint64_t start, end;
    /* per wanted key: whether the span has it, and the encoded AnyValue of its first occurrence */
    char found[MAX_KEYS];
    Slice vals[MAX_KEYS];
} SpanFacts;

typedef struct {
    Slice keys[MAX_KEYS];
    int nkeys;
} Keys;

/* Keys from a tuple of bytes (borrowed pointers: the caller's tuple keeps them alive). */
static int keys_of(PyObject *tuple, Keys *k)
{
    Py_ssize_t n = PyTuple_GET_SIZE(tuple);
    if (n > MAX_KEYS) {
        PyErr_Format(PyExc_ValueError, "at most %d attribute keys", MAX_KEYS);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *b = PyTuple_GET_ITEM(tuple, i);
        if (!PyBytes_Check(b)) {
            PyErr_SetString(PyExc_TypeError, "attribute keys must be bytes");
            return -1;
        }
        k->keys[i].p = (const uint8_t *)PyBytes_AS_STRING(b);
        k->keys[i].n = PyBytes_GET_SIZE(b);
    }
    k->nkeys = (int)n;
    return 0;
}

static int parse_attribute(Slice kv, const Keys *k, SpanFacts *sp)
{
    Reader r = reader_of(kv);
    Slice key = {NULL, 0}, val = {NULL, 0}, s;
    uint32_t f;
    int wt;
    uint64_t num;
    int j = -1;
    while (r.p < r.end) {
        if (rd_field(&r, &f, &wt, &num, &s) < 0)
            return -1;
        if (wt == WT_LEN && f == 1) {
            key = s;
            for (j = 0; j < k->nkeys && !(!sp->found[j] && slice_eq(key, k->keys[j])); j++)
                ;
            if (j == k->nkeys)
                return 0; /* not a wanted key (or seen already): its value does not matter */
        } else if (wt == WT_LEN && f == 2) {
            val = s;
        }
    }
    if (j >= 0) {
        sp->found[j] = 1;
        sp->vals[j] = val;
    }
    return 0;
}

static int parse_status(Slice st, long *code)
{
    Reader r = reader_of(st);
    Slice s;
    uint32_t f;
    int wt;
    uint64_t num;
    while (r.p < r.end) {
        if (rd_field(&r, &f, &wt, &num, &s) < 0)
            return -1;
        if (f == 3 && wt == WT_VARINT)
            *code = (long)(int32_t)num; /* an enum is an int32 */
    }
    return 0;
}

static int parse_span(Slice msg, const Keys *k, SpanFacts *sp)
{
    Reader r = reader_of(msg);
    Slice s, none = {NULL, 0};
    uint32_t f;
    int wt;
    uint64_t num;
    sp->whole = msg;
    sp->trace_id = sp->span_id = sp->trace_state = sp->name = none;
    sp->has_parent = 0;
    sp->flags = 0;
    sp->kind = sp->status = 0;
    sp->start = sp->end = 0;
    memset(sp->found, 0, (size_t)k->nkeys);
    while (r.p < r.end) {
        if (rd_field(&r, &f, &wt, &num, &s) < 0)
            return -1;
        if (wt == WT_LEN) {
            switch (f) {
            case 1: sp->trace_id = s; break;
            case 2: sp->span_id = s; break;
            case 3: sp->trace_state = s; break;
            case 4: sp->has_parent = s.n > 0; break;
            case 5: sp->name = s; break;
            case 9:
                if (k->nkeys && parse_attribute(s, k, sp) < 0)
                    return -1;
                break;
            case 15:
                if (parse_status(s, &sp->status) < 0)
                    return -1;
                break;
            }
        } else if (f == 6 && wt == WT_VARINT) {
            sp->kind = (long)(int32_t)num;
        } else if (f == 7 && wt == WT_I64) {
            sp->start = num;
        } else if (f == 8 && wt == WT_I64) {
            sp->end = num;
        } else if (f == 16 && wt == WT_I32) {
            sp->flags = (uint32_t)num;
        }
    }
    return 0;
}

/* Calls ``on_span(ctx, resource_index, facts)`` for every span of an encoded ExportTraceServiceRequest,
 * and ``on_scope``/``on_resource`` (may be NULL) as each scope / resource starts. */
typedef struct {
    int (*on_resource)(void *ctx, Py_ssize_t index, Slice rs);
    int (*on_scope)(void *ctx, Slice ss);
    int (*on_item)(void *ctx, Slice item);
} Walk;

static int walk_request(Slice req, const Walk *w, void *ctx)
{
    Reader rr = reader_of(req);
    Slice rs, ss, item;
    uint32_t f;
    int wt;
    uint64_t num;
    Py_ssize_t index = 0;
    while (rr.p < rr.end) {
        if (rd_field(&rr, &f, &wt, &num, &rs) < 0)
            return -1;
        if (f != 1 || wt != WT_LEN)
            continue;
        if (w->on_resource(ctx, index++, rs) < 0)
            return -1;
        Reader r = reader_of(rs);
        while (r.p < r.end) {
            if (rd_field(&r, &f, &wt, &num, &ss) < 0)
                return -1;
            if (f != 2 || wt != WT_LEN)
                continue;
            if (w->on_scope(ctx, ss) < 0)
                return -1;
            Reader sr = reader_of(ss);
            while (sr.p < sr.end) {
                if (rd_field(&sr, &f, &wt, &num, &item) < 0)
                    return -1;
                if (f == 2 && wt == WT_LEN && w->on_item(ctx, item) < 0)
                    return -1;
            }
        }
    }
    return 0;
}

/* --- span_metrics ------------------------------------------------------------------------------- */

/* An attribute value as a label string: strings as they are, bools "true"/"false", ints and doubles
 * as Python's str() writes them, anything else (or no value) "". */
static PyObject *label_of(Slice any)
{
    Reader r = reader_of(any);
    Slice s, str = {NULL, 0};
    uint32_t f, kind = 0;
    int wt;
    uint64_t num, val = 0;
    while (r.p < r.end) {
        if (rd_field(&r, &f, &wt, &num, &s) < 0)
            return NULL;
        int ok = ((f == 1 || f == 5 || f == 6 || f == 7) && wt == WT_LEN) || ((f == 2 || f == 3) && wt == WT_VARINT) ||
                 (f == 4 && wt == WT_I64);
        if (!ok)
            continue;
        kind = f; /* a oneof: the last member on the wire wins */
        if (wt == WT_LEN)
            str = s;
        else
            val = num;
    }
    switch (kind) {
    case 1:
        return str_of(str);
    case 2:
        return PyUnicode_FromString(val ? "true" : "false");
    case 3:
        return PyUnicode_FromFormat("%lld", (long long)(int64_t)val);
    case 4: {
        double d;
        memcpy(&d, &val, sizeof d);
        PyObject *x = PyFloat_FromDouble(d);
        if (x == NULL)
            return NULL;
        PyObject *out = PyObject_Str(x);
        Py_DECREF(x);
        return out;
    }
    default:
        return PyUnicode_FromStringAndSize("", 0);
    }
}

typedef struct {
    Keys k;
    PyObject *bases; /* list of tuples (service, base value per key) */
    PyObject *base;  /* borrowed: the current resource's */
    PyObject *rows;
    SpanFacts sp;
} MetricsCtx;

static int metrics_resource(void *vctx, Py_ssize_t index, Slice rs)
{
    MetricsCtx *c = vctx;
    (void)rs;
    if (index >= PyList_GET_SIZE(c->bases)) {
        PyErr_SetString(PyExc_ValueError, "fewer bases than resources");
        return -1;
    }
    c->base = PyList_GET_ITEM(c->bases, index);
    if (!PyTuple_Check(c->base) || PyTuple_GET_SIZE(c->base) != c->k.nkeys + 1) {
        PyErr_SetString(PyExc_TypeError, "each base must be a tuple (service, one value per key)");
        return -1;
    }
    return 0;
}

static int metrics_scope(void *ctx, Slice ss)
{
    (void)ctx;
    (void)ss;
    return 0;
}

static int metrics_span(void *vctx, Slice item)
{
    MetricsCtx *c = vctx;
    SpanFacts *sp = &c->sp;
    int n = c->k.nkeys;
    if (parse_span(item, &c->k, sp) < 0)
        return -1;
    PyObject *key = PyTuple_New(4 + n);
    if (key == NULL)
        return -1;
    PyObject *service = PyTuple_GET_ITEM(c->base, 0);
    Py_INCREF(service);
    PyTuple_SET_ITEM(key, 0, service);
    PyObject *x;
    if ((x = str_of(sp->name)) == NULL)
        goto fail;
    PyTuple_SET_ITEM(key, 1, x);
    if ((x = PyLong_FromLong(sp->kind)) == NULL)
        goto fail;
    PyTuple_SET_ITEM(key, 2, x);
    if ((x = PyLong_FromLong(sp->status)) == NULL)
        goto fail;
    PyTuple_SET_ITEM(key, 3, x);
    for (int j = 0; j < n; j++) {
        if (sp->found[j]) {
            if ((x = label_of(sp->vals[j])) == NULL)
                goto fail;
        } else {
            x = PyTuple_GET_ITEM(c->base, j + 1);
            Py_INCREF(x);
        }
        PyTuple_SET_ITEM(key, 4 + j, x);
    }
    uint64_t d = sp->end > sp->start ? sp->end - sp->start : 0;
    PyObject *row = Py_BuildValue("(NKKlNN)", key, (unsigned long long)d, (unsigned long long)sp->end, sp->status,
                                  bytes_of(sp->trace_id), bytes_of(sp->span_id));
    if (row == NULL) /* Py_BuildValue released key and the bytes already */
        return -1;
    int rc = PyList_Append(c->rows, row);
    Py_DECREF(row);
    return rc;
fail:
    Py_DECREF(key);
    return -1;
}

PyDoc_STRVAR(span_metric_rows_doc,
"span_metric_rows(request: bytes, keys: tuple[bytes, ...], bases: list[tuple]) -> list[tuple]\n\n"
"One row per span of an encoded ExportTraceServiceRequest:\n"
"(key, duration_ns, end_ns, status_code, trace_id, span_id), where key is\n"
"(service, name, kind, status_code, value per key...). A value is the span attribute's label\n"
"string, else the resource's: bases[i] = (service, value per key...) for the i-th resource.");

static PyObject *span_metric_rows(PyObject *self, PyObject *args)
{
    const char *data;
    Py_ssize_t len;
    PyObject *keys, *bases;
    (void)self;
    if (!PyArg_ParseTuple(args, "y#O!O!", &data, &len, &PyTuple_Type, &keys, &PyList_Type, &bases))
        return NULL;
    MetricsCtx c;
    if (keys_of(keys, &c.k) < 0)
        return NULL;
    c.bases = bases;
    c.base = NULL;
    if ((c.rows = PyList_New(0)) == NULL)
        return NULL;
    Walk w = {metrics_resource, metrics_scope, metrics_span};
    Slice req = {(const uint8_t *)data, len};
    if (walk_request(req, &w, &c) < 0) {
        Py_DECREF(c.rows);
        return NULL;
    }
    return c.rows;
}

/* --- tail_sampling: runs of spans / log records of one trace ------------------------------------- */

/* Builds the [(resource head, [(scope head, [run, ...]), ...]), ...] nesting both run scanners return. */
typedef struct {
    PyObject *out;    /* the result */
    PyObject *scopes; /* borrowed: the current resource's scope list */
    PyObject *runs;   /* borrowed: the current scope's run list */
} Nest;

static int nest_resource(Nest *n, Slice rs)
{
    PyObject *head = head_of(rs);
    if (head == NULL)
        return -1;
    PyObject *scopes = PyList_New(0);
    if (scopes == NULL) {
        Py_DECREF(head);
        return -1;
    }
    PyObject *pair = Py_BuildValue("(NN)", head, scopes);
    if (pair == NULL)
        return -1;
    int rc = PyList_Append(n->out, pair);
    Py_DECREF(pair);
    n->scopes = scopes; /* kept alive by n->out */
    n->runs = NULL;
    return rc;
}

static int nest_scope(Nest *n, Slice ss)
{
    PyObject *head = head_of(ss);
    if (head == NULL)
        return -1;
    PyObject *runs = PyList_New(0);
    if (runs == NULL) {
        Py_DECREF(head);
        return -1;
    }
    PyObject *pair = Py_BuildValue("(NN)", head, runs);
    if (pair == NULL)
        return -1;
    int rc = PyList_Append(n->scopes, pair);
    Py_DECREF(pair);
    n->runs = runs;
    return rc;
}

/* The run being built: consecutive spans with one trace id and one tracestate. */
typedef struct {
    Nest nest;
    Keys k;
    SpanFacts sp;
    int open;
    Slice trace_id, trace_state;
    PyObject *blobs; /* owned while open */
    Py_ssize_t nbytes;
    uint64_t status_mask, start, end;
    int root;
    PyObject *hits[MAX_KEYS]; /* owned while open: NULL, or [any span lacked the key, value bytes...] */
    char absent[MAX_KEYS];
} SpanRunCtx;

static void span_run_clear(SpanRunCtx *c)
{
    Py_CLEAR(c->blobs);
    for (int j = 0; j < c->k.nkeys; j++)
        Py_CLEAR(c->hits[j]);
    c->open = 0;
}

/* Appends the open run to the current scope's list as
 * (trace_id, trace_state, blobs, nbytes, status_mask, start, end, has_root, hits). */
static int span_run_close(SpanRunCtx *c)
{
    if (!c->open)
        return 0;
    int n = c->k.nkeys;
    PyObject *hits = PyTuple_New(n);
    if (hits == NULL)
        return -1;
    for (int j = 0; j < n; j++) {
        PyObject *h = c->hits[j];
        if (h == NULL) {
            h = Py_None;
            Py_INCREF(h);
        } else {
            PyObject *flag = c->absent[j] ? Py_True : Py_False;
            PyObject *placeholder = PyList_GET_ITEM(h, 0);
            Py_INCREF(flag);
            PyList_SET_ITEM(h, 0, flag);
            Py_DECREF(placeholder);
            c->hits[j] = NULL;
        }
        PyTuple_SET_ITEM(hits, j, h);
    }
    PyObject *blobs = c->blobs;
    c->blobs = NULL;
    c->open = 0;
    PyObject *run = Py_BuildValue("(NNNnKKKON)", bytes_of(c->trace_id), str_of(c->trace_state), blobs, c->nbytes,
                                  (unsigned long long)c->status_mask, (unsigned long long)c->start,
                                  (unsigned long long)c->end, c->root ? Py_True : Py_False, hits);
    if (run == NULL)
        return -1;
    int rc = PyList_Append(c->nest.runs, run);
    Py_DECREF(run);
    return rc;
}

static int span_run_resource(void *vctx, Py_ssize_t index, Slice rs)
{
    SpanRunCtx *c = vctx;
    (void)index;
    if (span_run_close(c) < 0)
        return -1;
    return nest_resource(&c->nest, rs);
}

static int span_run_scope(void *vctx, Slice ss)
{
    SpanRunCtx *c = vctx;
    if (span_run_close(c) < 0)
        return -1;
    return nest_scope(&c->nest, ss);
}

static int span_run_item(void *vctx, Slice item)
{
    SpanRunCtx *c = vctx;
    SpanFacts *sp = &c->sp;
    int n = c->k.nkeys;
    if (parse_span(item, &c->k, sp) < 0)
        return -1;
    if (c->open && !(slice_eq(sp->trace_id, c->trace_id) && slice_eq(sp->trace_state, c->trace_state)))
        if (span_run_close(c) < 0)
            return -1;
    if (!c->open) {
        if ((c->blobs = PyList_New(0)) == NULL)
            return -1;
        c->open = 1;
        c->trace_id = sp->trace_id;
        c->trace_state = sp->trace_state;
        c->nbytes = 0;
        c->status_mask = c->start = c->end = 0;
        c->root = 0;
        memset(c->absent, 0, (size_t)n);
    }
    PyObject *blob = bytes_of(item);
    if (blob == NULL)
        return -1;
    int rc = PyList_Append(c->blobs, blob);
    Py_DECREF(blob);
    if (rc < 0)
        return -1;
    c->nbytes += item.n;
    if (sp->status >= 0 && sp->status < 64)
        c->status_mask |= (uint64_t)1 << sp->status;
    if (sp->start && (!c->start || sp->start < c->start))
        c->start = sp->start;
    if (sp->end > c->end)
        c->end = sp->end;
    if (!sp->has_parent || (sp->flags & 0x300) == 0x300) /* local root, or its parent is remote */
        c->root = 1;
    for (int j = 0; j < n; j++) {
        if (!sp->found[j]) {
            c->absent[j] = 1;
            continue;
        }
        PyObject *h = c->hits[j];
        if (h == NULL) {
            if ((h = c->hits[j] = PyList_New(1)) == NULL)
                return -1;
            Py_INCREF(Py_None);
            PyList_SET_ITEM(h, 0, Py_None); /* replaced by the absent flag on close */
        } else {
            PyObject *last = PyList_GET_ITEM(h, PyList_GET_SIZE(h) - 1);
            if (PyBytes_Check(last) && PyBytes_GET_SIZE(last) == sp->vals[j].n &&
                (sp->vals[j].n == 0 || memcmp(PyBytes_AS_STRING(last), sp->vals[j].p, (size_t)sp->vals[j].n) == 0))
                continue; /* the same value as the previous span's */
        }
        PyObject *v = bytes_of(sp->vals[j]);
        if (v == NULL)
            return -1;
        rc = PyList_Append(h, v);
        Py_DECREF(v);
        if (rc < 0)
            return -1;
    }
    return 0;
}

PyDoc_STRVAR(span_runs_doc,
"span_runs(request: bytes, keys: tuple[bytes, ...]) -> list\n\n"
"The spans of an encoded ExportTraceServiceRequest as runs of consecutive spans with the same trace id and\n"
"tracestate: [(resource head, [(scope head, [run, ...]), ...]), ...], a head being the encoding of the\n"
"Resource/ScopeSpans without its children. A run is (trace_id, trace_state, [span bytes...], total bytes,\n"
"status mask (bit 1 << code), earliest non-zero start, latest end, has a root (no parent, or a remote\n"
"one), hits): hits[j] is None when no span has keys[j], else [some span lacks it, encoded AnyValue of\n"
"each span's first occurrence (repeats of the previous value left out)...].");

static PyObject *span_runs(PyObject *self, PyObject *args)
{
    const char *data;
    Py_ssize_t len;
    PyObject *keys;
    (void)self;
    if (!PyArg_ParseTuple(args, "y#O!", &data, &len, &PyTuple_Type, &keys))
        return NULL;
    SpanRunCtx c;
    if (keys_of(keys, &c.k) < 0)
        return NULL;
    c.open = 0;
    c.blobs = NULL;
    for (int j = 0; j < c.k.nkeys; j++)
        c.hits[j] = NULL;
    c.nest.scopes = c.nest.runs = NULL;
    if ((c.nest.out = PyList_New(0)) == NULL)
        return NULL;
    Walk w = {span_run_resource, span_run_scope, span_run_item};
    Slice req = {(const uint8_t *)data, len};
    if (walk_request(req, &w, &c) < 0 || span_run_close(&c) < 0) {
        span_run_clear(&c);
        Py_DECREF(c.nest.out);
        return NULL;
    }
    return c.nest.out;
}

/* Log records: runs of consecutive records with one trace id and the same side of keep_severity. */
typedef struct {
    Nest nest;
    long long keep_severity;
    int open;
    Slice trace_id;
    int immediate;
    PyObject *blobs; /* owned while open */
    Py_ssize_t nbytes;
} LogRunCtx;

static int log_run_close(LogRunCtx *c)
{
    if (!c->open)
        return 0;
    PyObject *blobs = c->blobs;
    c->blobs = NULL;
    c->open = 0;
    PyObject *run = Py_BuildValue("(NNnO)", bytes_of(c->trace_id), blobs, c->nbytes,
                                  c->immediate ? Py_True : Py_False);
    if (run == NULL)
        return -1;
    int rc = PyList_Append(c->nest.runs, run);
    Py_DECREF(run);
    return rc;
}

static int log_run_resource(void *vctx, Py_ssize_t index, Slice rl)
{
    LogRunCtx *c = vctx;
    (void)index;
    if (log_run_close(c) < 0)
        return -1;
    return nest_resource(&c->nest, rl);
}

static int log_run_scope(void *vctx, Slice sl)
{
    LogRunCtx *c = vctx;
    if (log_run_close(c) < 0)
        return -1;
    return nest_scope(&c->nest, sl);
}

static int log_run_item(void *vctx, Slice item)
{
    LogRunCtx *c = vctx;
    Reader r = reader_of(item);
    Slice s, trace_id = {NULL, 0};
    uint32_t f;
    int wt;
    uint64_t num;
    long severity = 0;
    while (r.p < r.end) {
        if (rd_field(&r, &f, &wt, &num, &s) < 0)
            return -1;
        if (f == 9 && wt == WT_LEN)
            trace_id = s;
        else if (f == 2 && wt == WT_VARINT)
            severity = (long)(int32_t)num;
    }
    int immediate = severity >= c->keep_severity;
    if (c->open && !(slice_eq(trace_id, c->trace_id) && immediate == c->immediate))
        if (log_run_close(c) < 0)
            return -1;
    if (!c->open) {
        if ((c->blobs = PyList_New(0)) == NULL)
            return -1;
        c->open = 1;
        c->trace_id = trace_id;
        c->immediate = immediate;
        c->nbytes = 0;
    }
    PyObject *blob = bytes_of(item);
    if (blob == NULL)
        return -1;
    int rc = PyList_Append(c->blobs, blob);
    Py_DECREF(blob);
    c->nbytes += item.n;
    return rc;
}

PyDoc_STRVAR(log_runs_doc,
"log_runs(request: bytes, keep_severity: int) -> list\n\n"
"The log records of an encoded ExportLogsServiceRequest as runs of consecutive records with the same\n"
"trace id and the same answer to severity_number >= keep_severity, nested like span_runs():\n"
"[(resource head, [(scope head, [(trace_id, [record bytes...], total bytes, at/above keep_severity), ...])])].");

static PyObject *log_runs(PyObject *self, PyObject *args)
{
    const char *data;
    Py_ssize_t len;
    LogRunCtx c;
    (void)self;
    if (!PyArg_ParseTuple(args, "y#L", &data, &len, &c.keep_severity))
        return NULL;
    c.open = 0;
    c.blobs = NULL;
    c.nest.scopes = c.nest.runs = NULL;
    if ((c.nest.out = PyList_New(0)) == NULL)
        return NULL;
    Walk w = {log_run_resource, log_run_scope, log_run_item};
    Slice req = {(const uint8_t *)data, len};
    if (walk_request(req, &w, &c) < 0 || log_run_close(&c) < 0) {
        Py_CLEAR(c.blobs);
        Py_DECREF(c.nest.out);
        return NULL;
    }
    return c.nest.out;
}

/* --- id lengths (the receiver's check) --------------------------------------------------------------- */

typedef struct {
    int logs;           /* 0: spans, 1: log records */
    Py_ssize_t items;
    int bad_id;
} IdCheckCtx;

static int idcheck_resource(void *ctx, Py_ssize_t index, Slice rs) { (void)ctx; (void)index; (void)rs; return 0; }
static int idcheck_scope(void *ctx, Slice ss) { (void)ctx; (void)ss; return 0; }

/* Spans need a 16-byte trace id and an 8-byte span id, and a parent id that is empty or 8 bytes;
 * log records need each id empty or full length. As in a parsed message, the last occurrence of a
 * field wins and an occurrence with another wire type is an unknown field. */
static int idcheck_item(void *vctx, Slice item)
{
    IdCheckCtx *c = vctx;
    c->items++;
    if (c->bad_id)
        return 0;
    uint32_t trace_f = c->logs ? 9 : 1, span_f = c->logs ? 10 : 2;
    Py_ssize_t trace_n = 0, span_n = 0, parent_n = 0;
    Reader r = reader_of(item);
    uint32_t f;
    int wt;
    uint64_t num;
    Slice s;
    while (r.p < r.end) {
        if (rd_field(&r, &f, &wt, &num, &s) < 0)
            return -1;
        if (wt != WT_LEN)
            continue;
        if (f == trace_f)
            trace_n = s.n;
        else if (f == span_f)
            span_n = s.n;
        else if (!c->logs && f == 4)
            parent_n = s.n;
    }
    if (c->logs)
        c->bad_id = (trace_n != 0 && trace_n != 16) || (span_n != 0 && span_n != 8);
    else
        c->bad_id = trace_n != 16 || span_n != 8 || (parent_n != 0 && parent_n != 8);
    return 0;
}

PyDoc_STRVAR(check_ids_doc,
"check_ids(request: bytes, logs: bool) -> int\n\n"
"Spans (or log records) in an encoded Export{Trace,Logs}ServiceRequest, or -1 when one has an id of\n"
"the wrong length (the receiver then describes it from the parsed message).");

static PyObject *check_ids(PyObject *self, PyObject *args)
{
    (void)self;
    const char *data;
    Py_ssize_t len;
    int logs;
    if (!PyArg_ParseTuple(args, "y#p", &data, &len, &logs))
        return NULL;
    IdCheckCtx c = {logs, 0, 0};
    Walk w = {idcheck_resource, idcheck_scope, idcheck_item};
    Slice req = {(const uint8_t *)data, len};
    if (walk_request(req, &w, &c) < 0)
        return NULL;
    return PyLong_FromSsize_t(c.bad_id ? -1 : c.items);
}

static PyMethodDef methods[] = {
    {"check_ids", check_ids, METH_VARARGS, check_ids_doc},
    {"span_metric_rows", span_metric_rows, METH_VARARGS, span_metric_rows_doc},
    {"span_runs", span_runs, METH_VARARGS, span_runs_doc},
    {"log_runs", log_runs, METH_VARARGS, log_runs_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sidecar._wire",
    "Per-item facts from encoded OTLP requests in one C pass (optional accelerator; see span_metrics and "
    "tail_sampling for the pure-Python equivalents).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__wire(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "MAX_KEYS", MAX_KEYS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
