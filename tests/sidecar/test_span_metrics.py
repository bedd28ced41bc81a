"""span_metrics: exact counts against ground truth, bucket placement, model labels, OTLP emission, cardinality cap."""

from __future__ import annotations

import os
import random
from collections import Counter

import pytest
import yaml
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from sidecar.envelope import Envelope
from sidecar.component import Kind, Refused
from sidecar.config import ComponentId, ConfigError, parse_config
from sidecar.pipeline import SignalRouter
from sidecar.processors.span_metrics import SpanMetricsConfig, SpanMetricsProcessor
from sidecar.registry import CreateSettings
from sidecar.signals import Signal
from sidecar.telemetry import SelfTelemetry
from sidecar.testing import CollectingConsumer, Counted

MS = 1_000_000


def make(with_metrics_route: bool = False, **cfg):
    config = SpanMetricsConfig.model_validate(yaml.safe_load(yaml.safe_dump(cfg)))
    tel = SelfTelemetry().component("processor", "span_metrics")
    settings = CreateSettings(id=ComponentId("span_metrics"), kind=Kind.PROCESSOR, telemetry=tel)
    sink = CollectingConsumer()
    router = SignalRouter("processor span_metrics")
    router.routes[Signal.TRACES] = sink
    if with_metrics_route:
        router.routes[Signal.METRICS] = sink
    proc = SpanMetricsProcessor(settings, config, router, wall_clock=lambda: 1_700_000_000.0)
    return Counted(proc, tel), sink, tel  # behind the pipeline's counting edge, as the graph runs it


def add_span(ss, *, name="forward", kind=Span.SPAN_KIND_INTERNAL, error=False, duration_ms=5.0, attrs=None):
    s = ss.spans.add()
    s.trace_id, s.span_id, s.name, s.kind = os.urandom(16), os.urandom(8), name, kind
    s.start_time_unix_nano = 1_700_000_000_000_000_000
    s.end_time_unix_nano = s.start_time_unix_nano + round(duration_ms * MS)
    if error:
        s.status.code = Status.STATUS_CODE_ERROR
    for k, v in (attrs or {}).items():
        a = s.attributes.add()
        a.key = k
        a.value.string_value = v
    return s


def request(service: str, resource_attrs: dict | None = None) -> tuple[ExportTraceServiceRequest, object]:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    for k, v in {"service.name": service, **(resource_attrs or {})}.items():
        a = rs.resource.attributes.add()
        a.key = k
        a.value.string_value = v
    return req, rs.scope_spans.add()


def sample(tel, name: str, **labels) -> float | None:
    return tel.registry.get_sample_value(name, labels)


def labels(service, span_name="forward", kind="SPAN_KIND_INTERNAL", status="STATUS_CODE_UNSET", model_id="",
           model_version="", **extra):
    return dict(service_name=service, span_name=span_name, span_kind=kind, status_code=status, model_id=model_id,
                model_version=model_version, **extra)


def test_counts_equal_ground_truth_and_spans_pass_through_unchanged():
    proc, sink, tel = make()
    rnd = random.Random(7)
    truth: Counter = Counter()
    sent = []
    for _ in range(40):
        service = rnd.choice(["ranker", "embedder"])
        req, ss = request(service)
        for _ in range(rnd.randint(1, 60)):
            model, version = rnd.choice(["bert", "gpt2"]), rnd.choice(["v1", "v2"])
            error = rnd.random() < 0.1
            add_span(ss, error=error, attrs={"ml.model.id": model, "ml.model.version": version})
            truth[(service, model, version, error)] += 1
        sent.append(req.SerializeToString())
        proc.consume(Envelope(Signal.TRACES, req))
    assert [r.SerializeToString() for r in sink.of(Signal.TRACES)] == sent
    for (service, model, version, error), n in truth.items():
        status = "STATUS_CODE_ERROR" if error else "STATUS_CODE_UNSET"
        lab = labels(service, status=status, model_id=model, model_version=version)
        assert sample(tel, "traces_span_metrics_calls_total", **lab) == n
        assert sample(tel, "traces_span_metrics_duration_seconds_count", **lab) == n
    assert tel.value("accepted", Signal.TRACES) == sum(truth.values())


