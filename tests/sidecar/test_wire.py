"""The wire scanner: its two halves (C ``sidecar._wire``, Python ``sidecar._wire_py``) against the
protobuf parser, and against each other.

One test class states what every scanner function must answer, judged by what the parser reads from
the same bytes; it runs once per implementation (the PyTest / CTest pattern of CPython's test_json).
The inputs are randomized and re-encoded non-canonically (unknown fields and groups everywhere, wrong
wire types, decoy values, split sub-messages, shuffled fields, over-long varints, open enum values),
and a parity test checks that both halves return equal results, byte for byte, on the same input.
"""

from __future__ import annotations

import functools
import gc
import random
import tracemalloc

import pytest
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from sidecar import _wire_py, wire
from sidecar._wire_types import (AuditSpan, AuditSpans, KeyHits, LogRun, ResourceGroup, ScopeGroup,
                                  SpanMetricGroup, SpanMetricRow, SpanRun)
from tests.sidecar.wire_gen import Reencoder, rand_logs, rand_traces, tag, trace_pool, varint

try:
    from sidecar import _wire as _c
except ImportError:  # pragma: no cover - the extension is built by `pip install -e .`
    _c = None

SERVICE = b"service.name"
KEYS = (b"ml.model.id", b"gen_ai.request.model", b"ml.model.version", b"user.tier", b"sampling.force_keep",
        b"http.status")

#: audit_spans: record keys, tag prefix and event keys (wire_gen's keys, some wanted, some not)
AUDIT_KEYS = (b"ml.model.id", b"gen_ai.request.model", b"user.tier")
AUDIT_PREFIX = b"noise"
AUDIT_EVENT_KEYS = (b"ml.model.version", b"http.status")


TRACES_SCHEMA = wire.schema_of(ExportTraceServiceRequest)


def audit_key(key: str) -> bool:
    return key.encode() in AUDIT_KEYS or key.startswith(AUDIT_PREFIX.decode())


def audit_wanted(span: Span) -> bool:
    return span.kind in (2, 5) or not span.parent_span_id or any(audit_key(kv.key) for kv in span.attributes)


def canon(value: AnyValue) -> bytes:
    """An AnyValue's known fields, deterministically encoded (NaN compares equal this way)."""
    return known(value).SerializeToString(deterministic=True)


def as_any(v) -> bytes:
    """An AuditSpan value back as canon(AnyValue): None, a decoded scalar, or an encoding."""
    if isinstance(v, bytes):
        return canon(AnyValue.FromString(v))
    field = {type(None): None, str: "string_value", bool: "bool_value", int: "int_value", float: "double_value"}
    name = field[type(v)]
    return canon(AnyValue() if name is None else AnyValue(**{name: v}))


def samples(seed: int, n: int, logs: bool = False):
    """(parsed message, bytes) pairs: canonical encodings and non-canonical ones of random requests."""
    rng = random.Random(seed)
    for i in range(n):
        msg = (rand_logs if logs else rand_traces)(rng, trace_pool(rng, 4))
        data = msg.SerializeToString() if i % 3 == 0 else Reencoder(rng, p=0.25).encode(msg)
        yield type(msg).FromString(data), data


def first_value(attributes, key: str):
    return next((kv.value for kv in attributes if kv.key == key), None)


def dedup(values: list) -> list:
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


def known(msg):
    """``msg`` without its unknown fields."""
    copy = type(msg)()
    copy.CopyFrom(msg)
    copy.DiscardUnknownFields()
    return copy


def parsed_span_run(group: list[Span], keys: tuple) -> tuple:
    """What a SpanRun must say about ``group``, from the parsed spans."""
    mask = 0
    for s in group:
        if 0 <= s.status.code < 3:
            mask |= 1 << s.status.code
    starts = [s.start_time_unix_nano for s in group if s.start_time_unix_nano]
    hits = []
    for key in keys:
        values = [first_value(s.attributes, key.decode()) for s in group]
        present = [v for v in values if v is not None]
        hits.append(None if not present else (None in values, present))
    return (mask, min(starts) if starts else 0, max(s.end_time_unix_nano for s in group),
            any(not s.parent_span_id or s.flags & 0x300 == 0x300 for s in group), hits)


