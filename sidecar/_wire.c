/*
 * sidecar._wire: one C pass over an encoded OTLP Export{Trace,Logs}ServiceRequest that returns
 * the few facts per span / log record the span_metrics and tail_sampling hot loops need, so
 * Python does only dict work instead of ~100 ns per protobuf field read, and never parses the request.
 *
 * The C half of one facade (sidecar/wire.py); sidecar/_wire_py.py is the pure-Python half, with the
 * same functions, signatures and named-tuple results (sidecar/_wire_types.py), and the tests run one
 * test class against both. On input the protobuf parser accepts, both answer the same: unknown
 * fields (groups too) are skipped, a field with an unexpected wire type is an unknown field, the last
 * occurrence of a scalar wins and repeated occurrences of a message field merge, enums are open
 * (any int32). Every read is bounds-checked; a bad varint, length, tag or group raises ValueError
 * (invalid UTF-8 in a string this scanner decodes raises UnicodeDecodeError, a ValueError). The GIL
 * is held throughout; the only module state is the result types, imported once.
 *
 * Field numbers (opentelemetry-proto):
 *   Export*ServiceRequest: 1 Resource{Spans,Logs}
 *   Resource{Spans,Logs}:  1 resource, 2 Scope{Spans,Logs}, 3 schema_url;  Resource: 1 attributes
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

/* Most attribute keys one call can look for (span_metrics dimensions + 3, tail_sampling's keys). */
#define MAX_KEYS 64

/* Deepest nesting upb parses (its default depth limit): every submessage or group is one deeper. The
 * scanners count groups from the field that starts them; check_encoding counts from the request (depth 0). */
#define MAX_DEPTH 100

/* Status codes with a meaning (UNSET, OK, ERROR): only these set a bit in a run's status mask. */
#define KNOWN_STATUS_CODES 3

enum { WT_VARINT = 0, WT_I64 = 1, WT_LEN = 2, WT_SGROUP = 3, WT_EGROUP = 4, WT_I32 = 5 };

/* The result types (sidecar/_wire_types.py), shared with the pure-Python scanner. */
static PyTypeObject *SpanMetricRow_T, *SpanRun_T, *LogRun_T, *KeyHits_T, *ResourceGroup_T, *ScopeGroup_T;
static PyTypeObject *AuditSpans_T, *AuditSpan_T, *SpanMetricGroup_T;

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

static int skip_group(Reader *r, uint32_t field, int depth);

/* One tag: its field number and wire type, as upb reads it (at most 5 bytes, field numbers 1..2^29-1). */
static inline int rd_tag(Reader *r, uint32_t *field, int *wt)
{
    const uint8_t *at = r->p;
    uint64_t tag;
    if (rd_varint(r, &tag) < 0)
        return -1;
    if (r->p - at > 5 || (tag >> 3) == 0 || (tag >> 3) > 0x1FFFFFFF)
        return bad("invalid field number");
    *field = (uint32_t)(tag >> 3);
    *wt = (int)(tag & 7);
    return 0;
}

/* The value of a field whose tag was just read: a number, the payload of a length-delimited field,
 * or (a group) nothing: the group is skipped whole, up to its matching end tag. */
static inline int rd_value(Reader *r, uint32_t field, int wt, uint64_t *num, Slice *s, int depth)
{
    uint64_t n;
    switch (wt) {
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
    case WT_SGROUP:
        return skip_group(r, field, depth + 1);
    case WT_EGROUP:
        return bad("end of a group that was not started");
    default: /* 6 and 7 are invalid */
        return bad("unsupported wire type");
    }
}

/* Skips the fields of a group (an unknown field to OTLP's schema) through its end tag. */
static int skip_group(Reader *r, uint32_t field, int depth)
{
    uint32_t f;
    int wt;
    uint64_t num;
    Slice s;
    if (depth > MAX_DEPTH)
        return bad("groups nested too deep");
    for (;;) {
        if (r->p >= r->end)
            return bad("unterminated group");
        if (rd_tag(r, &f, &wt) < 0)
            return -1;
        if (wt == WT_EGROUP)
            return f == field ? 0 : bad("end of a group that was not started");
        if (rd_value(r, f, wt, &num, &s, depth) < 0)
            return -1;
    }
}

/* One field: its number, wire type and value (a number, or the payload of a length-delimited field).
 * A group comes back with wire type WT_SGROUP and no value: no OTLP field is a group. */
static inline int rd_field(Reader *r, uint32_t *field, int *wt, uint64_t *num, Slice *s)
{
    if (rd_tag(r, field, wt) < 0)
        return -1;
    return rd_value(r, *field, *wt, num, s, 0);
}

static PyObject *bytes_of(Slice s) { return PyBytes_FromStringAndSize((const char *)s.p, s.n); }

static PyObject *str_of(Slice s) { return PyUnicode_DecodeUTF8((const char *)s.p, s.n, "strict"); }

/* Whether two byte strings of length ``n`` differ in their last 8 bytes (n >= 8): two loads, no call. Ids and
 * attribute keys that differ mostly differ there (keys share namespaces at the front), so most unequal pairs
 * are told apart without memcmp, which the audit subset called for every recent span it compared with. */
static inline int tail_differs(const uint8_t *a, const uint8_t *b, Py_ssize_t n)
{
    uint64_t x, y;
    memcpy(&x, a + n - 8, 8);
    memcpy(&y, b + n - 8, 8);
    return x != y;
}

static inline int slice_eq(Slice a, Slice b)
{
    if (a.n != b.n)
        return 0;
    if (a.n >= 8 && tail_differs(a.p, b.p, a.n))
        return 0;
    return a.n == 0 || memcmp(a.p, b.p, (size_t)a.n) == 0;
}

/* --- heads -------------------------------------------------------------------------------------- */

/* A Resource{Spans,Logs} or Scope{Spans,Logs} without its children: its fields 1 and 3 as encoded, with
 * an empty field 1 in front when absent. For a canonical encoding that is exactly
 * ``ResourceSpans(resource=rs.resource, schema_url=rs.schema_url).SerializeToString()``. */
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

/* A span's fields besides its attributes and events (the last occurrence of each; the status is only noted
 * while reading, and read by span_status once the span is known to be wanted). */
typedef struct {
    Slice trace_id, span_id, name, message;
    uint64_t start, end;
    long kind, code;
    int has_parent, has_status;
} SpanHead;

/* Takes field ``f`` of a span into ``h`` when it is a head field. */
static void span_head_field(SpanHead *h, uint32_t f, int wt, uint64_t num, Slice s)
{
    if (wt == WT_LEN) {
        switch (f) {
        case 1: h->trace_id = s; break;
        case 2: h->span_id = s; break;
        case 4: h->has_parent = s.n > 0; break;
        case 5: h->name = s; break;
        case 15: h->has_status = 1; break;
        }
    } else if (f == 6 && wt == WT_VARINT) {
        h->kind = (long)(int32_t)num;
    } else if (f == 7 && wt == WT_I64) {
        h->start = num;
    } else if (f == 8 && wt == WT_I64) {
        h->end = num;
    }
}

typedef struct {
    Slice whole, trace_state;
    SpanHead h; /* h.code stays 0: parse_span reads the status code into ``status`` */
    uint32_t flags;
    long status;
    /* per wanted key: whether the span has it, and the KeyValue of its first occurrence */
    char found[MAX_KEYS + 1];
    Slice vals[MAX_KEYS + 1];
} SpanFacts;

/* Keys shorter than this are found through their length (an attribute's key of another length costs one
 * table read: most keys of a span are not looked for); longer ones by comparing with each. */
#define SHORT_KEY 64

typedef struct {
    Slice keys[MAX_KEYS + 1]; /* + 1: span_metric_rows looks for the service key in resources too */
    int nkeys;
    signed char first_of_len[SHORT_KEY];   /* the first key of each length, -1: none */
    signed char next_of_len[MAX_KEYS + 1]; /* the next key of the same length, -1: none */
    int long_keys;                          /* keys of SHORT_KEY bytes or more */
} Keys;

/* The index of a key in ``k``, or -1. */
static inline int find_key(Slice key, const Keys *k)
{
    if (key.n < SHORT_KEY) {
        for (int j = k->first_of_len[key.n]; j >= 0; j = k->next_of_len[j])
            if (key.n == 0 || ((key.n < 8 || !tail_differs(key.p, k->keys[j].p, key.n))
                               && memcmp(key.p, k->keys[j].p, (size_t)key.n) == 0))
                return j;
        return -1;
    }
    if (k->long_keys)
        for (int j = 0; j < k->nkeys; j++)
            if (slice_eq(key, k->keys[j]))
                return j;
    return -1;
}

/* Appends one key; a key given twice is refused (each key is looked for once). */
static int add_key(Keys *k, PyObject *b)
{
    if (!PyBytes_Check(b)) {
        PyErr_SetString(PyExc_TypeError, "attribute keys must be bytes");
        return -1;
    }
    Slice key = {(const uint8_t *)PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b)};
    if (find_key(key, k) >= 0) {
        PyErr_SetString(PyExc_ValueError, "duplicate attribute key");
        return -1;
    }
    int j = k->nkeys++;
    k->keys[j] = key;
    k->next_of_len[j] = -1;
    if (key.n >= SHORT_KEY) {
        k->long_keys++;
    } else { /* appended to its length's chain: the chain keeps the keys' order */
        signed char *at = &k->first_of_len[key.n];
        while (*at >= 0)
            at = &k->next_of_len[*at];
        *at = (signed char)j;
    }
    return 0;
}

/* Keys from a tuple of bytes (borrowed pointers: the caller's tuple keeps them alive), after ``first``
 * when not NULL. */
static int keys_of(PyObject *tuple, Keys *k, PyObject *first)
{
    Py_ssize_t n = PyTuple_GET_SIZE(tuple);
    if (n > MAX_KEYS) {
        PyErr_Format(PyExc_ValueError, "at most %d attribute keys", MAX_KEYS);
        return -1;
    }
    k->nkeys = k->long_keys = 0;
    memset(k->first_of_len, -1, sizeof k->first_of_len);
    if (first != NULL && add_key(k, first) < 0)
        return -1;
    for (Py_ssize_t i = 0; i < n; i++)
        if (add_key(k, PyTuple_GET_ITEM(tuple, i)) < 0)
            return -1;
    return 0;
}

/* A KeyValue: when its key (the last key field, as parsed) is a wanted key the span has not had yet,
 * the span has it, and sp->vals holds the whole KeyValue (its value fields are read when needed). */
static int parse_attribute(Slice kv, const Keys *k, SpanFacts *sp)
{
    Reader r = reader_of(kv);
    Slice key = {NULL, 0}, s;
    uint32_t f;
    int wt;
    uint64_t num;
    int has_key = 0;
    while (r.p < r.end) {
        if (rd_field(&r, &f, &wt, &num, &s) < 0)
            return -1;
        if (wt == WT_LEN && f == 1) {
            key = s;
            has_key = 1;
        }
    }
    (void)has_key; /* no key field: the key is "" */
    int j = find_key(key, k);
    if (j >= 0 && !sp->found[j]) {
        sp->found[j] = 1;
        sp->vals[j] = kv;
    }
    return 0;
}

/* Every occurrence of length-delimited field ``field`` of a message as the parser sees it: merged, i.e.
 * their payloads concatenated; one occurrence (the usual case) is returned as a slice of the input, else
 * copied. A KeyValue's value is field 2, a Resource{Spans,Logs}'s resource field 1. */
static PyObject *merged_field(Slice msg, uint32_t field)
{
    Reader r = reader_of(msg);
    Slice s, first = {NULL, 0};
    uint32_t f;
    int wt;
    uint64_t num;
    int count = 0;
    Py_ssize_t total = 0;
    while (r.p < r.end) {
        if (rd_field(&r, &f, &wt, &num, &s) < 0)
            return NULL;
        if (f == field && wt == WT_LEN) {
            if (!count++)
                first = s;
            total += s.n;
        }
    }
    if (count <= 1)
        return bytes_of(first);
    PyObject *out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL)
        return NULL;
    char *w = PyBytes_AS_STRING(out);
    r = reader_of(msg);
    while (r.p < r.end) { /* cannot fail: read once already */
        rd_field(&r, &f, &wt, &num, &s);
        if (f == field && wt == WT_LEN) {
            memcpy(w, s.p, (size_t)s.n);
            w += s.n;
        }
    }
    return out;
}

static PyObject *value_bytes(Slice kv) { return merged_field(kv, 2); }

/* The first attribute with each key of a Resource{Spans,Logs}'s resource (field 1; several occurrences
 * merge, so their attributes are read in order as one list). */
