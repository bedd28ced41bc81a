"""The request envelope: lazy forms, mutation gives up the bytes, read-only views copy on write."""

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidecar.component import Kind
from sidecar.config import ComponentId
from sidecar.envelope import Envelope
from sidecar.processors.batch import FACTORY, BatchConfig
from sidecar.queue.memory import MemoryQueue
from sidecar.registry import CreateSettings
from sidecar.signals import Signal
from sidecar.telemetry import SelfTelemetry
from sidecar.testing import CollectingConsumer


def _request(n: int = 3, name: str = "op") -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    ss = req.resource_spans.add().scope_spans.add()
    for i in range(n):
        ss.spans.add(trace_id=b"\x01" * 16, span_id=(i + 1).to_bytes(8, "big"), name=f"{name}{i}")
    return req


def test_each_form_is_made_on_first_use_and_items_are_counted_once():
    req = _request()
    raw = req.SerializeToString()
    from_bytes = Envelope(Signal.TRACES, encoded=raw, items=3)
    assert not from_bytes.has_message
    assert from_bytes.message == req and from_bytes.encoded is raw
    from_message = Envelope(Signal.TRACES, req)
    assert from_message.items == 3 and not from_message.has_encoding
    assert from_message.encoded == raw
    with pytest.raises(ValueError):
        Envelope(Signal.TRACES)


def test_the_received_bytes_are_reused_until_the_message_is_changed():
    req = _request()
    fake = b"not what you would serialize"  # proves reuse: a serialization would differ
    env = Envelope(Signal.TRACES, req, encoded=fake, items=3)
    assert env.encoded is fake
    msg = env.mutable()
    msg.resource_spans[0].scope_spans[0].spans[0].name = "changed"
    assert env.encoded != fake
    assert Envelope(Signal.TRACES, encoded=env.encoded, items=3).message.resource_spans[0].scope_spans[0] \
        .spans[0].name == "changed"


def test_recount_after_removing_items():
    env = Envelope(Signal.TRACES, _request(3))
    del env.mutable().resource_spans[0].scope_spans[0].spans[0]
    assert env.recount() == 2 and env.items == 2


def test_a_read_only_view_gets_its_own_copy_when_it_mutates():
    req = _request()
    raw = req.SerializeToString()
    original = Envelope(Signal.TRACES, req, encoded=raw, items=3)
    a, b = original.share(), original.share()
    a.mutable().resource_spans[0].scope_spans[0].spans[0].name = "redacted"
    assert req.resource_spans[0].scope_spans[0].spans[0].name == "op0"  # the shared message is untouched
    assert b.message is req and b.encoded is raw  # the other branch still has the received bytes
    assert a.message.resource_spans[0].scope_spans[0].spans[0].name == "redacted"
    assert not a.read_only and a.encoded != raw


def test_merge_concatenates_encodings_and_remembers_parts():
    parts = [Envelope(Signal.TRACES, encoded=_request(2, name=f"r{i}-").SerializeToString(), items=2)
             for i in range(3)]
    merged = Envelope.merge(parts)
    assert merged.items == 6 and merged.parts == tuple(parts)
    assert merged.encoded == b"".join(p.encoded for p in parts)
    assert [s.name for rs in merged.message.resource_spans for ss in rs.scope_spans for s in ss.spans] == \
        [f"r{i}-{k}" for i in range(3) for k in range(2)]


def test_the_memory_queue_keeps_only_the_bytes_when_they_are_known():
    q = MemoryQueue(10)
    req = _request()
    raw = req.SerializeToString()
    q.put(Envelope(Signal.TRACES, req, encoded=raw, items=3))
    q.put(Envelope(Signal.TRACES, _request(1)))  # encoding unknown: the message is kept
    first, second = q.get(), q.get()
    assert not first.has_message and first.encoded is raw
    assert first.message == req
    assert second.has_message


def test_batch_processor_holds_encodings_and_merges_by_concatenation():
    sink = CollectingConsumer()
    tel = SelfTelemetry()
    batch = FACTORY.create(CreateSettings(ComponentId("batch"), Kind.PROCESSOR, tel.component("processor", "batch")),
                           BatchConfig(send_batch_size=6, timeout=60), sink)
    sent = [_request(3), _request(3)]
    for req in sent:
        batch.consume(Envelope(Signal.TRACES, req, encoded=req.SerializeToString(), items=3))
    (env,) = sink.envelopes
    assert env.encoded == b"".join(r.SerializeToString() for r in sent)  # no parse, no re-serialization
    (merged,) = sink.of(Signal.TRACES)
    assert [s.SerializeToString() for rs in merged.resource_spans for ss in rs.scope_spans for s in ss.spans] == \
        [s.SerializeToString() for r in sent for s in r.resource_spans[0].scope_spans[0].spans]
    batch.shutdown(0)