class ScannerContract:
    """What each scanner function answers, judged by the protobuf parser. Subclasses set ``impl``."""

    impl = None

    def test_span_runs_slice_each_span_exactly_and_fold_runs(self):
        for msg, data in samples(5, 60):
            runs = self.impl.span_runs(data, KEYS)
            assert [type(r) for r in runs] == [ResourceGroup] * len(msg.resource_spans)
            for rs, group in zip(msg.resource_spans, runs):
                assert ResourceSpans.FromString(group.head) == ResourceSpans(resource=rs.resource,
                                                                             schema_url=rs.schema_url)
                assert [None if v is None else AnyValue.FromString(v) for v in group.values] == \
                    [first_value(rs.resource.attributes, k.decode()) for k in KEYS]
                assert len(group.scopes) == len(rs.scope_spans)
                for ss, scope in zip(rs.scope_spans, group.scopes):
                    assert isinstance(scope, ScopeGroup)
                    assert ScopeSpans.FromString(scope.head) == ScopeSpans(scope=ss.scope, schema_url=ss.schema_url)
                    spans = iter(ss.spans)
                    for run in scope.runs:
                        assert isinstance(run, SpanRun)
                        # a tuple tail sampling buffers as it is; C's is never walked by the garbage collector
                        assert type(run.spans) is tuple
                        assert not gc.is_tracked(run.spans) or self.impl is _wire_py
                        group_spans = [next(spans) for _ in run.spans]
                        assert [Span.FromString(b) for b in run.spans] == group_spans  # each span's own bytes
                        assert data.find(b"".join(run.spans[:1])) >= 0  # sliced from the input, not re-encoded
                        assert {s.trace_id for s in group_spans} == {run.trace_id}
                        assert {s.trace_state for s in group_spans} == {run.trace_state}
                        assert run.nbytes == sum(map(len, run.spans))
                        mask, start, end, root, hits = parsed_span_run(group_spans, KEYS)
                        assert (run.status_mask, run.start_ns, run.end_ns, run.has_root) == (mask, start, end, root)
                        for h, want in zip(run.hits, hits):
                            if want is None:
                                assert h is None
                                continue
                            assert isinstance(h, KeyHits) and h.absent == want[0]
                            assert all(a != b for a, b in zip(h.values, h.values[1:]))  # repeats left out
                            assert dedup([AnyValue.FromString(v) for v in h.values]) == dedup(want[1])
                    assert next(spans, None) is None

    def test_log_runs_slice_each_record_exactly(self):
        for msg, data in samples(6, 60, logs=True):
            runs = self.impl.log_runs(data, 17)
            for rl, group in zip(msg.resource_logs, runs, strict=True):
                assert ResourceLogs.FromString(group.head) == ResourceLogs(resource=rl.resource,
                                                                           schema_url=rl.schema_url)
                for sl, scope in zip(rl.scope_logs, group.scopes, strict=True):
                    assert ScopeLogs.FromString(scope.head) == ScopeLogs(scope=sl.scope, schema_url=sl.schema_url)
                    assert all(isinstance(r, LogRun) for r in scope.runs)
                    assert all(type(r.records) is tuple for r in scope.runs)
                    assert self.impl is _wire_py or not any(gc.is_tracked(r.records) for r in scope.runs)
                    flat = [(r.trace_id, LogRecord.FromString(b), r.keep) for r in scope.runs for b in r.records]
                    assert flat == [(rec.trace_id, rec, rec.severity_number >= 17) for rec in sl.log_records]

    def test_span_metric_rows_label_the_first_occurrence_and_empty_is_absent(self):
        for msg, data in samples(7, 60):
            rows = iter(self.impl.span_metric_rows(data, SERVICE, KEYS))
            for rs in msg.resource_spans:
                base = [(v is not None and wire.any_label(v)) or "" for v in
                        (first_value(rs.resource.attributes, k.decode()) for k in (SERVICE, *KEYS))]
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        row = next(rows)
                        assert isinstance(row, SpanMetricRow)
                        labels = []
                        for k, b in zip(KEYS, base[1:]):
                            v = first_value(s.attributes, k.decode())
                            labels.append((v is not None and wire.any_label(v)) or b)
                        assert row.key == (base[0], s.name, s.kind, s.status.code, *labels)
                        end, start = s.end_time_unix_nano, s.start_time_unix_nano
                        assert row.duration_ns == (end - start if end > start else 0)
                        assert (row.end_ns, row.status_code, row.trace_id, row.span_id) == \
                            (end, s.status.code, s.trace_id, s.span_id)
            assert next(rows, None) is None

    def test_span_metric_groups_count_the_rows_of_each_key(self):
        """What span_metrics adds per series, without an object per span: per key of span_metric_rows, in the
        order of its first span, the count, duration sum, buckets (le inclusive) and the exemplars of the key's
        first slowest span and its last span, with their positions among the request's spans."""
        bounds = (0, 1, 10**3, 10**6, 10**9, 10**12, (1 << 64) - 1)
        edges = [None, *bounds, None]
        for msg, data in samples(12, 60):
            rows = self.impl.span_metric_rows(data, SERVICE, KEYS)
            groups = self.impl.span_metric_groups(data, SERVICE, KEYS, bounds, 10_000)
            assert all(isinstance(g, SpanMetricGroup) for g in groups)
            assert [g.key for g in groups] == list(dict.fromkeys(r.key for r in rows))
            for g in groups:
                mine = [(i, r) for i, r in enumerate(rows) if r.key == g.key]
                ds = [r.duration_ns for _, r in mine]
                assert (g.count, g.sum_ns) == (len(mine), sum(ds))
                assert g.buckets == [sum(1 for d in ds if (lo is None or lo < d) and (hi is None or d <= hi))
                                     for lo, hi in zip(edges, edges[1:])]
                at, r = next((i, r) for i, r in mine if r.duration_ns == max(ds))
                assert (g.slowest, g.slowest_at) == ((r.duration_ns, r.trace_id, r.span_id, r.end_ns), at)
                at, r = mine[-1]
                assert (g.latest, g.latest_at) == ((r.duration_ns, r.trace_id, r.span_id, r.end_ns), at)

    def test_span_metric_groups_merge_keys_that_label_alike_and_sum_past_64_bits(self):
        """An int 5, a string "5", an empty string and no attribute (the resource says "5") label alike: one
        group. Durations of 2**64 - 1 ns sum exactly."""
        req = ExportTraceServiceRequest()
        rs = req.resource_spans.add()
        rs.resource.attributes.add(key="k").value.string_value = "5"
        ss = rs.scope_spans.add()
        values = [AnyValue(int_value=5), AnyValue(string_value="5"), AnyValue(string_value=""), None,
                  AnyValue(int_value=5), AnyValue(string_value="6")]
        for i, av in enumerate(values):
            span = ss.spans.add(trace_id=bytes([i]) * 16, span_id=bytes([i]) * 8, name="s",
                                start_time_unix_nano=0, end_time_unix_nano=(1 << 64) - 1 - (i == 1))
            if av is not None:
                span.attributes.append(KeyValue(key="k", value=av))
        five, six = self.impl.span_metric_groups(req.SerializeToString(), SERVICE, (b"k",), (10,), 10)
        assert (five.key[4], five.count, six.key[4], six.count) == ("5", 5, "6", 1)
        assert five.sum_ns == 5 * ((1 << 64) - 1) - 1 and five.buckets == [0, 5]
        assert (five.slowest_at, five.latest_at) == (0, 4)  # the first of the slowest, the last
        assert five.slowest[1] == bytes([0]) * 16 and five.latest[1] == bytes([4]) * 16

    def test_span_metric_groups_count_keys_past_max_groups_together(self):
        """A hostile request with a key per span makes at most ``max_groups`` groups: the spans of the keys past
        them are counted in one last group (key None), so memory follows the cap, not the request."""
        req = ExportTraceServiceRequest()
        ss = req.resource_spans.add().scope_spans.add()
        names = ["a", "b", "a", "c", "d", "b", "c"]
        for i, name in enumerate(names):
            ss.spans.add(trace_id=bytes([i]) * 16, span_id=bytes([i]) * 8, name=name, start_time_unix_nano=0,
                         end_time_unix_nano=10 * (i + 1))
        a, b, rest = self.impl.span_metric_groups(req.SerializeToString(), SERVICE, (), (35,), 2)
        assert [(g.key[1], g.count, g.sum_ns) for g in (a, b)] == [("a", 2, 40), ("b", 2, 80)]
        assert (rest.key, rest.count, rest.sum_ns, rest.buckets) == (None, 3, 40 + 50 + 70, [0, 3])
        assert (rest.slowest_at, rest.latest_at) == (6, 6)
        assert len(self.impl.span_metric_groups(req.SerializeToString(), SERVICE, (), (35,), 4)) == 4

    def test_the_issue_input_labels_the_gen_ai_model(self):
        """ml.model.id="" is absent: the model falls back to gen_ai.request.model, whatever the order."""
        req = ExportTraceServiceRequest()
        span = req.resource_spans.add().scope_spans.add().spans.add(name="generate")
        for k, v in (("ml.model.id", ""), ("ml.model.version", "v1"), ("gen_ai.request.model", "llama")):
            span.attributes.add(key=k).value.string_value = v
        [row] = self.impl.span_metric_rows(req.SerializeToString(), SERVICE, KEYS[:3])
        assert row.key[4:] == ("", "llama", "v1")

    def test_label_strings_match_the_python_rendering(self):
        values = []
        for v in ["", "abc", "模型", True, False, 0, -7, 2**63 - 1, 0.1, -2.5e-300, float("inf"), b"\x00"]:
            field = {str: "string_value", bool: "bool_value", int: "int_value", float: "double_value",
                     bytes: "bytes_value"}[type(v)]
            values.append(AnyValue(**{field: v}))
        values.append(AnyValue())  # no value
        req = ExportTraceServiceRequest()
        rs = req.resource_spans.add()
        rs.resource.attributes.add(key="k").value.string_value = "base"
        rs.resource.attributes.add(key="service.name").value.int_value = 7
        ss = rs.scope_spans.add()
        for av in values:
            ss.spans.add(name="s").attributes.append(KeyValue(key="k", value=av))
        rows = self.impl.span_metric_rows(req.SerializeToString(), SERVICE, (b"k",))
        assert [row.key[4] for row in rows] == [wire.any_label(av) or "base" for av in values]
        assert {row.key[0] for row in rows} == {"7"}

    def test_open_enums_are_carried_as_their_number(self):
        req = ExportTraceServiceRequest()
        ss = req.resource_spans.add().scope_spans.add()
        codes = [7, 3, 2**31 - 1, -1, -(2**31)]
        for c in codes:
            sp = ss.spans.add(trace_id=b"t" * 16, span_id=b"s" * 8, kind=c)
            sp.status.code = c
        data = req.SerializeToString()
        rows = self.impl.span_metric_rows(data, SERVICE, ())
        assert [(r.key[2], r.key[3], r.status_code) for r in rows] == [(c, c, c) for c in codes]
        [run] = self.impl.span_runs(data, ())[0].scopes[0].runs
        assert run.status_mask == 0  # no known code among them, and no bit allocated by value
        assert self.impl.check_ids(data, False) == len(codes)

    def test_unknown_groups_and_wrong_wire_types_are_skipped_like_the_parser(self):
        span = Span(trace_id=b"t" * 16, span_id=b"s" * 8, name="op", kind=2)
        span.attributes.add(key="user.tier").value.string_value = "gold"
        group = tag(99, 3) + tag(1, 0) + varint(5) + tag(7, 3) + tag(2, 2) + b"\x01x" + tag(7, 4) + tag(99, 4)
        weird = (group + span.SerializeToString() + tag(6, 2) + b"\x01\x07"  # kind as bytes: unknown
                 + tag(9, 0) + varint(1) + group)  # attributes as a varint: unknown
        req = group + tag(1, 2) + varint(len(b := group + tag(2, 2) + varint(len(s := group + tag(2, 2) + varint(
            len(weird)) + weird)) + s)) + b
        assert known(ExportTraceServiceRequest.FromString(req).resource_spans[0].scope_spans[0].spans[0]) == span
        [run] = self.impl.span_runs(req, (b"user.tier",))[0].scopes[0].runs
        assert run.spans == (weird,) and run.hits[0].values == [AnyValue(string_value="gold").SerializeToString()]
        [row] = self.impl.span_metric_rows(req, SERVICE, (b"user.tier",))
        assert row.key == ("", "op", 2, 0, "gold")
        assert self.impl.check_ids(req, False) == 1

    def test_repeated_value_fields_merge_like_the_parser(self):
        kv = tag(1, 2) + b"\x01x" + tag(1, 2) + varint(9) + b"user.tier"  # the last key wins
        kv += tag(2, 2) + b"\x03\x0a\x01a" + tag(2, 2) + b"\x02\x18\x05"  # string "a", then int 5: int wins
        span = tag(1, 2) + varint(16) + b"t" * 16 + tag(9, 2) + varint(len(kv)) + kv
        req = ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(
            spans=[Span.FromString(span)])])])
        data = tag(1, 2) + varint(len(b := tag(2, 2) + varint(len(s := tag(2, 2) + varint(len(span)) + span)) + s)) + b
        assert ExportTraceServiceRequest.FromString(data) == req
        [row] = self.impl.span_metric_rows(data, SERVICE, (b"user.tier",))
        assert row.key[4] == "5"
        [run] = self.impl.span_runs(data, (b"user.tier",))[0].scopes[0].runs
        assert [AnyValue.FromString(v) for v in run.hits[0].values] == [AnyValue(int_value=5)]

    def test_check_ids_counts_items_or_flags_a_wrong_length(self):
        for msg, data in samples(8, 40):
            spans = [s for rs in msg.resource_spans for ss in rs.scope_spans for s in ss.spans]
            bad = any(len(s.trace_id) != 16 or len(s.span_id) != 8 or len(s.parent_span_id) not in (0, 8) for s in spans)
            assert self.impl.check_ids(data, False) == (-1 if bad else len(spans))
        for msg, data in samples(9, 40, logs=True):
            recs = [r for rl in msg.resource_logs for sl in rl.scope_logs for r in sl.log_records]
            bad = any(len(r.trace_id) not in (0, 16) or len(r.span_id) not in (0, 8) for r in recs)
            assert self.impl.check_ids(data, True) == (-1 if bad else len(recs))

    def test_check_encoding_takes_every_request_the_parser_takes(self):
        for logs in (False, True):
            request_type = ExportLogsServiceRequest if logs else ExportTraceServiceRequest
            schema = wire.schema_of(request_type)
            for msg, data in samples(40 + logs, 40, logs=logs):
                got = self.impl.check_encoding(data, schema, request_type)
                # the C half parses nothing (a stage that wants the message parses it); Python's is the parser
                assert got is None if self.impl is _c else got == msg

    @pytest.mark.parametrize("data", [
        b"\x0a",  # truncated varint
        b"\x0a\x05ab",  # a length past the end
        b"\x0a" + b"\xff" * 11,  # a varint longer than 10 bytes
        b"\x0b",  # a group that never ends
        b"\x0c",  # the end of a group never started
        b"\x0b\x14",  # a group ended by another field's end tag
        b"\x00\x00",  # field number 0
        b"\x0e",  # wire type 6
        bytes([0xf8, 0xff, 0xff, 0xff, 0xff, 0x0f]) + b"\x00",  # a tag longer than 5 bytes
        b"\x0a\x04\x12\x02\x12\x7f",  # a scope claiming more than its resource holds
        b"\x0a\x05\x12\x03\x12\x01\x0d",  # a span cut inside a fixed32
    ])
    def test_malformed_input_raises_value_error(self, data):
        for call in (lambda: self.impl.span_runs(data, KEYS), lambda: self.impl.log_runs(data, 17),
                     lambda: self.impl.check_ids(data, False),
                     lambda: self.impl.check_encoding(data, TRACES_SCHEMA, ExportTraceServiceRequest),
                     lambda: self.impl.span_metric_rows(data, SERVICE, KEYS),
                     lambda: self.impl.span_metric_groups(data, SERVICE, KEYS, (1, 2), 8)):
            with pytest.raises(ValueError):
                call()

    def test_argument_errors(self):
        with pytest.raises(ValueError, match="at most"):
            self.impl.span_runs(b"", tuple(b"k%d" % i for i in range(self.impl.MAX_KEYS + 1)))
        with pytest.raises(ValueError, match="duplicate"):
            self.impl.span_runs(b"", (b"k", b"k"))
        with pytest.raises(TypeError):
            self.impl.span_runs(b"", ("not bytes",))
        with pytest.raises(TypeError):
            self.impl.span_runs("not bytes", ())
        with pytest.raises(ValueError, match="duplicate"):
            self.impl.span_metric_rows(b"\x0a\x00", b"k", (b"k",))
        with pytest.raises(TypeError):
            self.impl.span_metric_rows(b"\x0a\x00", "service.name", (b"k",))
        for bounds in ((-1,), (1 << 64,), (1.5,), (True,)):
            with pytest.raises(ValueError, match="bounds"):
                self.impl.span_metric_groups(b"", SERVICE, (b"k",), bounds, 8)
        with pytest.raises(TypeError):
            self.impl.span_metric_groups(b"", SERVICE, (b"k",), [1], 8)
        with pytest.raises(ValueError, match="max_groups"):
            self.impl.span_metric_groups(b"", SERVICE, (b"k",), (1,), 0)

    def test_audit_spans_hold_entry_spans_and_spans_with_wanted_keys_as_the_parser_reads_them(self):
        selected = entries = 0
        for msg, data in samples(41, 60):
            groups = self.impl.audit_spans(data, AUDIT_KEYS, AUDIT_PREFIX, AUDIT_EVENT_KEYS)
            assert all(type(g) is AuditSpans and all(type(s) is AuditSpan for s in g.spans) for g in groups)
            expected = [(rs, want) for rs in msg.resource_spans
                        if (want := [s for ss in rs.scope_spans for s in ss.spans if audit_wanted(s)])]
            assert len(groups) == len(expected)
            for group, (rs, want) in zip(groups, expected):
                assert known(Resource.FromString(group.resource)) == known(rs.resource)
                assert len(group.spans) == len(want)
                for got, span in zip(group.spans, want):
                    assert Span.FromString(got.span) == span
                    assert got[:8] == (span.trace_id, span.span_id, span.kind in (2, 5) or not span.parent_span_id,
                                       span.name, span.start_time_unix_nano, span.end_time_unix_nano,
                                       span.status.code, span.status.message)
                    last = {kv.key: kv.value for kv in span.attributes if audit_key(kv.key)}
                    assert {k: as_any(v) for k, v in got.attributes.items()} == {k: canon(v) for k, v in last.items()}
                    first: dict = {}
                    for ev in span.events:
                        for kv in ev.attributes:
                            if kv.key.encode() in AUDIT_EVENT_KEYS:
                                first.setdefault(kv.key, kv.value)
                    assert {k: as_any(v) for k, v in got.events.items()} == {k: canon(v) for k, v in first.items()}
                    assert got.encoded == any(type(v) is bytes for d in (got.attributes, got.events)
                                              for v in d.values())
                    selected += 1
                    entries += got.entry
        assert selected > entries > 20

    def test_audit_spans_decode_one_scalar_and_leave_the_rest_encoded(self):
        span = Span(trace_id=b"t" * 16, span_id=b"s" * 8, parent_span_id=b"p" * 8, kind=1)
        values = {"s": AnyValue(string_value="é"), "b": AnyValue(bool_value=False), "i": AnyValue(int_value=-5),
                  "d": AnyValue(double_value=0.5), "x": AnyValue(bytes_value=b"\x00"), "n": AnyValue()}
        for k, v in values.items():
            span.attributes.add(key="tag." + k, value=v)
        data = ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[span])])])
        (group,) = self.impl.audit_spans(data.SerializeToString(), (), b"tag.", ())
        (got,) = group.spans
        assert got.entry is False and got.encoded is True and group.resource == b""
        assert got.attributes == {"tag.s": "é", "tag.b": False, "tag.i": -5, "tag.d": 0.5,
                                  "tag.x": values["x"].SerializeToString(), "tag.n": None}
        # a span that is neither an entry span nor carries a wanted key is left out, and so is its resource
        assert self.impl.audit_spans(data.SerializeToString(), (b"other",), b"", ()) == []

    def test_audit_spans_argument_errors(self):
        with pytest.raises(TypeError):
            self.impl.audit_spans(b"", [b"k"], b"", ())
        with pytest.raises(TypeError):
            self.impl.audit_spans(b"", (), "tag.", ())
        with pytest.raises(ValueError, match="duplicate"):
            self.impl.audit_spans(b"", (), b"", (b"k", b"k"))

    def test_audit_subset_is_a_valid_request_that_audit_spans_reads_the_same(self):
        """The audit branch reduces each request to this before redaction: what audit records are made of
        must come out of it exactly as out of the whole request, and nothing else may remain. (These random
        requests repeat no span's facts; repeats: test_both_halves_leave_out_the_same_repeats.)"""
        kept_total = dropped = 0
        for msg, data in samples(43, 60):
            subset, kept = self.impl.audit_subset(data, AUDIT_KEYS, AUDIT_PREFIX, AUDIT_EVENT_KEYS)
            reduced = ExportTraceServiceRequest.FromString(subset)  # the parser accepts it
            spans = [s for rs in reduced.resource_spans for ss in rs.scope_spans for s in ss.spans]
            assert kept == len(spans) == sum(audit_wanted(s) for rs in msg.resource_spans
                                             for ss in rs.scope_spans for s in ss.spans)
            whole = self.impl.audit_spans(data, AUDIT_KEYS, AUDIT_PREFIX, AUDIT_EVENT_KEYS)
            part = self.impl.audit_spans(subset, AUDIT_KEYS, AUDIT_PREFIX, AUDIT_EVENT_KEYS)
            assert [(g.resource, [sp[:-1] for sp in g.spans]) for g in part] == \
                   [(g.resource, [sp[:-1] for sp in g.spans]) for g in whole]  # all but the span's own bytes
            for span in spans:  # only what a record reads is left
                assert all(audit_key(kv.key) for kv in span.attributes)
                assert all(kv.key.encode() in AUDIT_EVENT_KEYS for ev in span.events for kv in ev.attributes)
                assert all(ev.attributes for ev in span.events)
                assert {f.name for f, _ in span.ListFields()} <= {
                    "trace_id", "span_id", "parent_span_id", "name", "kind", "start_time_unix_nano",
                    "end_time_unix_nano", "attributes", "events", "status"}
            assert all(not ss.HasField("scope") for rs in reduced.resource_spans for ss in rs.scope_spans)
            kept_total += kept
            dropped += sum(len(ss.spans) for rs in msg.resource_spans for ss in rs.scope_spans) - kept
        assert kept_total > 500 and dropped > 50
        assert self.impl.audit_subset(b"", (), b"", ()) == (b"", 0)

    def test_no_memory_is_leaked_on_success_or_error(self):
        msg, data = next(samples(3, 1))
        logs = next(samples(4, 1, logs=True))[1]

        def work():
            self.impl.span_runs(data, KEYS)
            self.impl.log_runs(logs, 17)
            self.impl.span_metric_rows(data, SERVICE, KEYS)
            self.impl.audit_spans(data, AUDIT_KEYS, AUDIT_PREFIX, AUDIT_EVENT_KEYS)
            self.impl.audit_subset(data, AUDIT_KEYS, AUDIT_PREFIX, AUDIT_EVENT_KEYS)
            for bad in (data[:-3], logs[:-3]):
                for call in (lambda: self.impl.span_runs(bad, KEYS), lambda: self.impl.log_runs(bad, 17),
                             lambda: self.impl.audit_spans(bad, AUDIT_KEYS, AUDIT_PREFIX, AUDIT_EVENT_KEYS),
                             lambda: self.impl.audit_subset(bad, AUDIT_KEYS, AUDIT_PREFIX, AUDIT_EVENT_KEYS)):
                    try:
                        call()
                    except ValueError:
                        pass

        for _ in range(300):  # warm up: the parser's and the allocator's caches settle
            work()
        tracemalloc.start()
        try:
            # a full collection empties CPython's free lists (of tuples, lists, ...), which tracemalloc counts
            # as allocated and which fill at whatever moment the last one ran: measured after one, what stays
            # allocated is what leaked
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(200):
                work()
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert grown < 20_000, f"{grown} bytes still allocated after 200 rounds"