def test_error_rate_per_model_version_is_computable():
    proc, _, tel = make()
    req, ss = request("ranker")
    for i in range(10):
        add_span(ss, error=i < 3, attrs={"ml.model.id": "bert", "ml.model.version": "v2"})
    proc.consume(Envelope(Signal.TRACES, req))
    err = sample(tel, "traces_span_metrics_calls_total",
                 **labels("ranker", status="STATUS_CODE_ERROR", model_id="bert", model_version="v2"))
    ok = sample(tel, "traces_span_metrics_calls_total", **labels("ranker", model_id="bert", model_version="v2"))
    assert err / (err + ok) == 0.3


def test_histogram_bucket_placement():
    proc, _, tel = make(histogram={"explicit": {"buckets": ["2ms", "10ms", "100ms"]}})
    req, ss = request("svc")
    for d in (1, 2, 2.5, 10, 50, 100, 150, 5000):
        add_span(ss, duration_ms=d)
    proc.consume(Envelope(Signal.TRACES, req))
    lab = labels("svc")
    bucket = lambda le: sample(tel, "traces_span_metrics_duration_seconds_bucket", le=le, **lab)
    assert [bucket("0.002"), bucket("0.01"), bucket("0.1"), bucket("+Inf")] == [2, 4, 6, 8]  # le is inclusive
    assert sample(tel, "traces_span_metrics_duration_seconds_sum", **lab) == pytest.approx(5.3155)


def test_model_id_falls_back_to_gen_ai_then_resource():
    proc, _, tel = make(dimensions=[{"name": "http.route", "default": "none"}, {"name": "user.tier"}])
    req, ss = request("chat", {"ml.model.id": "resource-model", "ml.model.version": "r1"})
    add_span(ss, attrs={"gen_ai.request.model": "llama"})  # the resource's ml.model.id outranks gen_ai
    add_span(ss, attrs={"ml.model.id": "span-model", "http.route": "/v1/chat"})
    proc.consume(Envelope(Signal.TRACES, req))
    req, ss = request("chat")
    add_span(ss, attrs={"gen_ai.request.model": "llama", "user.tier": "gold"})
    proc.consume(Envelope(Signal.TRACES, req))
    calls = lambda **kw: sample(tel, "traces_span_metrics_calls_total", **labels("chat", **kw))
    # ml.model.id (span, then resource) comes first; gen_ai.request.model only when neither has it
    assert calls(model_id="resource-model", model_version="r1", http_route="none", user_tier="") == 1
    assert calls(model_id="span-model", model_version="r1", http_route="/v1/chat", user_tier="") == 1
    assert calls(model_id="llama", model_version="", http_route="none", user_tier="gold") == 1


def test_exemplars_point_at_the_latest_error_and_the_slowest_span():
    proc, _, tel = make(histogram={"explicit": {"buckets": ["10ms", "1s"]}})
    req, ss = request("svc")
    add_span(ss, duration_ms=5)
    slow = add_span(ss, duration_ms=500)
    err = add_span(ss, duration_ms=3, error=True)
    proc.consume(Envelope(Signal.TRACES, req))
    text = generate_openmetrics(tel.registry).decode()
    assert f'trace_id="{slow.trace_id.hex()}"' in text
    assert f'trace_id="{err.trace_id.hex()}"' in text
    assert "traces_span_metrics_calls_total" in generate_latest(tel.registry).decode()


def test_refused_spans_are_counted_once_when_resent():
    proc, sink, tel = make()
    req, ss = request("svc")
    add_span(ss)
    sink.refuse, sink.refuse_times = Refused("queue_full"), 1
    with pytest.raises(Refused):
        proc.consume(Envelope(Signal.TRACES, req))
    proc.consume(Envelope(Signal.TRACES, req))
    assert sample(tel, "traces_span_metrics_calls_total", **labels("svc")) == 1


