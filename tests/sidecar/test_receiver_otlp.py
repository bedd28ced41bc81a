"""The otlp receiver over real gRPC and HTTP clients on loopback, with an in-memory next stage."""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time

import grpc
import pytest
import urllib3
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.metrics.v1.metrics_pb2 import Exemplar, Metric, NumberDataPoint
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from sidecar.envelope import Envelope
from sidecar.component import Kind, Refused
from sidecar.config import ComponentId, ConfigError, parse_config
from sidecar.otlp_json import to_json
from sidecar.receivers.otlp import FACTORY, OTLPReceiverConfig
from sidecar.pipeline import Edge
from sidecar.registry import CreateSettings
from sidecar.signals import Signal
from sidecar.telemetry import SelfTelemetry
from sidecar.testing import CollectingConsumer, free_port

TRACE_ID = bytes.fromhex("5b8efff798038103d269b633813fc60c")
SPAN_ID = bytes.fromhex("eee19b7ec3c1b174")


def traces(n: int = 3, trace_id: bytes = TRACE_ID, span_id: bytes = SPAN_ID) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.append(KeyValue(key="service.name", value=AnyValue(string_value="model-server")))
    ss = rs.scope_spans.add()
    ss.scope.name = "test"
    for i in range(n):
        ss.spans.append(Span(trace_id=trace_id, span_id=span_id, name=f"forward-{i}", kind=Span.SPAN_KIND_SERVER,
                             start_time_unix_nano=1_700_000_000_000_000_000,
                             end_time_unix_nano=1_700_000_000_500_000_000,
                             attributes=[KeyValue(key="ml.model.id", value=AnyValue(string_value="resnet"))]))
    return req


def logs(trace_id: bytes = TRACE_ID, span_id: bytes = SPAN_ID) -> ExportLogsServiceRequest:
    req = ExportLogsServiceRequest()
    sl = req.resource_logs.add().scope_logs.add()
    sl.log_records.append(LogRecord(trace_id=trace_id, span_id=span_id, severity_number=17,
                                    body=AnyValue(string_value="inference failed")))
    sl.log_records.append(LogRecord(body=AnyValue(string_value="no trace")))
    return req


def metrics(exemplar_trace_id: bytes = TRACE_ID) -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    sm = req.resource_metrics.add().scope_metrics.add()
    m = Metric(name="requests")
    m.sum.data_points.append(NumberDataPoint(as_int=4, exemplars=[Exemplar(trace_id=exemplar_trace_id, span_id=SPAN_ID,
                                                                               as_int=1)]))
    m.sum.data_points.append(NumberDataPoint(as_int=5))
    sm.metrics.append(m)
    return req


@pytest.fixture(scope="module")
def telemetry():
    return SelfTelemetry()


@pytest.fixture(scope="module")
def sink():
    return CollectingConsumer()


def make_receiver(telemetry: SelfTelemetry, sink, body: dict, name: str = ""):
    cid = ComponentId("otlp", name)
    settings = CreateSettings(id=cid, kind=Kind.RECEIVER, telemetry=telemetry.component("receiver", str(cid)))
    # the pipeline's counting edge out of the receiver, as the graph wires it
    return FACTORY.create(settings, OTLPReceiverConfig.model_validate(body), Edge(sink, settings.telemetry))


@pytest.fixture(scope="module")
def receiver(telemetry, sink):
    rec = make_receiver(telemetry, sink, {"protocols": {
        "grpc": {"endpoint": f"127.0.0.1:{free_port()}", "max_recv_msg_size_mib": 1},
        "http": {"endpoint": f"127.0.0.1:{free_port()}", "max_request_body_size": 64 * 1024},
    }})
    rec.start(None)
    yield rec
    rec.shutdown(time.monotonic() + 5)


@pytest.fixture(autouse=True)
def _reset(sink):
    with sink.lock:
        sink.requests.clear()
        sink.items = {s: 0 for s in Signal}
        sink.refuse = None
        sink.refuse_times = 0


@pytest.fixture(scope="module")
def channel(receiver):
    ch = grpc.insecure_channel(f"127.0.0.1:{receiver.grpc_port}")
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def http():
    pool = urllib3.PoolManager(retries=False, timeout=10)
    yield pool
    pool.clear()


def url(receiver, path: str = "/v1/traces") -> str:
    return f"http://127.0.0.1:{receiver.http_port}{path}"