class TestPython(ScannerContract):
    impl = _wire_py


@pytest.mark.skipif(_c is None, reason="the C extension is not built (pip install -e .)")
class TestC(ScannerContract):
    impl = _c


def test_the_facade_picks_one_implementation_and_honours_sidecar_pure_python(monkeypatch):
    import os

    expect_python = os.environ.get("SIDECAR_PURE_PYTHON") == "1" or _c is None
    assert wire.implementation is (_wire_py if expect_python else _c)
    assert wire.IMPLEMENTATION == ("python" if expect_python else "c")
    for name in ("check_ids", "span_metric_rows", "span_metric_groups", "span_runs", "log_runs", "audit_spans",
                 "audit_subset", "audit_rows"):
        assert getattr(wire, name) is getattr(wire.implementation, name)
    assert _c is None or _c.MAX_KEYS == _wire_py.MAX_KEYS


# --- parity: both halves, the same bytes, equal answers --------------------------------------------------

needs_c = pytest.mark.skipif(_c is None, reason="the C extension is not built (pip install -e .)")


def _answers(impl, data: bytes, logs: bool):
    out = []
    calls = [lambda: impl.check_ids(data, logs)]
    if logs:
        calls.append(lambda: impl.log_runs(data, 17))
    else:
        calls += [lambda: impl.span_runs(data, KEYS),
                  lambda: impl.span_metric_rows(data, SERVICE, KEYS),
                  lambda: impl.span_metric_groups(data, SERVICE, KEYS, (0, 10**6, 10**9), 10_000),
                  lambda: impl.audit_spans(data, AUDIT_KEYS, AUDIT_PREFIX, AUDIT_EVENT_KEYS),
                  lambda: impl.audit_subset(data, AUDIT_KEYS, AUDIT_PREFIX, AUDIT_EVENT_KEYS)]
    for call in calls:
        try:
            out.append(call())
        except ValueError:
            out.append(ValueError)
    return out


