/*
 * sidecar._wire_redact: the byte-level halves of wire-level redaction (sidecar/wire_redaction.py).
 *
 *   locate(request: bytes, signal: int, decisions: dict, scan: object) -> Located
 *       one pass over an encoded Export{Trace,Logs,Metrics}ServiceRequest that reports every string
 *       redaction looks at (attribute values at any depth of maps and arrays, span / event names, span
 *       status messages, log bodies), where it sits, what removes it, its item and its key; keys whose
 *       decision in `decisions` is not `scan` are reported for the key rules.
 *   splice(request: bytes, edits: list[tuple[int, int, bytes, int]]) -> bytes
 *       the request with byte-range edits applied and the length prefix of every enclosing message
 *       rewritten; everything else is copied as it is.
 *
 * The C half of one facade; sidecar/_wire_redact_py.py is the pure-Python half, with the same
 * functions and results (sidecar/_wire_redact_types.py), and the tests run one test class against
 * both and compare their results. Unknown fields (groups too) are skipped, a field with an unexpected
 * wire type is an unknown field; every read is bounds-checked and malformed input raises ValueError
 * (a key that is not UTF-8 raises UnicodeDecodeError, a ValueError). The GIL is held throughout.
 *
 * Field numbers (opentelemetry-proto): Export*ServiceRequest 1 Resource*; Resource* 1 resource,
 * 2 Scope*; Scope* 1 scope, 2 items; Resource 1 attributes; InstrumentationScope 3 attributes;
 * Span 5 name, 9 attributes, 11 events (2 name, 3 attributes), 13 links (4 attributes), 15 status
 * (2 message); LogRecord 5 body, 6 attributes; Metric 5 gauge, 7 sum, 9 histogram,
 * 10 exponential_histogram, 11 summary (1 data_points); data point attributes 7/7/9/1/7, exemplars
 * 5/5/8/11/-, Exemplar 7 filtered_attributes; KeyValue 1 key, 2 value; AnyValue 1 string, 5 array,
 * 6 kvlist; ArrayValue / KeyValueList 1 values.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 100
#define HAS_SUMMARY 1
#define BODY_LABEL (-1)
#define STATUS_LABEL (-2)
#define BODY_EMPTY (-3)
#define SITE 8 /* ints per occurrence of a text in Located.sites (sidecar/_wire_redact_types.py) */

enum { WT_VARINT = 0, WT_I64 = 1, WT_LEN = 2, WT_SGROUP = 3, WT_EGROUP = 4, WT_I32 = 5 };

static PyTypeObject *Located_T;

static int bad(const char *what)
{
    PyErr_Format(PyExc_ValueError, "malformed protobuf: %s", what);
    return -1;
}

/* --- reading ------------------------------------------------------------------------------------ */

static inline uint64_t rd64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline uint64_t rd32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* a[0..n) == b[0..n) with whole-word loads and no call: keys and most texts are a few bytes long */
static inline int same_bytes(const uint8_t *a, const uint8_t *b, Py_ssize_t n)
{
    if (n >= 8) {
        for (Py_ssize_t i = 0; i + 8 < n; i += 8)
            if (rd64(a + i) != rd64(b + i))
                return 0;
        return rd64(a + n - 8) == rd64(b + n - 8);
    }
    if (n >= 4)
        return rd32(a) == rd32(b) && rd32(a + n - 4) == rd32(b + n - 4);
    for (Py_ssize_t i = 0; i < n; i++)
        if (a[i] != b[i])
            return 0;
    return 1;
}

static inline int rd_varint(const uint8_t *d, Py_ssize_t *pos, Py_ssize_t end, uint64_t *out)
{
    Py_ssize_t p = *pos;
    if (p < end && d[p] < 0x80) {
        *out = d[p];
        *pos = p + 1;
        return 0;
    }
    uint64_t v = 0;
    for (int shift = 0; shift < 70; shift += 7) {
        if (p >= end)
            return bad("truncated varint");
        uint8_t b = d[p++];
        v |= (uint64_t)(b & 0x7F) << (shift < 64 ? shift : 63);
        if (!(b & 0x80)) {
            *out = v;
            *pos = p;
            return 0;
        }
    }
    return bad("varint longer than 10 bytes");
}

static inline int rd_tag(const uint8_t *d, Py_ssize_t *pos, Py_ssize_t end, uint32_t *field, int *wt)
{
    Py_ssize_t start = *pos;
    uint64_t tag;
    if (rd_varint(d, pos, end, &tag) < 0)
        return -1;
    uint64_t f = tag >> 3;
    if (*pos - start > 5 || f == 0 || f > 0x1FFFFFFF)
        return bad("invalid field number");
    *field = (uint32_t)f;
    *wt = (int)(tag & 7);
    return 0;
}