def count(receiver, family: str, signal: Signal, *extra: str) -> float:
    return receiver._telemetry.value(family, signal, *extra)


def refused_requests(telemetry: SelfTelemetry, protocol: str, reason: str) -> float:
    v = telemetry.registry.get_sample_value("sidecar_receiver_requests_refused_total",
                                            {"component": "otlp", "protocol": protocol, "reason": reason})
    return v or 0.0


def retry_info(err: grpc.RpcError) -> error_details_pb2.RetryInfo | None:
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.RetryInfo()
                if detail.Unpack(info):
                    return info
    return None


# --- gRPC -----------------------------------------------------------------------------------------


def test_grpc_delivers_each_signal_unchanged_and_counts_items(receiver, channel, sink):
    before = count(receiver, "accepted", Signal.TRACES)
    resp = trace_service_pb2_grpc.TraceServiceStub(channel).Export(traces(3), timeout=5)
    assert resp == ExportTraceServiceResponse() and not resp.HasField("partial_success")
    logs_service_pb2_grpc.LogsServiceStub(channel).Export(logs(), timeout=5)
    metrics_service_pb2_grpc.MetricsServiceStub(channel).Export(metrics(), timeout=5)

    assert sink.of(Signal.TRACES) == [traces(3)]
    assert sink.of(Signal.LOGS) == [logs()]
    assert sink.of(Signal.METRICS) == [metrics()]
    assert count(receiver, "accepted", Signal.TRACES) - before == 3
    assert sink.items[Signal.LOGS] == 2 and sink.items[Signal.METRICS] == 2


def test_grpc_gzip_from_client(receiver, channel, sink):
    trace_service_pb2_grpc.TraceServiceStub(channel).Export(traces(50), timeout=5, compression=grpc.Compression.Gzip)
    assert sink.of(Signal.TRACES) == [traces(50)]


@pytest.mark.parametrize("stub, request_, message", [
    (trace_service_pb2_grpc.TraceServiceStub, traces(5, trace_id=b"short"),
     "resource_spans[0].scope_spans[0].spans[0].trace_id: must be 16 bytes, got 5"),
    (trace_service_pb2_grpc.TraceServiceStub, traces(2, span_id=b"\x01" * 16),
     "resource_spans[0].scope_spans[0].spans[0].span_id: must be 8 bytes, got 16"),
    (logs_service_pb2_grpc.LogsServiceStub, logs(span_id=b"\x01\x02\x03"),
     "resource_logs[0].scope_logs[0].log_records[0].span_id: must be empty or 8 bytes, got 3"),
    (metrics_service_pb2_grpc.MetricsServiceStub, metrics(exemplar_trace_id=b"\x01" * 4),
     "resource_metrics[0].scope_metrics[0].metrics[0].sum.data_points[0].exemplars[0].trace_id: "
     "must be empty or 16 bytes, got 4"),
], ids=["trace_id", "span_id", "log_span_id", "exemplar_trace_id"])
def test_grpc_wrong_length_ids_reject_the_whole_request(receiver, channel, sink, telemetry, stub, request_, message):
    before = refused_requests(telemetry, "grpc", "invalid")
    with pytest.raises(grpc.RpcError) as err:
        stub(channel).Export(request_, timeout=5)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == message
    assert sink.requests == []
    assert refused_requests(telemetry, "grpc", "invalid") == before + 1
    trace_service_pb2_grpc.TraceServiceStub(channel).Export(traces(1), timeout=5)  # still serving
    assert sink.items[Signal.TRACES] == 1


def test_grpc_span_with_bad_parent_id_names_it(channel):
    req = traces(3)
    req.resource_spans[0].scope_spans[0].spans[2].parent_span_id = b"\x00\x01"
    with pytest.raises(grpc.RpcError) as err:
        trace_service_pb2_grpc.TraceServiceStub(channel).Export(req, timeout=5)
    assert err.value.details() == ("resource_spans[0].scope_spans[0].spans[2].parent_span_id: "
                                   "must be empty or 8 bytes, got 2")


def test_grpc_oversized_message_is_refused_and_server_keeps_serving(channel, sink):
    big = traces(1)
    big.resource_spans[0].scope_spans[0].spans[0].name = "x" * (2 * 1024 * 1024)
    stub = trace_service_pb2_grpc.TraceServiceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.Export(big, timeout=5)
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sink.requests == []
    stub.Export(traces(2), timeout=5)
    assert sink.items[Signal.TRACES] == 2


