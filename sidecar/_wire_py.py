"""The pure-Python half of the wire scanner (``sidecar.wire``): the same functions as ``sidecar/_wire.c``.

Each function takes the encoded request (``bytes``) and returns the named tuples of
``sidecar._wire_types``, exactly as the C half does. The facts about each item come from the
protobuf parser itself (one parse per call, so this half accepts and rejects precisely what the
parser does; a rejection is a ValueError); the exact bytes of each item and the resource / scope
heads come from a small wire walk that skips unknown fields, groups included, the same way the C
half does. The tests run one test class against both halves.
"""

from __future__ import annotations

import struct
from bisect import bisect_left

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidecar._wire_types import (AuditSpan, AuditSpans, KeyHits, LogRun, ResourceGroup, ScopeGroup,
                                  SpanMetricGroup, SpanMetricRow, SpanRun)
from sidecar.protowire import encode_varint, length_delimited

#: Most attribute keys one call can look for (as in the C half).
MAX_KEYS = 64
SCHEMA_WIDTH = 32
_MAX_GROUP_DEPTH = 100
#: Status codes with a meaning (UNSET, OK, ERROR); only these set a bit in a run's status mask.
_KNOWN_STATUS_CODES = 3
_MASK64 = (1 << 64) - 1
_LEN, _SGROUP, _EGROUP = 2, 3, 4


def _bad(what: str) -> ValueError:
    return ValueError(f"malformed protobuf: {what}")


def _parse(message_type, data: bytes):
    if not isinstance(data, bytes):
        raise TypeError(f"request must be bytes, not {type(data).__name__}")
    try:
        return message_type.FromString(data)
    except DecodeError as e:
        raise _bad(str(e)) from None


def _keys(keys) -> list:
    """The keys as the str the parser gives attribute keys (None for bytes no valid key can equal)."""
    if not isinstance(keys, tuple):
        raise TypeError("keys must be a tuple of bytes")
    if len(keys) > MAX_KEYS:
        raise ValueError(f"at most {MAX_KEYS} attribute keys")
    out = []
    for i, k in enumerate(keys):
        if not isinstance(k, bytes):
            raise TypeError("attribute keys must be bytes")
        if k in keys[:i]:
            raise ValueError("duplicate attribute key")
        try:
            out.append(k.decode())
        except UnicodeDecodeError:
            out.append(None)
    return out


# --- the wire walk --------------------------------------------------------------------------------


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    if pos < end and data[pos] < 0x80:
        return data[pos], pos + 1
    value = shift = 0
    while shift < 70:
        if pos >= end:
            raise _bad("truncated varint")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value & _MASK64, pos
        shift += 7
    raise _bad("varint longer than 10 bytes")