static int skip(const uint8_t *d, Py_ssize_t *pos, Py_ssize_t end, uint32_t field, int wt, int depth)
{
    uint64_t v;
    switch (wt) {
    case WT_VARINT:
        return rd_varint(d, pos, end, &v);
    case WT_I64:
    case WT_I32: {
        Py_ssize_t n = wt == WT_I64 ? 8 : 4;
        if (end - *pos < n)
            return bad("truncated fixed-width field");
        *pos += n;
        return 0;
    }
    case WT_LEN:
        if (rd_varint(d, pos, end, &v) < 0)
            return -1;
        if (v > (uint64_t)(end - *pos))
            return bad("length past the end of the buffer");
        *pos += (Py_ssize_t)v;
        return 0;
    case WT_SGROUP:
        if (++depth > MAX_DEPTH)
            return bad("groups nested too deep");
        for (;;) {
            uint32_t f;
            int w;
            if (*pos >= end)
                return bad("unterminated group");
            if (rd_tag(d, pos, end, &f, &w) < 0)
                return -1;
            if (w == WT_EGROUP) {
                if (f != field)
                    return bad("end of a group that was not started");
                return 0;
            }
            if (skip(d, pos, end, f, w, depth) < 0)
                return -1;
        }
    case WT_EGROUP:
        return bad("end of a group that was not started");
    default:
        return bad("unsupported wire type");
    }
}

/* One field of a message: its number, where its tag and (for LEN fields) its length and content are.
 * `field` and `wt` are not neighbours: GCC merges `f.field == 1 && f.wt == WT_LEN` into one 64-bit load of
 * the two just-stored 32-bit halves, a store-forwarding stall on every KeyValue (a third of locate's time). */
typedef struct {
    uint32_t field;
    Py_ssize_t ts, ls, cs, ce;
    int wt;
} Field;

/* The next field at *pos (< end); a LEN field's content is bounds-checked. */
static inline int next_field(const uint8_t *d, Py_ssize_t *pos, Py_ssize_t end, Field *f)
{
    f->ts = *pos;
    if (rd_tag(d, pos, end, &f->field, &f->wt) < 0)
        return -1;
    if (f->wt == WT_LEN) {
        uint64_t n;
        f->ls = *pos;
        if (rd_varint(d, pos, end, &n) < 0)
            return -1;
        if (n > (uint64_t)(end - *pos))
            return bad("length past the end of the buffer");
        f->cs = *pos;
        f->ce = *pos + (Py_ssize_t)n;
        *pos = f->ce;
        return 0;
    }
    f->ls = f->cs = f->ce = -1;
    return skip(d, pos, end, f->field, f->wt, 0);
}

/* --- locate ------------------------------------------------------------------------------------- */

/* A growable array of int64, returned as the bytes of native int64s (Located's *_sites fields). */
typedef struct {
    int64_t *v;
    Py_ssize_t len, cap;
} Ints;

/* The decisions of the keys seen in this call, by key bytes: a key costs one str and one dict
 * lookup the first time it appears in a request, a hash and a compare after that. */
#define KEY_SLOTS 256
typedef struct {
    uint64_t hash;
    Py_ssize_t start, len; /* the key's first occurrence in the request; len -1: empty slot */
    PyObject *decision;    /* borrowed from the decisions dict, which no code can change during the call */
} KeySlot;

/* A distinct text: its hash, where it is in the joined texts, and its last occurrence so far (len -1: empty slot). */
typedef struct {
    uint64_t hash;
    Py_ssize_t start, len, last;
} TextSlot;

typedef struct {
    const uint8_t *d;
    Py_ssize_t n;
    PyObject *decisions, *scan;
    PyObject *names, *keys;
    uint8_t *text;                /* the texts, each followed by a newline */
    Py_ssize_t text_len, text_cap;
    Ints text_ends, firsts, sites, name_sites, kv_sites, items;
    Py_ssize_t n_items, n_slots;
    KeySlot slots[KEY_SLOTS];
    TextSlot *texts;              /* the distinct texts so far, by content: open addressing, at most half full */
    Py_ssize_t texts_cap, texts_mask, n_texts;
} Loc;

/* Working memory kept from one call to the next. Growing fresh buffers for every request cost more than the
 * walk itself: the allocator hands large freed blocks back to the kernel, and the next request pays a page
 * fault for every page it touches again. A call takes the buffers (a call that starts while another one runs
 * Python code, which can switch threads, finds none and grows its own) and puts its own back at the end,
 * freeing what another call left there and any buffer one huge request grew past SCRATCH_KEEP bytes. */
#define SCRATCH_KEEP ((Py_ssize_t)1 << 20)
static struct {
    uint8_t *text;
    Py_ssize_t text_cap;
    Ints text_ends, firsts, sites, name_sites, kv_sites, items;
    TextSlot *texts;
    Py_ssize_t texts_cap;
} scratch;

/* Texts are found again by a hash of their bytes seeded at random per process, so that no input can be made
 * to collide (a request of colliding strings would cost time quadratic in its size). */
static uint64_t hash_seed;

static uint64_t text_hash(const uint8_t *p, Py_ssize_t n)
{
    uint64_t h = hash_seed ^ ((uint64_t)n * 0x9E3779B97F4A7C15ULL), w;
    Py_ssize_t i = 0;
    for (; i + 8 < n; i += 8) {
        h = (h ^ rd64(p + i)) * 0xBF58476D1CE4E5B9ULL;
        h ^= h >> 29;
    }
    /* the last 1-8 bytes as whole loads that may overlap the bytes before them (the length is in h) */
    if (n >= 8)
        w = rd64(p + n - 8);
    else if (n >= 4)
        w = rd32(p) | rd32(p + n - 4) << 32;
    else if (n > 0)
        w = (uint64_t)p[0] | (uint64_t)p[n >> 1] << 8 | (uint64_t)p[n - 1] << 16;
    else
        w = 0;
    h = (h ^ w) * 0x94D049BB133111EBULL;
    h ^= h >> 32;
    h = (h ^ hash_seed) * 0xBF58476D1CE4E5B9ULL;
    return h ^ (h >> 31);
}