@needs_c
@pytest.mark.parametrize("logs", [False, True], ids=["traces", "logs"])
def test_both_halves_answer_identically_on_random_re_encoded_requests(logs):
    n = 0
    for msg, data in samples(21 + logs, 300, logs=logs):
        assert _answers(_c, data, logs) == _answers(_wire_py, data, logs)
        n += len(data)
    assert n > 100_000


#: bytes that break UTF-8 where they land in a string: continuation, overlong and surrogate leads, past U+10FFFF
_UTF8_BREAKERS = [0x80, 0xbf, 0xc0, 0xc1, 0xc2, 0xe0, 0xed, 0xef, 0xf0, 0xf4, 0xf5, 0xff]


def damaged(rng: random.Random, data: bytes, utf8: float = 0.0) -> bytes:
    """``data`` with one to three random edits: a byte replaced (by a UTF-8 breaker with probability
    ``utf8``), bytes inserted, or bytes deleted."""
    b = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        i = rng.randrange(len(b))
        op = rng.random()
        if op < 0.5:
            b[i] = rng.choice(_UTF8_BREAKERS) if utf8 and rng.random() < utf8 else rng.randrange(256)
        elif op < 0.75:
            b[i:i] = rng.randbytes(rng.randrange(1, 12))
        else:
            del b[i:i + rng.randrange(1, 12)]
    return bytes(b)


