"""The C scanner (sidecar._wire) against the pure-Python paths it replaces, and against bad input.

span_metrics and tail_sampling each run once on the C path and once with the extension
switched off, on the same randomized requests (nested attribute values, missing fields,
remote parents, tracestate, events and links carrying the same keys, unicode, empty ids,
several resources and scopes, late spans and logs of decided traces); series, decisions,
counters and every emitted byte must be identical. The scanner itself must return each
span's exact serialization, and must raise ValueError, never crash, on truncated or
mutated bytes.
"""

from __future__ import annotations

import random
import tracemalloc

import pytest
import yaml
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from sidecar.processors import span_metrics as span_metrics_module
from sidecar.processors.tail_sampling import processor as tail_sampling_module
from sidecar.signals import Signal
from tests.sidecar.tail_sampling.helpers import FakeClock
from tests.sidecar.tail_sampling.helpers import make as make_tail_sampling
from tests.sidecar.test_span_metrics import make as make_span_metrics

_wire = pytest.importorskip("sidecar._wire", reason="the C extension is not built (pip install -e .)")

TEXTS = ["", "a", "resnet50", "gold", "bronze", "modèle-é", "模型", "🚀 fast", "x" * 300, "v3"]
BASE_NS = 1_700_000_000_000_000_000


def rand_value(rng: random.Random, av: AnyValue, depth: int = 0) -> None:
    kind = rng.choice(["str", "bool", "int", "double", "bytes", "none"] + (["array", "kvlist"] if depth < 3 else []))
    if kind == "str":
        av.string_value = rng.choice(TEXTS)
    elif kind == "bool":
        av.bool_value = rng.random() < 0.5
    elif kind == "int":
        av.int_value = rng.choice([0, 1, -1, 503, 2**63 - 1, -(2**63), rng.getrandbits(40)])
    elif kind == "double":
        av.double_value = rng.choice([0.0, -0.5, 1e300, 2.5e-300, 503.0, float("inf"), rng.random() * 1000])
    elif kind == "bytes":
        av.bytes_value = rng.randbytes(rng.randrange(0, 40))
    elif kind == "array":
        for _ in range(rng.randrange(0, 4)):
            rand_value(rng, av.array_value.values.add(), depth + 1)
    elif kind == "kvlist":
        for i in range(rng.randrange(0, 4)):
            kv = av.kvlist_value.values.add(key=f"k{i}")
            rand_value(rng, kv.value, depth + 1)
    # "none": a KeyValue whose value is unset


#: Keys the configured metrics dimensions and sampling policies look at, and some they do not.
KEYS = ["ml.model.id", "gen_ai.request.model", "ml.model.version", "sampling.force_keep", "user.tier",
        "http.status", "noise", "noise.é", "ml.model"]


def rand_attributes(rng: random.Random, kvs, n_max: int = 6) -> None:
    """Unique keys (OTLP requires it), typed values; the interesting keys often as the expected type."""
    keys = rng.sample(KEYS, rng.randrange(0, min(n_max, len(KEYS)) + 1))
    # span_metrics' Python path stops reading once it has the model id and version, the C path reads on:
    # they only differ when ml.model.id's label is empty and gen_ai.request.model comes after both, so
    # keep gen_ai.request.model first (a known, harmless difference on such input).
    if "gen_ai.request.model" in keys:
        keys.remove("gen_ai.request.model")
        keys.insert(0, "gen_ai.request.model")
    for key in keys:
        kv = kvs.add(key=key)
        r = rng.random()
        if key == "sampling.force_keep" and r < 0.7:
            kv.value.bool_value = rng.random() < 0.6
        elif key == "user.tier" and r < 0.7:
            kv.value.string_value = rng.choice(["gold", "silver", "bronze", "é"])
        elif key == "http.status" and r < 0.7:
            if rng.random() < 0.5:
                kv.value.int_value = rng.choice([200, 503, 599, 404])
            else:
                kv.value.double_value = rng.choice([200.0, 503.5])
        elif key.startswith("ml.") and r < 0.8:
            kv.value.string_value = rng.choice(["resnet50", "bert", "v1", "v2", "模型"])
        else:
            rand_value(rng, kv.value)


