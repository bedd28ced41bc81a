"""batch: merging, size and time triggers, splitting, backpressure and shutdown, driven by explicit ticks."""

from __future__ import annotations

import threading
import time

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.metrics.v1.metrics_pb2 import AGGREGATION_TEMPORALITY_CUMULATIVE, Metric, NumberDataPoint
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from pydantic import ValidationError

from sidecar.envelope import Envelope
from sidecar.component import Kind, Refused
from sidecar.config import ComponentId, pydantic_problems
from sidecar.processors.batch import BatchConfig, BatchProcessor, split_request
from sidecar.registry import CreateSettings
from sidecar.signals import Signal, count_items
from sidecar.telemetry import SelfTelemetry
from sidecar.testing import CollectingConsumer, Counted


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def traces(n: int, service: str = "svc", scopes: int = 1, start: int = 0) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add(schema_url="https://opentelemetry.io/schemas/1.26.0")
    rs.resource.attributes.append(KeyValue(key="service.name", value=AnyValue(string_value=service)))
    for s in range(scopes):
        ss = rs.scope_spans.add()
        ss.scope.name = f"scope-{s}"
        for i in range(n):
            ss.spans.append(Span(trace_id=b"\x01" * 16, span_id=(start + i).to_bytes(8, "big"), name=f"s{start + i}"))
    return req


def flat_spans(requests) -> list[tuple]:
    """(service, scope, span name) of every span, in order: what must survive batching unchanged."""
    return [(rs.resource.attributes[0].value.string_value, ss.scope.name, sp.name)
            for r in requests for rs in r.resource_spans for ss in rs.scope_spans for sp in ss.spans]


def make(clock: FakeClock | None = None, **cfg):
    telemetry = SelfTelemetry()
    sink = CollectingConsumer()
    cid = ComponentId("batch")
    settings = CreateSettings(id=cid, kind=Kind.PROCESSOR, telemetry=telemetry.component("processor", str(cid)))
    proc = BatchProcessor(settings, BatchConfig.model_validate(cfg), sink, clock=clock or FakeClock())
    return Counted(proc, settings.telemetry), sink  # behind the pipeline's counting edge, as the graph runs it


def counter(proc: Counted, family: str, signal: Signal = Signal.TRACES, *extra: str) -> float:
    return proc._edge.telemetry.value(family, signal, *extra)


def test_merges_requests_and_sends_when_send_batch_size_is_reached():
    proc, sink = make(send_batch_size=250)
    inputs = [traces(100, service=f"svc-{i}", start=100 * i) for i in range(3)]
    proc.consume(Envelope(Signal.TRACES, inputs[0]))
    proc.consume(Envelope(Signal.TRACES, inputs[1]))
    assert sink.requests == []  # 200 < 250: waiting
    proc.consume(Envelope(Signal.TRACES, inputs[2]))
    batches = sink.of(Signal.TRACES)
    assert len(batches) == 1 and count_items(Signal.TRACES, batches[0]) == 300
    assert len(batches[0].resource_spans) == 3  # merged by appending resource entries
    assert flat_spans(batches) == flat_spans(inputs)
    assert proc.pending_items(Signal.TRACES) == 0
    assert counter(proc, "received") == 300 and counter(proc, "accepted") == 300


def test_timeout_sends_a_partial_batch():
    clock = FakeClock()
    proc, sink = make(clock, send_batch_size=1000, timeout="200ms")
    proc.consume(Envelope(Signal.LOGS, ExportLogsServiceRequest(resource_logs=[{"scope_logs": [
        {"log_records": [LogRecord(body=AnyValue(string_value="hello"))]}]}])))
    clock.now += 0.1
    proc.tick()
    assert sink.requests == []
    clock.now += 0.1
    proc.tick()
    assert sink.items[Signal.LOGS] == 1
    assert proc.pending_items(Signal.LOGS) == 0


def test_signals_are_batched_separately():
    clock = FakeClock()
    proc, sink = make(clock, send_batch_size=10)
    proc.consume(Envelope(Signal.TRACES, traces(4)))
    proc.consume(Envelope(Signal.LOGS, ExportLogsServiceRequest(resource_logs=[{"scope_logs": [
        {"log_records": [LogRecord()] * 3}]}])))
    clock.now += 1
    proc.tick()
    assert [s for s, _ in sink.requests] == [Signal.TRACES, Signal.LOGS] or \
        [s for s, _ in sink.requests] == [Signal.LOGS, Signal.TRACES]
    assert sink.items[Signal.TRACES] == 4 and sink.items[Signal.LOGS] == 3