static int resource_facts(Slice rs, const Keys *k, SpanFacts *f)
{
    Reader r = reader_of(rs);
    Slice res, kv;
    uint32_t fld;
    int wt;
    uint64_t num;
    memset(f->found, 0, (size_t)k->nkeys);
    if (!k->nkeys)
        return 0;
    while (r.p < r.end) {
        if (rd_field(&r, &fld, &wt, &num, &res) < 0)
            return -1;
        if (fld != 1 || wt != WT_LEN)
            continue;
        Reader rr = reader_of(res);
        while (rr.p < rr.end) {
            if (rd_field(&rr, &fld, &wt, &num, &kv) < 0)
                return -1;
            if (fld == 1 && wt == WT_LEN && parse_attribute(kv, k, f) < 0)
                return -1;
        }
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
    sp->trace_state = none;
    memset(&sp->h, 0, sizeof sp->h);
    sp->flags = 0;
    sp->status = 0;
    memset(sp->found, 0, (size_t)k->nkeys);
    while (r.p < r.end) {
        if (rd_field(&r, &f, &wt, &num, &s) < 0)
            return -1;
        span_head_field(&sp->h, f, wt, num, s);
        if (wt == WT_LEN) {
            switch (f) {
            case 3: sp->trace_state = s; break;
            case 9:
                if (k->nkeys && parse_attribute(s, k, sp) < 0)
                    return -1;
                break;
            case 15:
                if (parse_status(s, &sp->status) < 0)
                    return -1;
                break;
            }
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

/* A KeyValue's value as a label string: strings as they are, bools "true"/"false", ints and doubles
 * as Python's str() writes them, anything else (or no value) "". Several value fields merge: of the
 * oneof, the last member on the wire wins. */
static PyObject *label_of(Slice kv)
{
    Reader kr = reader_of(kv);
    Slice s, any, str = {NULL, 0};
    uint32_t f, kind = 0;
    int wt;
    uint64_t num, val = 0;
    while (kr.p < kr.end) {
        if (rd_field(&kr, &f, &wt, &num, &any) < 0)
            return NULL;
        if (f != 2 || wt != WT_LEN)
            continue;
        Reader r = reader_of(any);
        while (r.p < r.end) {
            if (rd_field(&r, &f, &wt, &num, &s) < 0)
                return NULL;
            int ok = ((f == 1 || f == 5 || f == 6 || f == 7) && wt == WT_LEN) ||
                     ((f == 2 || f == 3) && wt == WT_VARINT) || (f == 4 && wt == WT_I64);
            if (!ok)
                continue;
            kind = f;
            if (wt == WT_LEN)
                str = s;
            else
                val = num;
        }
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

/* A run's item bytes as a tuple (the list's reference is consumed), untracked by the garbage collector: it
   holds only bytes, so it is in no cycle, and tail sampling buffers it for seconds as a trace's first group,
   where every collection would walk it again (CPython untracks such a tuple at its first collection). */
static PyObject *frozen_blobs(PyObject *list)
{
    PyObject *t = PyList_AsTuple(list);
    Py_DECREF(list);
    if (t != NULL && PyObject_GC_IsTracked(t))
        PyObject_GC_UnTrack(t);
    return t;
}

/* A new instance of a named-tuple type holding ``items`` (references stolen; a NULL item means an
 * earlier call failed: the others are released and NULL returned). */
static PyObject *named(PyTypeObject *t, Py_ssize_t n, PyObject **items)
{
    PyObject *o = NULL;
    for (Py_ssize_t i = 0; i < n; i++)
        if (items[i] == NULL)
            goto fail;
    if ((o = t->tp_alloc(t, n)) == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++)
        PyTuple_SET_ITEM(o, i, items[i]);
    return o;
fail:
    for (Py_ssize_t i = 0; i < n; i++)
        Py_XDECREF(items[i]);
    return NULL;
}

typedef struct {
    Keys k;          /* the span keys */
    Keys rk;         /* the service key, then the span keys: looked for in each resource */
    PyObject *base;  /* owned: the current resource's (service, label per key) */
    PyObject *rows;
    SpanFacts sp, res;
} MetricsCtx;

/* A resource's (service, label per span key): what its spans' keys fall back to ("" where it has none). */
static PyObject *resource_labels(Slice rs, const Keys *rk, SpanFacts *res)
{
    if (resource_facts(rs, rk, res) < 0)
        return NULL;
    PyObject *base = PyTuple_New(rk->nkeys);
    if (base == NULL)
        return NULL;
    for (int j = 0; j < rk->nkeys; j++) {
        PyObject *x = res->found[j] ? label_of(res->vals[j]) : PyUnicode_FromStringAndSize("", 0);
        if (x == NULL) {
            Py_DECREF(base);
            return NULL;
        }
        PyTuple_SET_ITEM(base, j, x);
    }
    return base;
}

/* A SpanMetricRow key: (service, name, kind, status, label per key). ``vals[j]``: the span's KeyValue for key j,
 * {NULL, 0} when it has none; an absent key or an empty label takes the resource's (``base``). */
static PyObject *metric_key(PyObject *base, Slice name, long kind, long status, const Slice *vals, int n)
{
    PyObject *key = PyTuple_New(4 + n);
    if (key == NULL)
        return NULL;
    PyTuple_SET_ITEM(key, 0, Py_NewRef(PyTuple_GET_ITEM(base, 0)));
    PyObject *x;
    if ((x = str_of(name)) == NULL)
        goto fail;
    PyTuple_SET_ITEM(key, 1, x);
    if ((x = PyLong_FromLong(kind)) == NULL)
        goto fail;
    PyTuple_SET_ITEM(key, 2, x);
    if ((x = PyLong_FromLong(status)) == NULL)
        goto fail;
    PyTuple_SET_ITEM(key, 3, x);
    for (int j = 0; j < n; j++) {
        x = NULL;
        if (vals[j].p != NULL) {
            if ((x = label_of(vals[j])) == NULL)
                goto fail;
            if (PyUnicode_GET_LENGTH(x) == 0) /* an empty label counts as absent */
                Py_CLEAR(x);
        }
        if (x == NULL)
            x = Py_NewRef(PyTuple_GET_ITEM(base, j + 1));
        PyTuple_SET_ITEM(key, 4 + j, x);
    }
    return key;
fail:
    Py_DECREF(key);
    return NULL;
}

static int metrics_resource(void *vctx, Py_ssize_t index, Slice rs)
{
    MetricsCtx *c = vctx;
    (void)index;
    PyObject *base = resource_labels(rs, &c->rk, &c->res);
    if (base == NULL)
        return -1;
    Py_XSETREF(c->base, base);
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
    Slice vals[MAX_KEYS];
    for (int j = 0; j < n; j++)
        vals[j] = sp->found[j] ? sp->vals[j] : (Slice){NULL, 0};
    PyObject *key = metric_key(c->base, sp->h.name, sp->h.kind, sp->status, vals, n);
    if (key == NULL)
        return -1;
    uint64_t d = sp->h.end > sp->h.start ? sp->h.end - sp->h.start : 0;
    PyObject *items[6] = {key, PyLong_FromUnsignedLongLong(d), PyLong_FromUnsignedLongLong(sp->h.end),
                          PyLong_FromLong(sp->status), bytes_of(sp->h.trace_id), bytes_of(sp->h.span_id)};
    PyObject *row = named(SpanMetricRow_T, 6, items);
    if (row == NULL) /* named() released the items already */
        return -1;
    int rc = PyList_Append(c->rows, row);
    Py_DECREF(row);
    return rc;
}

PyDoc_STRVAR(span_metric_rows_doc,
"span_metric_rows(request: bytes, service_key: bytes, keys: tuple[bytes, ...]) -> list[SpanMetricRow]\n\n"
"One SpanMetricRow per span of an encoded ExportTraceServiceRequest (see sidecar._wire_types).");

static PyObject *span_metric_rows(PyObject *self, PyObject *args)
{
    const char *data;
    Py_ssize_t len;
    PyObject *service_key, *keys;
    (void)self;
    if (!PyArg_ParseTuple(args, "y#O!O!", &data, &len, &PyBytes_Type, &service_key, &PyTuple_Type, &keys))
        return NULL;
    MetricsCtx c;
    if (keys_of(keys, &c.k, NULL) < 0 || keys_of(keys, &c.rk, service_key) < 0)
        return NULL;
    c.base = NULL;
    if ((c.rows = PyList_New(0)) == NULL)
        return NULL;
    Walk w = {metrics_resource, metrics_scope, metrics_span};
    Slice req = {(const uint8_t *)data, len};
    int rc = walk_request(req, &w, &c);
    Py_XDECREF(c.base);
    if (rc < 0) {
        Py_DECREF(c.rows);
        return NULL;
    }
    return c.rows;
}

/* --- span_metrics: the spans of a request counted per key ----------------------------------------- */

/* One span an exemplar can name: ids, duration, end, and its index among the request's spans. */
typedef struct {
    Slice trace_id, span_id;
    uint64_t duration, end;
    Py_ssize_t at;
} Exemplar;

/* The spans with one key as read on the wire (resource, name, kind, status, the first KeyValue of each key);
 * keys of different bytes can label alike (an int 1 and a string "1"): merged once labelled. */
typedef struct {
    Py_ssize_t resource;
    Slice name;
    long kind, status;
    uint64_t hash, sum, carries; /* the durations' sum: carries * 2**64 + sum */
    Py_ssize_t count;
    Exemplar slowest, latest;
    int merged; /* into an earlier group of the same key */
} MetricGroup;

typedef struct {
    Keys k, rk;
    PyObject *bases; /* per resource, its (service, label per key) */
    SpanFacts sp, res;
    const uint64_t *bounds;
    Py_ssize_t nbounds, spans;
    MetricGroup *groups;
    Slice *vals;        /* per group, its KeyValue per key ({NULL, 0}: absent): only as many as there are keys */
    Py_ssize_t *counts; /* per group, nbounds + 1 bucket counts */
    Py_ssize_t ngroups, cap;
    Py_ssize_t *table;  /* open addressing on group indices, -1: empty */
    size_t mask;
    Py_ssize_t max_groups; /* keys counted apart; spans of further keys go to the rest group */
    Py_ssize_t rest;       /* the rest group's index, -1: none yet */
} GroupsCtx;

static uint64_t mix_bytes(uint64_t h, Slice s)
{
    for (Py_ssize_t i = 0; i < s.n; i++)
        h = (h ^ s.p[i]) * 0x100000001b3ull; /* FNV-1a */
    return (h ^ (uint64_t)s.n) * 0x100000001b3ull;
}

static int groups_resource(void *vctx, Py_ssize_t index, Slice rs)
{
    GroupsCtx *c = vctx;
    (void)index;
    PyObject *base = resource_labels(rs, &c->rk, &c->res);
    if (base == NULL)
        return -1;
    int rc = PyList_Append(c->bases, base);
    Py_DECREF(base);
    return rc;
}

static int groups_grow(GroupsCtx *c)
{
    Py_ssize_t cap = c->cap ? 2 * c->cap : 16, nb = c->nbounds + 1;
    MetricGroup *g = PyMem_Realloc(c->groups, (size_t)cap * sizeof *g);
    if (g == NULL)
        return PyErr_NoMemory(), -1;
    c->groups = g;
    Slice *vals = PyMem_Realloc(c->vals, (size_t)(cap * (c->k.nkeys ? c->k.nkeys : 1)) * sizeof *vals);
    if (vals == NULL)
        return PyErr_NoMemory(), -1;
    c->vals = vals;
    Py_ssize_t *counts = PyMem_Realloc(c->counts, (size_t)(cap * nb) * sizeof *counts);
    if (counts == NULL)
        return PyErr_NoMemory(), -1;
    c->counts = counts;
    size_t size = 2 * (size_t)cap;
    Py_ssize_t *table = PyMem_Malloc(size * sizeof *table);
    if (table == NULL)
        return PyErr_NoMemory(), -1;
    for (size_t b = 0; b < size; b++)
        table[b] = -1;
    for (Py_ssize_t i = 0; i < c->ngroups; i++) {
        if (i == c->rest)
            continue;
        size_t b = (size_t)c->groups[i].hash & (size - 1);
        while (table[b] >= 0)
            b = (b + 1) & (size - 1);
        table[b] = i;
    }
    PyMem_Free(c->table);
    c->table = table;
    c->mask = size - 1;
    c->cap = cap;
    return 0;
}

/* bisect.bisect_left(bounds, d): the bucket a duration falls in (bounds[i-1] < d <= bounds[i]). */
static Py_ssize_t bucket_of(const uint64_t *bounds, Py_ssize_t n, uint64_t d)
{
    Py_ssize_t lo = 0, hi = n;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (bounds[mid] < d)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static int groups_span(void *vctx, Slice item)
{
    GroupsCtx *c = vctx;
    SpanFacts *sp = &c->sp;
    int n = c->k.nkeys;
    if (parse_span(item, &c->k, sp) < 0)
        return -1;
    Py_ssize_t resource = PyList_GET_SIZE(c->bases) - 1;
    uint64_t h = mix_bytes(0xcbf29ce484222325ull ^ (uint64_t)resource, sp->h.name);
    h = (h ^ (uint64_t)sp->h.kind) * 0x100000001b3ull;
    h = (h ^ (uint64_t)sp->status) * 0x100000001b3ull;
    for (int j = 0; j < n; j++)
        h = sp->found[j] ? mix_bytes(h, sp->vals[j]) : (h ^ 0xff) * 0x100000001b3ull;
    MetricGroup *g = NULL;
    size_t b = (size_t)h & c->mask;
    for (; c->table != NULL && c->table[b] >= 0; b = (b + 1) & c->mask) {
        MetricGroup *x = &c->groups[c->table[b]];
        if (x->hash != h || x->resource != resource || x->kind != sp->h.kind || x->status != sp->status
                || !slice_eq(x->name, sp->h.name))
            continue;
        const Slice *xv = &c->vals[c->table[b] * n];
        int j = 0;
        for (; j < n; j++)
            if ((xv[j].p == NULL) != !sp->found[j] || (sp->found[j] && !slice_eq(xv[j], sp->vals[j])))
                break;
        if (j == n) {
            g = x;
            break;
        }
    }
    Py_ssize_t nb = c->nbounds + 1;
    if (g == NULL && c->ngroups - (c->rest >= 0) >= c->max_groups) {
        if (c->rest < 0) { /* a group outside the table: its key is None */
            if (2 * (c->ngroups + 1) > c->cap && groups_grow(c) < 0)
                return -1;
            c->rest = c->ngroups++;
            memset(&c->groups[c->rest], 0, sizeof c->groups[c->rest]);
            memset(&c->counts[c->rest * nb], 0, (size_t)nb * sizeof *c->counts);
        }
        g = &c->groups[c->rest];
    }
    if (g == NULL) {
        if (2 * (c->ngroups + 1) > c->cap) {
            if (groups_grow(c) < 0)
                return -1;
            for (b = (size_t)h & c->mask; c->table[b] >= 0; b = (b + 1) & c->mask)
                ;
        }
        g = &c->groups[c->ngroups];
        c->table[b] = c->ngroups;
        memset(&c->counts[c->ngroups * nb], 0, (size_t)nb * sizeof *c->counts);
        c->ngroups++;
        g->resource = resource;
        g->name = sp->h.name;
        g->kind = sp->h.kind;
        g->status = sp->status;
        for (int j = 0; j < n; j++)
            c->vals[(g - c->groups) * n + j] = sp->found[j] ? sp->vals[j] : (Slice){NULL, 0};
        g->hash = h;
        g->sum = g->carries = 0;
        g->count = 0;
        g->merged = 0;
    }
    uint64_t d = sp->h.end > sp->h.start ? sp->h.end - sp->h.start : 0;
    Exemplar ex = {sp->h.trace_id, sp->h.span_id, d, sp->h.end, c->spans++};
    if (!g->count || d > g->slowest.duration)
        g->slowest = ex;
    g->latest = ex;
    g->count++;
    g->sum += d;
    g->carries += g->sum < d;
    c->counts[(g - c->groups) * nb + bucket_of(c->bounds, c->nbounds, d)]++;
    return 0;
}

/* The group's SpanMetricRow key, as metrics_span makes it. */
static PyObject *group_key(GroupsCtx *c, const MetricGroup *g)
{
    return metric_key(PyList_GET_ITEM(c->bases, g->resource), g->name, g->kind, g->status,
                      &c->vals[(g - c->groups) * c->k.nkeys], c->k.nkeys);
}

/* Group ``from`` counted into ``into`` (same key; ``from`` has the later first span). */
static void group_merge(GroupsCtx *c, MetricGroup *into, MetricGroup *from)
{
    Py_ssize_t nb = c->nbounds + 1, *a = &c->counts[(into - c->groups) * nb], *b = &c->counts[(from - c->groups) * nb];
    for (Py_ssize_t i = 0; i < nb; i++)
        a[i] += b[i];
    into->count += from->count;
    into->sum += from->sum;
    into->carries += from->carries + (into->sum < from->sum);
    if (from->slowest.duration > into->slowest.duration
            || (from->slowest.duration == into->slowest.duration && from->slowest.at < into->slowest.at))
        into->slowest = from->slowest;
    if (from->latest.at > into->latest.at)
        into->latest = from->latest;
    from->merged = 1;
}

static PyObject *exemplar_of(const Exemplar *e)
{
    PyObject *out = PyTuple_New(4), *items[4] = {PyLong_FromUnsignedLongLong(e->duration), bytes_of(e->trace_id),
                                                  bytes_of(e->span_id), PyLong_FromUnsignedLongLong(e->end)};
    for (int i = 0; i < 4; i++) {
        if (out == NULL || items[i] == NULL) {
            Py_CLEAR(out);
            Py_XDECREF(items[i]);
        } else {
            PyTuple_SET_ITEM(out, i, items[i]);
        }
    }
    return out;
}

static PyObject *group_sum(const MetricGroup *g)
{
    if (!g->carries)
        return PyLong_FromUnsignedLongLong(g->sum);
    PyObject *hi = PyLong_FromUnsignedLongLong(g->carries), *shift = PyLong_FromLong(64), *lo = NULL, *out = NULL;
    PyObject *big = hi && shift ? PyNumber_Lshift(hi, shift) : NULL;
    if (big != NULL && (lo = PyLong_FromUnsignedLongLong(g->sum)) != NULL)
        out = PyNumber_Add(big, lo);
    Py_XDECREF(hi);
    Py_XDECREF(shift);
    Py_XDECREF(big);
    Py_XDECREF(lo);
    return out;
}

/* The groups as SpanMetricGroups, in the order of their first spans, groups of equal keys merged. */
static PyObject *groups_result(GroupsCtx *c)
{
    PyObject *keys = PyList_New(c->ngroups), *seen = PyDict_New(), *out = PyList_New(0);
    if (keys == NULL || seen == NULL || out == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < c->ngroups; i++) {
        PyObject *key = i == c->rest ? Py_NewRef(Py_None) : group_key(c, &c->groups[i]);
        if (key == NULL)
            goto fail;
        PyList_SET_ITEM(keys, i, key);
        if (i == c->rest)
            continue;
        PyObject *first = PyDict_GetItemWithError(seen, key);
        if (first != NULL) {
            group_merge(c, &c->groups[PyLong_AsSsize_t(first)], &c->groups[i]);
            continue;
        }
        PyObject *index = PyErr_Occurred() ? NULL : PyLong_FromSsize_t(i);
        int rc = index == NULL ? -1 : PyDict_SetItem(seen, key, index);
        Py_XDECREF(index);
        if (rc < 0)
            goto fail;
    }
    Py_ssize_t nb = c->nbounds + 1;
    for (Py_ssize_t i = 0; i < c->ngroups; i++) {
        const MetricGroup *g = &c->groups[i];
        if (g->merged)
            continue;
        PyObject *buckets = PyList_New(nb);
        for (Py_ssize_t k = 0; buckets != NULL && k < nb; k++) {
            PyObject *x = PyLong_FromSsize_t(c->counts[i * nb + k]);
            if (x == NULL)
                Py_CLEAR(buckets);
            else
                PyList_SET_ITEM(buckets, k, x);
        }
        PyObject *items[8] = {Py_NewRef(PyList_GET_ITEM(keys, i)), PyLong_FromSsize_t(g->count), group_sum(g), buckets,
                              exemplar_of(&g->slowest), PyLong_FromSsize_t(g->slowest.at), exemplar_of(&g->latest),
                              PyLong_FromSsize_t(g->latest.at)};
        PyObject *group = named(SpanMetricGroup_T, 8, items);
        if (group == NULL || PyList_Append(out, group) < 0) {
            Py_XDECREF(group);
            goto fail;
        }
        Py_DECREF(group);
    }
    Py_DECREF(keys);
    Py_DECREF(seen);
    return out;
fail:
    Py_XDECREF(keys);
    Py_XDECREF(seen);
    Py_XDECREF(out);
    return NULL;
}

PyDoc_STRVAR(span_metric_groups_doc,
"span_metric_groups(request: bytes, service_key: bytes, keys: tuple[bytes, ...], bounds: tuple[int, ...],\n"
"                   max_groups: int) -> list[SpanMetricGroup]\n\n"
"The spans of an encoded ExportTraceServiceRequest counted per SpanMetricRow key, in the order of each key's\n"
"first span (see sidecar._wire_types); ``bounds``: the histogram's upper bounds in ns, ints in [0, 2**64).\n"
"At most ``max_groups`` keys are counted apart (distinct on the wire; keys that label alike merge after):\n"
"the spans of further keys are counted in one last group whose key is None.");

static PyObject *span_metric_groups(PyObject *self, PyObject *args)
{
    const char *data;
    Py_ssize_t len;
    PyObject *service_key, *keys, *bounds;
    Py_ssize_t max_groups;
    (void)self;
    if (!PyArg_ParseTuple(args, "y#O!O!O!n", &data, &len, &PyBytes_Type, &service_key, &PyTuple_Type, &keys,
                          &PyTuple_Type, &bounds, &max_groups))
        return NULL;
    if (max_groups < 1) {
        PyErr_SetString(PyExc_ValueError, "max_groups: must be >= 1");
        return NULL;
    }
    GroupsCtx c;
    memset(&c, 0, sizeof c);
    c.max_groups = max_groups;
    c.rest = -1;
    if (keys_of(keys, &c.k, NULL) < 0 || keys_of(keys, &c.rk, service_key) < 0)
        return NULL;
    c.nbounds = PyTuple_GET_SIZE(bounds);
    uint64_t *bs = PyMem_Malloc((size_t)(c.nbounds + 1) * sizeof *bs);
    if (bs == NULL)
        return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < c.nbounds; i++) {
        PyObject *b = PyTuple_GET_ITEM(bounds, i);
        bs[i] = PyLong_CheckExact(b) ? PyLong_AsUnsignedLongLong(b) : (uint64_t)-1;
        if (!PyLong_CheckExact(b) || (bs[i] == (uint64_t)-1 && PyErr_Occurred())) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "bounds: ints in [0, 2**64)");
            PyMem_Free(bs);
            return NULL;
        }
    }
    c.bounds = bs;
    PyObject *out = NULL;
    if ((c.bases = PyList_New(0)) != NULL) {
        Walk w = {groups_resource, metrics_scope, groups_span};
        Slice req = {(const uint8_t *)data, len};
        if (walk_request(req, &w, &c) == 0)
            out = groups_result(&c);
    }
    Py_XDECREF(c.bases);
    PyMem_Free(bs);
    PyMem_Free(c.groups);
    PyMem_Free(c.vals);
    PyMem_Free(c.counts);
    PyMem_Free(c.table);
    return out;
}

/* --- tail_sampling: runs of spans / log records of one trace ------------------------------------- */

/* Builds the [ResourceGroup(head, [ScopeGroup(head, [run, ...]), ...]), ...] nesting both run scanners return. */
typedef struct {
    PyObject *out;    /* the result */
    PyObject *scopes; /* borrowed: the current resource's scope list */
    PyObject *runs;   /* borrowed: the current scope's run list */
} Nest;

/* ``values`` (stolen; NULL: an error already set) is the resource's value per key. */
static int nest_resource(Nest *n, Slice rs, PyObject *values)
{
    PyObject *scopes = PyList_New(0);
    Py_XINCREF(scopes); /* one reference for the group, one kept below */
    PyObject *items[3] = {head_of(rs), scopes, values};
    PyObject *pair = named(ResourceGroup_T, 3, items);
    Py_XDECREF(scopes);
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
    Py_INCREF(runs);
    PyObject *items[2] = {head, runs};
    PyObject *pair = named(ScopeGroup_T, 2, items);
    Py_DECREF(runs);
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
    PyObject *hits[MAX_KEYS]; /* owned while open: NULL, or the list of value bytes (repeats left out) */
    SpanFacts res;            /* the current resource's attributes */
    char absent[MAX_KEYS];
} SpanRunCtx;

static void span_run_clear(SpanRunCtx *c)
{
    Py_CLEAR(c->blobs);
    for (int j = 0; j < c->k.nkeys; j++)
        Py_CLEAR(c->hits[j]);
    c->open = 0;
}

/* Appends the open run to the current scope's list as a SpanRun. */
static int span_run_close(SpanRunCtx *c)
{
    if (!c->open)
        return 0;
    int n = c->k.nkeys;
    PyObject *hits = PyTuple_New(n);
    if (hits == NULL)
        return -1;
    for (int j = 0; j < n; j++) {
        PyObject *h = Py_None;
        if (c->hits[j] == NULL) {
            Py_INCREF(h);
        } else {
            PyObject *items[2] = {PyBool_FromLong(c->absent[j]), c->hits[j]};
            c->hits[j] = NULL;
            if ((h = named(KeyHits_T, 2, items)) == NULL) {
                Py_DECREF(hits);
                return -1;
            }
        }
        PyTuple_SET_ITEM(hits, j, h);
    }
    PyObject *blobs = frozen_blobs(c->blobs); /* NULL on failure: named() then releases the other items */
    c->blobs = NULL;
    c->open = 0;
    PyObject *items[9] = {bytes_of(c->trace_id), str_of(c->trace_state), blobs, PyLong_FromSsize_t(c->nbytes),
                          PyLong_FromUnsignedLongLong(c->status_mask), PyLong_FromUnsignedLongLong(c->start),
                          PyLong_FromUnsignedLongLong(c->end), PyBool_FromLong(c->root), hits};
    PyObject *run = named(SpanRun_T, 9, items);
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
    if (span_run_close(c) < 0 || resource_facts(rs, &c->k, &c->res) < 0)
        return -1;
    PyObject *values = PyTuple_New(c->k.nkeys);
    if (values == NULL)
        return -1;
    for (int j = 0; j < c->k.nkeys; j++) {
        PyObject *v = Py_None;
        if (c->res.found[j]) {
            if ((v = value_bytes(c->res.vals[j])) == NULL) {
                Py_DECREF(values);
                return -1;
            }
        } else {
            Py_INCREF(v);
        }
        PyTuple_SET_ITEM(values, j, v);
    }
    return nest_resource(&c->nest, rs, values);
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
    if (c->open && !(slice_eq(sp->h.trace_id, c->trace_id) && slice_eq(sp->trace_state, c->trace_state)))
        if (span_run_close(c) < 0)
            return -1;
    if (!c->open) {
        if ((c->blobs = PyList_New(0)) == NULL)
            return -1;
        c->open = 1;
        c->trace_id = sp->h.trace_id;
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
    if (sp->status >= 0 && sp->status < KNOWN_STATUS_CODES) /* open enum: others carry no bit */
        c->status_mask |= (uint64_t)1 << sp->status;
    if (sp->h.start && (!c->start || sp->h.start < c->start))
        c->start = sp->h.start;
    if (sp->h.end > c->end)
        c->end = sp->h.end;
    if (!sp->h.has_parent || (sp->flags & 0x300) == 0x300) /* local root, or its parent is remote */
        c->root = 1;
    for (int j = 0; j < n; j++) {
        if (!sp->found[j]) {
            c->absent[j] = 1;
            continue;
        }
        PyObject *h = c->hits[j];
        PyObject *v = value_bytes(sp->vals[j]);
        if (v == NULL)
            return -1;
        if (h == NULL) {
            if ((h = c->hits[j] = PyList_New(0)) == NULL) {
                Py_DECREF(v);
                return -1;
            }
        } else {
            PyObject *last = PyList_GET_ITEM(h, PyList_GET_SIZE(h) - 1);
            int same = PyBytes_GET_SIZE(last) == PyBytes_GET_SIZE(v) &&
                       memcmp(PyBytes_AS_STRING(last), PyBytes_AS_STRING(v), (size_t)PyBytes_GET_SIZE(v)) == 0;
            if (same) { /* the same value as the previous span's */
                Py_DECREF(v);
                continue;
            }
        }
        rc = PyList_Append(h, v);
        Py_DECREF(v);
        if (rc < 0)
            return -1;
    }
    return 0;
}

PyDoc_STRVAR(span_runs_doc,
"span_runs(request: bytes, keys: tuple[bytes, ...]) -> list[ResourceGroup]\n\n"
"The spans of an encoded ExportTraceServiceRequest as SpanRuns: consecutive spans with the same trace id\n"
"and tracestate, nested in ResourceGroup / ScopeGroup (see sidecar._wire_types).");

static PyObject *span_runs(PyObject *self, PyObject *args)
{
    const char *data;
    Py_ssize_t len;
    PyObject *keys;
    (void)self;
    if (!PyArg_ParseTuple(args, "y#O!", &data, &len, &PyTuple_Type, &keys))
        return NULL;
    SpanRunCtx c;
    if (keys_of(keys, &c.k, NULL) < 0)
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
    PyObject *blobs = frozen_blobs(c->blobs);
    c->blobs = NULL;
    c->open = 0;
    PyObject *items[4] = {bytes_of(c->trace_id), blobs, PyLong_FromSsize_t(c->nbytes), PyBool_FromLong(c->immediate)};
    PyObject *run = named(LogRun_T, 4, items);
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
    return nest_resource(&c->nest, rl, PyTuple_New(0));
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
"log_runs(request: bytes, keep_severity: int) -> list[ResourceGroup]\n\n"
"The log records of an encoded ExportLogsServiceRequest as LogRuns: consecutive records with the same\n"
"trace id and the same answer to severity_number >= keep_severity, nested like span_runs().");

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

/* --- check_encoding (the receiver's parse, without parsing) ------------------------------------- */

/* A request type's schema as sidecar/wire.py builds it from the protobuf descriptors: SCHEMA_WIDTH bytes
 * per message type (type 0 the request), one per field number below SCHEMA_WIDTH: 0 for a field the parser
 * reads without looking inside (numbers, bytes, enums, unknown fields), 1 for a string (its UTF-8 is
 * checked), 2 + i for a message of type i (its fields are checked in turn). */
#define SCHEMA_WIDTH 32

/* Strict UTF-8 as upb checks a proto3 string: no overlong forms, surrogates or code points past U+10FFFF. */
static int utf8_ok(const uint8_t *p, Py_ssize_t n)
{
    const uint8_t *end = p + n;
    while (p < end) {
        while (end - p >= 8) { /* ASCII, 8 bytes at a time */
            uint64_t w;
            memcpy(&w, p, 8);
            if (w & 0x8080808080808080ULL)
                break;
            p += 8;
        }
        if (p >= end)
            break;
        uint8_t c = *p;
        if (c < 0x80) {
            p++;
            continue;
        }
        int more;
        uint8_t lo = 0x80, hi = 0xBF; /* the range of the second byte */
        if (c >= 0xC2 && c <= 0xDF)
            more = 1;
        else if (c == 0xE0)
            more = 2, lo = 0xA0;
        else if (c == 0xED)
            more = 2, hi = 0x9F;
        else if (c >= 0xE1 && c <= 0xEF)
            more = 2;
        else if (c == 0xF0)
            more = 3, lo = 0x90;
        else if (c == 0xF4)
            more = 3, hi = 0x8F;
        else if (c >= 0xF1 && c <= 0xF3)
            more = 3;
        else
            return 0;
        if (end - p <= more || p[1] < lo || p[1] > hi)
            return 0;
        for (int i = 2; i <= more; i++)
            if ((p[i] & 0xC0) != 0x80)
                return 0;
        p += more + 1;
    }
    return 1;
}

/* Every field of one message of type ``type``, at ``depth``, as the parser would read it. The common
 * shapes (one-byte tags and lengths, length-delimited and varint fields) are read inline; anything else
 * goes through rd_tag / rd_value, which check it as every other scanner here does. */
static int check_message(const uint8_t *p, const uint8_t *end, const uint8_t *schema, Py_ssize_t ntypes,
                         Py_ssize_t type, int depth)
{
    const uint8_t *row = schema + type * SCHEMA_WIDTH;
    while (p < end) {
        uint32_t f;
        int wt;
        if (*p < 0x80 && *p >= 8) { /* a one-byte tag of field 1..15 */
            f = *p >> 3;
            wt = *p & 7;
            p++;
        } else {
            Reader r = {p, end};
            if (rd_tag(&r, &f, &wt) < 0)
                return -1;
            p = r.p;
        }
        if (wt == WT_LEN) {
            uint64_t n;
            if (p < end && *p < 0x80) {
                n = *p++;
            } else {
                Reader r = {p, end};
                if (rd_varint(&r, &n) < 0)
                    return -1;
                p = r.p;
            }
            if (n > (uint64_t)(end - p))
                return bad("length past the end of the buffer");
            const uint8_t *sub = p;
            p += n;
            uint8_t kind = f < SCHEMA_WIDTH ? row[f] : 0;
            if (kind == 0)
                continue; /* bytes, or an unknown field */
            if (kind == 1) {
                if (!utf8_ok(sub, (Py_ssize_t)n))
                    return bad("invalid UTF-8 in a string field");
                continue;
            }
            if (kind - 2 >= ntypes)
                return bad("schema names a message type it does not hold");
            if (depth + 1 > MAX_DEPTH)
                return bad("messages nested too deep");
            if (check_message(sub, p, schema, ntypes, kind - 2, depth + 1) < 0)
                return -1;
        } else if (wt == WT_VARINT && p < end && *p < 0x80) {
            p++;
        } else { /* a number, or a group (skipped whole, one deeper), or an invalid wire type */
            Reader r = {p, end};
            uint64_t num;
            Slice s;
            if (rd_value(&r, f, wt, &num, &s, depth) < 0)
                return -1;
            p = r.p; /* a known message or string field with another wire type is an unknown field */
        }
    }
    return 0;
}

PyDoc_STRVAR(check_encoding_doc,
"check_encoding(request: bytes, schema: bytes, request_type: type) -> None\n\n"
"Raises ValueError, naming the damage, exactly where the protobuf parser (upb) would refuse ``request`` as\n"
"a ``request_type``: bad tags, varints, lengths and groups, invalid UTF-8 in a string field, nesting deeper\n"
"than 100. ``schema`` is ``sidecar.wire.schema_of(request_type)``. Returns None: nothing is parsed, so a\n"
"stage that wants the message parses it then (most work on the bytes and never do).");

static PyObject *check_encoding(PyObject *self, PyObject *args)
{
    (void)self;
    const char *data, *schema;
    Py_ssize_t len, slen;
    PyObject *request_type;
    if (!PyArg_ParseTuple(args, "y#y#O:check_encoding", &data, &len, &schema, &slen, &request_type))
        return NULL;
    if (slen == 0 || slen % SCHEMA_WIDTH != 0)
        return PyErr_Format(PyExc_ValueError, "schema must be a non-empty multiple of %d bytes", SCHEMA_WIDTH);
    if (check_message((const uint8_t *)data, (const uint8_t *)data + len, (const uint8_t *)schema, slen / SCHEMA_WIDTH,
                      0, 0) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* --- a span's own fields, as audit records read them ------------------------------------------ */

/* An entry span: kind SERVER or CONSUMER, or no parent. */
static int span_entry(const SpanHead *h) { return h->kind == 2 || h->kind == 5 || !h->has_parent; }

/* The status code and message of a span whose fields span_head_field read: every occurrence of the status
 * merges (a message field), so all are read, in order. */
static int span_status(Slice item, SpanHead *h)
{
    if (!h->has_status)
        return 0;
    Reader r = reader_of(item);
    uint32_t f;
    int wt;
    uint64_t num;
    Slice s, t;
    while (r.p < r.end) {
        rd_field(&r, &f, &wt, &num, &s); /* cannot fail: read once already */
        if (f != 15 || wt != WT_LEN)
            continue;
        Reader sr = reader_of(s);
        while (sr.p < sr.end) {
            if (rd_field(&sr, &f, &wt, &num, &t) < 0)
                return -1;
            if (f == 2 && wt == WT_LEN)
                h->message = t;
            else if (f == 3 && wt == WT_VARINT)
                h->code = (long)(int32_t)num;
        }
    }
    return 0;
}

/* --- audit_spans ----------------------------------------------------------------------------- */

/* Per resource: the spans an audit record can use, i.e. entry spans (kind SERVER 2 or CONSUMER 5, or
 * no parent) and spans with a wanted attribute key or a key starting with the prefix. Every other span
 * costs one scan of its fields and no Python object. */
typedef struct {
    Keys k;          /* span attribute keys */
    Keys ek;         /* event attribute keys */
    PyObject *names[MAX_KEYS + 1], *enames[MAX_KEYS + 1]; /* owned: each key's str, made on first use */
    Slice prefix;
    PyObject *out;   /* list of AuditSpans */
    PyObject *spans; /* owned: the current resource's selected spans, or NULL before the first resource */
    Slice rs;        /* the current Resource{Spans} */
} AuditCtx;

static int audit_flush(AuditCtx *c)
{
    PyObject *spans = c->spans;
    c->spans = NULL;
    if (spans == NULL)
        return 0;
    if (PyList_GET_SIZE(spans) == 0) {
        Py_DECREF(spans);
        return 0;
    }
    PyObject *items[2] = {merged_field(c->rs, 1), spans};
    PyObject *group = named(AuditSpans_T, 2, items);
    if (group == NULL)
        return -1;
    int rc = PyList_Append(c->out, group);
    Py_DECREF(group);
    return rc;
}

static int audit_resource(void *vctx, Py_ssize_t index, Slice rs)
{
    AuditCtx *c = vctx;
    (void)index;
    if (audit_flush(c) < 0)
        return -1;
    c->rs = rs;
    c->spans = PyList_New(0);
    return c->spans == NULL ? -1 : 0;
}

static int audit_scope(void *ctx, Slice ss) { (void)ctx; (void)ss; return 0; }

/* An AnyValue for Python: None when empty; a str, bool, int or float when it is one scalar field;
 * else its encoding (bytes, for the caller to parse: arrays, maps, bytes, merged or odd encodings). */
static PyObject *any_value(Slice v)
{
    Reader r = reader_of(v);
    uint32_t f;
    int wt;
    uint64_t num;
    Slice s;
    if (v.n == 0)
        Py_RETURN_NONE;
    if (rd_field(&r, &f, &wt, &num, &s) < 0)
        return NULL;
    if (r.p == r.end) {
        if (f == 1 && wt == WT_LEN)
            return str_of(s);
        if (f == 2 && wt == WT_VARINT)
            return PyBool_FromLong(num != 0);
        if (f == 3 && wt == WT_VARINT)
            return PyLong_FromLongLong((long long)(int64_t)num);
        if (f == 4 && wt == WT_I64) {
            double d;
            memcpy(&d, &num, sizeof d);
            return PyFloat_FromDouble(d);
        }
    }
    return bytes_of(v);
}

/* A KeyValue's key (its last key field, "" when none) and value (its value fields concatenated). */
static int key_value(Slice kv, Slice *key, Slice *first, int *nvalues)
{
    Reader r = reader_of(kv);
    Slice s;
    uint32_t f;
    int wt;
    uint64_t num;
    key->p = NULL;
    key->n = 0;
    *nvalues = 0;
    while (r.p < r.end) {
        if (rd_field(&r, &f, &wt, &num, &s) < 0)
            return -1;
        if (wt == WT_LEN && f == 1)
            *key = s;
        else if (wt == WT_LEN && f == 2 && !(*nvalues)++)
            *first = s;
    }
    return 0;
}

/* Sets d[key] to the KeyValue's value (any_value); ``only_new``: unless the key is there already. */
static int put_value(PyObject **d, Slice kv, Slice key, Slice first, int nvalues, int only_new, int *encoded,
                     PyObject **name)
{
    if (*d == NULL && (*d = PyDict_New()) == NULL)
        return -1;
    PyObject *k;
    if (name == NULL) {
        k = str_of(key);
    } else { /* a wanted key: its str is made once per call (hash cached) */
        if (*name == NULL)
            *name = str_of(key);
        k = Py_XNewRef(*name);
    }
    if (k == NULL)
        return -1;
    if (only_new && PyDict_Contains(*d, k)) {
        Py_DECREF(k);
        return 0;
    }
    PyObject *v;
    if (nvalues == 0) {
        v = Py_NewRef(Py_None);
    } else if (nvalues == 1) {
        v = any_value(first);
    } else {
        PyObject *merged = value_bytes(kv);
        v = merged; /* several value fields merge: the caller parses the encoding */
    }
    if (v != NULL && PyBytes_CheckExact(v))
        *encoded = 1;
    int rc = v == NULL ? -1 : PyDict_SetItem(*d, k, v);
    Py_DECREF(k);
    Py_XDECREF(v);
    return rc;
}

/* The index of a wanted key, MAX_KEYS for another key starting with the (non-empty) prefix, else -1. */
static int key_index(Slice key, const Keys *k, Slice prefix)
{
    int j = find_key(key, k);
    if (j >= 0)
        return j;
    if (prefix.n && key.n >= prefix.n && memcmp(key.p, prefix.p, (size_t)prefix.n) == 0)
        return MAX_KEYS;
    return -1;
}

/* The wanted attributes of one event (field 11 of a span) into *events, the first occurrence winning. */
static int audit_event(Slice ev, const Keys *ek, PyObject **names, PyObject **events, int *encoded)
{
    Reader r = reader_of(ev);
    uint32_t f;
    int wt, nv;
    uint64_t num;
    Slice s, key, first = {NULL, 0}, none = {NULL, 0};
    while (r.p < r.end) {
        if (rd_field(&r, &f, &wt, &num, &s) < 0)
            return -1;
        if (f != 3 || wt != WT_LEN)
            continue;
        if (key_value(s, &key, &first, &nv) < 0)
            return -1;
        int j = key_index(key, ek, none);
        if (j >= 0 && put_value(events, s, key, first, nv, 1, encoded, &names[j]) < 0)
            return -1;
    }
    return 0;
}

static int audit_item(void *vctx, Slice item)
{
    AuditCtx *c = vctx;
    Reader r = reader_of(item);
    uint32_t f;
    int wt, nv, encoded = 0, j;
    uint64_t num;
    Slice s, key, first = {NULL, 0};
    SpanHead h = {0};
    PyObject *attrs = NULL, *events = NULL;
    while (r.p < r.end) {
        if (rd_field(&r, &f, &wt, &num, &s) < 0)
            goto fail;
        if (wt == WT_LEN && f == 9) {
            if (key_value(s, &key, &first, &nv) < 0)
                goto fail;
            j = key_index(key, &c->k, c->prefix);
            if (j >= 0 && put_value(&attrs, s, key, first, nv, 0, &encoded, j < MAX_KEYS ? &c->names[j] : NULL) < 0)
                goto fail;
        } else if (wt == WT_LEN && f == 11) {
            if (c->ek.nkeys && audit_event(s, &c->ek, c->enames, &events, &encoded) < 0)
                goto fail;
        } else {
            span_head_field(&h, f, wt, num, s);
        }
    }
    int entry = span_entry(&h);
    if (!entry && attrs == NULL) {
        Py_XDECREF(events);
        return 0;
    }
    if (span_status(item, &h) < 0)
        goto fail;
    if (encoded) { /* a later scalar may have replaced an encoded value: say what the dicts hold now */
        encoded = 0;
        PyObject *dicts[2] = {attrs, events}, *k, *v;
        for (int i = 0; i < 2 && !encoded; i++) {
            Py_ssize_t pos = 0;
            while (dicts[i] != NULL && !encoded && PyDict_Next(dicts[i], &pos, &k, &v))
                encoded = PyBytes_CheckExact(v);
        }
    }
    PyObject *items[12] = {
        bytes_of(h.trace_id), bytes_of(h.span_id), PyBool_FromLong(entry), str_of(h.name),
        PyLong_FromUnsignedLongLong(h.start), PyLong_FromUnsignedLongLong(h.end), PyLong_FromLong(h.code),
        str_of(h.message), attrs ? attrs : PyDict_New(), events ? events : PyDict_New(),
        PyBool_FromLong(encoded), bytes_of(item),
    };
    attrs = events = NULL;
    PyObject *sp = named(AuditSpan_T, 12, items);
    if (sp == NULL)
        return -1;
    int rc = PyList_Append(c->spans, sp);
    Py_DECREF(sp);
    return rc;
fail:
    Py_XDECREF(attrs);
    Py_XDECREF(events);
    return -1;
}

PyDoc_STRVAR(audit_spans_doc,
"audit_spans(request: bytes, keys: tuple[bytes, ...], prefix: bytes, event_keys: tuple[bytes, ...])\n"
"    -> list[AuditSpans]\n\n"
"Per ResourceSpans with any: its resource as encoded and an AuditSpan for each span that is an entry\n"
"span (kind SERVER or CONSUMER, or no parent) or has an attribute whose key is one of ``keys`` or\n"
"starts with ``prefix`` (non-empty). What the audit exporter reads records from, parsing no span.");

/* The arguments of audit_spans and audit_subset: the request, span and event attribute keys (borrowed: the
 * caller's tuples keep them alive), and the prefix. */
static int audit_args(PyObject *args, Slice *req, Keys *k, Keys *ek, Slice *prefix)
{
    const char *data, *pre;
    Py_ssize_t len, plen;
    PyObject *keys, *event_keys;
    if (!PyArg_ParseTuple(args, "y#O!y#O!", &data, &len, &PyTuple_Type, &keys, &pre, &plen, &PyTuple_Type,
                          &event_keys))
        return -1;
    if (keys_of(keys, k, NULL) < 0 || keys_of(event_keys, ek, NULL) < 0)
        return -1;
    req->p = (const uint8_t *)data;
    req->n = len;
    prefix->p = (const uint8_t *)pre;
    prefix->n = plen;
    return 0;
}

static PyObject *audit_spans(PyObject *self, PyObject *args)
{
    (void)self;
    AuditCtx c;
    Slice req;
    if (audit_args(args, &req, &c.k, &c.ek, &c.prefix) < 0)
        return NULL;
    c.spans = NULL;
    c.rs.p = NULL;
    c.rs.n = 0;
    memset(c.names, 0, sizeof c.names);
    memset(c.enames, 0, sizeof c.enames);
    if ((c.out = PyList_New(0)) == NULL)
        return NULL;
    Walk w = {audit_resource, audit_scope, audit_item};
    int rc = walk_request(req, &w, &c) < 0 || audit_flush(&c) < 0 ? -1 : 0;
    for (int j = 0; j <= MAX_KEYS; j++) {
        Py_XDECREF(c.names[j]);
        Py_XDECREF(c.enames[j]);
    }
    if (rc < 0) {
        Py_XDECREF(c.spans);
        Py_CLEAR(c.out);
    }
    return c.out;
}

/* --- audit_subset ---------------------------------------------------------------------------- */

/* A growing output buffer. A length-delimited field is written as its tag, a 5-byte gap for the
 * length (inputs are < 2 GiB) and its content; closing it writes the minimal length varint and moves
 * the content back over the rest of the gap. */
typedef struct {
    uint8_t *p;
    Py_ssize_t n, cap;
} Out;

static int out_room(Out *o, Py_ssize_t more)
{
    if (o->n + more <= o->cap)
        return 0;
    Py_ssize_t cap = o->cap ? o->cap : 256;
    while (cap < o->n + more)
        cap *= 2;
    uint8_t *p = PyMem_Realloc(o->p, (size_t)cap);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    o->p = p;
    o->cap = cap;
    return 0;
}

static inline int varint_len(uint64_t v)
{
    int n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

static inline void put_varint(uint8_t *w, uint64_t v)
{
    while (v >= 0x80) {
        *w++ = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    *w = (uint8_t)v;
}

static int out_varint(Out *o, uint64_t v)
{
    if (out_room(o, 10) < 0)
        return -1;
    put_varint(o->p + o->n, v);
    o->n += varint_len(v);
    return 0;
}

static int out_tag(Out *o, uint32_t field, int wt) { return out_varint(o, ((uint64_t)field << 3) | (uint64_t)wt); }

/* A length-delimited field with ``s`` as its content. */
static int out_len_field(Out *o, uint32_t field, Slice s)
{
    if (out_tag(o, field, WT_LEN) < 0 || out_varint(o, (uint64_t)s.n) < 0 || out_room(o, s.n) < 0)
        return -1;
    if (s.n)
        memcpy(o->p + o->n, s.p, (size_t)s.n);
    o->n += s.n;
    return 0;
}

/* Opens a length-delimited field; returns where its gap starts (for out_close), -1 on error. */
static Py_ssize_t out_open(Out *o, uint32_t field)
{
    if (out_tag(o, field, WT_LEN) < 0 || out_room(o, 5) < 0)
        return -1;
    Py_ssize_t at = o->n;
    o->n += 5;
    return at;
}

static void out_close(Out *o, Py_ssize_t at)
{
    Py_ssize_t len = o->n - at - 5;
    int k = varint_len((uint64_t)len);
    put_varint(o->p + at, (uint64_t)len);
    if (k < 5)
        memmove(o->p + at + k, o->p + at + 5, (size_t)len);
    o->n = at + k + len;
}

/* The non-entry spans kept last in the open ResourceSpans: a later one of the same trace with the same wanted
 * attributes (byte for byte, in order) and no event attribute is a repeat, left out (a generate loop's forward
 * spans: their facts are this one's). */
#define REPEAT_WINDOW 8
#define REPEAT_ATTRS 32
typedef struct {
    Slice trace_id;
    int n;
    Slice kv[REPEAT_ATTRS];
} KeptFacts;

typedef struct {
    Keys k, ek;
    Slice prefix;
    Out out;
    KeptFacts recent[REPEAT_WINDOW];
    int nrecent, next_recent;
    Py_ssize_t rs_tag;   /* where the current ResourceSpans' tag starts, -1 before the first */
    Py_ssize_t rs_at, ss_at; /* gaps of the open ResourceSpans and its one ScopeSpans */
    Py_ssize_t nspans;   /* spans in the open ResourceSpans */
    Py_ssize_t kept;     /* spans kept in all */
} SubsetCtx;

/* Closes the open ResourceSpans, or takes it back out when it kept no span. */
static void subset_close(SubsetCtx *c)
{
    if (c->rs_tag < 0)
        return;
    if (c->nspans == 0) {
        c->out.n = c->rs_tag;
    } else {
        out_close(&c->out, c->ss_at);
        out_close(&c->out, c->rs_at);
    }
    c->rs_tag = -1;
}

static int subset_resource(void *vctx, Py_ssize_t index, Slice rs)
{
    SubsetCtx *c = vctx;
    (void)index;
    subset_close(c);
    c->rs_tag = c->out.n;
    c->nspans = 0;
    c->nrecent = c->next_recent = 0;
    if ((c->rs_at = out_open(&c->out, 1)) < 0)
        return -1;
    Reader r = reader_of(rs);
    Slice s;
    uint32_t f;
    int wt;
    uint64_t num;
    while (r.p < r.end) { /* every occurrence of the resource: the parser merges them */
        if (rd_field(&r, &f, &wt, &num, &s) < 0)
            return -1;
        if (f == 1 && wt == WT_LEN && out_len_field(&c->out, 1, s) < 0)
            return -1;
    }
    return (c->ss_at = out_open(&c->out, 2)) < 0 ? -1 : 0;
}

/* An event's attributes with a wanted key, as one event (nothing when it has none). */
static int subset_event(SubsetCtx *c, Slice ev)
{
    Reader r = reader_of(ev);
    Slice s, key, first;
    uint32_t f;
    int wt, nv;
    uint64_t num;
    Slice none = {NULL, 0};
    Py_ssize_t tag = c->out.n, at = -1;
    while (r.p < r.end) {
        if (rd_field(&r, &f, &wt, &num, &s) < 0)
            return -1;
        if (f != 3 || wt != WT_LEN)
            continue;
        if (key_value(s, &key, &first, &nv) < 0)
            return -1;
        if (key_index(key, &c->ek, none) < 0)
            continue;
        if (at < 0 && (at = out_open(&c->out, 11)) < 0)
            return -1;
        if (out_len_field(&c->out, 3, s) < 0)
            return -1;
    }
    if (at >= 0)
        out_close(&c->out, at);
    else
        c->out.n = tag;
    return 0;
}

/* Whether a non-entry span with these wanted attributes repeats one kept in the window; if not, it joins it. */
static int repeats(SubsetCtx *c, Slice trace_id, const Slice *kv, int n)
{
    for (int i = 0; i < c->nrecent; i++) {
        const KeptFacts *k = &c->recent[i];
        if (k->n != n || !slice_eq(k->trace_id, trace_id))
            continue;
        int same = 1;
        for (int j = 0; same && j < n; j++)
            same = slice_eq(k->kv[j], kv[j]);
        if (same)
            return 1;
    }
    KeptFacts *k = &c->recent[c->next_recent];
    c->next_recent = (c->next_recent + 1) % REPEAT_WINDOW;
    if (c->nrecent < REPEAT_WINDOW)
        c->nrecent++;
    k->trace_id = trace_id;
    k->n = n;
    memcpy(k->kv, kv, (size_t)n * sizeof *kv);
    return 0;
}

static int subset_item(void *vctx, Slice item)
{
    SubsetCtx *c = vctx;
    Reader r = reader_of(item);
    Slice s, key, first, trace_id = {NULL, 0}, kv[REPEAT_ATTRS];
    uint32_t f;
    int wt, nv, j, nkv = 0;
    uint64_t num;
    long kind = 0;
    int has_parent = 0, wanted = 0, events = 0;
    /* one pass: written as read, taken back out unless audit_spans would select it (an entry span, or one
     * with a wanted attribute) and it is no repeat */
    Py_ssize_t tag = c->out.n, at = out_open(&c->out, 2);
    if (at < 0)
        return -1;
    while (r.p < r.end) {
        if (rd_field(&r, &f, &wt, &num, &s) < 0)
            return -1;
        if (wt == WT_LEN) {
            switch (f) {
            case 1:
                trace_id = s;
                if (out_len_field(&c->out, f, s) < 0)
                    return -1;
                break;
            case 4:
                has_parent = s.n > 0;
                /* fall through */
            case 2: case 5: case 15:
                if (out_len_field(&c->out, f, s) < 0)
                    return -1;
                break;
            case 9:
                if (key_value(s, &key, &first, &nv) < 0)
                    return -1;
                j = key_index(key, &c->k, c->prefix);
                if (j >= 0) {
                    wanted = 1;
                    if (nkv <= REPEAT_ATTRS) { /* REPEAT_ATTRS + 1: too many to compare */
                        if (nkv < REPEAT_ATTRS)
                            kv[nkv] = s;
                        nkv++;
                    }
                    if (out_len_field(&c->out, 9, s) < 0)
                        return -1;
                }
                break;
            case 11:
                if (c->ek.nkeys) {
                    Py_ssize_t before = c->out.n;
                    if (subset_event(c, s) < 0)
                        return -1;
                    events |= c->out.n != before;
                }
                break;
            }
        } else if (wt == WT_VARINT && f == 6) {
            kind = (long)(int32_t)num;
            if (out_tag(&c->out, 6, WT_VARINT) < 0 || out_varint(&c->out, num) < 0)
                return -1;
        } else if (wt == WT_I64 && (f == 7 || f == 8)) {
            if (out_tag(&c->out, f, WT_I64) < 0 || out_room(&c->out, 8) < 0)
                return -1;
            memcpy(c->out.p + c->out.n, r.p - 8, 8);
            c->out.n += 8;
        }
    }
    int entry = kind == 2 || kind == 5 || !has_parent;
    if (!(wanted || entry) || (!entry && !events && nkv <= REPEAT_ATTRS && repeats(c, trace_id, kv, nkv))) {
        c->out.n = tag;
        return 0;
    }
    out_close(&c->out, at);
    c->nspans++;
    c->kept++;
    return 0;
}

PyDoc_STRVAR(audit_subset_doc,
"audit_subset(request: bytes, keys: tuple[bytes, ...], prefix: bytes, event_keys: tuple[bytes, ...])\n"
"    -> tuple[bytes, int]\n\n"
"The request re-encoded with only what ``audit_spans`` reads, and how many spans it kept: per\n"
"ResourceSpans with a selected span, its resource and one ScopeSpans (no scope) of the spans\n"
"``audit_spans`` selects, each with only its ids, parent, name, kind, times, status, the attributes\n"
"``audit_spans`` reads and, of its events, only the attributes with a key in ``event_keys``; a\n"
"repeat is left out: a span that is no entry span, whose kept attributes equal, byte for byte and in\n"
"order, those of one of the last 8 such spans kept of its ResourceSpans and trace, neither having an\n"
"event attribute kept (a generate loop's forward spans). ``audit_spans`` answers the same on the\n"
"result as on the request, less the repeats.");

static PyObject *audit_subset(PyObject *self, PyObject *args)
{
    (void)self;
    SubsetCtx c;
    Slice req;
    memset(&c, 0, sizeof c);
    if (audit_args(args, &req, &c.k, &c.ek, &c.prefix) < 0)
        return NULL;
    c.rs_tag = -1;
    Walk w = {subset_resource, audit_scope, subset_item};
    PyObject *result = NULL;
    if (walk_request(req, &w, &c) == 0) {
        subset_close(&c);
        result = Py_BuildValue("(y#n)", c.out.p ? (const char *)c.out.p : "", c.out.n, c.kept);
    }
    PyMem_Free(c.out.p);
    return result;
}

/* --- audit_rows ------------------------------------------------------------------------------ */

/* The audit store's rows of a request's records, made in this pass: what sidecar.audit.records.extract
 * and row_of give, for the usual shape of request. Roles of the layout's keys, in order; parameter keys
 * follow, sorted by their names in the record. */
enum { R_REQUEST, R_USER, R_MODEL, R_VERSION, R_GENAI, R_REPLAY, R_ERROR_TYPE, R_HTTP, R_HTTP_OLD, R_INPUT,
       R_OUTPUT = R_INPUT + 3, R_PARAMS = R_OUTPUT + 3 };
#define ROW_MAX_KEYS 32
#define ROW_MAX_TAGS 8
#define ROW_COLUMNS 20

/* One selected span: an entry span, or one with a wanted attribute (as audit_spans selects). */
typedef struct {
    Py_ssize_t resource, next; /* next: the next inference span of the same trace, -1 */
    SpanHead h;
    int entry, inference, claimed;
    uint32_t present;         /* bit j: wanted key j seen (its last occurrence wins, as in a dict) */
    Slice val[ROW_MAX_KEYS];  /* that occurrence's value field (NULL: none, i.e. None) */
    int ntags;
    Slice tag_key[ROW_MAX_TAGS], tag_val[ROW_MAX_TAGS]; /* keys without the prefix */
} RowSpan;

typedef struct {
    Keys k, ek;
    Py_ssize_t nparams;
    PyObject *param_names, *tensor_format, *status_names, *encoder, *recorded, *missing; /* borrowed */
    Slice prefix, service_key, intent;
    RowSpan *spans;
    Py_ssize_t nspans, cap;
    PyObject **service;  /* owned: per resource, its service.name (str) */
    Slice *service_raw;  /* per resource, its bytes (equal bytes: equal str) */
    Py_ssize_t nres, res_cap;
    int unusual;         /* a shape left to the general path (the caller gets None) */
    /* the previous record's parameters (value slices, NULL: not set) and their JSON: records of one request
     * usually have the same, so the JSON is made once */
    const RowSpan *last_from[ROW_MAX_KEYS];
    PyObject *last_params; /* owned */
} RowsCtx;

/* A shape the fast path leaves to the general path: sets the flag, stops the walk (not an error). */
static int unusual(RowsCtx *c)
{
    c->unusual = 1;
    return -1;
}

/* The service of one ResourceSpans: Resource (field 1, once) attributes, the last service.name KeyValue's
 * string value ("" when absent or not a string), as Resource.FromString(...) reads it. */
static int rows_resource(void *vctx, Py_ssize_t index, Slice rs)
{
    RowsCtx *c = vctx;
    (void)index;
    Reader r = reader_of(rs);
    uint32_t f;
    int wt, nv, resources = 0, found = 0;
    uint64_t num;
    Slice res = {NULL, 0}, s, key, first = {NULL, 0}, value = {NULL, 0};
    while (r.p < r.end) {
        if (rd_field(&r, &f, &wt, &num, &s) < 0)
            return -1;
        if (f == 1 && wt == WT_LEN) {
            res = s;
            resources++;
        }
    }
    if (resources > 1)
        return unusual(c);
    r = reader_of(res);
    while (r.p < r.end) {
        if (rd_field(&r, &f, &wt, &num, &s) < 0)
            return -1;
        if (f != 1 || wt != WT_LEN)
            continue;
        if (key_value(s, &key, &first, &nv) < 0)
            return -1;
        if (slice_eq(key, c->service_key)) {
            if (nv > 1)
                return unusual(c);
            found = 1;
            value = nv ? first : (Slice){NULL, 0};
        }
    }
    Slice name = {(const uint8_t *)"", 0};
    if (found && value.n) {
        Reader vr = reader_of(value);
        if (rd_field(&vr, &f, &wt, &num, &s) < 0)
            return -1;
        if (vr.p != vr.end)
            return unusual(c);
        if (f == 1 && wt == WT_LEN)
            name = s;
    }
    if (c->nres == c->res_cap) {
        Py_ssize_t cap = c->res_cap ? 2 * c->res_cap : 4;
        PyObject **sv = PyMem_Realloc(c->service, (size_t)cap * sizeof *sv);
        if (sv == NULL)
            return PyErr_NoMemory(), -1;
        c->service = sv;
        Slice *raw = PyMem_Realloc(c->service_raw, (size_t)cap * sizeof *raw);
        if (raw == NULL)
            return PyErr_NoMemory(), -1;
        c->service_raw = raw;
        c->res_cap = cap;
    }
    PyObject *str = str_of(name);
    if (str == NULL)
        return -1;
    c->service[c->nres] = str;
    c->service_raw[c->nres++] = name;
    return 0;
}

/* Whether one event (field 11 of a span) has an attribute with an event key (a generation span's prompt). */
static int event_has_key(Slice ev, const Keys *ek, int *has)
{
    Reader r = reader_of(ev);
    uint32_t f;
    int wt, nv;
    uint64_t num;
    Slice s, key, first, none = {NULL, 0};
    while (r.p < r.end) {
        if (rd_field(&r, &f, &wt, &num, &s) < 0)
            return -1;
        if (f == 3 && wt == WT_LEN) {
            if (key_value(s, &key, &first, &nv) < 0)
                return -1;
            if (key_index(key, ek, none) >= 0)
                *has = 1;
        }
    }
    return 0;
}

static PyObject *attr_of(RowsCtx *c, const RowSpan *sp, int j, int arrays);

static int rows_item(void *vctx, Slice item)
{
    RowsCtx *c = vctx;
    if (c->nspans == c->cap) {
        Py_ssize_t cap = c->cap ? 2 * c->cap : 64;
        RowSpan *sp = PyMem_Realloc(c->spans, (size_t)cap * sizeof *sp);
        if (sp == NULL)
            return PyErr_NoMemory(), -1;
        c->spans = sp;
        c->cap = cap;
    }
    RowSpan *sp = &c->spans[c->nspans];
    Reader r = reader_of(item);
    uint32_t f;
    int wt, nv, j, events = 0;
    uint64_t num;
    Slice s, key, first = {NULL, 0}, none = {NULL, 0};
    memset(&sp->h, 0, sizeof sp->h);
    sp->present = 0;
    sp->ntags = 0;
    sp->claimed = 0;
    sp->next = -1;
    sp->resource = c->nres - 1;
    while (r.p < r.end) {
        if (rd_field(&r, &f, &wt, &num, &s) < 0)
            return -1;
        if (wt == WT_LEN && f == 9) {
            if (key_value(s, &key, &first, &nv) < 0)
                return -1;
            j = key_index(key, &c->k, c->prefix);
            if (j < 0)
                continue;
            if (nv > 1)
                return unusual(c); /* value fields that merge: the parser's business */
            if (j < MAX_KEYS) {
                sp->present |= (uint32_t)1 << j;
                sp->val[j] = nv ? first : none;
                continue;
            }
            key.p += c->prefix.n;
            key.n -= c->prefix.n;
            for (j = 0; j < sp->ntags && !slice_eq(sp->tag_key[j], key); j++)
                ;
            if (j == ROW_MAX_TAGS)
                return unusual(c);
            sp->tag_key[j] = key;
            sp->tag_val[j] = nv ? first : none;
            if (j == sp->ntags)
                sp->ntags++;
        } else if (wt == WT_LEN && f == 11) {
            if (c->ek.nkeys && event_has_key(s, &c->ek, &events) < 0)
                return -1;
        } else {
            span_head_field(&sp->h, f, wt, num, s);
        }
    }
    sp->entry = span_entry(&sp->h);
    if (!sp->entry && !sp->present && !sp->ntags)
        return 0; /* neither an entry span nor one with a record's attribute */
    if (events)
        return unusual(c); /* prompt and completion as events: the general path merges them */
    if (sp->resource < 0)
        return unusual(c);
    if (sp->present & ((uint32_t)1 << R_REPLAY)) { /* instrumentation.replay re-running a record */
        PyObject *replay = attr_of(c, sp, R_REPLAY, 0);
        if (replay == NULL)
            return -1;
        int skip = replay == Py_True;
        Py_DECREF(replay);
        if (skip)
            return 0;
    }
    if (span_status(item, &sp->h) < 0)
        return -1;
    sp->inference = !sp->entry && (sp->present & ((1u << R_MODEL) | (1u << R_GENAI))) != 0;
    c->nspans++;
    return 0;
}

/* A value for Python as records._value reads it: a scalar (any_value), or with ``arrays`` a list of scalars
 * (an ArrayValue: shapes, dtypes, finish reasons). NULL after setting ``unusual`` for any other encoded value
 * (maps, bytes, nested arrays, merged fields): the general path reads those. */
static PyObject *row_value_of(RowsCtx *c, Slice v, int arrays)
{
    PyObject *o = any_value(v);
    if (o == NULL || !PyBytes_CheckExact(o))
        return o;
    Py_DECREF(o);
    Reader r = reader_of(v);
    uint32_t f;
    int wt;
    uint64_t num;
    Slice arr, item;
    if (!arrays || rd_field(&r, &f, &wt, &num, &arr) < 0 || r.p != r.end || f != 5 || wt != WT_LEN) {
        PyErr_Clear();
        c->unusual = 1;
        return NULL;
    }
    PyObject *list = PyList_New(0);
    Reader ar = reader_of(arr);
    while (list != NULL && ar.p < ar.end) {
        if (rd_field(&ar, &f, &wt, &num, &item) < 0) {
            Py_CLEAR(list);
            break;
        }
        if (f != 1 || wt != WT_LEN)
            continue; /* an unknown field of ArrayValue */
        PyObject *x = any_value(item);
        if (x != NULL && PyBytes_CheckExact(x)) {
            Py_DECREF(x);
            c->unusual = 1;
            x = NULL;
        }
        if (x == NULL || PyList_Append(list, x) < 0)
            Py_CLEAR(list);
        Py_XDECREF(x);
    }
    return list;
}

/* The value of wanted key ``j`` of a span (new reference), Py_None when absent (``arrays``: as row_value_of);
 * NULL: an error, or unusual. */
static PyObject *attr_of(RowsCtx *c, const RowSpan *sp, int j, int arrays)
{
    if (!(sp->present & ((uint32_t)1 << j)))
        return Py_NewRef(Py_None);
    return row_value_of(c, sp->val[j], arrays);
}

static PyObject *str_or_none(PyObject *v)
{
    if (v == NULL || v == Py_None || PyUnicode_CheckExact(v))
        return v;
    PyObject *s = PyObject_Str(v);
    Py_DECREF(v);
    return s;
}

/* A record's fields gathered from its spans (records.merge): NULL until set; ``params`` entries may be None. */
typedef struct {
    PyObject *model, *version, *input, *output;
    const RowSpan *params[ROW_MAX_KEYS]; /* the span each parameter comes from */
} Facts;

static void facts_clear(Facts *fx)
{
    Py_CLEAR(fx->model);
    Py_CLEAR(fx->version);
    Py_CLEAR(fx->input);
    Py_CLEAR(fx->output);
}

/* records.is_tensor_payload: the format's name in the first 64 characters. */
static int is_tensor(RowsCtx *c, PyObject *text)
{
    PyObject *head = PyUnicode_Substring(text, 0, 64);
    if (head == NULL)
        return -1;
    int rc = PyUnicode_Contains(head, c->tensor_format);
    Py_DECREF(head);
    return rc;
}

/* One payload (input or output): the first of the span's sources with a value, a str as it is, else JSON. */
static int merge_payload(RowsCtx *c, const RowSpan *sp, int role, PyObject **slot)
{
    PyObject *v = NULL;
    for (int j = role; j < role + 3; j++) {
        if (!(sp->present & ((uint32_t)1 << j)))
            continue;
        if ((v = row_value_of(c, sp->val[j], 1)) == NULL)
            return -1;
        if (v != Py_None)
            break;
        Py_CLEAR(v);
    }
    if (v == NULL)
        return 0;
    if (!PyUnicode_CheckExact(v)) {
        Py_SETREF(v, PyObject_CallOneArg(c->encoder, v));
        if (v == NULL)
            return -1;
    }
    int replace = *slot == NULL;
    if (!replace) {
        int new_t = is_tensor(c, v), old_t = new_t > 0 ? is_tensor(c, *slot) : 0;
        if (new_t < 0 || old_t < 0) {
            Py_DECREF(v);
            return -1;
        }
        replace = new_t && !old_t;
    }
    if (replace)
        Py_XSETREF(*slot, v);
    else
        Py_DECREF(v);
    return 0;
}

/* records.merge(target, _span_facts(span)): what is set stays; parameters per key. */
static int merge_facts(RowsCtx *c, const RowSpan *sp, Facts *fx)
{
    if (fx->model == NULL && (sp->present & ((1u << R_MODEL) | (1u << R_GENAI)))) {
        PyObject *model = attr_of(c, sp, R_MODEL, 0);
        if (model == NULL)
            return -1;
        int truth = PyObject_IsTrue(model);
        if (truth < 0) {
            Py_DECREF(model);
            return -1;
        }
        if (!truth) {
            Py_SETREF(model, attr_of(c, sp, R_GENAI, 0));
            if (model == NULL)
                return -1;
        }
        if (model == Py_None)
            Py_DECREF(model);
        else if ((fx->model = str_or_none(model)) == NULL)
            return -1;
    }
    if (fx->version == NULL && (sp->present & (1u << R_VERSION))) {
        PyObject *v = attr_of(c, sp, R_VERSION, 0);
        if (v == NULL || (fx->version = PyObject_Str(v)) == NULL) {
            Py_XDECREF(v);
            return -1;
        }
        Py_DECREF(v);
    }
    for (Py_ssize_t i = 0; i < c->nparams; i++)
        if (fx->params[i] == NULL && (sp->present & ((uint32_t)1 << (R_PARAMS + i))))
            fx->params[i] = sp;
    if (merge_payload(c, sp, R_INPUT, &fx->input) < 0 || merge_payload(c, sp, R_OUTPUT, &fx->output) < 0)
        return -1;
    return 0;
}

static PyObject *hex_of(Slice s)
{
    static const char digits[] = "0123456789abcdef";
    PyObject *out = PyUnicode_New(2 * s.n, 127);
    if (out == NULL)
        return NULL;
    Py_UCS1 *w = PyUnicode_1BYTE_DATA(out);
    for (Py_ssize_t i = 0; i < s.n; i++) {
        w[2 * i] = (Py_UCS1)digits[s.p[i] >> 4];
        w[2 * i + 1] = (Py_UCS1)digits[s.p[i] & 15];
    }
    return out;
}

/* records._error_code: an HTTP status >= 400, else error.type, else an ERROR status's message. */
static PyObject *error_code(RowsCtx *c, const RowSpan *sp)
{
    for (int j = R_HTTP; j <= R_HTTP_OLD; j++) {
        if (!(sp->present & ((uint32_t)1 << j)))
            continue;
        PyObject *v = attr_of(c, sp, j, 0);
        if (v == NULL)
            return NULL;
        if (PyLong_CheckExact(v)) {
            int overflow;
            long long code = PyLong_AsLongLongAndOverflow(v, &overflow);
            if (overflow > 0 || code >= 400)
                return str_or_none(v);
        }
        Py_DECREF(v);
    }
    if (sp->present & (1u << R_ERROR_TYPE)) {
        PyObject *v = attr_of(c, sp, R_ERROR_TYPE, 0);
        if (v == NULL)
            return NULL;
        int truth = PyObject_IsTrue(v);
        if (truth > 0)
            return str_or_none(v);
        Py_DECREF(v);
        if (truth < 0)
            return NULL;
    }
    if (sp->h.code == 2) {
        if (!sp->h.message.n)
            return PyUnicode_FromString("error");
        PyObject *m = str_of(sp->h.message);
        if (m == NULL || PyUnicode_GET_LENGTH(m) <= 200)
            return m;
        Py_SETREF(m, PyUnicode_Substring(m, 0, 200));
        return m;
    }
    Py_RETURN_NONE;
}

/* JSON of a dict (the layout's encoder: sorted keys), "{}" when empty. */
static PyObject *json_of(RowsCtx *c, PyObject *d)
{
    if (PyDict_GET_SIZE(d) == 0)
        return PyUnicode_FromStringAndSize("{}", 2);
    return PyObject_CallOneArg(c->encoder, d);
}

static PyObject *tags_of(RowsCtx *c, const RowSpan *sp, PyObject **intent)
{
    PyObject *d = PyDict_New();
    if (d == NULL)
        return NULL;
    for (int i = 0; i < sp->ntags; i++) {
        PyObject *k = str_of(sp->tag_key[i]), *v = str_or_none(row_value_of(c, sp->tag_val[i], 0));
        if (v == Py_None)
            Py_SETREF(v, PyObject_Str(v));
        int rc = k == NULL || v == NULL ? -1 : PyDict_SetItem(d, k, v);
        if (rc == 0 && *intent == NULL && slice_eq(sp->tag_key[i], c->intent))
            *intent = Py_NewRef(v);
        Py_XDECREF(k);
        Py_XDECREF(v);
        if (rc < 0) {
            Py_DECREF(d);
            return NULL;
        }
    }
    PyObject *out = json_of(c, d);
    Py_DECREF(d);
    return out;
}

static PyObject *params_of(RowsCtx *c, Facts *fx)
{
    int same = c->last_params != NULL;
    for (Py_ssize_t i = 0; same && i < c->nparams; i++) {
        const RowSpan *a = fx->params[i], *b = c->last_from[i];
        same = a == b || (a != NULL && b != NULL && slice_eq(a->val[R_PARAMS + i], b->val[R_PARAMS + i]));
    }
    if (same)
        return Py_NewRef(c->last_params);
    PyObject *d = PyDict_New();
    if (d == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < c->nparams; i++) {
        if (fx->params[i] == NULL)
            continue;
        PyObject *v = attr_of(c, fx->params[i], (int)(R_PARAMS + i), 1);
        int rc = v == NULL ? -1 : PyDict_SetItem(d, PyTuple_GET_ITEM(c->param_names, i), v);
        Py_XDECREF(v);
        if (rc < 0) {
            Py_DECREF(d);
            return NULL;
        }
    }
    PyObject *out = json_of(c, d);
    Py_DECREF(d);
    if (out != NULL) {
        Py_XSETREF(c->last_params, Py_NewRef(out));
        memcpy(c->last_from, fx->params, sizeof c->last_from);
    }
    return out;
}

#define MAX_UNIX_NANO ((uint64_t)INT64_MAX)

/* A trace id's bucket in a table of mask + 1 (its first 8 bytes, random in any real id, mixed). */
static size_t trace_bucket(Slice trace_id, size_t mask)
{
    uint64_t h = 0;
    if (trace_id.n)
        memcpy(&h, trace_id.p, trace_id.n < 8 ? (size_t)trace_id.n : 8);
    return (size_t)((h * 0x9E3779B97F4A7C15ull) >> 32) & mask;
}

/* The row of entry span ``e``: its own fields, merged with the facts of the inference spans of its trace
 * and service (claimed: they made no fragment). */
static PyObject *entry_row(RowsCtx *c, RowSpan *e, Py_ssize_t *heads, size_t mask)
{
    Facts fx;
    memset(&fx, 0, sizeof fx);
    PyObject *items[ROW_COLUMNS] = {NULL}, *intent = NULL, *row = NULL;
    if (merge_facts(c, e, &fx) < 0)
        goto done;
    if (heads != NULL) {
        for (size_t b = trace_bucket(e->h.trace_id, mask); heads[b] >= 0; b = (b + 1) & mask) {
            if (!slice_eq(c->spans[heads[b]].h.trace_id, e->h.trace_id))
                continue;
            Slice svc = c->service_raw[e->resource];
            for (Py_ssize_t i = heads[b]; i >= 0; i = c->spans[i].next) {
                RowSpan *sp = &c->spans[i];
                if (sp->resource != e->resource && !slice_eq(c->service_raw[sp->resource], svc))
                    continue;
                sp->claimed = 1;
                if (merge_facts(c, sp, &fx) < 0)
                    goto done;
            }
            break;
        }
    }
    uint64_t start = e->h.start < MAX_UNIX_NANO ? e->h.start : MAX_UNIX_NANO;
    uint64_t end = e->h.end < MAX_UNIX_NANO ? e->h.end : MAX_UNIX_NANO;
    if (end < start)
        end = start;
#define SET(i, expr) if ((items[i] = (expr)) == NULL) goto done
    SET(0, hex_of(e->h.trace_id));
    SET(1, hex_of(e->h.span_id));
    SET(2, PyLong_FromUnsignedLongLong(start));
    SET(3, Py_NewRef(c->recorded));
    SET(4, Py_NewRef(c->service[e->resource]));
    SET(5, str_of(e->h.name));
    SET(6, str_or_none(attr_of(c, e, R_REQUEST, 0)));
    SET(7, Py_NewRef(fx.model ? fx.model : Py_None));
    SET(8, Py_NewRef(fx.version ? fx.version : Py_None));
    SET(9, str_or_none(attr_of(c, e, R_USER, 0)));
    SET(11, tags_of(c, e, &intent));
    SET(10, intent ? Py_NewRef(intent) : Py_NewRef(Py_None));
    SET(12, PyFloat_FromDouble((double)(end - start) / 1e6));
    SET(13, Py_NewRef(PyTuple_GET_ITEM(c->status_names, e->h.code >= 0 && e->h.code < 3 ? e->h.code : 0)));
    SET(14, error_code(c, e));
    SET(15, params_of(c, &fx));
    SET(16, Py_NewRef(fx.input ? fx.input : Py_None));
    SET(17, Py_NewRef(fx.output ? fx.output : Py_None));
    SET(18, PyLong_FromLong(0));
    SET(19, Py_NewRef(Py_None));
#undef SET
    if ((row = PyTuple_New(ROW_COLUMNS)) == NULL)
        goto done;
    for (int i = 0; i < ROW_COLUMNS; i++) {
        if (items[i] == Py_None) /* a missing text: what the store binds for one */
            Py_SETREF(items[i], Py_NewRef(c->missing));
        PyTuple_SET_ITEM(row, i, items[i]);
        items[i] = NULL;
    }
    PyObject_GC_UnTrack(row); /* texts and numbers only: no cycle can pass through it, the collector need not look */
done:
    for (int i = 0; i < ROW_COLUMNS; i++)
        Py_XDECREF(items[i]);
    Py_XDECREF(intent);
    facts_clear(&fx);
    return row;
}

/* The rows, once every selected span is read: inference spans chained per trace (a hash of the trace ids),
 * one row per entry span; NULL with ``unusual`` when an inference span is left unclaimed (a fragment). */
static PyObject *make_rows(RowsCtx *c)
{
    Py_ssize_t ninf = 0, *heads = NULL;
    size_t mask = 0;
    for (Py_ssize_t i = 0; i < c->nspans; i++)
        ninf += c->spans[i].inference;
    if (ninf) {
        size_t size = 8;
        while (size < 2 * (size_t)ninf)
            size <<= 1;
        mask = size - 1;
        if ((heads = PyMem_Malloc(size * 2 * sizeof *heads)) == NULL)
            return PyErr_NoMemory();
        Py_ssize_t *tails = heads + size;
        for (size_t b = 0; b < size; b++)
            heads[b] = -1;
        for (Py_ssize_t i = 0; i < c->nspans; i++) {
            RowSpan *sp = &c->spans[i];
            if (!sp->inference)
                continue;
            size_t b = trace_bucket(sp->h.trace_id, mask);
            while (heads[b] >= 0 && !slice_eq(c->spans[heads[b]].h.trace_id, sp->h.trace_id))
                b = (b + 1) & mask;
            if (heads[b] < 0)
                heads[b] = i;
            else
                c->spans[tails[b]].next = i;
            tails[b] = i;
        }
    }
    PyObject *rows = PyList_New(0);
    for (Py_ssize_t i = 0; rows != NULL && i < c->nspans; i++) {
        if (!c->spans[i].entry)
            continue;
        PyObject *row = entry_row(c, &c->spans[i], heads, mask);
        if (row == NULL || PyList_Append(rows, row) < 0)
            Py_CLEAR(rows);
        Py_XDECREF(row);
    }
    for (Py_ssize_t i = 0; rows != NULL && i < c->nspans; i++)
        if (c->spans[i].inference && !c->spans[i].claimed) {
            c->unusual = 1;
            Py_CLEAR(rows);
        }
    PyMem_Free(heads);
    return rows;
}

PyDoc_STRVAR(audit_rows_doc,
"audit_rows(request: bytes, layout: tuple, recorded: int, missing=None) -> list[tuple] | None\n\n"
"The audit store's rows of the request's records (sidecar.audit.records.row_of of each record\n"
"sidecar.audit.records.extract makes, in the store's column order, ``recorded`` as the recorded time),\n"
"made in one pass; None when the request needs the general path: an inference span without its entry\n"
"span (a fragment), prompt or completion events, a value left encoded (maps, bytes, nested lists, or a\n"
"list where a record holds text: lists of scalars are taken in parameters and payloads), more tags\n"
"than this pass holds, merged fields, or anything it cannot read (extract then says what). ``layout`` is\n"
"sidecar.audit.records' (keys by role, parameter names, prefix, event keys, service key, intent tag,\n"
"tensor format, status names, JSON encoder). A text a record lacks is ``missing`` in its row (the\n"
"store's choice: what it binds cheaply).");

static PyObject *audit_rows(PyObject *self, PyObject *args)
{
    (void)self;
    const char *data;
    Py_ssize_t len;
    PyObject *layout, *keys, *event_keys, *recorded, *missing = Py_None;
    RowsCtx c;
    memset(&c, 0, sizeof c);
    if (!PyArg_ParseTuple(args, "y#O!O!|O", &data, &len, &PyTuple_Type, &layout, &PyLong_Type, &recorded, &missing))
        return NULL;
    c.missing = missing;
    const char *pre, *skey, *intent;
    Py_ssize_t plen, sklen, ilen;
    if (!PyArg_ParseTuple(layout, "O!O!y#O!y#y#UO!O", &PyTuple_Type, &keys, &PyTuple_Type, &c.param_names,
                          &pre, &plen, &PyTuple_Type, &event_keys, &skey, &sklen, &intent, &ilen, &c.tensor_format,
                          &PyTuple_Type, &c.status_names, &c.encoder))
        return NULL;
    c.nparams = PyTuple_GET_SIZE(keys) - R_PARAMS;
    if (c.nparams < 0 || PyTuple_GET_SIZE(keys) > ROW_MAX_KEYS || PyTuple_GET_SIZE(c.param_names) != c.nparams
            || PyTuple_GET_SIZE(c.status_names) != 3) {
        PyErr_SetString(PyExc_ValueError, "audit_rows: a layout with keys for every role, at most 32 keys, "
                        "a name per parameter key and 3 status names");
        return NULL;
    }
    if (keys_of(keys, &c.k, NULL) < 0 || keys_of(event_keys, &c.ek, NULL) < 0)
        return NULL;
    c.prefix = (Slice){(const uint8_t *)pre, plen};
    c.service_key = (Slice){(const uint8_t *)skey, sklen};
    c.intent = (Slice){(const uint8_t *)intent, ilen};
    c.recorded = recorded;
    Slice req = {(const uint8_t *)data, len};
    Walk w = {rows_resource, audit_scope, rows_item};
    PyObject *rows = NULL;
    if (walk_request(req, &w, &c) == 0)
        rows = make_rows(&c);
    for (Py_ssize_t i = 0; i < c.nres; i++)
        Py_DECREF(c.service[i]);
    Py_XDECREF(c.last_params);
    PyMem_Free(c.service);
    PyMem_Free(c.service_raw);
    PyMem_Free(c.spans);
    if (rows == NULL && (c.unusual || !PyErr_ExceptionMatches(PyExc_MemoryError))) {
        PyErr_Clear(); /* unusual, or damaged: the general path makes the records or says what is wrong */
        Py_RETURN_NONE;
    }
    return rows;
}

static PyMethodDef methods[] = {
    {"check_ids", check_ids, METH_VARARGS, check_ids_doc},
    {"check_encoding", check_encoding, METH_VARARGS, check_encoding_doc},
    {"span_metric_rows", span_metric_rows, METH_VARARGS, span_metric_rows_doc},
    {"span_metric_groups", span_metric_groups, METH_VARARGS, span_metric_groups_doc},
    {"span_runs", span_runs, METH_VARARGS, span_runs_doc},
    {"log_runs", log_runs, METH_VARARGS, log_runs_doc},
    {"audit_spans", audit_spans, METH_VARARGS, audit_spans_doc},
    {"audit_subset", audit_subset, METH_VARARGS, audit_subset_doc},
    {"audit_rows", audit_rows, METH_VARARGS, audit_rows_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sidecar._wire",
    "Per-item facts from encoded OTLP requests in one C pass: the C half of sidecar.wire "
    "(sidecar._wire_py is the pure-Python half, with the same functions and results).",
    -1, methods, NULL, NULL, NULL, NULL,
};

static int load_types(void)
{
    static const char *names[] = {"SpanMetricRow", "SpanRun", "LogRun", "KeyHits", "ResourceGroup", "ScopeGroup",
                                  "AuditSpans", "AuditSpan", "SpanMetricGroup"};
    PyTypeObject **slots[] = {&SpanMetricRow_T, &SpanRun_T, &LogRun_T, &KeyHits_T, &ResourceGroup_T, &ScopeGroup_T,
                              &AuditSpans_T, &AuditSpan_T, &SpanMetricGroup_T};
    PyObject *types = PyImport_ImportModule("sidecar._wire_types");
    if (types == NULL)
        return -1;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        PyObject *t = PyObject_GetAttrString(types, names[i]);
        if (t == NULL || !PyType_Check(t) || !PyType_IsSubtype((PyTypeObject *)t, &PyTuple_Type)) {
            if (t != NULL)
                PyErr_Format(PyExc_TypeError, "sidecar._wire_types.%s must be a named tuple", names[i]);
            Py_XDECREF(t);
            Py_DECREF(types);
            return -1;
        }
        Py_XSETREF(*slots[i], (PyTypeObject *)t); /* kept for the life of the process */
    }
    Py_DECREF(types);
    return 0;
}

PyMODINIT_FUNC PyInit__wire(void)
{
    if (load_types() < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && (PyModule_AddIntConstant(m, "MAX_KEYS", MAX_KEYS) < 0
                      || PyModule_AddIntConstant(m, "SCHEMA_WIDTH", SCHEMA_WIDTH) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
