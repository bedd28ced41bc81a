"""The pipeline graph: one instance per id, shared processors per signal, copies before mutation, ordering."""

import time

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

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
    def consume(self, signal, request):
        request.resource_spans[0].scope_spans[0].spans[0].name = "mutated"
        super().consume(signal, request)


def test_fanout_gives_holding_branches_a_copy_when_another_branch_mutates():
    holder, mutator = CollectingConsumer(), Mutating()
    for order in ([holder, mutator], [mutator, holder]):
        holder.requests.clear()
        mutator.requests.clear()
        fan = Fanout(order, [isinstance(c, Mutating) for c in order])
        fan.consume(Signal.TRACES, _request())
        assert holder.of(Signal.TRACES)[0].resource_spans[0].scope_spans[0].spans[0].name == "op"
        assert mutator.of(Signal.TRACES)[0].resource_spans[0].scope_spans[0].spans[0].name == "mutated"


def test_fanout_without_mutation_shares_one_object():
    a, b = CollectingConsumer(), CollectingConsumer()
    req = _request()
    Fanout([a, b], [False, False]).consume(Signal.TRACES, req)
    assert a.of(Signal.TRACES)[0] is req and b.of(Signal.TRACES)[0] is req


def test_fanout_delivers_to_every_branch_and_reports_a_refusal():
    a, b = CollectingConsumer(), CollectingConsumer()
    a.refuse = Refused("queue_full")
    try:
        Fanout([a, b], [False, False]).consume(Signal.TRACES, _request())
        raise AssertionError("refusal swallowed")
    except Refused as e:
        assert e.reason == "queue_full"
    assert len(b.of(Signal.TRACES)) == 1  # the healthy branch still got it


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


def test_received_encoding_is_reused_only_while_it_is_true():
    from sidecar.signals import encoded, forget_encoding, known_encoding

    req = _request()
    raw = req.SerializeToString()
    fake = b"not what you would serialize"
    with known_encoding(req, fake):
        assert encoded(req) is fake  # reused, not re-serialized
        forget_encoding(req)
        assert encoded(req) == raw
    assert encoded(req) == raw


def test_stages_after_a_mutating_processor_never_see_the_stale_received_encoding():
    """redaction before tail_sampling: tail_sampling works on bytes, and they must be the redacted ones."""
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

    with OTLPBackend() as backend:
        port = free_port()
        cfg = parse_config(f"""
receivers:
  otlp: {{protocols: {{grpc: {{endpoint: 127.0.0.1:{port}}}}}}}
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
""", environ={})
        service = Service(cfg)
        service.start()
        try:
            stub = trace_service_pb2_grpc.TraceServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
            stub.Export(_request(), timeout=5)
            assert backend.wait_for_items(Signal.TRACES, 1, timeout=10)
        finally:
            service.shutdown(5)
        (_, _, span), = backend.spans()
        (value,) = [kv.value.string_value for kv in span.attributes if kv.key == "user.email"]
        assert "a@example.com" not in value and value