def test_send_batch_max_size_splits_oversized_requests_keeping_resource_and_scope():
    proc, sink = make(send_batch_size=1000, send_batch_max_size=1000)
    big = traces(1250, scopes=2)  # 2500 spans in two scopes
    proc.consume(Envelope(Signal.TRACES, big))
    batches = sink.of(Signal.TRACES)
    assert [count_items(Signal.TRACES, b) for b in batches] == [1000, 1000]
    assert proc.pending_items(Signal.TRACES) == 500
    proc.shutdown(time.monotonic() + 5)
    batches = sink.of(Signal.TRACES)
    assert [count_items(Signal.TRACES, b) for b in batches] == [1000, 1000, 500]
    assert flat_spans(batches) == flat_spans([big])
    for b in batches:
        assert b.resource_spans[0].schema_url == "https://opentelemetry.io/schemas/1.26.0"


def test_batches_never_exceed_send_batch_max_size():
    clock = FakeClock()
    proc, sink = make(clock, send_batch_size=100, send_batch_max_size=150)
    for i in range(10):
        proc.consume(Envelope(Signal.TRACES, traces(70, start=70 * i)))
    clock.now += 1
    proc.tick()
    sizes = [count_items(Signal.TRACES, b) for b in sink.of(Signal.TRACES)]
    assert sum(sizes) == 700 and max(sizes) <= 150


def test_split_metrics_at_data_point_granularity():
    req = ExportMetricsServiceRequest()
    sm = req.resource_metrics.add().scope_metrics.add()
    s = Metric(name="requests", unit="1", description="served")
    s.sum.aggregation_temporality = AGGREGATION_TEMPORALITY_CUMULATIVE
    s.sum.is_monotonic = True
    s.sum.data_points.extend(NumberDataPoint(as_int=i) for i in range(5))
    g = Metric(name="gpu_util")
    g.gauge.data_points.extend(NumberDataPoint(as_double=i / 10) for i in range(3))
    sm.metrics.extend([s, g])

    pieces = split_request(Signal.METRICS, req, 3)
    assert [n for _, n in pieces] == [3, 3, 2]
    first, second = pieces[0][0], pieces[1][0]
    m = first.resource_metrics[0].scope_metrics[0].metrics[0]
    assert (m.name, m.unit, m.description) == ("requests", "1", "served")
    assert m.sum.is_monotonic and m.sum.aggregation_temporality == AGGREGATION_TEMPORALITY_CUMULATIVE
    names = [mm.name for mm in second.resource_metrics[0].scope_metrics[0].metrics]
    assert names == ["requests", "gpu_util"]  # 2 sum points then the first gauge point
    values = [dp.as_int for p, _ in pieces for mm in p.resource_metrics[0].scope_metrics[0].metrics
              if mm.name == "requests" for dp in mm.sum.data_points]
    assert values == [0, 1, 2, 3, 4]
    assert sum(count_items(Signal.METRICS, p) for p, _ in pieces) == 8


def test_refused_batches_stay_pending_and_are_retried_in_order():
    clock = FakeClock()
    proc, sink = make(clock, send_batch_size=100, timeout="200ms")
    sink.refuse = Refused("queue_full", retry_after=2.0)
    first = traces(100, start=0)
    proc.consume(Envelope(Signal.TRACES, first))  # accepted, the flush is refused
    assert sink.requests == [] and proc.pending_items(Signal.TRACES) == 100
    calls = sink.calls
    second = traces(100, start=100)
    proc.consume(Envelope(Signal.TRACES, second))  # no hammering the refusing stage from callers
    assert sink.calls == calls
    clock.now += 1.0
    proc.tick()
    assert sink.calls == calls  # retry_after (2s) respected
    sink.refuse = None
    clock.now += 1.5
    proc.tick()
    assert flat_spans(sink.of(Signal.TRACES)) == flat_spans([first, second])
    assert proc.pending_items(Signal.TRACES) == 0
    assert counter(proc, "accepted") == 200