static void ints_take(Ints *a, Ints *kept)
{
    *a = *kept;
    a->len = 0;
    kept->v = NULL;
    kept->cap = 0;
}

static void ints_keep(Ints *kept, Ints *a)
{
    PyMem_Free(kept->v);
    *kept = (Ints){NULL, 0, 0};
    if (a->cap * (Py_ssize_t)sizeof(int64_t) <= SCRATCH_KEEP)
        *kept = *a;
    else
        PyMem_Free(a->v);
    a->v = NULL;
}

static int ints_push(Ints *a, const Py_ssize_t *v, int k)
{
    if (a->len + k > a->cap) {
        Py_ssize_t cap = a->cap ? a->cap * 2 : 256;
        while (cap < a->len + k)
            cap *= 2;
        int64_t *p = PyMem_Realloc(a->v, (size_t)cap * sizeof(int64_t));
        if (p == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        a->v = p;
        a->cap = cap;
    }
    for (int i = 0; i < k; i++)
        a->v[a->len++] = (int64_t)v[i];
    return 0;
}

static PyObject *ints_bytes(Ints *a)
{
    return PyBytes_FromStringAndSize((const char *)a->v, a->len * (Py_ssize_t)sizeof(int64_t));
}

/* A cheap hash of a key: its length and its first and last 8 bytes (equal keys are compared whole). */
static uint64_t key_hash(const uint8_t *p, Py_ssize_t n)
{
    uint64_t a = 0, b = 0;
    if (n >= 8) {
        memcpy(&a, p, 8);
        memcpy(&b, p + n - 8, 8);
    } else {
        memcpy(&a, p, (size_t)n);
    }
    uint64_t h = (a ^ (b * 0x9E3779B97F4A7C15ULL) ^ (uint64_t)n) * 0xBF58476D1CE4E5B9ULL;
    return h ^ (h >> 31);
}

/* The decision for the key at [start, start + len): a borrowed object, NULL when the dict has none;
 * unless it is `scan`, *key_out holds the decoded key (a new reference). -1 in *err on error. */
static PyObject *decide(Loc *L, Py_ssize_t start, Py_ssize_t len, PyObject **key_out, int *err)
{
    uint64_t h = key_hash(L->d + start, len);
    KeySlot *slot = NULL;
    *key_out = NULL;
    *err = 0;
    for (Py_ssize_t i = 0; i < KEY_SLOTS; i++) {
        KeySlot *s = &L->slots[(h + (uint64_t)i) & (KEY_SLOTS - 1)];
        if (s->len < 0) {
            slot = s;
            break;
        }
        if (s->hash == h && s->len == len && same_bytes(L->d + s->start, L->d + start, len))
            return s->decision; /* only `scan` decisions are kept: others need the str for the record */
    }
    PyObject *key = PyUnicode_DecodeUTF8((const char *)L->d + start, len, "strict");
    if (key == NULL) {
        *err = -1;
        return NULL;
    }
    PyObject *decision = PyDict_GetItemWithError(L->decisions, key); /* borrowed */
    if (decision == NULL && PyErr_Occurred()) {
        Py_DECREF(key);
        *err = -1;
        return NULL;
    }
    if (slot != NULL && decision == L->scan && L->n_slots < KEY_SLOTS / 2) {
        slot->hash = h;
        slot->start = start;
        slot->len = len;
        slot->decision = decision;
        L->n_slots++;
    }
    if (decision == L->scan)
        Py_DECREF(key);
    else
        *key_out = key;
    return decision;
}

static int push_bytes(PyObject *list, const uint8_t *p, Py_ssize_t n)
{
    PyObject *o = PyBytes_FromStringAndSize((const char *)p, n);
    if (o == NULL)
        return -1;
    int rc = PyList_Append(list, o);
    Py_DECREF(o);
    return rc;
}

/* The slot of a text with this hash and these bytes, or the empty slot where it goes. */
static TextSlot *text_slot(Loc *L, uint64_t h, const uint8_t *p, Py_ssize_t n)
{
    for (uint64_t i = h;; i++) {
        TextSlot *t = &L->texts[i & (uint64_t)L->texts_mask];
        if (t->len < 0 || (t->hash == h && t->len == n && same_bytes(L->text + t->start, p, n)))
            return t;
    }
}

/* Room for one more distinct text with the table at most half full: a table twice the size, refilled. */
static int texts_room(Loc *L)
{
    Py_ssize_t size = L->texts_mask + 1;
    if ((L->n_texts + 1) * 2 <= size)
        return 0;
    Py_ssize_t cap = size * 2;
    TextSlot *table = PyMem_Malloc((size_t)cap * sizeof(TextSlot));
    if (table == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < cap; i++)
        table[i].len = -1;
    TextSlot *old = L->texts;
    L->texts = table;
    L->texts_cap = cap;
    L->texts_mask = cap - 1;
    for (Py_ssize_t i = 0; i < size; i++)
        if (old[i].len >= 0)
            *text_slot(L, old[i].hash, L->text + old[i].start, old[i].len) = old[i];
    PyMem_Free(old);
    return 0;
}

/* One occurrence of a text: its bytes are joined into L->text the first time they occur. */
static int text(Loc *L, Py_ssize_t ls, Py_ssize_t cs, Py_ssize_t ce, Py_ssize_t drop_start, Py_ssize_t drop_end,
                Py_ssize_t item, Py_ssize_t key_start, Py_ssize_t key_end)
{
    Py_ssize_t v[SITE] = {ls, ce, drop_start, drop_end, item, key_start, key_end, -1}, n = ce - cs;
    Py_ssize_t occurrence = L->sites.len / SITE;
    if (texts_room(L) < 0)
        return -1;
    const uint8_t *p = L->d + cs;
    uint64_t h = text_hash(p, n);
    TextSlot *t = text_slot(L, h, p, n);
    if (t->len >= 0) {
        L->sites.v[t->last * SITE + SITE - 1] = occurrence;
        t->last = occurrence;
        return ints_push(&L->sites, v, SITE);
    }
    if (L->text_len + n + 1 > L->text_cap) { /* never: L->text holds the whole request */
        Py_ssize_t cap = L->text_cap ? L->text_cap * 2 : 4096;
        while (cap < L->text_len + n + 1)
            cap *= 2;
        uint8_t *q = PyMem_Realloc(L->text, (size_t)cap);
        if (q == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        L->text = q;
        L->text_cap = cap;
    }
    *t = (TextSlot){h, L->text_len, n, occurrence};
    L->n_texts++;
    memcpy(L->text + L->text_len, p, (size_t)n);
    L->text_len += n;
    L->text[L->text_len++] = '\n';
    Py_ssize_t end = L->text_len;
    if (ints_push(&L->text_ends, &end, 1) < 0 || ints_push(&L->firsts, &occurrence, 1) < 0)
        return -1;
    return ints_push(&L->sites, v, SITE);
}

static int name(Loc *L, const Field *f, Py_ssize_t item, int is_event)
{
    if (f->ce <= f->cs)
        return 0;
    Py_ssize_t v[4] = {f->ls, f->ce, item, is_event};
    if (push_bytes(L->names, L->d + f->cs, f->ce - f->cs) < 0)
        return -1;
    return ints_push(&L->name_sites, v, 4);
}

static int kv(Loc *L, Py_ssize_t kv_start, Py_ssize_t ls, Py_ssize_t cs, Py_ssize_t ce, Py_ssize_t item, int depth,
              int top);

/* An AnyValue at [pos, end); a string in it is removed with [drop_start, drop_end) (key_end BODY_EMPTY: that
 * range is a log body from its length prefix, which a drop sets to zero). */
static int value(Loc *L, Py_ssize_t pos, Py_ssize_t end, Py_ssize_t drop_start, Py_ssize_t drop_end,
                 Py_ssize_t item, Py_ssize_t key_start, Py_ssize_t key_end, int depth)
{
    if (depth > MAX_DEPTH)
        return bad("nested too deep");
    Py_ssize_t p = pos;
    Field f;
    while (p < end) {
        if (next_field(L->d, &p, end, &f) < 0)
            return -1;
        if (f.wt != WT_LEN)
            continue;
        if (f.field == 1) {
            if (f.ce > f.cs && text(L, f.ls, f.cs, f.ce, drop_start, drop_end, item, key_start, key_end) < 0)
                return -1;
        } else if (f.field == 5) {
            Py_ssize_t q = f.cs;
            Field e;
            while (q < f.ce) {
                if (next_field(L->d, &q, f.ce, &e) < 0)
                    return -1;
                if (e.field == 1 && e.wt == WT_LEN &&
                    value(L, e.cs, e.ce, e.ts, e.ce, item, key_start, key_end == BODY_EMPTY ? BODY_LABEL : key_end,
                          depth + 1) < 0)
                    return -1;
            }
        } else if (f.field == 6) {
            Py_ssize_t q = f.cs;
            Field e;
            while (q < f.ce) {
                if (next_field(L->d, &q, f.ce, &e) < 0)
                    return -1;
                if (e.field == 1 && e.wt == WT_LEN && kv(L, e.ts, e.ls, e.cs, e.ce, item, depth + 1, 0) < 0)
                    return -1;
            }
        }
    }
    return 0;
}

/* A KeyValue; returns HAS_SUMMARY when `top` and its key is a summary attribute, -1 on error. */
static int kv(Loc *L, Py_ssize_t kv_start, Py_ssize_t ls, Py_ssize_t cs, Py_ssize_t ce, Py_ssize_t item, int depth,
              int top)
{
    if (depth > MAX_DEPTH)
        return bad("nested too deep");
    Py_ssize_t key_start = cs, key_end = cs, p = cs;
    Field f;
    while (p < ce) {
        if (next_field(L->d, &p, ce, &f) < 0)
            return -1;
        if (f.field == 1 && f.wt == WT_LEN) {
            key_start = f.cs;
            key_end = f.ce;
        }
    }
    PyObject *key;
    int err;
    PyObject *decision = decide(L, key_start, key_end - key_start, &key, &err);
    if (err < 0)
        return -1;
    int walk = decision == L->scan || decision == NULL;
    Py_ssize_t record = -1;
    if (decision != L->scan) {
        Py_ssize_t first = L->sites.len / SITE;
        Py_ssize_t v[6] = {kv_start, ls, ce, item, first, first};
        record = L->kv_sites.len;
        int rc = PyList_Append(L->keys, key) < 0 || ints_push(&L->kv_sites, v, 6) < 0;
        Py_DECREF(key);
        if (rc)
            return -1;
    }
    if (walk) {
        p = cs;
        while (p < ce) {
            next_field(L->d, &p, ce, &f);
            if (f.field == 2 && f.wt == WT_LEN &&
                value(L, f.cs, f.ce, kv_start, ce, item, key_start, key_end, depth + 1) < 0)
                return -1;
        }
        if (record >= 0)
            L->kv_sites.v[record + 5] = L->sites.len / SITE;
    }
    return top && key_end - key_start >= 10 && memcmp(L->d + key_start, "redaction.", 10) == 0 ? HAS_SUMMARY : 0;
}

/* Each KeyValue in field `field` of the message at [pos, end). */
static int attrs(Loc *L, Py_ssize_t pos, Py_ssize_t end, uint32_t field, Py_ssize_t item, int depth)
{
    Py_ssize_t p = pos;
    Field f;
    while (p < end) {
        if (next_field(L->d, &p, end, &f) < 0)
            return -1;
        if (f.field == field && f.wt == WT_LEN && kv(L, f.ts, f.ls, f.cs, f.ce, item, depth, 0) < 0)
            return -1;
    }
    return 0;
}

static int push_item(Loc *L, Py_ssize_t pos, Py_ssize_t end, int flags)
{
    Py_ssize_t v[3] = {pos, end, flags};
    L->n_items++;
    return ints_push(&L->items, v, 3);
}

static int span(Loc *L, Py_ssize_t pos, Py_ssize_t end)
{
    Py_ssize_t item = L->n_items, p = pos;
    int flags = 0, r;
    Field f, g;
    while (p < end) {
        if (next_field(L->d, &p, end, &f) < 0)
            return -1;
        if (f.wt != WT_LEN)
            continue;
        switch (f.field) {
        case 5:
            if (name(L, &f, item, 0) < 0)
                return -1;
            break;
        case 9:
            if ((r = kv(L, f.ts, f.ls, f.cs, f.ce, item, 0, 1)) < 0)
                return -1;
            flags |= r;
            break;
        case 11: {
            Py_ssize_t q = f.cs;
            while (q < f.ce) {
                if (next_field(L->d, &q, f.ce, &g) < 0)
                    return -1;
                if (g.wt != WT_LEN)
                    continue;
                if (g.field == 2 && name(L, &g, item, 1) < 0)
                    return -1;
                if (g.field == 3 && kv(L, g.ts, g.ls, g.cs, g.ce, item, 0, 0) < 0)
                    return -1;
            }
            break;
        }
        case 13:
            if (attrs(L, f.cs, f.ce, 4, item, 0) < 0)
                return -1;
            break;
        case 15: {
            Py_ssize_t q = f.cs;
            while (q < f.ce) {
                if (next_field(L->d, &q, f.ce, &g) < 0)
                    return -1;
                if (g.field == 2 && g.wt == WT_LEN && g.ce > g.cs &&
                    text(L, g.ls, g.cs, g.ce, g.ts, g.ce, item, STATUS_LABEL, STATUS_LABEL) < 0)
                    return -1;
            }
            break;
        }
        }
    }
    return push_item(L, pos, end, flags);
}

static int log_record(Loc *L, Py_ssize_t pos, Py_ssize_t end)
{
    Py_ssize_t item = L->n_items, p = pos;
    int flags = 0, r;
    Field f;
    while (p < end) {
        if (next_field(L->d, &p, end, &f) < 0)
            return -1;
        if (f.wt != WT_LEN)
            continue;
        /* a dropped body string empties the body (every value in it), as clearing the body does */
        if (f.field == 5 && value(L, f.cs, f.ce, f.ls, f.ce, item, BODY_LABEL, BODY_EMPTY, 0) < 0)
            return -1;
        if (f.field == 6) {
            if ((r = kv(L, f.ts, f.ls, f.cs, f.ce, item, 0, 1)) < 0)
                return -1;
            flags |= r;
        }
    }
    return push_item(L, pos, end, flags);
}

static int metric(Loc *L, Py_ssize_t pos, Py_ssize_t end)
{
    Py_ssize_t p = pos;
    Field f, pt, g;
    while (p < end) {
        if (next_field(L->d, &p, end, &f) < 0)
            return -1;
        uint32_t attrs_field, exemplars_field;
        switch (f.field) {
        case 5: case 7: attrs_field = 7; exemplars_field = 5; break;
        case 9: attrs_field = 9; exemplars_field = 8; break;
        case 10: attrs_field = 1; exemplars_field = 11; break;
        case 11: attrs_field = 7; exemplars_field = 0; break;
        default: continue;
        }
        if (f.wt != WT_LEN)
            continue;
        Py_ssize_t q = f.cs;
        while (q < f.ce) {
            if (next_field(L->d, &q, f.ce, &pt) < 0)
                return -1;
            if (pt.field != 1 || pt.wt != WT_LEN)
                continue;
            Py_ssize_t r = pt.cs;
            while (r < pt.ce) {
                if (next_field(L->d, &r, pt.ce, &g) < 0)
                    return -1;
                if (g.wt != WT_LEN)
                    continue;
                if (g.field == attrs_field) {
                    if (kv(L, g.ts, g.ls, g.cs, g.ce, -1, 0, 0) < 0)
                        return -1;
                } else if (exemplars_field && g.field == exemplars_field) {
                    if (attrs(L, g.cs, g.ce, 7, -1, 0) < 0)
                        return -1;
                }
            }
        }
    }
    return 0;
}

typedef int (*item_fn)(Loc *, Py_ssize_t, Py_ssize_t);

/* request -> resource groups -> scope groups -> `item` for each item (field 2 of a scope group). */
static int groups(Loc *L, item_fn item)
{
    Py_ssize_t p = 0;
    Field rs, f, g;
    while (p < L->n) {
        if (next_field(L->d, &p, L->n, &rs) < 0)
            return -1;
        if (rs.field != 1 || rs.wt != WT_LEN)
            continue;
        Py_ssize_t q = rs.cs;
        while (q < rs.ce) {
            if (next_field(L->d, &q, rs.ce, &f) < 0)
                return -1;
            if (f.wt != WT_LEN)
                continue;
            if (f.field == 1) {
                if (attrs(L, f.cs, f.ce, 1, -1, 0) < 0)
                    return -1;
            } else if (f.field == 2) {
                Py_ssize_t r = f.cs;
                while (r < f.ce) {
                    if (next_field(L->d, &r, f.ce, &g) < 0)
                        return -1;
                    if (g.wt != WT_LEN)
                        continue;
                    if (g.field == 1 && attrs(L, g.cs, g.ce, 3, -1, 0) < 0)
                        return -1;
                    if (g.field == 2 && item(L, g.cs, g.ce) < 0)
                        return -1;
                }
            }
        }
    }
    return 0;
}

static PyObject *locate(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    int signal;
    PyObject *decisions, *scan;
    if (!PyArg_ParseTuple(args, "y*iOO:locate", &buf, &signal, &decisions, &scan))
        return NULL;
    PyObject *result = NULL, *text = NULL, *text_ends = NULL, *sites = NULL, *name_sites = NULL, *kv_sites = NULL,
             *items = NULL, *firsts = NULL;
    Loc *L = PyMem_Calloc(1, sizeof(Loc));
    if (L == NULL) {
        PyBuffer_Release(&buf);
        return PyErr_NoMemory();
    }
    L->d = buf.buf;
    L->n = buf.len;
    L->decisions = decisions;
    L->scan = scan;
    L->text = scratch.text;
    L->text_cap = scratch.text_cap;
    scratch.text = NULL;
    scratch.text_cap = 0;
    ints_take(&L->text_ends, &scratch.text_ends);
    ints_take(&L->firsts, &scratch.firsts);
    ints_take(&L->sites, &scratch.sites);
    L->texts = scratch.texts;
    L->texts_cap = scratch.texts_cap;
    scratch.texts = NULL;
    scratch.texts_cap = 0;
    ints_take(&L->name_sites, &scratch.name_sites);
    ints_take(&L->kv_sites, &scratch.kv_sites);
    ints_take(&L->items, &scratch.items);
    for (int i = 0; i < KEY_SLOTS; i++)
        L->slots[i].len = -1;
    if (!PyBytes_Check(PyTuple_GET_ITEM(args, 0))) {
        PyErr_Format(PyExc_TypeError, "request must be bytes, not %s", Py_TYPE(PyTuple_GET_ITEM(args, 0))->tp_name);
        goto done;
    }
    if (!PyDict_Check(decisions)) {
        PyErr_SetString(PyExc_TypeError, "decisions must be a dict");
        goto done;
    }
    if (!(L->names = PyList_New(0)) || !(L->keys = PyList_New(0)))
        goto done;
    /* every text is a part of the request, and the tag and length before it are longer than its newline */
    if (L->text_cap < L->n + 1) {
        uint8_t *p = PyMem_Realloc(L->text, (size_t)L->n + 1);
        if (p == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        L->text = p;
        L->text_cap = L->n + 1;
    }
    /* the table of distinct texts starts with 256 slots, in the memory an earlier call left when it has them */
    if (L->texts_cap < 256) {
        PyMem_Free(L->texts);
        L->texts_cap = 0;
        if ((L->texts = PyMem_Malloc(256 * sizeof(TextSlot))) == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        L->texts_cap = 256;
    }
    L->texts_mask = 255;
    for (int i = 0; i < 256; i++)
        L->texts[i].len = -1;
    item_fn fn = signal == 0 ? span : signal == 1 ? log_record : signal == 2 ? metric : NULL;
    if (fn == NULL) {
        PyErr_Format(PyExc_ValueError, "unknown signal %d", signal);
        goto done;
    }
    if (groups(L, fn) < 0)
        goto done;
    /* the texts joined with newlines, as b"\\n".join(texts): no newline after the last */
    if (!(text = PyBytes_FromStringAndSize((const char *)L->text, L->text_len ? L->text_len - 1 : 0)) ||
        !(text_ends = ints_bytes(&L->text_ends)) || !(sites = ints_bytes(&L->sites)) ||
        !(name_sites = ints_bytes(&L->name_sites)) ||
        !(kv_sites = ints_bytes(&L->kv_sites)) || !(items = ints_bytes(&L->items)) ||
        !(firsts = ints_bytes(&L->firsts)))
        goto done;
    result = PyObject_CallFunctionObjArgs((PyObject *)Located_T, text, text_ends, sites, L->names, name_sites,
                                          L->keys, kv_sites, items, firsts, NULL);
done:
    Py_XDECREF(sites);
    Py_XDECREF(name_sites);
    Py_XDECREF(kv_sites);
    Py_XDECREF(items);
    Py_XDECREF(text);
    Py_XDECREF(text_ends);
    Py_XDECREF(firsts);
    Py_XDECREF(L->names);
    Py_XDECREF(L->keys);
    PyMem_Free(scratch.text);
    scratch.text = NULL;
    scratch.text_cap = 0;
    if (L->text_cap <= SCRATCH_KEEP) {
        scratch.text = L->text;
        scratch.text_cap = L->text_cap;
    } else {
        PyMem_Free(L->text);
    }
    ints_keep(&scratch.text_ends, &L->text_ends);
    ints_keep(&scratch.firsts, &L->firsts);
    ints_keep(&scratch.sites, &L->sites);
    PyMem_Free(scratch.texts);
    scratch.texts = NULL;
    scratch.texts_cap = 0;
    if (L->texts_cap * (Py_ssize_t)sizeof(TextSlot) <= SCRATCH_KEEP) {
        scratch.texts = L->texts;
        scratch.texts_cap = L->texts_cap;
    } else {
        PyMem_Free(L->texts);
    }
    ints_keep(&scratch.name_sites, &L->name_sites);
    ints_keep(&scratch.kv_sites, &L->kv_sites);
    ints_keep(&scratch.items, &L->items);
    PyMem_Free(L);
    PyBuffer_Release(&buf);
    return result;
}

/* --- splice ------------------------------------------------------------------------------------- */

typedef struct {
    Py_ssize_t start, end, owner;
    const uint8_t *data;
    Py_ssize_t len;
} Edit;

typedef struct {
    uint8_t *p;
    Py_ssize_t len, cap;
} Out;

static int out_put(Out *o, const uint8_t *src, Py_ssize_t n)
{
    if (o->len + n > o->cap) {
        Py_ssize_t cap = o->cap * 2 > o->len + n ? o->cap * 2 : o->len + n + 64;
        uint8_t *p = PyMem_Realloc(o->p, (size_t)cap);
        if (p == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        o->p = p;
        o->cap = cap;
    }
    if (n)
        memcpy(o->p + o->len, src, (size_t)n);
    o->len += n;
    return 0;
}

/* Replacements by start; an append sorts with the replacements at its position, before them, the
 * innermost message's first (as _order in the Python half). */
static int edit_cmp(const void *a, const void *b)
{
    const Edit *x = a, *y = b;
    if (x->start != y->start)
        return x->start < y->start ? -1 : 1;
    int xa = x->owner >= 0, ya = y->owner >= 0;
    if (xa != ya)
        return xa ? -1 : 1;
    if (xa && x->owner != y->owner)
        return x->owner > y->owner ? -1 : 1;
    return 0;
}

static int overlap(void)
{
    PyErr_SetString(PyExc_ValueError, "edits overlap or lie outside the request");
    return -1;
}

static int splice_msg(const uint8_t *d, Py_ssize_t pos, Py_ssize_t end, Edit *edits, Py_ssize_t i, Py_ssize_t j,
                      Out *out, int depth)
{
    if (depth > MAX_DEPTH)
        return bad("nested too deep");
    Py_ssize_t copied = pos, cursor = pos;
    Py_ssize_t tail_first = -1, n_tails = 0; /* appends to this message: contiguous once sorted */
    while (i < j) {
        Edit *e = &edits[i];
        if (e->owner == pos) {
            if (e->start != end) {
                PyErr_SetString(PyExc_ValueError, "an append must be at the end of its message");
                return -1;
            }
            if (n_tails == 0)
                tail_first = i;
            else if (tail_first + n_tails != i)
                return overlap();
            n_tails++;
            i++;
            continue;
        }
        Py_ssize_t key = e->owner < 0 ? e->start : e->owner;
        Field f;
        for (;;) {
            if (cursor >= end || key < cursor)
                return overlap();
            if (next_field(d, &cursor, end, &f) < 0)
                return -1;
            if (key < cursor)
                break;
        }
        Py_ssize_t fs = f.ts, fe = cursor, cs = f.wt == WT_LEN ? f.cs : -1, m = i;
        int nested = cs >= 0;
        while (m < j) {
            Edit *x = &edits[m];
            if (x->owner < 0) {
                if (x->start >= fe)
                    break;
                if (x->start < cs)
                    nested = 0;
            } else if (!(fs <= x->owner && x->owner < fe) || x->owner == pos) {
                break;
            }
            m++;
        }
        if (out_put(out, d + copied, fs - copied) < 0)
            return -1;
        if (nested) {
            if (out_put(out, d + fs, f.ls - fs) < 0)
                return -1;
            Py_ssize_t mark = out->len;
            uint8_t pad[10] = {0};
            if (out_put(out, pad, 10) < 0)
                return -1;
            Py_ssize_t content = out->len;
            if (splice_msg(d, cs, fe, edits, i, m, out, depth + 1) < 0)
                return -1;
            Py_ssize_t n = out->len - content;
            uint8_t v[10];
            int k = 0;
            uint64_t u = (uint64_t)n;
            while (u >= 0x80) {
                v[k++] = (uint8_t)((u & 0x7F) | 0x80);
                u >>= 7;
            }
            v[k++] = (uint8_t)u;
            memcpy(out->p + mark, v, (size_t)k);
            memmove(out->p + mark + k, out->p + content, (size_t)n);
            out->len = mark + k + n;
        } else {
            Py_ssize_t p = fs;
            for (Py_ssize_t t = i; t < m; t++) {
                Edit *x = &edits[t];
                if (x->owner >= 0 || x->start < p || x->end > fe || x->end < x->start) {
                    PyErr_SetString(PyExc_ValueError, "edits overlap or split a field");
                    return -1;
                }
                if (out_put(out, d + p, x->start - p) < 0 || out_put(out, x->data, x->len) < 0)
                    return -1;
                p = x->end;
            }
            if (out_put(out, d + p, fe - p) < 0)
                return -1;
        }
        copied = fe;
        i = m;
    }
    if (out_put(out, d + copied, end - copied) < 0)
        return -1;
    for (Py_ssize_t t = tail_first; t < tail_first + n_tails; t++)
        if (out_put(out, edits[t].data, edits[t].len) < 0)
            return -1;
    return 0;
}

static PyObject *splice(PyObject *self, PyObject *args)
{
    PyObject *request, *edit_list;
    if (!PyArg_ParseTuple(args, "OO:splice", &request, &edit_list))
        return NULL;
    if (!PyBytes_Check(request))
        return PyErr_Format(PyExc_TypeError, "request must be bytes, not %s", Py_TYPE(request)->tp_name);
    PyObject *seq = PySequence_Fast(edit_list, "edits must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), size = PyBytes_GET_SIZE(request);
    if (n == 0) {
        Py_DECREF(seq);
        Py_INCREF(request);
        return request;
    }
    const uint8_t *d = (const uint8_t *)PyBytes_AS_STRING(request);
    Edit *edits = PyMem_Calloc((size_t)n, sizeof(Edit));
    Out out = {NULL, 0, 0};
    PyObject *result = NULL;
    if (edits == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *t = PySequence_Fast_GET_ITEM(seq, k), *data;
        Edit *e = &edits[k];
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 4) {
            PyErr_SetString(PyExc_TypeError, "an edit is a (start, end, data, owner) tuple");
            goto done;
        }
        e->start = PyLong_AsSsize_t(PyTuple_GET_ITEM(t, 0));
        e->end = PyLong_AsSsize_t(PyTuple_GET_ITEM(t, 1));
        e->owner = PyLong_AsSsize_t(PyTuple_GET_ITEM(t, 3));
        if (PyErr_Occurred())
            goto done;
        data = PyTuple_GET_ITEM(t, 2);
        if (!PyBytes_Check(data)) {
            PyErr_SetString(PyExc_TypeError, "an edit's data must be bytes");
            goto done;
        }
        e->data = (const uint8_t *)PyBytes_AS_STRING(data);
        e->len = PyBytes_GET_SIZE(data);
        if (e->start < 0 || e->end < e->start || e->end > size || e->owner >= size || e->owner < -1) {
            overlap();
            goto done;
        }
    }
    qsort(edits, (size_t)n, sizeof(Edit), edit_cmp);
    size_t total = (size_t)size + 64;
    for (Py_ssize_t k = 0; k < n; k++)
        total += (size_t)edits[k].len;
    out.p = PyMem_Malloc(total);
    if (out.p == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    out.cap = (Py_ssize_t)total;
    if (splice_msg(d, 0, size, edits, 0, n, &out, 0) < 0)
        goto done;
    result = PyBytes_FromStringAndSize((const char *)out.p, out.len);
done:
    PyMem_Free(out.p);
    PyMem_Free(edits);
    Py_DECREF(seq);
    return result;
}

/* --- module ------------------------------------------------------------------------------------- */

static PyMethodDef methods[] = {
    {"locate", locate, METH_VARARGS,
     "locate(request, signal, decisions, scan) -> Located: every string redaction looks at, and where it is."},
    {"splice", splice, METH_VARARGS,
     "splice(request, edits) -> bytes: the edits applied, every enclosing length prefix rewritten."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_wire_redact",
                                    "Byte-level halves of wire-level redaction (see sidecar/wire_redaction.py).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__wire_redact(void)
{
    PyObject *types = PyImport_ImportModule("sidecar._wire_redact_types");
    if (types == NULL)
        return NULL;
    Located_T = (PyTypeObject *)PyObject_GetAttrString(types, "Located");
    Py_DECREF(types);
    if (Located_T == NULL)
        return NULL;
    PyObject *os = PyImport_ImportModule("os");
    PyObject *seed = os == NULL ? NULL : PyObject_CallMethod(os, "urandom", "i", (int)sizeof(hash_seed));
    Py_XDECREF(os);
    if (seed == NULL)
        return NULL;
    memcpy(&hash_seed, PyBytes_AS_STRING(seed), sizeof(hash_seed));
    Py_DECREF(seed);
    PyObject *m = PyModule_Create(&module);
    /* the layout of Located.sites this build writes: sidecar.wire_redaction uses no build that differs */
    if (m != NULL && PyModule_AddIntConstant(m, "SITE", SITE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