def test_grpc_memory_limit_refusal_is_resource_exhausted_with_retry_info(receiver, channel, sink):
    sink.refuse = Refused("memory_limit", retry_after=2.5)
    before = count(receiver, "refused", Signal.TRACES, "memory_limit")
    with pytest.raises(grpc.RpcError) as err:
        trace_service_pb2_grpc.TraceServiceStub(channel).Export(traces(4), timeout=5)
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    info = retry_info(err.value)
    assert info is not None, "OTLP clients only retry RESOURCE_EXHAUSTED when RetryInfo is present"
    assert info.retry_delay.seconds == 2 and info.retry_delay.nanos == 500_000_000
    assert count(receiver, "refused", Signal.TRACES, "memory_limit") - before == 4


def test_grpc_memory_limit_without_delay_defaults_to_one_second(channel, sink):
    sink.refuse = Refused("memory_limit")
    with pytest.raises(grpc.RpcError) as err:
        logs_service_pb2_grpc.LogsServiceStub(channel).Export(logs(), timeout=5)
    assert retry_info(err.value).retry_delay.seconds == 1


@pytest.mark.parametrize("refusal, code", [
    (Refused("queue_full"), grpc.StatusCode.UNAVAILABLE),
    (Refused("shutting_down"), grpc.StatusCode.UNAVAILABLE),
    (Refused("bad_data", retryable=False), grpc.StatusCode.INVALID_ARGUMENT),
])
def test_grpc_other_refusals(channel, sink, refusal, code):
    sink.refuse = refusal
    with pytest.raises(grpc.RpcError) as err:
        trace_service_pb2_grpc.TraceServiceStub(channel).Export(traces(1), timeout=5)
    assert err.value.code() is code
    sink.refuse = None
    trace_service_pb2_grpc.TraceServiceStub(channel).Export(traces(1), timeout=5)
    assert sink.items[Signal.TRACES] == 1


# --- HTTP -----------------------------------------------------------------------------------------


def test_http_protobuf_delivers_and_answers_in_protobuf(receiver, http, sink):
    r = http.request("POST", url(receiver), body=traces(3).SerializeToString(),
                     headers={"Content-Type": "application/x-protobuf"})
    assert r.status == 200
    assert r.headers["Content-Type"] == "application/x-protobuf"
    assert ExportTraceServiceResponse.FromString(r.data) == ExportTraceServiceResponse()
    assert sink.of(Signal.TRACES) == [traces(3)]


