"""The OTLP/gRPC exporter against real gRPC servers on loopback."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from pydantic import ValidationError

from sidecar.envelope import Envelope
from sidecar.component import Kind, PermanentError, Refused, RetryableError
from sidecar.config import ComponentId
from sidecar.exporters.otlp import FACTORY, OTLPExporterConfig, _target, classify
from sidecar.host import Host
from sidecar.registry import CreateSettings
from sidecar.signals import Signal
from sidecar.telemetry import SelfTelemetry
from sidecar.testing import Counted, OTLPBackend, free_port

FAST_RETRY = {"initial_interval": "50ms", "max_interval": "200ms", "max_elapsed_time": "30s"}


def traces(marker: int, spans: int = 3) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "svc"
    ss = rs.scope_spans.add()
    ss.scope.name = "test"
    for i in range(spans):
        sp = ss.spans.add(name=f"req-{marker}-{i}", trace_id=marker.to_bytes(16, "big"),
                          span_id=(i + 1).to_bytes(8, "big"), start_time_unix_nano=10, end_time_unix_nano=20)
        sp.attributes.add(key="ml.model.id").value.string_value = "resnet"
    return req


def make(endpoint: str, name: str = "main", **extra):
    tel = SelfTelemetry()
    body = {"endpoint": endpoint, "tls": {"insecure": True}, "retry_on_failure": FAST_RETRY, "timeout": "2s", **extra}
    cfg = OTLPExporterConfig.model_validate(body)
    comp = tel.component("exporter", f"otlp/{name}")
    exp = FACTORY.create(CreateSettings(ComponentId("otlp", name), Kind.EXPORTER, comp), cfg, None)
    exp.start(Host(tel))
    return Counted(exp, comp), comp  # behind the pipeline's counting edge, as the graph runs it


def wait_for(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.fixture
def backend():
    with OTLPBackend() as b:
        yield b


# --- classification ---------------------------------------------------------------------------

def _details(delay: float | None) -> tuple:
    if delay is None:
        return ()
    st = status_pb2.Status(code=8, message="slow down")
    st.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(
        seconds=int(delay), nanos=int(round((delay % 1) * 1e9)))))
    return (("grpc-status-details-bin", st.SerializeToString()),)


@pytest.mark.parametrize("code, delay, retryable", [
    (grpc.StatusCode.CANCELLED, None, True),
    (grpc.StatusCode.DEADLINE_EXCEEDED, None, True),
    (grpc.StatusCode.ABORTED, None, True),
    (grpc.StatusCode.OUT_OF_RANGE, None, True),
    (grpc.StatusCode.UNAVAILABLE, None, True),
    (grpc.StatusCode.DATA_LOSS, None, True),
    (grpc.StatusCode.UNAVAILABLE, 2.5, True),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, None, False),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 1.25, True),
    (grpc.StatusCode.INVALID_ARGUMENT, None, False),
    (grpc.StatusCode.UNAUTHENTICATED, None, False),
    (grpc.StatusCode.PERMISSION_DENIED, None, False),
    (grpc.StatusCode.NOT_FOUND, None, False),
    (grpc.StatusCode.UNIMPLEMENTED, None, False),
    (grpc.StatusCode.INTERNAL, None, False),
    (grpc.StatusCode.UNKNOWN, None, False),
    (grpc.StatusCode.FAILED_PRECONDITION, None, False),
    (grpc.StatusCode.ALREADY_EXISTS, None, False),
])
def test_grpc_status_classification_follows_the_otlp_spec(code, delay, retryable):
    err = classify(code, "boom", _details(delay))
    assert isinstance(err, RetryableError if retryable else PermanentError)
    assert code.name in str(err)
    if retryable:
        assert err.retry_after == pytest.approx(delay) if delay is not None else err.retry_after is None


def test_garbled_status_details_are_not_retry_info():
    err = classify(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", (("grpc-status-details-bin", b"\xff\xff"),))
    assert isinstance(err, PermanentError)


@pytest.mark.parametrize("endpoint, insecure, want", [
    ("collector:4317", False, ("collector:4317", True)),
    ("collector:4317", True, ("collector:4317", False)),
    ("http://collector:4317", False, ("collector:4317", False)),
    ("https://collector:4317/", True, ("collector:4317", True)),
])
def test_endpoint_scheme_decides_tls(endpoint, insecure, want):
    cfg = OTLPExporterConfig.model_validate({"endpoint": endpoint, "tls": {"insecure": insecure}})
    assert _target(cfg) == want


@pytest.mark.parametrize("body, path", [
    ({"endpoint": "collector"}, "endpoint"),
    ({"endpoint": "127.0.0.1:4317", "compression": "zstd"}, "compression"),
    ({"endpoint": "127.0.0.1:4317", "tls": {"cert_file": "c.pem"}}, "tls"),
    ({"endpoint": "127.0.0.1:4317", "tls": {"insecure_skip_verify": True}}, "tls.insecure_skip_verify"),
    ({"endpoint": "127.0.0.1:4317", "sending_queue": {"queue_size": 0}}, "sending_queue.queue_size"),
    ({"endpoint": "127.0.0.1:4317", "timeout": 0}, "timeout"),
    ({"endpoint": "127.0.0.1:4317", "retry": {}}, "retry"),
])
def test_config_errors_name_the_key(body, path):
    with pytest.raises(ValidationError) as e:
        OTLPExporterConfig.model_validate(body)
    assert any(".".join(str(p) for p in err["loc"]).startswith(path) for err in e.value.errors())


# --- delivery ---------------------------------------------------------------------------------

def test_delivers_requests_intact(backend):
    exp, tel = make(backend.endpoint)
    try:
        sent = [traces(i) for i in range(10)]
        for req in sent:
            exp.consume(Envelope(Signal.TRACES, req))
        assert backend.wait_for_items(Signal.TRACES, 30, timeout=10)
    finally:
        exp.shutdown(time.monotonic() + 5)
    assert sorted(r.SerializeToString() for r in backend.requests[Signal.TRACES]) == \
        sorted(r.SerializeToString() for r in sent)
    assert tel.value("accepted", Signal.TRACES) == 30
    assert tel.value("exported", Signal.TRACES) == 30


def test_outage_then_restart_on_same_port_delivers_every_item_exactly_once():
    port = free_port()
    backend = OTLPBackend(port).start()
    exp, tel = make(backend.endpoint, sending_queue={"num_consumers": 2})
    try:
        exp.consume(Envelope(Signal.TRACES, traces(0)))
        wait_for(lambda: tel.value("exported", Signal.TRACES) == 3)  # acknowledged, not only received
        backend.stop()
        sent = [traces(i) for i in range(1, 21)]
        for req in sent:
            exp.consume(Envelope(Signal.TRACES, req))  # acknowledged while the backend is down
        time.sleep(0.3)
        assert backend.items[Signal.TRACES] == 3
        backend.start()
        assert backend.wait_for_items(Signal.TRACES, 63, timeout=20)
    finally:
        exp.shutdown(time.monotonic() + 5)
        backend.stop()
    got = [r.SerializeToString() for r in backend.requests[Signal.TRACES]]
    assert sorted(got) == sorted(r.SerializeToString() for r in [traces(0)] + sent)
    assert tel.value("retried", Signal.TRACES) > 0
    assert tel.value("exported", Signal.TRACES) == 63


def test_resource_exhausted_with_retry_info_waits_the_servers_delay(backend):
    backend.failure = (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, 0.4)
    backend.fail_times = 1
    exp, tel = make(backend.endpoint)
    try:
        t0 = time.monotonic()
        exp.consume(Envelope(Signal.TRACES, traces(1)))
        assert backend.wait_for_items(Signal.TRACES, 3, timeout=10)
        assert time.monotonic() - t0 >= 0.4  # not the 50 ms backoff
    finally:
        exp.shutdown(time.monotonic() + 5)
    assert tel.value("retried", Signal.TRACES) == 3


def test_permanent_errors_drop_and_count(backend):
    backend.failure = (grpc.StatusCode.INVALID_ARGUMENT, 400, None)
    exp, tel = make(backend.endpoint)
    try:
        exp.consume(Envelope(Signal.TRACES, traces(1)))
        wait_for(lambda: tel.value("dropped", Signal.TRACES, "permanent_error", "false") >= 3)
    finally:
        exp.shutdown(time.monotonic() + 5)
    assert tel.value("dropped", Signal.TRACES, "permanent_error", "false") == 3
    assert backend.calls == 1
    assert tel.value("exported", Signal.TRACES) == 0


def test_retries_exhausted_is_counted():
    exp, tel = make(f"127.0.0.1:{free_port()}",
                    retry_on_failure={"initial_interval": "20ms", "max_interval": "20ms", "max_elapsed_time": "100ms"})
    try:
        exp.consume(Envelope(Signal.TRACES, traces(1)))
        wait_for(lambda: tel.value("dropped", Signal.TRACES, "retries_exhausted", "false") >= 3)
    finally:
        exp.shutdown(time.monotonic() + 5)
    assert tel.value("dropped", Signal.TRACES, "retries_exhausted", "false") == 3


def test_one_backend_down_does_not_delay_another_exporter(backend):
    dead, dead_tel = make(f"127.0.0.1:{free_port()}", name="dead",
                          sending_queue={"num_consumers": 1, "queue_size": 5})
    live, live_tel = make(backend.endpoint, name="live")
    try:
        accepted = 0
        with pytest.raises(Refused) as refused:
            for i in range(10):  # 5 queued + at most 1 in its worker's retry loop
                dead.consume(Envelope(Signal.TRACES, traces(i)))
                accepted += 1
        assert refused.value.reason == "queue_full"  # its queue is full: only it refuses
        t0 = time.monotonic()
        for i in range(5):
            live.consume(Envelope(Signal.TRACES, traces(i)))
        assert backend.wait_for_items(Signal.TRACES, 15, timeout=10)
        assert time.monotonic() - t0 < 5
    finally:
        t0 = time.monotonic()
        dead.shutdown(time.monotonic() + 0.2)
        live.shutdown(time.monotonic() + 5)
    assert time.monotonic() - t0 < 3
    assert live_tel.value("exported", Signal.TRACES) == 15
    assert dead_tel.value("exported", Signal.TRACES) == 0
    assert dead_tel.value("dropped", Signal.TRACES, "shutdown", "false") == 3 * accepted  # lost, but counted
    assert dead_tel.value("refused", Signal.TRACES, "queue_full") == 3


# --- partial success and headers, against a servicer of our own --------------------------------

class _PartialServicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self.metadata: list[dict] = []
        self.done = threading.Event()

    def Export(self, request, context):  # noqa: N802
        self.metadata.append(dict(context.invocation_metadata()))
        self.done.set()
        resp = trace_service_pb2.ExportTraceServiceResponse()
        resp.partial_success.rejected_spans = 2
        resp.partial_success.error_message = "spans too old"
        return resp


def test_partial_success_counts_rejected_items_and_sends_headers(caplog):
    servicer = _PartialServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    exp, tel = make(f"http://127.0.0.1:{port}", headers={"X-Scope-OrgID": "tenant-1"})
    try:
        exp.consume(Envelope(Signal.TRACES, traces(1, spans=5)))
        assert servicer.done.wait(10)
        wait_for(lambda: tel.value("exported", Signal.TRACES) >= 3)
    finally:
        exp.shutdown(time.monotonic() + 5)
        server.stop(None)
    assert tel.value("exported", Signal.TRACES) == 3
    assert tel.value("dropped", Signal.TRACES, "rejected_by_backend", "false") == 2
    assert servicer.metadata[0]["x-scope-orgid"] == "tenant-1"
    assert any("spans too old" in r.getMessage() for r in caplog.records)


def test_shutdown_drains_the_queue_before_returning(backend):
    exp, tel = make(backend.endpoint, sending_queue={"num_consumers": 1})
    for i in range(30):
        exp.consume(Envelope(Signal.TRACES, traces(i)))
    exp.shutdown(time.monotonic() + 10)
    assert backend.items[Signal.TRACES] == 90
    assert tel.value("dropped", Signal.TRACES, "shutdown", "false") == 0