def test_otlp_metrics_emitted_into_the_metrics_pipeline_and_metrics_pass_through():
    proc, sink, _ = make(with_metrics_route=True, histogram={"explicit": {"buckets": ["10ms"]}})
    assert proc.emits_metrics
    req, ss = request("ranker")
    for d in (1, 20, 30):
        add_span(ss, duration_ms=d, attrs={"ml.model.id": "bert", "ml.model.version": "v1"})
    proc.consume(Envelope(Signal.TRACES, req))
    incoming = ExportMetricsServiceRequest()
    incoming.resource_metrics.add()
    proc.consume(Envelope(Signal.METRICS, incoming))
    proc.flush_metrics()
    passed, emitted = sink.of(Signal.METRICS)
    assert passed is incoming
    (rm,) = emitted.resource_metrics
    assert [(a.key, a.value.string_value) for a in rm.resource.attributes] == [("service.name", "ranker")]
    calls, duration = rm.scope_metrics[0].metrics
    assert calls.name == "traces.span.metrics.calls" and calls.sum.is_monotonic
    (dp,) = calls.sum.data_points
    assert dp.as_int == 3
    assert {a.key: a.value.string_value for a in dp.attributes} == {
        "span.name": "forward", "span.kind": "SPAN_KIND_INTERNAL", "status.code": "STATUS_CODE_UNSET",
        "ml.model.id": "bert", "ml.model.version": "v1"}
    (hp,) = duration.histogram.data_points
    assert duration.unit == "s" and list(hp.explicit_bounds) == [0.01] and list(hp.bucket_counts) == [1, 2]
    assert hp.count == 3 and hp.sum == pytest.approx(0.051)
    assert len(hp.exemplars) == 1


def test_without_a_metrics_pipeline_nothing_is_emitted():
    proc, sink, _ = make()
    assert not proc.emits_metrics
    req, ss = request("svc")
    add_span(ss)
    proc.consume(Envelope(Signal.TRACES, req))
    proc.shutdown(deadline=0)
    assert sink.of(Signal.METRICS) == []


def test_cardinality_is_capped_into_one_overflow_series():
    proc, _, tel = make(max_series=5)
    req, ss = request("svc")
    for i in range(20):
        add_span(ss, name=f"op-{i}")
    proc.consume(Envelope(Signal.TRACES, req))
    assert len(proc.snapshot()) == 6
    assert sample(tel, "traces_span_metrics_calls_total", otel_metric_overflow="true") == 15
    assert sample(tel, "sidecar_span_metrics_overflow_spans_total", component="span_metrics") == 15
    total = sum(c for c, *_ in proc.snapshot().values())
    assert total == 20


def test_config_errors_name_the_path():
    text = """
receivers: {otlp: {protocols: {grpc: {endpoint: 127.0.0.1:4317}}}}
processors:
  span_metrics:
    histogram: {explicit: {buckets: [10ms, 2ms]}}
    dimensions: [{name: service_name}]
exporters: {debug: {}}
service:
  pipelines:
    traces: {receivers: [otlp], processors: [span_metrics], exporters: [debug]}
"""
    with pytest.raises(ConfigError) as e:
        parse_config(text, environ={})
    assert any(p.startswith("processors.span_metrics.histogram.explicit.buckets: must be strictly increasing")
               for p in e.value.problems), e.value.problems
    ok = text.replace("[10ms, 2ms]", "[2ms, 10ms]").replace("service_name", "http.route")
    cfg = parse_config(ok, environ={})
    assert cfg.processors["span_metrics"].config.histogram.explicit.buckets == [0.002, 0.01]


def test_a_request_with_more_keys_than_max_series_overflows_the_rest_in_memory_that_follows_the_cap():
    """A hostile request with a distinct span name per span: the scanner counts at most max_series keys apart and
    the rest together, so the spans past the cap are counted (under the overflow series, and in the overflow
    counter) without an object per key; the request's transient memory stays a few times its size (counting a
    group per key took 37x, span by span 20x)."""
    import tracemalloc

    proc, _, tel = make(max_series=50)
    req, ss = request("svc")
    for i in range(50_000):
        add_span(ss, name=f"op-{i}", duration_ms=1)
    env = Envelope(Signal.TRACES, encoded=req.SerializeToString(), items=50_000)
    tracemalloc.start()
    try:
        proc.consume(env)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 12 * len(env.encoded), f"{peak / len(env.encoded):.1f}x the request"
    got = proc.snapshot()
    assert len(got) == 51 and sum(s[0] for s in got.values()) == 50_000
    assert sample(tel, "traces_span_metrics_calls_total", otel_metric_overflow="true") == 50_000 - 50
    assert sample(tel, "sidecar_span_metrics_overflow_spans_total", component="span_metrics") == 50_000 - 50


