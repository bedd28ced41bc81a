"""span_metrics and tail_sampling on each half of the wire scanner: the same series, decisions, counters
and emitted bytes on randomized, non-canonically encoded requests; the input that once labelled
differently; and span kinds / status codes outside the known range (issue 9 items 1 and 2), which must
be counted and labelled as their number, never raise, never allocate by value.
"""

from __future__ import annotations

import random
import tracemalloc

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client import generate_latest

from sidecar import _wire_py, wire
from sidecar.envelope import Envelope
from sidecar.signals import Signal
from tests.sidecar.tail_sampling.helpers import FakeClock
from tests.sidecar.tail_sampling.helpers import make as make_tail_sampling
from tests.sidecar.test_span_metrics import make as make_span_metrics
from tests.sidecar.wire_gen import Reencoder, rand_logs, rand_traces, trace_pool

try:
    from sidecar import _wire as _c
except ImportError:  # pragma: no cover
    _c = None

IMPLEMENTATIONS = [pytest.param(_wire_py, id="python"),
                   pytest.param(_c, id="c", marks=pytest.mark.skipif(_c is None, reason="C extension not built"))]
OPEN_ENUMS = [7, 3, 2**31 - 1, -1, -(2**31)]


def use(monkeypatch, impl) -> None:
    """Point the facade at one implementation (the processors look its functions up per call)."""
    for name in ("check_ids", "span_metric_rows", "span_metric_groups", "span_runs", "log_runs", "MAX_KEYS"):
        monkeypatch.setattr(wire, name, getattr(impl, name))
    monkeypatch.setattr(wire, "implementation", impl)


@pytest.fixture(params=IMPLEMENTATIONS)
def scanner(request, monkeypatch):
    use(monkeypatch, request.param)
    return request.param


def envelope(signal: Signal, msg, rng: random.Random) -> Envelope:
    """The request as the receiver hands it on: its received bytes, often not canonically encoded."""
    data = Reencoder(rng, p=0.2).encode(msg) if rng.random() < 0.6 else msg.SerializeToString()
    return Envelope(signal, encoded=data, items=Envelope(signal, msg).items)


# --- both halves, the same answers ------------------------------------------------------------------------

needs_c = pytest.mark.skipif(_c is None, reason="the C extension is not built")


def span_metrics_snapshot(monkeypatch, impl, dimensions):
    with monkeypatch.context() as m:
        use(m, impl)
        proc, _, _ = make_span_metrics(dimensions=dimensions)
        rng = random.Random(11)
        pool = trace_pool(rng)
        for _ in range(150):
            proc.consume(envelope(Signal.TRACES, rand_traces(rng, pool), rng))
        text = generate_latest(proc._tel.root.registry).decode()
        return proc.snapshot(), [line for line in text.splitlines() if "_created" not in line]


@needs_c
@pytest.mark.parametrize("dimensions", [[], [{"name": "user.tier", "default": "none"}, {"name": "http.status"}]])
def test_span_metrics_series_are_identical_on_both_halves(monkeypatch, dimensions):
    c, c_text = span_metrics_snapshot(monkeypatch, _c, dimensions)
    py, py_text = span_metrics_snapshot(monkeypatch, _wire_py, dimensions)
    assert sum(s[0] for s in py.values()) > 1000
    assert len(py) > 50  # many series: names, kinds, statuses, model labels of every value type
    assert c == py  # counts, sums, buckets and both exemplars per series
    assert c_text == py_text  # and what Prometheus scrapes


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


def run_tail_sampling(monkeypatch, impl, seed: int, policies: list[dict]):
    """Feed one randomized scenario; return what came out and every counter (without creation times)."""
    with monkeypatch.context() as m:
        use(m, impl)
        clock = FakeClock()
        proc, sink, clock, tel = make_tail_sampling(
            policies, clock=clock, rng=random.Random(seed).random, num_traces=6,
            logs={"always_keep_severity_at_least": 17, "without_trace_sampling_percentage": 50})
        rng = random.Random(seed)
        pool = trace_pool(rng, 30)
        for step in range(40):
            live = pool[step % 10: step % 10 + 12]  # traces come and go: late items meet decided ones
            proc.consume(envelope(Signal.TRACES, rand_traces(rng, live), rng))
            proc.consume(envelope(Signal.LOGS, rand_logs(rng, live), rng))
            proc.tick(clock.advance(rng.choice([0.2, 0.7, 1.5, 11])))
        proc.shutdown(clock.t + 5)
    out = [(signal, request.SerializeToString()) for signal, request in sink.requests]
    counters = {(s.name, tuple(sorted(s.labels.items()))): s.value
                for metric in tel.registry.collect() for s in metric.samples if not s.name.endswith("_created")}
    return out, counters


