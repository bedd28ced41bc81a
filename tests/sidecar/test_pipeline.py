"""The pipeline graph: one instance per id, shared processors per signal, copy on mutation, ordering, counting."""

import contextlib
import threading
import time

import pytest

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidecar.envelope import Envelope
from sidecar.component import Refused
from sidecar.config import parse_config
from sidecar.pipeline import Fanout, Service, _front_to_back
from sidecar.signals import Signal
from sidecar.testing import CollectingConsumer, OTLPBackend, free_port


def _request(name: str = "op") -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    span = req.resource_spans.add().scope_spans.add().spans.add(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name=name)
    span.attributes.add(key="user.email").value.string_value = "a@example.com"
    return req


class Mutating(CollectingConsumer):
    """A processor that changes data in place and declares nothing about it."""

    def consume(self, envelope):
        envelope.mutable().resource_spans[0].scope_spans[0].spans[0].name = "mutated"
        super().consume(envelope)


def test_fanout_gives_a_branch_that_mutates_its_own_copy():
    holder, mutator = CollectingConsumer(), Mutating()
    for order in ([holder, mutator], [mutator, holder]):
        holder.requests.clear()
        mutator.requests.clear()
        req = _request()
        Fanout(order).consume(Envelope(Signal.TRACES, req, encoded=req.SerializeToString(), items=1))
        assert holder.of(Signal.TRACES)[0].resource_spans[0].scope_spans[0].spans[0].name == "op"
        assert holder.envelopes[-1].encoded == _request().SerializeToString()  # still the received bytes
        assert mutator.of(Signal.TRACES)[0].resource_spans[0].scope_spans[0].spans[0].name == "mutated"
        assert req.resource_spans[0].scope_spans[0].spans[0].name == "op"  # the shared message is untouched


def test_fanout_without_mutation_shares_one_object():
    a, b = CollectingConsumer(), CollectingConsumer()
    req = _request()
    Fanout([a, b]).consume(Envelope(Signal.TRACES, req))
    assert a.of(Signal.TRACES)[0] is req and b.of(Signal.TRACES)[0] is req
    assert a.envelopes[0].read_only and b.envelopes[0].read_only


def test_fanout_delivers_to_every_branch_and_reports_a_refusal():
    a, b = CollectingConsumer(), CollectingConsumer()
    a.refuse = Refused("queue_full")
    try:
        Fanout([a, b]).consume(Envelope(Signal.TRACES, _request()))
        raise AssertionError("refusal swallowed")
    except Refused as e:
        assert e.reason == "queue_full"
    assert len(b.of(Signal.TRACES)) == 1  # the healthy branch still got it


class Deferring:
    """A branch that leaves a wait for a sync on the request (as tail sampling's log does) and records when
    it was consumed and when its wait ran."""

    def __init__(self, name: str, events: list, fail: Refused | None = None):
        self.name, self.events, self.fail = name, events, fail

    def consume(self, envelope):
        self.events.append(f"{self.name} consumed")

        def wait():
            self.events.append(f"{self.name} synced")
            if self.fail is not None:
                raise self.fail

        if envelope.commitments is None or not envelope.commitments.defer(wait):
            wait()


class Recording(CollectingConsumer):
    def __init__(self, name: str, events: list):
        super().__init__()
        self.name, self.events = name, events

    def consume(self, envelope):
        self.events.append(f"{self.name} consumed")
        super().consume(envelope)


def test_a_fanout_runs_the_waits_a_branch_left_after_every_branch_and_before_it_returns():
    """The first branch's sync overlaps the second branch's work, and the sender's answer still follows it."""
    events: list[str] = []
    Fanout([Deferring("log", events), Recording("audit", events)]).consume(Envelope(Signal.TRACES, _request()))
    assert events == ["log consumed", "audit consumed", "log synced"]


def test_a_failed_wait_refuses_the_request_and_the_other_waits_still_run():
    events: list[str] = []
    fanout = Fanout([Deferring("log", events, fail=Refused("storage_error")), Deferring("journal", events)])
    with pytest.raises(Refused) as refused:
        fanout.consume(Envelope(Signal.TRACES, _request()))
    assert refused.value.reason == "storage_error"
    # the journal's wait ran too (a wait also gives back what its stage held for the request)
    assert events == ["log consumed", "journal consumed", "log synced", "journal synced"]


def test_a_fanout_inside_a_branch_leaves_its_waits_to_the_outer_one():
    events: list[str] = []
    inner = Fanout([Deferring("log", events), Recording("file", events)])
    Fanout([inner, Recording("audit", events)]).consume(Envelope(Signal.TRACES, _request()))
    assert events == ["log consumed", "file consumed", "audit consumed", "log synced"]


def test_a_wait_left_after_the_fanout_answered_runs_at_once():
    """A stage that kept the request past the fan-out (none of the shipped ones does) cannot leave a wait
    nobody would run: it waits itself."""
    keeping = CollectingConsumer()
    Fanout([keeping, Recording("other", [])]).consume(Envelope(Signal.TRACES, _request()))
    events: list[str] = []
    Deferring("late", events).consume(keeping.envelopes[0])
    assert events == ["late consumed", "late synced"]


