"""Memory under hostile load: a request that would not fit is refused before it is parsed, the limiter
accepts again as soon as memory is handed back, and in-memory sending queues are bounded in bytes."""

from __future__ import annotations

import time

import grpc
import pytest
import urllib3
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidecar.component import Kind, Refused
from sidecar.config import ComponentId
from sidecar.envelope import Envelope
from sidecar.exporters.base import QueueConfig
from sidecar.host import Host
from sidecar.pipeline import Edge
from sidecar.processors.memory_limiter import MemoryLimiter, MemoryLimiterConfig
from sidecar.queue.memory import MemoryQueue
from sidecar.receivers.otlp import FACTORY, OTLPReceiverConfig
from sidecar.registry import CreateSettings
from sidecar.signals import Signal
from sidecar.telemetry import SelfTelemetry
from sidecar.testing import CollectingConsumer, free_port
from tests.sidecar.test_memory_limiter import MIB, FakeMemory

TRACE_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def traces(spans: int) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    ss = req.resource_spans.add().scope_spans.add()
    for i in range(spans):
        ss.spans.add(name="predict" * 20, trace_id=b"\1" * 16, span_id=i.to_bytes(8, "big"))
    return req


def pipeline(memory: FakeMemory, limit_mib: int = 400):
    """receiver -> memory_limiter -> sink, started as the Service starts them (limiter first, one host)."""
    tel = SelfTelemetry()
    host = Host(tel)
    sink = CollectingConsumer()
    lid = ComponentId("memory_limiter")
    lset = CreateSettings(id=lid, kind=Kind.PROCESSOR, telemetry=tel.component("processor", str(lid)))
    limiter = MemoryLimiter(lset, MemoryLimiterConfig.model_validate({"limit_mib": limit_mib, "check_interval": "1h"}),
                            sink, rss_reader=memory.read, release_memory=memory.release)
    rid = ComponentId("otlp")
    rset = CreateSettings(id=rid, kind=Kind.RECEIVER, telemetry=tel.component("receiver", str(rid)))
    rec = FACTORY.create(rset, OTLPReceiverConfig.model_validate({"protocols": {
        "grpc": {"endpoint": f"127.0.0.1:{free_port()}", "max_recv_msg_size_mib": 64},
        "http": {"endpoint": f"127.0.0.1:{free_port()}", "max_request_body_size": 64 * MIB}}}),
        Edge(Edge(limiter, lset.telemetry), rset.telemetry))
    limiter.start(host)
    rec.start(host)
    return rec, limiter, sink, tel


def refused_requests(tel, protocol: str) -> float:
    return tel.registry.get_sample_value("sidecar_receiver_requests_refused_total",
                                         {"component": "otlp", "protocol": protocol, "reason": "memory_limit"}) or 0.0


def test_a_request_that_would_not_fit_is_refused_retryable_before_it_is_parsed():
    memory = FakeMemory(250)  # soft limit 320 MiB; a request costs 8x its size (request_memory_factor)
    rec, limiter, sink, tel = pipeline(memory)
    big = traces(30_000).SerializeToString()  # ~4.5 MiB: about 36 MiB on its way through
    assert 4 * MIB < len(big) < 5 * MIB
    channel = grpc.insecure_channel(f"127.0.0.1:{rec.grpc_port}",
                                    options=[("grpc.max_send_message_length", 64 * MIB)])
    export = channel.unary_unary(TRACE_EXPORT, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    http = urllib3.PoolManager(retries=False, timeout=10)
    url = f"http://127.0.0.1:{rec.http_port}/v1/traces"
    headers = {"Content-Type": "application/x-protobuf"}
    try:
        export(big, timeout=10)  # 250 + 36 MiB fits under 320
        assert http.request("POST", url, body=big, headers=headers).status == 200
        memory.rss = 300 * MIB  # under the soft limit, but 300 + 36 MiB is not
        with pytest.raises(grpc.RpcError) as err:
            export(big, timeout=10)
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        r = http.request("POST", url, body=big, headers=headers)
        assert r.status == 429 and r.headers["Retry-After"]
        assert refused_requests(tel, "grpc") == refused_requests(tel, "http") == 1
        export(traces(10).SerializeToString(), timeout=10)  # a small one still fits
        assert [len(r.resource_spans[0].scope_spans[0].spans) for r in sink.of(Signal.TRACES)] == [30_000] * 2 + [10]
    finally:
        channel.close()
        rec.shutdown(time.monotonic() + 5)
        limiter.shutdown(time.monotonic() + 5)


def test_requests_admitted_and_still_on_their_way_in_count_against_the_budget():
    memory = FakeMemory(250)
    rec, limiter, sink, tel = pipeline(memory)
    try:
        size = int(4.5 * MIB)
        assert limiter.admit(size) is None  # 250 + 36
        refusal = limiter.admit(size)  # 250 + 36 admitted + 36 > 320: refused, retryable
        assert refusal is not None and refusal.reason == "memory_limit" and refusal.retryable
        assert "admitted to requests in flight" in str(refusal)
        limiter.admitted(size)  # the first one is in the pipeline now: its memory shows in RSS
        memory.rss += 36 * MIB
        assert limiter.admit(size) is not None  # 286 + 36 > 320
        memory.rss = 250 * MIB
        assert limiter.admit(size) is None
        assert limiter.admit(100 * 1024) is None  # small requests are not measured
    finally:
        rec.shutdown(time.monotonic() + 5)
        limiter.shutdown(time.monotonic() + 5)


def test_the_limiter_accepts_again_as_soon_as_memory_is_handed_back_not_at_the_next_check():
    memory = FakeMemory(390)  # over the soft limit: refusing; the periodic check is an hour away
    rec, limiter, sink, tel = pipeline(memory)
    try:
        with pytest.raises(Refused):
            limiter.consume(Envelope(Signal.TRACES, traces(1)))
        memory.freed = 200 * MIB  # gc + malloc_trim hand the spike back on the next release
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                limiter.consume(Envelope(Signal.TRACES, traces(1)))
                break
            except Refused:
                continue
        assert not limiter.refusing and len(sink.of(Signal.TRACES)) == 1
        assert memory.releases >= 1
    finally:
        rec.shutdown(time.monotonic() + 5)
        limiter.shutdown(time.monotonic() + 5)


def test_memory_queue_is_bounded_in_bytes_as_well_as_requests():
    one = Envelope(Signal.TRACES, encoded=traces(100).SerializeToString(), items=100)
    size = len(one.encoded)
    q = MemoryQueue(1000, max_bytes=3 * size)
    for _ in range(3):
        q.put(Envelope(Signal.TRACES, encoded=one.encoded, items=100))
    with pytest.raises(Refused) as e:
        q.put(Envelope(Signal.TRACES, encoded=one.encoded, items=100))
    assert e.value.reason == "queue_full" and e.value.retryable and "max_bytes" in str(e.value)
    assert q.byte_count() == 3 * size
    q.get()
    q.put(Envelope(Signal.TRACES, traces(100), items=100))  # room again; a message without bytes is measured
    assert q.byte_count() == 3 * size
    lone = MemoryQueue(10, max_bytes=10)
    lone.put(Envelope(Signal.TRACES, encoded=one.encoded, items=100))  # an empty queue takes one bigger request
    assert QueueConfig().max_bytes == 64 * MIB