def _loop_request(rng: random.Random) -> bytes:
    """Traces whose forward spans repeat their facts (a generate loop), interleaved, with variations that make a
    span no repeat: another value, another trace, an event attribute kept, more attributes than compared, a
    window's worth of other spans in between, another resource."""
    req = ExportTraceServiceRequest()
    for _ in range(rng.randint(1, 2)):
        rs = req.resource_spans.add()
        rs.resource.attributes.add(key="service.name").value.string_value = "svc"
        ss = rs.scope_spans.add()
        traces = [rng.randbytes(16) for _ in range(rng.randint(1, 3))]
        facts = [[("ml.model.id", "m"), ("user.tier", "gold")], [("ml.model.id", "m"), ("user.tier", "free")],
                 [("gen_ai.request.model", "llm")], [("noise.x", str(i)) for i in range(rng.choice([2, 40]))]]
        for tid in traces:
            ss.spans.add(trace_id=tid, span_id=rng.randbytes(8), kind=2, name="POST /generate")
        for _ in range(rng.randint(0, 24)):
            sp = ss.spans.add(trace_id=rng.choice(traces), span_id=rng.randbytes(8), parent_span_id=rng.randbytes(8),
                              kind=rng.choice([1, 3]), name=rng.choice(["forward", "step"]))
            for key, value in rng.choice(facts):
                sp.attributes.add(key=key).value.string_value = value
            if rng.random() < 0.1:
                sp.events.add(name="e").attributes.add(key="ml.model.version").value.string_value = "v"
            if rng.random() < 0.1:
                sp.attributes.add(key="unread").value.int_value = 1
    return req.SerializeToString()