def test_a_wait_left_from_another_thread_runs_there():
    """A stage that hands the request to its own thread (a batch processor's flush) waits there itself: the
    fan-out's thread alone defers and settles."""
    events: list[str] = []

    class HandingOn:
        def consume(self, envelope):
            worker = threading.Thread(target=Deferring("flush", events).consume, args=(envelope,))
            worker.start()
            worker.join()
            events.append("handed on")

    Fanout([HandingOn(), Recording("audit", events)]).consume(Envelope(Signal.TRACES, _request()))
    assert events == ["flush consumed", "flush synced", "handed on", "audit consumed"]


def test_front_to_back_orders_shared_processors():
    assert _front_to_back([["a", "b", "c"], ["a", "c"], ["x", "b"]]) == ["a", "x", "b", "c"]
    assert _front_to_back([["a", "b"], ["b", "a"]]) == ["a", "b"]  # a cycle falls back to config order


def test_one_processor_instance_serves_a_traces_and_a_logs_pipeline():
    cfg = parse_config(f"""
receivers:
  otlp: {{protocols: {{grpc: {{endpoint: 127.0.0.1:{free_port()}}}}}}}
processors:
  batch: {{timeout: 50ms}}
exporters:
  debug: {{}}
service:
  telemetry: {{metrics: {{address: null}}}}
  pipelines:
    traces: {{receivers: [otlp], processors: [batch], exporters: [debug]}}
    logs: {{receivers: [otlp], processors: [batch], exporters: [debug]}}
""", environ={})
    service = Service(cfg)
    assert list(service.graph.processors) == ["batch"]
    assert len(service.graph.exporters) == 1 and len(service.graph.receivers) == 1


def test_service_starts_forwards_and_shuts_down_in_order():
    with OTLPBackend() as backend:
        port = free_port()
        cfg = parse_config(f"""
receivers:
  otlp: {{protocols: {{grpc: {{endpoint: 127.0.0.1:{port}}}}}}}
processors:
  batch: {{timeout: 10s, send_batch_size: 100000}}
exporters:
  otlp: {{endpoint: {backend.endpoint}, tls: {{insecure: true}}}}
service:
  telemetry: {{metrics: {{address: null}}}}
  pipelines:
    traces: {{receivers: [otlp], processors: [batch], exporters: [otlp]}}
""", environ={})
        service = Service(cfg)
        service.start()
        assert service.host.ready.is_set()
        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

        stub = trace_service_pb2_grpc.TraceServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        for i in range(5):
            stub.Export(_request(f"op-{i}"), timeout=5)
        assert backend.items[Signal.TRACES] == 0  # held by the 10 s batch
        t0 = time.monotonic()
        service.shutdown(10)
        assert time.monotonic() - t0 < 8
        # receivers stopped first, then the batch drained into a still-running exporter
        assert backend.items[Signal.TRACES] == 5
        assert not service.host.ready.is_set()
        tel = service.telemetry.component("exporter", "otlp")
        assert tel.value("exported", Signal.TRACES) == 5


def _emails(backend) -> list[str]:
    return [kv.value.string_value for _, _, span in backend.spans() for kv in span.attributes if kv.key == "user.email"]


@contextlib.contextmanager
def _running(config_yaml: str, shutdown_timeout: float = 5):
    """A started Service built from ``config_yaml`` (RECEIVER_PORT: a free port) and a function that
    exports one request to its OTLP/gRPC receiver and returns the status code's name."""
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

    port = free_port()
    service = Service(parse_config(config_yaml.replace("RECEIVER_PORT", str(port)), environ={}))
    service.start()
    stub = trace_service_pb2_grpc.TraceServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))

    def export(req) -> str:
        try:
            stub.Export(req, timeout=5)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name

    try:
        yield service, export
    finally:
        service.shutdown(shutdown_timeout)


def test_stages_after_a_mutating_processor_never_see_the_stale_received_encoding():
    """redaction before tail_sampling: tail_sampling works on bytes, and they must be the redacted ones."""
    with OTLPBackend() as backend:
        with _running(f"""
receivers:
  otlp: {{protocols: {{grpc: {{endpoint: 127.0.0.1:RECEIVER_PORT}}}}}}
processors:
  redaction: {{}}
  span_metrics: {{}}
  tail_sampling:
    decision_wait: 100ms
    decision_wait_after_root_received: 0s
    policies: [{{name: all, type: always_sample}}]
exporters:
  otlp: {{endpoint: {backend.endpoint}, tls: {{insecure: true}}}}
service:
  telemetry: {{metrics: {{address: null}}}}
  pipelines:
    traces: {{receivers: [otlp], processors: [redaction, span_metrics, tail_sampling], exporters: [otlp]}}
""") as (_, export):
            assert export(_request()) == "OK"
            assert backend.wait_for_items(Signal.TRACES, 1, timeout=10)
        (value,) = _emails(backend)
        assert "a@example.com" not in value and value


# --- a processor that declares nothing cannot export stale bytes ----------------------------------