def test_pending_is_bounded_and_new_data_is_refused_when_full():
    proc, sink = make(send_batch_size=100, max_pending_items=300)
    sink.refuse = Refused("queue_full")
    for _ in range(3):
        proc.consume(Envelope(Signal.TRACES, traces(100)))
    with pytest.raises(Refused) as err:
        proc.consume(Envelope(Signal.TRACES, traces(50)))
    assert err.value.reason == "batch_full" and err.value.retryable
    assert proc.pending_items(Signal.TRACES) == 300
    assert counter(proc, "refused", Signal.TRACES, "batch_full") == 50
    proc.consume(Envelope(Signal.LOGS, ExportLogsServiceRequest(resource_logs=[{"scope_logs": [{"log_records": [{}]}]}])))


def test_default_pending_bound_is_ten_batches():
    proc, _ = make(send_batch_size=100, send_batch_max_size=200)
    assert proc.max_pending_items == 2000


def test_non_retryable_refusal_drops_and_counts():
    proc, sink = make(send_batch_size=10)
    sink.refuse = Refused("unsupported_signal", retryable=False)
    proc.consume(Envelope(Signal.TRACES, traces(10)))
    assert proc.pending_items(Signal.TRACES) == 0
    assert counter(proc, "dropped", Signal.TRACES, "unsupported_signal", "false") == 10


def test_shutdown_sends_everything_and_then_refuses():
    proc, sink = make(send_batch_size=1000)
    proc.consume(Envelope(Signal.TRACES, traces(7)))
    proc.shutdown(time.monotonic() + 5)
    assert sink.items[Signal.TRACES] == 7
    with pytest.raises(Refused) as err:
        proc.consume(Envelope(Signal.TRACES, traces(1)))
    assert err.value.reason == "shutting_down"


def test_shutdown_retries_until_the_deadline_then_counts_the_rest_dropped():
    proc, sink = make(send_batch_size=1000)
    proc.consume(Envelope(Signal.TRACES, traces(7)))
    sink.refuse = Refused("queue_full")
    sink.refuse_times = 2  # refuses twice, then accepts: within the deadline
    proc.shutdown(time.monotonic() + 5)
    assert sink.items[Signal.TRACES] == 7

    proc, sink = make(send_batch_size=1000)
    proc.consume(Envelope(Signal.TRACES, traces(9)))
    sink.refuse = Refused("queue_full")  # refuses forever
    proc.shutdown(time.monotonic())
    assert sink.items[Signal.TRACES] == 0
    assert counter(proc, "dropped", Signal.TRACES, "shutdown", "false") == 9


def test_concurrent_callers_lose_and_duplicate_nothing():
    proc, sink = make(send_batch_size=64)

    def produce(k: int) -> None:
        for i in range(50):
            proc.consume(Envelope(Signal.TRACES, traces(5, service=f"t{k}", start=i * 5)))

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    proc.shutdown(time.monotonic() + 5)
    got = flat_spans(sink.of(Signal.TRACES))
    assert len(got) == 1000 and len(set(got)) == 1000
    for k in range(4):  # each producer's spans arrive in the order it sent them
        mine = [name for svc, _, name in got if svc == f"t{k}"]
        assert mine == [f"s{i}" for i in range(250)]


def test_timer_thread_sends_after_timeout():
    proc, sink = make(clock=time.monotonic, send_batch_size=1000, timeout="20ms")
    proc.start(None)
    try:
        proc.consume(Envelope(Signal.TRACES, traces(3)))
        assert sink.wait_for_items(Signal.TRACES, 3, timeout=5)
    finally:
        proc.shutdown(time.monotonic() + 2)


@pytest.mark.parametrize("body, problem", [
    ({"send_batch_size": 1000, "send_batch_max_size": 100},
     "processors.batch.send_batch_max_size: must be 0 (unlimited) or >= send_batch_size (1000), got 100"),
    ({"timeout": "0s"}, "processors.batch.timeout: must be > 0"),
    ({"send_batch_size": 0}, "processors.batch.send_batch_size: Input should be greater than or equal to 1"),
    ({"send_batch_size": 100, "max_pending_items": 10},
     "processors.batch.max_pending_items: must be >= send_batch_size (100), got 10"),
    ({"send_batch_sise": 10}, "processors.batch.send_batch_sise: unknown key"),
])
def test_config_errors_name_the_key(body, problem):
    with pytest.raises(ValidationError) as err:
        BatchConfig.model_validate(body)
    assert problem in pydantic_problems(err.value, "processors.batch")


def test_config_defaults_match_otelcol():
    cfg = BatchConfig()
    assert (cfg.send_batch_size, cfg.timeout, cfg.send_batch_max_size) == (8192, 0.2, 0)