@needs_c
def test_both_halves_leave_out_the_same_repeats():
    """audit_subset leaves out a non-entry span whose kept attributes (and trace, and ResourceSpans) equal those
    of one of the last few kept: both halves leave out exactly the same ones, and only such spans."""
    rng = random.Random(17)
    left_out = 0
    for _ in range(300):
        data = _loop_request(rng)
        c_out = _c.audit_subset(data, AUDIT_KEYS, AUDIT_PREFIX, AUDIT_EVENT_KEYS)
        assert c_out == _wire_py.audit_subset(data, AUDIT_KEYS, AUDIT_PREFIX, AUDIT_EVENT_KEYS)
        whole = [sp for g in _c.audit_spans(data, AUDIT_KEYS, AUDIT_PREFIX, AUDIT_EVENT_KEYS) for sp in g.spans]
        part = [sp for g in _c.audit_spans(c_out[0], AUDIT_KEYS, AUDIT_PREFIX, AUDIT_EVENT_KEYS) for sp in g.spans]
        kept = {(sp.trace_id, sp.span_id) for sp in part}
        for sp in whole:
            if (sp.trace_id, sp.span_id) not in kept:  # a repeat: a kept non-entry span of its trace says the same
                left_out += 1
                assert not sp.entry and not sp.events
                assert any(k.trace_id == sp.trace_id and not k.entry and k.attributes == sp.attributes for k in part)
    assert left_out > 300