def _tag(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    tag, after = _varint(data, pos, end)
    field = tag >> 3
    if after - pos > 5 or field == 0 or field > 0x1FFFFFFF:
        raise _bad("invalid field number")
    return field, tag & 7, after


def _skip(data: bytes, pos: int, end: int, field: int, wt: int, depth: int = 0) -> int:
    """The position after the value of a field whose tag was just read (a group: after its end tag)."""
    if wt == 0:
        return _varint(data, pos, end)[1]
    if wt == 1 or wt == 5:
        pos += 8 if wt == 1 else 4
        if pos > end:
            raise _bad("truncated fixed-width field")
        return pos
    if wt == _LEN:
        n, pos = _varint(data, pos, end)
        if n > end - pos:
            raise _bad("length past the end of the buffer")
        return pos + n
    if wt == _SGROUP:
        depth += 1
        if depth > _MAX_GROUP_DEPTH:
            raise _bad("groups nested too deep")
        while True:
            if pos >= end:
                raise _bad("unterminated group")
            f, w, pos = _tag(data, pos, end)
            if w == _EGROUP:
                if f != field:
                    raise _bad("end of a group that was not started")
                return pos
            pos = _skip(data, pos, end, f, w, depth)
    if wt == _EGROUP:
        raise _bad("end of a group that was not started")
    raise _bad("unsupported wire type")


def _fields(data: bytes, pos: int, end: int) -> list[tuple[int, int, int, int]]:
    """(field, wire type, value start, value end) of each field of the message at data[pos:end]."""
    out = []
    while pos < end:
        field, wt, pos = _tag(data, pos, end)
        if wt == _LEN:
            n, start = _varint(data, pos, end)
            if n > end - start:
                raise _bad("length past the end of the buffer")
            pos = start + n
            out.append((field, wt, start, pos))
        else:
            start = pos
            pos = _skip(data, pos, end, field, wt)
            out.append((field, wt, start, pos))
    return out


def _children(data: bytes, pos: int, end: int, field: int) -> list[tuple[int, int]]:
    """(start, end) of each length-delimited occurrence of ``field``."""
    return [(a, b) for f, wt, a, b in _fields(data, pos, end) if f == field and wt == _LEN]


def _head(data: bytes, pos: int, end: int) -> bytes:
    """A Resource{Spans,Logs} / Scope{Spans,Logs} without its children: fields 1 and 3 as encoded
    (tag and length included), an empty field 1 in front when it has none."""
    parts = []
    has_first = False
    while pos < end:
        at = pos
        field, wt, pos = _tag(data, pos, end)
        pos = _skip(data, pos, end, field, wt)
        if wt == _LEN and field in (1, 3):
            parts.append(data[at:pos])
            has_first |= field == 1
    return (b"" if has_first else b"\x0a\x00") + b"".join(parts)


def _first_values(data: bytes, pos: int, end: int, wanted: dict[bytes, int], field_number: int = 9,
                  found: dict[int, bytes] | None = None) -> dict[int, bytes]:
    """Per wanted key index: the encoded value of the first attribute (a ``field_number`` entry) with that
    key (several value fields of one KeyValue concatenated: the parser merges them)."""
    found = {} if found is None else found
    for field, wt, a, b in _fields(data, pos, end):
        if field != field_number or wt != _LEN:
            continue
        key = b""
        values = []
        for f, w, x, y in _fields(data, a, b):
            if w == _LEN:
                if f == 1:
                    key = data[x:y]
                elif f == 2:
                    values.append(data[x:y])
        j = wanted.get(key)
        if j is not None and j not in found:
            found[j] = values[0] if len(values) == 1 else b"".join(values)
    return found


# --- the scanners ------------------------------------------------------------------------------------


def any_label(value) -> str:
    """An AnyValue as a label string: strings as they are, bools true/false, numbers as ``str()``, else ""."""
    s = value.string_value
    if s:
        return s
    kind = value.WhichOneof("value")
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind in ("int_value", "double_value"):
        return str(getattr(value, kind))
    return ""  # no value, an empty string, arrays, maps and bytes


def check_encoding(request: bytes, schema: bytes, request_type):
    """The request parsed as ``request_type``: the parser itself checks it (ValueError where it refuses),
    and the message it made is returned for the receiver to hand on. ``schema`` is for the C half."""
    if len(schema) == 0 or len(schema) % SCHEMA_WIDTH:
        raise ValueError(f"schema must be a non-empty multiple of {SCHEMA_WIDTH} bytes")
    return _parse(request_type, request)


def check_ids(request: bytes, logs: bool) -> int:
    """Spans (or log records) in an encoded Export{Trace,Logs}ServiceRequest, or -1 when one has an id
    of the wrong length: spans need a 16-byte trace id, an 8-byte span id and an empty or 8-byte parent;
    a log record's ids may also be empty."""
    n = 0
    bad = False
    if logs:
        for rl in _parse(ExportLogsServiceRequest, request).resource_logs:
            for sl in rl.scope_logs:
                for rec in sl.log_records:
                    n += 1
                    t, s = len(rec.trace_id), len(rec.span_id)
                    bad = bad or (t != 0 and t != 16) or (s != 0 and s != 8)
    else:
        for rs in _parse(ExportTraceServiceRequest, request).resource_spans:
            for ss in rs.scope_spans:
                for span in ss.spans:
                    n += 1
                    p = len(span.parent_span_id)
                    bad = bad or len(span.trace_id) != 16 or len(span.span_id) != 8 or (p != 0 and p != 8)
    return -1 if bad else n


def _first_labels(attributes, slot: dict[str, int], n: int) -> list[str]:
    """Per key: the label of the first attribute with that key ("" when none)."""
    labels = [""] * n
    seen = set()
    for kv in attributes:
        j = slot.get(kv.key)
        if j is not None and j not in seen:
            seen.add(j)
            labels[j] = any_label(kv.value)
    return labels


def span_metric_rows(request: bytes, service_key: bytes, keys: tuple) -> list[SpanMetricRow]:
    """One SpanMetricRow per span of an encoded ExportTraceServiceRequest (see sidecar._wire_types)."""
    if not isinstance(service_key, bytes):
        raise TypeError("service_key must be bytes")
    str_keys = _keys(keys)
    if service_key in keys:
        raise ValueError("duplicate attribute key")
    msg = _parse(ExportTraceServiceRequest, request)
    n = len(str_keys)
    slot = {k: j for j, k in enumerate(str_keys) if k is not None}
    resource_slot = {k: j + 1 for k, j in slot.items()}
    # a key whose bytes occur nowhere in the request is on no span: stop looking once the others are found
    slot = {k: j for k, j in slot.items() if request.find(keys[j]) >= 0}
    try:
        resource_slot[service_key.decode()] = 0
    except UnicodeDecodeError:
        pass
    rows: list[SpanMetricRow] = []
    append, new_row, get = rows.append, tuple.__new__, slot.get
    everything = sum(1 << j for j in slot.values())
    for rs in msg.resource_spans:
        base = _first_labels(rs.resource.attributes, resource_slot, n + 1)
        service, base_labels = base[0], base[1:]
        head = (service,)
        for ss in rs.scope_spans:
            for span in ss.spans:
                labels = base_labels
                if slot:
                    seen = 0  # bit j: key j met (its first occurrence counts)
                    for kv in span.attributes:
                        j = get(kv.key)
                        if j is not None and not seen >> j & 1:
                            seen |= 1 << j
                            value = kv.value
                            label = value.string_value or any_label(value)
                            if label:  # an empty label counts as absent
                                if labels is base_labels:
                                    labels = list(base_labels)
                                labels[j] = label
                            if seen == everything:
                                break
                status = span.status.code
                start, end = span.start_time_unix_nano, span.end_time_unix_nano
                append(new_row(SpanMetricRow, (head + (span.name, span.kind, status, *labels),
                                               end - start if end > start else 0, end, status, span.trace_id,
                                               span.span_id)))
    return rows


def span_metric_groups(request: bytes, service_key: bytes, keys: tuple, bounds: tuple,
                       max_groups: int) -> list[SpanMetricGroup]:
    """The spans of an encoded ExportTraceServiceRequest counted per SpanMetricRow key, in the order of each key's
    first span (see sidecar._wire_types); ``bounds``: the histogram's upper bounds in ns, ints in [0, 2**64). At
    most ``max_groups`` keys are counted apart: the spans of further keys are counted in one last group whose key
    is None."""
    if not isinstance(bounds, tuple):
        raise TypeError("bounds must be a tuple")
    if not all(type(b) is int and 0 <= b < 1 << 64 for b in bounds):
        raise ValueError("bounds: ints in [0, 2**64)")
    if type(max_groups) is not int:
        raise TypeError("max_groups must be an int")
    if max_groups < 1:
        raise ValueError("max_groups: must be >= 1")
    groups: dict = {}
    rest = None
    n_buckets = len(bounds) + 1
    for at, (key, d, end, _status, trace_id, span_id) in enumerate(span_metric_rows(request, service_key, keys)):
        exemplar = (d, trace_id, span_id, end)
        g = groups.get(key)
        if g is None and len(groups) - (rest is not None) >= max_groups:
            if rest is None:
                rest = groups[None] = [None, 0, 0, [0] * n_buckets, exemplar, at, exemplar, at]
            g = rest
        if g is None:
            g = groups[key] = [key, 0, 0, [0] * n_buckets, exemplar, at, exemplar, at]
        elif d > g[4][0]:
            g[4], g[5] = exemplar, at
        g[1] += 1
        g[2] += d
        g[3][bisect_left(bounds, d)] += 1
        g[6], g[7] = exemplar, at
    return [tuple.__new__(SpanMetricGroup, g) for g in groups.values()]


def span_runs(request: bytes, keys: tuple) -> list[ResourceGroup]:
    """The spans of an encoded ExportTraceServiceRequest as SpanRuns (see sidecar._wire_types)."""
    str_keys = _keys(keys)
    msg = _parse(ExportTraceServiceRequest, request)
    data = request
    wanted = {k: j for j, k in enumerate(keys)}
    n_keys = len(keys)
    out = []
    for rs, (ra, rb) in zip(msg.resource_spans, _children(data, 0, len(data), 1)):
        scopes: list[ScopeGroup] = []
        values = [None] * n_keys
        if n_keys:
            present = {k: j for k, j in wanted.items() if data.find(k, ra, rb) >= 0}
            if present:
                found: dict[int, bytes] = {}
                for a, b in _children(data, ra, rb, 1):  # the resource (several occurrences merge)
                    _first_values(data, a, b, present, 1, found)
                for j, v in found.items():
                    values[j] = v
        out.append(ResourceGroup(_head(data, ra, rb), scopes, tuple(values)))
        for ss, (sa, sb) in zip(rs.scope_spans, _children(data, ra, rb, 2)):
            runs: list[SpanRun] = []
            scopes.append(ScopeGroup(_head(data, sa, sb), runs))
            run = None
            for span, (a, b) in zip(ss.spans, _children(data, sa, sb, 2)):
                tid, ts = span.trace_id, span.trace_state
                if run is None or tid != run[0] or ts != run[1]:
                    if run is not None:
                        runs.append(_span_run(run))
                    # trace_id, trace_state, spans, nbytes, mask, start, end, root, values per key, absent per key
                    run = [tid, ts, [], 0, 0, 0, 0, False, [None] * n_keys, [False] * n_keys]
                blob = data[a:b]
                run[2].append(blob)
                run[3] += b - a
                code = span.status.code
                if 0 <= code < _KNOWN_STATUS_CODES:  # enums are open: other codes set no bit
                    run[4] |= 1 << code
                start, end = span.start_time_unix_nano, span.end_time_unix_nano
                if start and (not run[5] or start < run[5]):
                    run[5] = start
                if end > run[6]:
                    run[6] = end
                if not span.parent_span_id or span.flags & 0x300 == 0x300:
                    run[7] = True
                if n_keys:
                    present = {k: j for k, j in wanted.items() if blob.find(k) >= 0}  # cheap prefilter
                    found = _span_values(span, blob, data, a, b, present, str_keys) if present else {}
                    values, absent = run[8], run[9]
                    for j in range(n_keys):
                        v = found.get(j)
                        if v is None:
                            absent[j] = True
                        elif values[j] is None:
                            values[j] = [v]
                        elif values[j][-1] != v:  # a repeat of the previous value is left out
                            values[j].append(v)
            if run is not None:
                runs.append(_span_run(run))
    return out


def _span_values(span, blob: bytes, data: bytes, a: int, b: int, present: dict[bytes, int],
                 str_keys: list) -> dict[int, bytes]:
    """The span's first value per present key, as encoded. A span encoded canonically (as the parser would
    write it back: the usual case) reads them from the parsed span; any other encoding is walked."""
    if span.SerializeToString() != blob:
        return _first_values(data, a, b, present)
    want = {str_keys[j]: j for j in present.values() if str_keys[j] is not None}
    found: dict[int, bytes] = {}
    for kv in span.attributes:
        j = want.get(kv.key)
        if j is not None and j not in found:
            found[j] = kv.value.SerializeToString()
            if len(found) == len(want):
                break
    return found


def _span_run(run: list) -> SpanRun:
    hits = tuple(None if v is None else KeyHits(a, v) for v, a in zip(run[8], run[9]))
    return SpanRun(run[0], run[1], tuple(run[2]), run[3], run[4], run[5], run[6], run[7], hits)


def log_runs(request: bytes, keep_severity: int) -> list[ResourceGroup]:
    """The log records of an encoded ExportLogsServiceRequest as LogRuns (see sidecar._wire_types)."""
    if not isinstance(keep_severity, int):
        raise TypeError("keep_severity must be an int")
    if not -(1 << 63) <= keep_severity < 1 << 63:
        raise OverflowError("keep_severity out of range")
    msg = _parse(ExportLogsServiceRequest, request)
    data = request
    out = []
    for rl, (ra, rb) in zip(msg.resource_logs, _children(data, 0, len(data), 1)):
        scopes: list[ScopeGroup] = []
        out.append(ResourceGroup(_head(data, ra, rb), scopes, ()))
        for sl, (sa, sb) in zip(rl.scope_logs, _children(data, ra, rb, 2)):
            runs: list[LogRun] = []
            scopes.append(ScopeGroup(_head(data, sa, sb), runs))
            run = None
            for rec, (a, b) in zip(sl.log_records, _children(data, sa, sb, 2)):
                tid = rec.trace_id
                keep = rec.severity_number >= keep_severity
                if run is None or tid != run[0] or keep != run[3]:
                    if run is not None:
                        runs.append(LogRun(run[0], tuple(run[1]), run[2], run[3]))
                    run = [tid, [], 0, keep]
                run[1].append(data[a:b])
                run[2] += b - a
            if run is not None:
                runs.append(LogRun(run[0], tuple(run[1]), run[2], run[3]))
    return out



_ENTRY_KINDS = (2, 5)  # SPAN_KIND_SERVER, SPAN_KIND_CONSUMER


def _any_value(data: bytes, parts: list[tuple[int, int]]):
    """A KeyValue's value as AuditSpan holds it: None, one scalar field decoded, else the encoding."""
    if not parts:
        return None
    if len(parts) == 1:
        a, b = parts[0]
        if a == b:
            return None
        fields = _fields(data, a, b)
        if len(fields) == 1:
            f, wt, x, y = fields[0]
            if f == 1 and wt == _LEN:
                return data[x:y].decode()
            if f == 2 and wt == 0:
                return _varint(data, x, y)[0] != 0
            if f == 3 and wt == 0:
                v = _varint(data, x, y)[0]
                return v - (1 << 64) if v >> 63 else v
            if f == 4 and wt == 1:
                return struct.unpack_from("<d", data, x)[0]
    return b"".join(data[a:b] for a, b in parts)


def _key_values(data: bytes, a: int, b: int, field: int):
    """(key, value parts) of each KeyValue in ``field`` of the message at data[a:b]."""
    for f, wt, x, y in _fields(data, a, b):
        if f != field or wt != _LEN:
            continue
        key, parts = b"", []
        for g, w, p, q in _fields(data, x, y):
            if w == _LEN and g == 1:
                key = data[p:q]
            elif w == _LEN and g == 2:
                parts.append((p, q))
        yield key, parts


def _audit_span(span, data: bytes, a: int, b: int, wanted: set, prefix: bytes, event_keys: set,
                recent: list) -> AuditSpan | None:
    attrs = {}
    for key, parts in _key_values(data, a, b, 9):
        if key in wanted or (prefix and key.startswith(prefix)):
            attrs[key.decode()] = _any_value(data, parts)
    entry = span.kind in _ENTRY_KINDS or not span.parent_span_id
    if not entry and not attrs:
        return None
    events: dict = {}
    if event_keys:
        for f, wt, x, y in _fields(data, a, b):
            if f == 11 and wt == _LEN:
                for key, parts in _key_values(data, x, y, 3):
                    if key in event_keys and key.decode() not in events:
                        events[key.decode()] = _any_value(data, parts)
    encoded = any(type(v) is bytes for d in (attrs, events) for v in d.values())
    return AuditSpan(span.trace_id, span.span_id, entry, span.name, span.start_time_unix_nano,
                     span.end_time_unix_nano, span.status.code, span.status.message, attrs, events, encoded,
                     data[a:b])


def _selected(request: bytes, keys: tuple, prefix: bytes, event_keys: tuple, select) -> list[tuple[list, list]]:
    """Per ResourceSpans with any: (its resource occurrences' ranges, ``select(...)`` of each span where not
    None), ``select`` deciding as audit_spans does which spans a record can use."""
    _keys(keys), _keys(event_keys)
    if not isinstance(prefix, bytes):
        raise TypeError("a bytes-like object is required for prefix")
    wanted, ekeys = set(keys), set(event_keys)
    msg = _parse(ExportTraceServiceRequest, request)
    data = request
    out = []
    for rs, (ra, rb) in zip(msg.resource_spans, _children(data, 0, len(data), 1)):
        spans: list = []
        recent: list = []  # select's memory within one ResourceSpans
        for ss, (sa, sb) in zip(rs.scope_spans, _children(data, ra, rb, 2)):
            for span, (a, b) in zip(ss.spans, _children(data, sa, sb, 2)):
                found = select(span, data, a, b, wanted, prefix, ekeys, recent)
                if found is not None:
                    spans.append(found)
        if spans:
            out.append((_children(data, ra, rb, 1), spans))
    return out


def audit_spans(request: bytes, keys: tuple, prefix: bytes, event_keys: tuple) -> list[AuditSpans]:
    """Per ResourceSpans with any: its resource as encoded and an AuditSpan per span that is an entry span
    (SERVER or CONSUMER, or no parent) or has an attribute whose key is in ``keys`` or starts with ``prefix``
    (non-empty); see sidecar._wire_types.AuditSpan."""
    return [AuditSpans(b"".join(request[x:y] for x, y in resource), spans)
            for resource, spans in _selected(request, keys, prefix, event_keys, _audit_span)]


def _field(number: int, payload: bytes) -> bytes:
    return length_delimited(encode_varint(number << 3 | _LEN), payload)


def _wanted_key(data: bytes, x: int, y: int, keys: set, prefix: bytes) -> bool:
    """Whether the KeyValue at data[x:y] has a key in ``keys`` or starting with ``prefix`` (non-empty)."""
    key = b""
    for g, w, p, q in _fields(data, x, y):
        if w == _LEN and g == 1:
            key = data[p:q]
    return key in keys or bool(prefix and key.startswith(prefix))


#: a repeat is looked for among this many non-entry spans kept last, of at most this many kept attributes
_REPEAT_WINDOW = 8
_REPEAT_ATTRS = 32


def _subset_span(span, data: bytes, a: int, b: int, wanted: set, prefix: bytes, event_keys: set,
                 recent: list) -> bytes | None:
    """The span with only what audit_spans reads, or None when audit_spans would not select it or it repeats
    one of the ``recent`` non-entry spans kept (same trace, same kept attributes, byte for byte and in order,
    no event attribute kept); ``recent`` gains it otherwise."""
    parts, kept_kvs = [], []
    events = False
    for f, wt, x, y in _fields(data, a, b):
        if wt == _LEN:
            if f in (1, 2, 4, 5, 15):
                parts.append(_field(f, data[x:y]))
            elif f == 9 and _wanted_key(data, x, y, wanted, prefix):
                kept_kvs.append(data[x:y])
                parts.append(_field(f, data[x:y]))
            elif f == 11 and event_keys:
                attrs = [_field(3, data[p:q]) for g, w, p, q in _fields(data, x, y)
                         if g == 3 and w == _LEN and _wanted_key(data, p, q, event_keys, b"")]
                if attrs:
                    parts.append(_field(11, b"".join(attrs)))
                    events = True
        elif wt == 0 and f == 6:
            parts.append(b"\x30" + encode_varint(_varint(data, x, y)[0]))
        elif wt == 1 and f in (7, 8):
            parts.append(encode_varint(f << 3 | 1) + data[x:y])
    entry = span.kind in _ENTRY_KINDS or not span.parent_span_id
    if not (kept_kvs or entry):
        return None
    if not entry and not events and len(kept_kvs) <= _REPEAT_ATTRS:
        facts = (span.trace_id, tuple(kept_kvs))
        if facts in recent:
            return None
        recent.append(facts)
        del recent[:-_REPEAT_WINDOW]
    return _field(2, b"".join(parts))


def audit_subset(request: bytes, keys: tuple, prefix: bytes, event_keys: tuple) -> tuple[bytes, int]:
    """The request re-encoded with only what ``audit_spans`` reads, and how many spans it kept: per
    ResourceSpans with a selected span, its resource and one ScopeSpans (no scope) of the spans
    ``audit_spans`` selects, each with only its ids, parent, name, kind, times, status, the attributes
    ``audit_spans`` reads and, of its events, only the attributes with a key in ``event_keys``; a repeat
    (see ``_subset_span``: a generate loop's forward spans) is left out."""
    out, kept = [], 0
    for resource, spans in _selected(request, keys, prefix, event_keys, _subset_span):
        kept += len(spans)
        head = b"".join(_field(1, request[x:y]) for x, y in resource)
        out.append(_field(1, head + _field(2, b"".join(spans))))
    return b"".join(out), kept


def audit_rows(request: bytes, layout: tuple, recorded: int, missing=None) -> None:
    """None: this half leaves every request to :func:`sidecar.audit.records.extract` (the C half makes the rows
    of the usual request in its pass; the rows it makes are tested equal to what extract's records give). The
    records are the same either way; in Python, a second implementation of them would only be slower."""
    return None