def test_a_series_fed_by_two_raw_keys_takes_its_first_slowest_span_and_its_latest_error_across_both():
    """gen_ai.request.model and ml.model.id naming one model feed one series from two raw keys, counted apart in
    the scanner: the exemplars are the spans counting one by one picks, by their positions in the request."""
    spec = [("ml.model.id", 10, False), ("gen_ai.request.model", 50, False), ("ml.model.id", 20, False),
            ("gen_ai.request.model", 80, False),  # the first of the slowest: the raw key that started second
            ("ml.model.id", 80, False), ("gen_ai.request.model", 5, True),
            ("ml.model.id", 5, True)]  # the latest error: the raw key whose first error came first
    grouped, _, _ = make()
    single, _, _ = make()
    req, ss = request("svc")
    for key, ms, error in spec:
        s = add_span(ss, duration_ms=ms, error=error, attrs={key: "m"})
        one, one_ss = request("svc")
        one_ss.spans.append(s)
        single.consume(Envelope(Signal.TRACES, one))
    grouped.consume(Envelope(Signal.TRACES, req))
    got = grouped.snapshot()
    assert got == single.snapshot() and len(got) == 2
    (ok_key,) = [k for k in got if k[3] != Status.STATUS_CODE_ERROR]
    (err_key,) = [k for k in got if k[3] == Status.STATUS_CODE_ERROR]
    assert got[ok_key][3][1] == ss.spans[3].trace_id
    assert got[err_key][4][1] == ss.spans[6].trace_id


def test_many_spans_of_one_series_fill_the_same_buckets_and_exemplars_as_one_by_one():
    """A request with many spans of one series (counted as a group) and one with a series fed by two raw label
    sets (gen_ai model and model id naming the same model: counted span by span) give what one request per
    span gives: the same buckets, sum, the first of the slowest spans and the latest error as exemplars."""
    cfg = {"histogram": {"explicit": {"buckets": ["2ms", "10ms", "100ms"]}}}
    durations = ([1, 2, 2.5, 10, 50, 100, 5000, 150, 2, 100, 5000, 0.5, 10, 10.000001, 99, 3] * 2)[:-1]
    for by_model in (False, True):
        grouped, _, _ = make(**cfg)
        single, _, _ = make(**cfg)
        req, ss = request("svc")
        for i, d in enumerate(durations):
            attrs = {("gen_ai.request.model" if by_model and i % 2 else "ml.model.id"): "m"}
            for error in (False, True):
                s = add_span(ss, duration_ms=d, error=error, attrs=attrs)
                one, one_ss = request("svc")
                one_ss.spans.append(s)
                single.consume(Envelope(Signal.TRACES, one))
        grouped.consume(Envelope(Signal.TRACES, req))
        got, want = grouped.snapshot(), single.snapshot()
        assert got == want and len(got) == 2
        (ok_key,) = [k for k in got if k[3] != Status.STATUS_CODE_ERROR]
        slowest = [s for s in ss.spans if s.status.code != Status.STATUS_CODE_ERROR
                   and s.end_time_unix_nano - s.start_time_unix_nano == 5000 * MS][0]
        assert got[ok_key][3][1] == slowest.trace_id  # the first of the slowest (5000 ms occurs four times)
        (err_key,) = [k for k in got if k[3] == Status.STATUS_CODE_ERROR]
        assert got[err_key][4][1] == ss.spans[-1].trace_id  # the latest error
        assert got[ok_key][2] == [8, 7, 10, 6]  # le is inclusive