@needs_c
def test_on_corrupted_bytes_both_raise_or_both_answer_the_same():
    """Where the parser accepts the corrupted bytes both halves give equal answers; where it rejects
    them the Python half raises ValueError and the C half raises ValueError or answers (it reads less
    than the parser validates); neither crashes."""
    rng = random.Random(9)
    accepted = 0
    for logs in (False, True):
        for msg, data in samples(30 + logs, 8, logs=logs):
            for _ in range(250):
                b = damaged(rng, data)
                request_type = ExportLogsServiceRequest if logs else ExportTraceServiceRequest
                try:
                    request_type.FromString(b)
                except DecodeError:
                    assert all(a is ValueError for a in _answers(_wire_py, b, logs))
                    _answers(_c, b, logs)  # must not crash
                    continue
                accepted += 1
                assert _answers(_c, b, logs) == _answers(_wire_py, b, logs)
    assert accepted > 100


# --- check_encoding: the receiver's parse, refusing exactly what the parser refuses ----------------------


def _ld(field: int, payload: bytes) -> bytes:
    return tag(field, 2) + varint(len(payload)) + payload


def _in_span(body: bytes) -> bytes:
    return _ld(1, _ld(2, _ld(2, body)))  # request -> resource_spans -> scope_spans -> spans


def _in_log(body: bytes) -> bytes:
    return _ld(1, _ld(2, _ld(2, body)))  # request -> resource_logs -> scope_logs -> log_records


def _nested(levels: int, kvlists: bool) -> bytes:
    """An attribute whose value nests ``levels`` arrays (2 messages each) or kvlists (3 each)."""
    v = _ld(1, b"x")
    for _ in range(levels):
        v = _ld(6, _ld(1, _ld(1, b"k") + _ld(2, v))) if kvlists else _ld(5, _ld(1, v))
    return _ld(9, _ld(1, b"k") + _ld(2, v))


def _groups(levels: int, field: int = 20) -> bytes:
    v = b""
    for _ in range(levels):
        v = tag(field, 3) + v + tag(field, 4)
    return v