@pytest.mark.parametrize("signal, request_, path", [
    (Signal.TRACES, traces(2), "/v1/traces"),
    (Signal.LOGS, logs(), "/v1/logs"),
    (Signal.METRICS, metrics(), "/v1/metrics"),
])
def test_http_json_with_hex_ids_decodes_identical_to_protobuf(receiver, http, sink, signal, request_, path):
    body = to_json(signal, request_)
    assert TRACE_ID.hex() in body  # the OTLP/JSON spelling: hex, not base64
    r = http.request("POST", url(receiver, path), body=body.encode(),
                     headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status == 200, r.data
    assert r.headers["Content-Type"] == "application/json"
    assert json.loads(r.data) == {}
    assert sink.of(signal) == [request_]


@pytest.mark.parametrize("content_type, encode", [
    ("application/x-protobuf", lambda req: req.SerializeToString()),
    ("application/json", lambda req: to_json(Signal.TRACES, req).encode()),
])
def test_http_gzip_bodies(receiver, http, sink, content_type, encode):
    r = http.request("POST", url(receiver), body=gzip.compress(encode(traces(20))),
                     headers={"Content-Type": content_type, "Content-Encoding": "gzip"})
    assert r.status == 200, r.data
    assert sink.of(Signal.TRACES) == [traces(20)]


def _error_message(r) -> str:
    if r.headers["Content-Type"] == "application/json":
        return json.loads(r.data)["message"]
    return status_pb2.Status.FromString(r.data).message


@pytest.mark.parametrize("headers, body, status, reason, needle", [
    ({"Content-Type": "application/x-protobuf"}, b"\xff\xff\xff\xff not protobuf", 400, "invalid",
     "invalid OTLP protobuf traces request"),
    ({"Content-Type": "application/x-protobuf"}, traces(3).SerializeToString()[:-7], 400, "invalid",
     "invalid OTLP protobuf traces request"),
    ({"Content-Type": "application/json"}, b'{"resourceSpans": [', 400, "invalid", "invalid JSON"),
    ({"Content-Type": "application/json"},
     b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"abcd","spanId":"eee19b7ec3c1b174"}]}]}]}', 400,
     "invalid", "resourceSpans[0].scopeSpans[0].spans[0].traceId: must be 32 hex characters"),
    ({"Content-Type": "application/json"},
     b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"spanId":"eee19b7ec3c1b174"}]}]}]}', 400,
     "invalid", "resource_spans[0].scope_spans[0].spans[0].trace_id: must be 16 bytes, got 0"),
    ({"Content-Type": "text/plain"}, b"hello", 415, "unsupported_media_type",
     "use application/x-protobuf or application/json"),
    ({}, b"hello", 415, "unsupported_media_type", "use application/x-protobuf or application/json"),
    ({"Content-Type": "application/x-protobuf", "Content-Encoding": "br"}, b"x", 415, "unsupported_media_type",
     "unsupported Content-Encoding 'br'"),
    ({"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"}, b"not gzip at all", 400, "invalid",
     "invalid gzip body"),
    ({"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"},
     gzip.compress(traces(3).SerializeToString())[:-10], 400, "invalid", "invalid gzip body"),
    ({"Content-Type": "application/x-protobuf"}, b"\x00" * (64 * 1024 + 1), 413, "too_large",
     "exceeds max_request_body_size (65536 bytes)"),
    ({"Content-Type": "application/json", "Content-Encoding": "gzip"}, gzip.compress(b" " * (10 * 1024 * 1024)), 413,
     "too_large", "decompressed body exceeds max_request_body_size"),
], ids=["garbage", "truncated", "bad-json", "short-hex-id", "missing-trace-id", "text-plain", "no-content-type",
        "brotli", "not-gzip", "truncated-gzip", "too-large", "gzip-bomb"])
def test_http_malformed_requests(receiver, http, sink, telemetry, headers, body, status, reason, needle):
    before = refused_requests(telemetry, "http", reason)
    r = http.request("POST", url(receiver), body=body, headers=headers)
    assert r.status == status
    assert needle in _error_message(r)
    if headers.get("Content-Type") == "application/x-protobuf":
        assert r.headers["Content-Type"] == "application/x-protobuf"  # errors answer in the request's encoding
    assert sink.requests == []
    assert refused_requests(telemetry, "http", reason) == before + 1
    ok = http.request("POST", url(receiver), body=traces(1).SerializeToString(),
                      headers={"Content-Type": "application/x-protobuf"})
    assert ok.status == 200 and sink.items[Signal.TRACES] == 1


def test_http_declared_length_over_limit_is_refused(receiver, telemetry):
    def post_declaring(length: int, send: int) -> bytes:
        with socket.create_connection(("127.0.0.1", receiver.http_port), timeout=5) as s:
            s.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
                      b"Content-Length: %d\r\n\r\n" % length + b"\x00" * send)
            return s.recv(4096)

    before = refused_requests(telemetry, "http", "too_large")
    assert post_declaring(100_000, 100_000).startswith(b"HTTP/1.1 413")  # answered (and counted) by the app
    assert refused_requests(telemetry, "http", "too_large") == before + 1
    # far over the limit: the server refuses from the headers alone, without buffering the body
    assert post_declaring(10 * 1024 * 1024, 0).startswith(b"HTTP/1.1 413")


def test_http_wrong_method_and_unknown_path(receiver, http):
    r = http.request("GET", url(receiver))
    assert r.status == 405 and r.headers["Allow"] == "POST"
    r = http.request("POST", url(receiver, "/v1/profiles"), body=b"", headers={"Content-Type": "application/json"})
    assert r.status == 404


@pytest.mark.parametrize("refusal, status, retry_after", [
    (Refused("memory_limit", retry_after=0.2), 429, "1"),
    (Refused("queue_full", retry_after=3), 503, "3"),
    (Refused("disk_full"), 503, "1"),
    (Refused("bad_data", retryable=False), 400, None),
])
def test_http_refusals_tell_the_client_when_to_retry(receiver, http, sink, refusal, status, retry_after):
    sink.refuse = refusal
    r = http.request("POST", url(receiver), body=traces(2).SerializeToString(),
                     headers={"Content-Type": "application/x-protobuf"})
    assert r.status == status
    assert r.headers.get("Retry-After") == retry_after
    assert status_pb2.Status.FromString(r.data).message == refusal.reason