class Scrub:
    """A new in-place processor, redaction-like, that declares nothing about mutating."""

    def __init__(self, next_consumer):
        self._next = next_consumer

    def consume(self, envelope):
        msg = envelope.mutable()  # the only way to change the message: the received bytes are dropped
        for rs in msg.resource_spans:
            for ss in rs.scope_spans:
                for span in ss.spans:
                    for kv in span.attributes:
                        if kv.key == "user.email":
                            kv.value.string_value = "[EMAIL]"
        self._next.consume(envelope)

    def start(self, host):
        pass

    def shutdown(self, deadline):
        pass


@pytest.fixture
def scrub_registered(monkeypatch):
    from sidecar import registry
    from sidecar.component import Kind
    from sidecar.config import ConfigModel

    class ScrubConfig(ConfigModel):
        pass

    factory = registry.Factory(type="scrub", kind=Kind.PROCESSOR, config_model=ScrubConfig,
                               create=lambda settings, cfg, nxt: Scrub(nxt))
    monkeypatch.setitem(registry._load(), (Kind.PROCESSOR, "scrub"), factory)


def test_an_undeclared_in_place_processor_cannot_cause_stale_bytes_to_be_exported(scrub_registered):
    """scrub -> stages that work on bytes (span_metrics, tail_sampling) -> a queued OTLP exporter that sends
    bytes as they are; a second pipeline shares the receiver without scrub and must see the original."""
    with OTLPBackend() as scrubbed, OTLPBackend() as raw:
        with _running(f"""
receivers:
  otlp: {{protocols: {{grpc: {{endpoint: 127.0.0.1:RECEIVER_PORT}}}}}}
processors:
  scrub: {{}}
  span_metrics: {{}}
  tail_sampling:
    decision_wait: 100ms
    decision_wait_after_root_received: 0s
    policies: [{{name: all, type: always_sample}}]
exporters:
  otlp/scrubbed: {{endpoint: {scrubbed.endpoint}, tls: {{insecure: true}}, sending_queue: {{batch: {{max_size: 100}}}}}}
  otlp/raw: {{endpoint: {raw.endpoint}, tls: {{insecure: true}}}}
service:
  telemetry: {{metrics: {{address: null}}}}
  pipelines:
    traces: {{receivers: [otlp], processors: [scrub, span_metrics, tail_sampling], exporters: [otlp/scrubbed]}}
    traces/raw: {{receivers: [otlp], exporters: [otlp/raw]}}
""") as (_, export):
            assert export(_request()) == "OK"
            assert scrubbed.wait_for_items(Signal.TRACES, 1, timeout=10)
            assert raw.wait_for_items(Signal.TRACES, 1, timeout=10)
        assert _emails(scrubbed) == ["[EMAIL]"]
        assert _emails(raw) == ["a@example.com"]  # the other branch of the fan-out is untouched


# --- counting at the edges ----------------------------------------------------------------------


def _by_component(registry, family: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric in registry.collect():
        if metric.name == family:
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.value:
                    key = f"{sample.labels['kind']} {sample.labels['component']}"
                    out[key] = out.get(key, 0) + sample.value
    return out


def test_one_queue_full_event_is_one_refusal_counted_where_it_happened():
    """receiver -> memory_limiter -> span_metrics -> exporter whose queue is full: only the exporter counts
    the refusal (one SidecarRefusingData alert, not four); every stage in front still counts what it received."""
    with _running(f"""
receivers:
  otlp: {{protocols: {{grpc: {{endpoint: 127.0.0.1:RECEIVER_PORT}}}}}}
processors:
  memory_limiter: {{limit_mib: 100000}}
  span_metrics: {{}}
exporters:
  otlp: {{endpoint: 127.0.0.1:{free_port()}, tls: {{insecure: true}},
          sending_queue: {{queue_size: 1, num_consumers: 1}}, retry_on_failure: {{initial_interval: 10s}}}}
service:
  telemetry: {{metrics: {{address: null}}}}
  pipelines:
    traces: {{receivers: [otlp], processors: [memory_limiter, span_metrics], exporters: [otlp]}}
""", shutdown_timeout=1) as (service, export):
        # the backend is down: the worker holds one request (retrying), the queue one; then the queue is full
        codes = [export(_request(f"op-{i}")) for i in range(4)]
        assert codes[:2] == ["OK", "OK"] and "UNAVAILABLE" in codes
        refused = codes.count("UNAVAILABLE")
        registry = service.telemetry.registry
        assert _by_component(registry, "sidecar_items_refused") == {"exporter otlp": refused}
        received = _by_component(registry, "sidecar_items_received")
        assert received == {"receiver otlp": 4, "processor memory_limiter": 4, "processor span_metrics": 4,
                            "exporter otlp": 4}
        assert _by_component(registry, "sidecar_items_accepted") == {c: 4 - refused for c in received}
        assert registry.get_sample_value("sidecar_receiver_requests_refused_total", {
            "component": "otlp", "protocol": "grpc", "reason": "queue_full"}) == refused  # the alert's metric