EDGE_CASES = {
    "wire type 6": _in_span(tag(20, 6)), "wire type 7": _in_span(tag(20, 7)),
    "field number 0": _in_span(tag(0, 0) + b"\x01"),
    "unknown field with bad UTF-8": _in_span(_ld(20, b"\xff")),
    "bytes field with bad UTF-8": _in_span(_ld(1, b"\xff")),
    "AnyValue bytes with bad UTF-8": _in_span(_ld(9, _ld(2, _ld(7, b"\xff")))),
    "name: bad UTF-8": _in_span(_ld(5, b"\xff")),
    "name: overlong NUL": _in_span(_ld(5, b"\xc0\x80")),
    "name: surrogate": _in_span(_ld(5, b"\xed\xa0\x80")),
    "name: U+10FFFF": _in_span(_ld(5, "\U0010ffff".encode())),
    "name: past U+10FFFF": _in_span(_ld(5, b"\xf4\x90\x80\x80")),
    "name: 5-byte form": _in_span(_ld(5, b"\xf8\x88\x80\x80\x80")),
    "name: cut multi-byte": _in_span(_ld(5, "é".encode()[:1])),
    "name: NUL": _in_span(_ld(5, b"\x00")),
    "name: long ASCII then bad": _in_span(_ld(5, b"a" * 37 + b"\x80")),
    "name as a varint (unknown)": _in_span(tag(5, 0) + b"\x01"),
    "name as a group (unknown)": _in_span(tag(5, 3) + tag(5, 4)),
    "attributes as a varint (unknown)": _in_span(tag(9, 0) + b"\x05"),
    "attributes as a group with fields": _in_span(tag(9, 3) + _ld(1, b"\xff") + tag(9, 4)),
    "kind as length-delimited": _in_span(_ld(6, b"\x01\x02")),
    "status code 2^64-1": _in_span(_ld(15, tag(3, 0) + varint(2**64 - 1))),
    "event name: bad UTF-8": _in_span(_ld(11, _ld(2, b"\xff"))),
    "link trace_state: bad UTF-8": _in_span(_ld(13, _ld(3, b"\xff"))),
    "status message: bad UTF-8": _in_span(_ld(15, _ld(2, b"\xff"))),
    "attribute key: bad UTF-8": _in_span(_ld(9, _ld(1, b"\xff"))),
    "attribute string: bad UTF-8": _in_span(_ld(9, _ld(2, _ld(1, b"\xff")))),
    "array string: bad UTF-8": _in_span(_ld(9, _ld(2, _ld(5, _ld(1, _ld(1, b"\xfe")))))),
    "scope name: bad UTF-8": _ld(1, _ld(2, _ld(1, _ld(1, b"\xff")))),
    "schema_url: bad UTF-8": _ld(1, _ld(3, b"\xff")),
    "entity_refs id_keys: bad UTF-8": _ld(1, _ld(1, _ld(3, _ld(3, b"\xff")))),
    "unknown group": _in_span(tag(20, 3) + tag(21, 0) + b"\x01" + tag(20, 4)),
    "unknown group, mismatched end": _in_span(tag(20, 3) + tag(21, 4)),
    "unknown group, never ended": _in_span(tag(20, 3) + tag(21, 0) + b"\x01"),
    "unknown group holding wire type 6": _in_span(tag(20, 3) + tag(21, 6) + tag(20, 4)),
    "end of a group never started": _in_span(tag(20, 4)),
    "fixed64 cut": _in_span(tag(7, 1) + b"\x00" * 7),
    "fixed32 cut": _in_span(tag(16, 5) + b"\x00" * 3),
    "length 2^31": _in_span(tag(5, 2) + varint(2**31) + b"x"),
    "length cut": _in_span(tag(5, 2) + varint(5) + b"ab"),
    "varint cut": _in_span(tag(6, 0) + b"\x80"),
    "varint of 10 bytes, high bits set": _in_span(tag(6, 0) + b"\xff" * 9 + b"\x7f"),
    "varint of 11 bytes": _in_span(tag(6, 0) + b"\xff" * 10 + b"\x01"),
    "tag of 5 bytes": _in_span(b"\xa8\x80\x80\x80\x00\x01"),
    "tag of 6 bytes": _in_span(b"\xa8\x80\x80\x80\x80\x00\x01"),
    "tag past 32 bits": _in_span(varint(2**32) + b"\x01"),
    "submessage with trailing garbage": _in_span(_ld(15, b"\x80")),
    "empty request": b"",
    "log body string: bad UTF-8": _in_log(_ld(5, _ld(1, b"\xff"))),
    "log severity_text: bad UTF-8": _in_log(_ld(3, b"\xff")),
    "log event_name: bad UTF-8": _in_log(_ld(12, b"\xc3")),
    **{f"arrays nested {n}": _in_span(_nested(n, False)) for n in (46, 47, 48)},
    **{f"kvlists nested {n}": _in_span(_nested(n, True)) for n in (30, 31, 32)},
    **{f"groups nested {n} in a span": _in_span(_groups(n)) for n in (96, 97, 98)},
    **{f"groups nested {n} in the request": _groups(n) for n in (99, 100, 101)},
    "length-delimited unknowns nested 200": _in_span(functools.reduce(lambda v, _: _ld(20, v), range(200), b"")),
}


@needs_c
@pytest.mark.parametrize("logs", [False, True], ids=["as traces", "as logs"])
@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_check_encoding_refuses_exactly_what_the_parser_refuses(name, logs):
    request_type = ExportLogsServiceRequest if logs else ExportTraceServiceRequest
    data = EDGE_CASES[name]
    try:
        request_type.FromString(data)
        parser_takes = True
    except DecodeError:
        parser_takes = False
    for impl in (_c, _wire_py):
        try:
            impl.check_encoding(data, wire.schema_of(request_type), request_type)
            assert parser_takes, f"{impl.__name__} took what the parser refuses"
        except ValueError as e:
            assert not parser_takes, f"{impl.__name__} refused what the parser takes: {e}"
            assert str(e).startswith("malformed protobuf")


@needs_c
def test_check_encoding_agrees_with_the_parser_on_corrupted_requests():
    """Random damage to random non-canonical requests, biased to UTF-8 damage in strings: the C half
    refuses exactly the bytes the parser refuses. A miss either way is a bug: taking what the parser
    refuses would fail a later stage that parses; refusing what it takes would lose a client's data."""
    rng = random.Random(17)
    outcomes = {True: 0, False: 0}
    for logs in (False, True):
        request_type = ExportLogsServiceRequest if logs else ExportTraceServiceRequest
        schema = wire.schema_of(request_type)
        for msg, data in samples(50 + logs, 10, logs=logs):
            for _ in range(300):
                b = damaged(rng, data, utf8=0.8)
                try:
                    request_type.FromString(b)
                    takes = True
                except DecodeError:
                    takes = False
                try:
                    _c.check_encoding(b, schema, request_type)
                    c_takes = True
                except ValueError:
                    c_takes = False
                assert c_takes == takes, (logs, b.hex())
                outcomes[takes] += 1
    assert min(outcomes.values()) > 300, outcomes  # both answers, each hundreds of times


def test_schema_of_refuses_what_it_cannot_describe():
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    with pytest.raises(ValueError, match="bucket_counts"):
        wire.schema_of(ExportMetricsServiceRequest)
    for impl in filter(None, (_c, _wire_py)):
        with pytest.raises(ValueError, match="multiple of"):
            impl.check_encoding(b"", b"\x00" * 31, ExportTraceServiceRequest)