@needs_c
@pytest.mark.parametrize("policies, expect_kept_by", [
    (POLICIES, {"errors", "slow", "debug", "5xx", "not-bronze-sampled"}),
    (ATTRIBUTE_POLICIES, {"gold", "5xx", "not-bronze-sampled"}),
])
def test_tail_sampling_decisions_and_bytes_are_identical_on_both_halves(monkeypatch, policies, expect_kept_by):
    kept_by: set[str] = set()
    for seed in (1, 2, 3):
        c_out, c_counters = run_tail_sampling(monkeypatch, _c, seed, policies)
        py_out, py_counters = run_tail_sampling(monkeypatch, _wire_py, seed, policies)
        assert c_counters == py_counters
        assert c_out == py_out  # every emitted request, byte for byte
        decided = {k[1]: v for k, v in py_counters.items() if k[0] == "sidecar_tail_sampling_traces_total"}
        kept_by |= {dict(labels)["policy"] for labels in decided if dict(labels)["decision"] == "sampled"}
        assert any(dict(labels)["decision"] == "not_sampled" for labels in decided)
    assert expect_kept_by <= kept_by, kept_by  # the scenarios exercised them


# --- one half at a time --------------------------------------------------------------------------------------


def test_an_empty_model_id_yields_to_the_gen_ai_model_on_either_half(scanner):
    """The issue's span: ml.model.id="" (absent), ml.model.version="v1", gen_ai.request.model="llama"."""
    proc, _, tel = make_span_metrics()
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "chat"
    span = rs.scope_spans.add().spans.add(name="generate", trace_id=b"t" * 16, span_id=b"s" * 8)
    for k, v in (("ml.model.id", ""), ("ml.model.version", "v1"), ("gen_ai.request.model", "llama")):
        span.attributes.add(key=k).value.string_value = v
    proc.consume(Envelope(Signal.TRACES, req))
    [labels] = [proc._labels(k) for k in proc.snapshot()]
    assert (labels["model_id"], labels["model_version"]) == ("llama", "v1")


def open_enum_request() -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "svc"
    ss = rs.scope_spans.add()
    for i, code in enumerate(OPEN_ENUMS):
        sp = ss.spans.add(trace_id=bytes([i + 1]) * 16, span_id=b"s" * 8, name="op", kind=code,
                          start_time_unix_nano=1, end_time_unix_nano=2)
        sp.status.code = code
    return req


def test_span_metrics_labels_open_enum_values_as_their_number(scanner):
    proc, _, tel = make_span_metrics(with_metrics_route=True)
    proc.consume(Envelope(Signal.TRACES, open_enum_request()))
    text = generate_latest(tel.root.registry).decode()  # /metrics renders, no exception
    kind = {7: "7", 3: "SPAN_KIND_CLIENT"}  # 3 is a known span kind, not a known status code
    for code in OPEN_ENUMS:
        assert f'span_kind="{kind.get(code, code)}",span_name="op",status_code="{code}"' in text
    exported = proc.build_metrics_request()  # the OTLP export builds too
    codes = {kv.value.string_value for rm in exported.resource_metrics for sm in rm.scope_metrics
             for dp in sm.metrics[0].sum.data_points for kv in dp.attributes if kv.key == "status.code"}
    assert codes == {str(c) for c in OPEN_ENUMS}


def test_tail_sampling_takes_open_status_codes_without_allocating_by_value(scanner):
    policies = [{"name": "errors", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}}]
    proc, sink, clock, _ = make_tail_sampling(policies)
    tracemalloc.start()
    try:
        proc.consume(Envelope(Signal.TRACES, open_enum_request()))  # 2**31-1 once meant a 256 MiB int
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, f"peak {peak} bytes for one small request"
    proc.tick(clock.advance(30))
    assert sink.of(Signal.TRACES) == []  # no known ERROR among the codes: nothing kept, nothing raised


def test_more_dimensions_than_the_scanner_takes_fail_at_start_up_naming_the_key():
    from sidecar.processors.span_metrics import SpanMetricsConfig

    too_many = [{"name": f"attr.{i}"} for i in range(wire.MAX_KEYS - 2)]
    with pytest.raises(ValueError, match=r"dimensions: at most 61"):
        SpanMetricsConfig.model_validate({"dimensions": too_many})
    SpanMetricsConfig.model_validate({"dimensions": too_many[:-1]})  # the most it takes


def test_attribute_policies_on_one_key_share_its_scan():
    """Two policies on user.tier: the key is scanned once and both judge its value."""
    policies = [
        {"name": "gold", "type": "string_attribute", "string_attribute": {"key": "user.tier", "values": ["gold"]}},
        {"name": "not-gold", "type": "string_attribute",
         "string_attribute": {"key": "user.tier", "values": ["gold"], "invert_match": True}},
    ]
    proc, sink, clock, _ = make_tail_sampling(policies)
    req = ExportTraceServiceRequest()
    ss = req.resource_spans.add().scope_spans.add()
    for i, tier in enumerate(["gold", "bronze"]):
        sp = ss.spans.add(trace_id=bytes([i + 1]) * 16, span_id=b"s" * 8, name=tier)
        sp.attributes.add(key="user.tier").value.string_value = tier
    proc.consume(Envelope(Signal.TRACES, req))
    proc.tick(clock.advance(30))
    kept = {s.name: [kv.value.string_value for kv in s.attributes if kv.key == "sampling.policy"]
            for r in sink.of(Signal.TRACES) for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans}
    assert kept == {"gold": ["gold"], "bronze": ["not-gold"]}