def rand_traces(rng: random.Random, trace_ids: list[bytes]) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    for _ in range(rng.randrange(1, 4)):
        rs = req.resource_spans.add()
        if rng.random() < 0.8:  # else no resource at all
            rs.resource.attributes.add(key="service.name").value.string_value = rng.choice(["svc", "", "séance"])
            rand_attributes(rng, rs.resource.attributes, 3)
            if rng.random() < 0.5 and all(kv.key != "user.tier" for kv in rs.resource.attributes):
                rs.resource.attributes.add(key="user.tier").value.string_value = rng.choice(["gold", "bronze"])
        if rng.random() < 0.3:
            rs.schema_url = "https://opentelemetry.io/schemas/1.26.0"
        for _ in range(rng.randrange(1, 3)):
            ss = rs.scope_spans.add()
            if rng.random() < 0.7:
                ss.scope.name = rng.choice(["torch", "http", ""])
                ss.scope.version = "0.1"
            if rng.random() < 0.2:
                ss.schema_url = "s"
            tid = rng.choice(trace_ids)
            for _ in range(rng.randrange(0, 12)):
                if rng.random() < 0.4:  # runs of one trace, interleaved traces, traceless spans
                    tid = rng.choice(trace_ids + [b""])
                sp = ss.spans.add(trace_id=tid)
                if rng.random() < 0.9:
                    sp.span_id = rng.randbytes(8)
                if rng.random() < 0.6:
                    sp.parent_span_id = rng.randbytes(8)
                sp.flags = rng.choice([0, 0, 0x100, 0x300, 0x301, rng.getrandbits(32)])
                sp.trace_state = rng.choice(["", "", "", "vendor=x", "ot=rv:00112233445566", "ot=th:8;rv:ffffffffffffff,a=b",
                                             "ot=rv:zz"])
                sp.name = rng.choice(["forward", "preprocess", "POST /predict", "", "推理"])
                sp.kind = rng.randrange(0, 6)
                start = rng.choice([0, BASE_NS + rng.getrandbits(30), 2**64 - 5])
                sp.start_time_unix_nano = start
                sp.end_time_unix_nano = rng.choice([0, min(2**64 - 1, start + rng.choice([1, 10**6, 6 * 10**7, 2 * 10**9])), start // 2])
                rand_attributes(rng, sp.attributes)
                if rng.random() < 0.3:
                    sp.status.code = rng.choice([0, 1, 2])
                    if rng.random() < 0.5:
                        sp.status.message = rng.choice(TEXTS)
                if rng.random() < 0.3:  # events and links carry the same keys: they must not count
                    ev = sp.events.add(name="exception", time_unix_nano=start)
                    rand_attributes(rng, ev.attributes)
                    link = sp.links.add(trace_id=rng.randbytes(16), span_id=rng.randbytes(8), trace_state="l=1")
                    rand_attributes(rng, link.attributes)
                sp.dropped_attributes_count = rng.choice([0, 0, 3])
    return req


def rand_logs(rng: random.Random, trace_ids: list[bytes]) -> ExportLogsServiceRequest:
    req = ExportLogsServiceRequest()
    for _ in range(rng.randrange(1, 3)):
        rl = req.resource_logs.add()
        if rng.random() < 0.8:
            rl.resource.attributes.add(key="service.name").value.string_value = "svc"
        for _ in range(rng.randrange(1, 3)):
            sl = rl.scope_logs.add()
            if rng.random() < 0.5:
                sl.scope.name = "app"
            tid = rng.choice(trace_ids)
            for _ in range(rng.randrange(0, 8)):
                if rng.random() < 0.5:
                    tid = rng.choice(trace_ids + [b""])
                rec = sl.log_records.add(trace_id=tid, severity_number=rng.choice([0, 5, 9, 9, 13, 17, 21, 24]),
                                         time_unix_nano=BASE_NS + rng.getrandbits(30))
                rec.body.string_value = rng.choice(TEXTS)
                rand_attributes(rng, rec.attributes, 3)
    return req


def trace_pool(rng: random.Random, n: int = 12) -> list[bytes]:
    return [rng.randbytes(16) for _ in range(n)]


# --- span_metrics --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dimensions", [[], [{"name": "user.tier", "default": "none"}, {"name": "http.status"}]])
def test_span_metrics_series_are_identical_with_and_without_the_extension(monkeypatch, dimensions):
    wire_proc, _, _ = make_span_metrics(dimensions=dimensions)
    assert wire_proc._aggregate == wire_proc._aggregate_wire
    monkeypatch.setattr(span_metrics_module, "_wire", None)
    py_proc, _, _ = make_span_metrics(dimensions=dimensions)
    assert py_proc._aggregate != py_proc._aggregate_wire
    rng = random.Random(11)
    pool = trace_pool(rng)
    for _ in range(150):
        req = rand_traces(rng, pool)
        wire_proc.consume(Signal.TRACES, req)
        py_proc.consume(Signal.TRACES, req)
    wire, py = wire_proc.snapshot(), py_proc.snapshot()
    assert sum(s[0] for s in py.values()) > 1000
    assert len(py) > 50  # many series: names, kinds, statuses, model labels of every value type
    assert wire == py  # counts, sums, buckets and both exemplars per series


# --- tail_sampling -------------------------------------------------------------------------------------

POLICIES = [
    {"name": "errors", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}},
    {"name": "slow", "type": "latency", "latency": {"threshold_ms": 1500}},
    {"name": "debug", "type": "boolean_attribute", "boolean_attribute": {"key": "sampling.force_keep", "value": True}},
    {"name": "gold", "type": "string_attribute", "string_attribute": {"key": "user.tier", "values": ["gold", "é"]}},
    {"name": "5xx", "type": "numeric_attribute",
     "numeric_attribute": {"key": "http.status", "min_value": 500, "max_value": 599}},
    {"name": "not-bronze-sampled", "type": "and", "and": {"and_sub_policy": [
        {"name": "not-bronze", "type": "string_attribute",
         "string_attribute": {"key": "user.tier", "values": ["bronze"], "invert_match": True}},
        {"name": "p30", "type": "probabilistic", "probabilistic": {"sampling_percentage": 30}}]}},
    {"name": "baseline", "type": "probabilistic", "probabilistic": {"sampling_percentage": 10}},
]


#: Attribute policies alone decide most traces here, so a span-versus-resource slip shows.
ATTRIBUTE_POLICIES = [p for p in POLICIES if p["name"] in ("gold", "5xx", "not-bronze-sampled")]


def run_tail_sampling(seed: int, policies: list[dict]):
    """Feed one randomized scenario; return what came out and every counter (without creation times)."""
    clock = FakeClock()
    proc, sink, clock, tel = make_tail_sampling(
        policies, clock=clock, rng=random.Random(seed).random, num_traces=6,
        logs={"always_keep_severity_at_least": 17, "without_trace_sampling_percentage": 50})
    rng = random.Random(seed)
    pool = trace_pool(rng, 30)
    for step in range(40):
        live = pool[step % 10: step % 10 + 12]  # traces come and go: late items meet decided ones
        proc.consume(Signal.TRACES, rand_traces(rng, live))
        proc.consume(Signal.LOGS, rand_logs(rng, live))
        proc.tick(clock.advance(rng.choice([0.2, 0.7, 1.5, 11])))
    proc.shutdown(clock.t + 5)
    out = [(signal, request.SerializeToString()) for signal, request in sink.requests]
    counters = {(s.name, tuple(sorted(s.labels.items()))): s.value
                for m in tel.registry.collect() for s in m.samples if not s.name.endswith("_created")}
    return proc, out, counters


@pytest.mark.parametrize("policies, expect_kept_by", [
    (POLICIES, {"errors", "slow", "debug", "5xx", "not-bronze-sampled"}),
    (ATTRIBUTE_POLICIES, {"gold", "5xx", "not-bronze-sampled"}),
])
def test_tail_sampling_decisions_and_bytes_are_identical_with_and_without_the_extension(
        monkeypatch, policies, expect_kept_by):
    kept_by: set[str] = set()
    for seed in (1, 2, 3):
        wire_proc, wire_out, wire_counters = run_tail_sampling(seed, policies)
        assert wire_proc._consume_traces == wire_proc._consume_traces_wire
        with monkeypatch.context() as m:
            m.setattr(tail_sampling_module, "_wire", None)
            py_proc, py_out, py_counters = run_tail_sampling(seed, policies)
        assert py_proc._consume_traces != py_proc._consume_traces_wire
        assert wire_counters == py_counters
        assert [s for s, _ in wire_out] == [s for s, _ in py_out]
        assert wire_out == py_out  # every emitted request, byte for byte
        decided = {k[1]: v for k, v in py_counters.items() if k[0] == "sidecar_tail_sampling_traces_total"}
        kept_by |= {dict(labels)["policy"] for labels in decided if dict(labels)["decision"] == "sampled"}
        assert any(dict(labels)["decision"] == "not_sampled" for labels in decided)
        assert any(dict(labels)["decision"] == "dropped_too_early" for labels in decided)
        late = {dict(k[1])["decision"] for k, v in py_counters.items()
                if k[0] == "sidecar_tail_sampling_late_items_total" and v}
        assert late == {"sampled", "not_sampled"}
    assert expect_kept_by <= kept_by, kept_by  # the scenarios exercised them


# --- the scanner itself --------------------------------------------------------------------------------


def test_span_runs_slice_each_span_exactly_and_fold_runs():
    rng = random.Random(5)
    for _ in range(40):
        req = rand_traces(rng, trace_pool(rng, 4))
        keys = (b"sampling.force_keep", b"user.tier")
        runs = _wire.span_runs(req.SerializeToString(), keys)
        assert len(runs) == len(req.resource_spans)
        for rs, (rhead, scopes) in zip(req.resource_spans, runs):
            assert rhead == tail_sampling_module._span_heads(rs)[0]
            assert len(scopes) == len(rs.scope_spans)
            for ss, (shead, span_runs) in zip(rs.scope_spans, scopes):
                assert shead == tail_sampling_module._scope_span_head(ss)
                spans = iter(ss.spans)
                for tid, ts, blobs, nbytes, mask, start, end, root, hits in span_runs:
                    group = [next(spans) for _ in blobs]
                    assert blobs == [s.SerializeToString() for s in group]  # exactly each span's encoding
                    assert {s.trace_id for s in group} == {tid} and {s.trace_state for s in group} == {ts}
                    assert nbytes == sum(map(len, blobs))
                    assert mask == sum({1 << s.status.code for s in group})
                    starts = [s.start_time_unix_nano for s in group if s.start_time_unix_nano]
                    assert start == (min(starts) if starts else 0)
                    assert end == max(s.end_time_unix_nano for s in group)
                    assert root == any(not s.parent_span_id or s.flags & 0x300 == 0x300 for s in group)
                    for key, h in zip(keys, hits):
                        values = [next((kv.value for kv in s.attributes if kv.key == key.decode()), None) for s in group]
                        if h is None:
                            assert values == [None] * len(group)
                        else:
                            assert h[0] == (None in values)
                            assert {AnyValue.FromString(v).SerializeToString() for v in h[1:]} == \
                                {v.SerializeToString() for v in values if v is not None}
                assert next(spans, None) is None


def test_log_runs_slice_each_record_exactly():
    rng = random.Random(6)
    for _ in range(40):
        req = rand_logs(rng, trace_pool(rng, 3))
        runs = _wire.log_runs(req.SerializeToString(), 17)
        for rl, (rhead, scopes) in zip(req.resource_logs, runs, strict=True):
            assert rhead == tail_sampling_module._log_heads(rl)[0]
            for sl, (shead, log_runs) in zip(rl.scope_logs, scopes, strict=True):
                assert shead == tail_sampling_module._scope_log_head(sl)
                flat = [(tid, blob, keep) for tid, blobs, _, keep in log_runs for blob in blobs]
                assert flat == [(r.trace_id, r.SerializeToString(), r.severity_number >= 17) for r in sl.log_records]


def test_label_strings_match_the_python_rendering():
    values = []
    for v in ["", "abc", "模型", True, False, 0, -7, 2**63 - 1, 0.1, -2.5e-300, float("inf"), b"\x00"]:
        av = AnyValue()
        if isinstance(v, str):
            av.string_value = v
        elif isinstance(v, bool):
            av.bool_value = v
        elif isinstance(v, int):
            av.int_value = v
        elif isinstance(v, float):
            av.double_value = v
        else:
            av.bytes_value = v
        values.append(av)
    values.append(AnyValue())  # no value
    req = ExportTraceServiceRequest()
    ss = req.resource_spans.add().scope_spans.add()
    for av in values:
        ss.spans.add(name="s").attributes.append(KeyValue(key="k", value=av))
    rows = _wire.span_metric_rows(req.SerializeToString(), (b"k",), [("svc", "base")])
    assert [row[0][4] for row in rows] == [span_metrics_module._any_str(av) for av in values]


# --- robustness ----------------------------------------------------------------------------------------


def _call_all(data: bytes) -> None:
    """Each scanner either returns or raises ValueError on ``data``."""
    for call in (lambda: _wire.span_runs(data, (b"user.tier", b"sampling.force_keep")),
                 lambda: _wire.log_runs(data, 17),
                 lambda: _wire.span_metric_rows(data, (b"ml.model.id", b"user.tier"), [("s", "", "")] * 64)):
        try:
            call()
        except ValueError:
            pass


def test_truncated_and_mutated_bytes_raise_value_error_never_crash():
    rng = random.Random(9)
    samples = [rand_traces(rng, trace_pool(rng, 3)).SerializeToString() for _ in range(5)]
    samples += [rand_logs(rng, trace_pool(rng, 3)).SerializeToString() for _ in range(5)]
    for data in samples:
        for cut in range(0, len(data), max(1, len(data) // 200)):
            _call_all(data[:cut])
        for _ in range(300):
            b = bytearray(data)
            for _ in range(rng.randrange(1, 4)):
                i = rng.randrange(len(b))
                op = rng.random()
                if op < 0.5:
                    b[i] = rng.randrange(256)
                elif op < 0.75:
                    b[i:i] = rng.randbytes(rng.randrange(1, 12))
                else:
                    del b[i:i + rng.randrange(1, 12)]
            _call_all(bytes(b))
    for _ in range(2000):
        _call_all(rng.randbytes(rng.randrange(0, 64)))


@pytest.mark.parametrize("data, message", [
    (b"\x0a", "truncated varint"),
    (b"\x0a\x05ab", "length past the end"),
    (b"\x0a" + b"\xff" * 11, "varint longer than 10 bytes"),
    (b"\x0b", "unsupported wire type"),  # a group
    (b"\x00\x00", "invalid field number"),
    (b"\x0a\x04\x12\x02\x12\x7f", "length past the end"),  # a scope claiming more than its resource holds
    (b"\x0a\x05\x12\x03\x12\x01\x0d", "truncated fixed-width field"),  # a span cut inside a fixed32
])
def test_specific_malformations_raise_value_error(data, message):
    with pytest.raises(ValueError, match=message):
        _wire.span_runs(data, ())
    with pytest.raises(ValueError, match=message):
        _wire.log_runs(data, 17)


def test_invalid_utf8_in_a_string_field_raises_value_error():
    span = b"\x2a\x02\xff\xfe"  # name (field 5) = invalid UTF-8
    data = b"\x0a\x08\x12\x06\x12\x04" + span
    with pytest.raises(ValueError):
        _wire.span_metric_rows(data, (), [("s",)])


def test_argument_errors():
    with pytest.raises(ValueError, match="at most"):
        _wire.span_runs(b"", tuple(b"k%d" % i for i in range(_wire.MAX_KEYS + 1)))
    with pytest.raises(TypeError):
        _wire.span_runs(b"", ("not bytes",))
    with pytest.raises(ValueError, match="fewer bases"):
        _wire.span_metric_rows(b"\x0a\x00", (), [])
    with pytest.raises(TypeError):
        _wire.span_metric_rows(b"\x0a\x00", (b"k",), [("svc",)])


def test_no_memory_is_leaked_on_success_or_error():
    rng = random.Random(3)
    traces = rand_traces(rng, trace_pool(rng, 4)).SerializeToString()
    logs = rand_logs(rng, trace_pool(rng, 4)).SerializeToString()
    keys = (b"user.tier", b"sampling.force_keep")

    def work():
        _wire.span_runs(traces, keys)
        _wire.log_runs(logs, 17)
        _wire.span_metric_rows(traces, keys, [("s", "", "")] * 8)
        for bad in (traces[:-3], logs[:-3]):
            _call_all(bad)

    for _ in range(20):
        work()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(300):
            work()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 20_000, f"{grown} bytes still allocated after 300 rounds"
