"""Received encodings travel with a request until a stage changes it; queues hold bytes instead of messages."""

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidecar.queue import QueueItem
from sidecar.queue.memory import MemoryQueue
from sidecar.signals import Signal, known_encoding


def _request(n: int = 3) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    ss = req.resource_spans.add().scope_spans.add()
    for i in range(n):
        ss.spans.add(trace_id=b"\x01" * 16, span_id=(i + 1).to_bytes(8, "big"), name=f"op{i}")
    return req


def test_a_queue_item_makes_the_missing_form_on_first_use():
    req = _request()
    raw = req.SerializeToString()
    from_bytes = QueueItem(Signal.TRACES, None, 3, wire=raw)
    assert from_bytes.request == req
    from_message = QueueItem(Signal.TRACES, req, 3)
    assert from_message.wire == raw


def test_the_memory_queue_keeps_only_the_bytes_when_they_are_known():
    q = MemoryQueue(10)
    req = _request()
    raw = req.SerializeToString()
    with known_encoding(req, raw):
        q.put(Signal.TRACES, req, 3)
    q.put(Signal.TRACES, _request(1), 1)  # encoding unknown: the message is kept
    first, second = q.get(), q.get()
    assert first._request is None and first.wire is raw  # noqa: SLF001 - the point of the test
    assert first.request == req
    assert second._request is not None  # noqa: SLF001


def test_batch_processor_holds_encodings_and_merges_by_concatenation():
    from sidecar.component import Kind
    from sidecar.config import ComponentId
    from sidecar.processors.batch import FACTORY, BatchConfig
    from sidecar.registry import CreateSettings
    from sidecar.telemetry import SelfTelemetry
    from sidecar.testing import CollectingConsumer

    sink = CollectingConsumer()
    tel = SelfTelemetry()
    batch = FACTORY.create(CreateSettings(ComponentId("batch"), Kind.PROCESSOR, tel.component("processor", "batch")),
                           BatchConfig(send_batch_size=6, timeout=60), sink)
    sent = [_request(3), _request(3)]
    for req in sent:
        with known_encoding(req, req.SerializeToString()):
            batch.consume(Signal.TRACES, req)
    (merged,) = sink.of(Signal.TRACES)
    assert [s.SerializeToString() for rs in merged.resource_spans for ss in rs.scope_spans for s in ss.spans] == \
        [s.SerializeToString() for r in sent for s in r.resource_spans[0].scope_spans[0].spans]
    batch.shutdown(0)