def test_http_custom_url_path(telemetry, sink, http):
    rec = make_receiver(telemetry, sink, {"protocols": {"http": {"endpoint": f"127.0.0.1:{free_port()}",
                                                                  "logs_url_path": "/otlp/logs"}}}, name="custom")
    rec.start(None)
    try:
        assert rec.grpc_port is None
        r = http.request("POST", url(rec, "/otlp/logs"), body=logs().SerializeToString(),
                         headers={"Content-Type": "application/x-protobuf"})
        assert r.status == 200
        assert sink.of(Signal.LOGS) == [logs()]
    finally:
        rec.shutdown(time.monotonic() + 2)


# --- lifecycle ------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_port_in_use_fails_start_naming_the_endpoint(telemetry, sink, protocol):
    spelled = {"grpc": "gRPC", "http": "HTTP"}[protocol]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        endpoint = f"127.0.0.1:{taken.getsockname()[1]}"
        rec = make_receiver(telemetry, sink, {"protocols": {protocol: {"endpoint": endpoint}}}, name="clash")
        with pytest.raises(OSError, match=f"cannot listen for OTLP/{spelled} on {endpoint}"):
            rec.start(None)


def test_shutdown_lets_in_flight_requests_finish_and_refuses_new_ones(telemetry, http):
    class Slow(CollectingConsumer):
        """Holds every request until released, so requests are in flight when shutdown begins."""

        def __init__(self):
            super().__init__()
            self.entered = threading.Semaphore(0)
            self.release = threading.Event()

        def consume(self, envelope):
            self.entered.release()
            self.release.wait(10)
            super().consume(envelope)

    slow = Slow()
    rec = make_receiver(telemetry, slow, {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{free_port()}"},
                                                        "http": {"endpoint": f"127.0.0.1:{free_port()}"}}},
                        name="drain")
    rec.start(None)
    channel = grpc.insecure_channel(f"127.0.0.1:{rec.grpc_port}")
    stub = trace_service_pb2_grpc.TraceServiceStub(channel)
    grpc_call = stub.Export.future(traces(2), timeout=10)
    http_result = {}
    http_call = threading.Thread(target=lambda: http_result.setdefault("r", http.request(
        "POST", url(rec, "/v1/logs"), body=logs().SerializeToString(),
        headers={"Content-Type": "application/x-protobuf"})))
    http_call.start()
    assert slow.entered.acquire(timeout=5) and slow.entered.acquire(timeout=5)  # both in flight

    stopper = threading.Thread(target=rec.shutdown, args=(time.monotonic() + 10,))
    stopper.start()
    time.sleep(0.2)  # let shutdown begin while the requests are in flight
    with pytest.raises(grpc.RpcError):
        stub.Export(traces(1), timeout=2)  # no new gRPC requests once shutdown began
    late = http.request("POST", url(rec), body=traces(1).SerializeToString(),
                        headers={"Content-Type": "application/x-protobuf"})
    assert late.status == 503 and late.headers["Retry-After"] == "1"

    slow.release.set()
    assert grpc_call.result() == ExportTraceServiceResponse()  # the in-flight ones completed
    http_call.join(10)
    assert http_result["r"].status == 200
    stopper.join(10)
    assert not stopper.is_alive()
    assert slow.items[Signal.TRACES] == 2 and slow.items[Signal.LOGS] == 2
    channel.close()


def test_config_unknown_key_names_its_path():
    text = """
receivers:
  otlp:
    protocols:
      grpc:
        max_concurent_streams: 10
exporters:
  debug:
service:
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [debug]
"""
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    assert "receivers.otlp.protocols.grpc.max_concurent_streams: unknown key" in err.value.problems


def test_config_requires_a_protocol_and_empty_means_defaults():
    with pytest.raises(ValueError, match="at least one of grpc or http"):
        OTLPReceiverConfig.model_validate({"protocols": {}})
    cfg = OTLPReceiverConfig.model_validate({"protocols": {"grpc": None}})
    assert cfg.protocols.grpc.endpoint == "127.0.0.1:4317" and cfg.protocols.http is None
