"""The OTLP/HTTP exporter against a real HTTP server on loopback."""

from __future__ import annotations

import email.utils
import gzip
import json
import threading
import time

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from pydantic import ValidationError

from sidecar.envelope import Envelope
from sidecar import otlp_json
from sidecar.component import Kind, PermanentError, RetryableError
from sidecar.config import ComponentId
from sidecar.exporters.otlphttp import FACTORY, OTLPHTTPExporterConfig, classify_status, parse_retry_after
from sidecar.host import Host
from sidecar.httpserver import BackgroundHTTPServer
from sidecar.registry import CreateSettings
from sidecar.signals import Signal
from sidecar.telemetry import SelfTelemetry
from sidecar.testing import OTLPHTTPBackend, free_port

FAST_RETRY = {"initial_interval": "50ms", "max_interval": "200ms", "max_elapsed_time": "30s"}


def logs(marker: int, records: int = 2) -> ExportLogsServiceRequest:
    req = ExportLogsServiceRequest()
    rl = req.resource_logs.add()
    rl.resource.attributes.add(key="service.name").value.string_value = "svc"
    sl = rl.scope_logs.add()
    for i in range(records):
        rec = sl.log_records.add(severity_number=9, trace_id=marker.to_bytes(16, "big"))
        rec.body.string_value = f"log {marker}-{i}"
    return req


def make(endpoint: str, **extra):
    tel = SelfTelemetry()
    cfg = OTLPHTTPExporterConfig.model_validate({"endpoint": endpoint, "retry_on_failure": FAST_RETRY,
                                                 "timeout": "2s", **extra})
    comp = tel.component("exporter", "otlphttp")
    exp = FACTORY.create(CreateSettings(ComponentId("otlphttp"), Kind.EXPORTER, comp), cfg, None)
    exp.start(Host(tel))
    return exp, comp


def wait_for(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.fixture
def backend():
    with OTLPHTTPBackend() as b:
        yield b


# --- classification ---------------------------------------------------------------------------

@pytest.mark.parametrize("status, retry_after, retryable, delay", [
    (429, "3", True, 3.0),
    (503, "1", True, 1.0),
    (502, None, True, None),
    (504, None, True, None),
    (503, "soon", True, None),
    (400, None, False, None),
    (401, None, False, None),
    (403, None, False, None),
    (404, None, False, None),
    (413, None, False, None),
    (500, None, False, None),
    (501, None, False, None),
])
def test_http_status_classification(status, retry_after, retryable, delay):
    err = classify_status(status, b"the backend says no" * 50, retry_after, "http://x/v1/logs")
    assert isinstance(err, RetryableError if retryable else PermanentError)
    assert f"HTTP {status}" in str(err) and "the backend says no" in str(err)
    assert len(str(err)) < 400  # a snippet, not the whole body
    if retryable:
        assert err.retry_after == delay


def test_retry_after_as_http_date():
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(date, now=lambda: now) == pytest.approx(30)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=lambda: now) == 0
    assert parse_retry_after(None) is None


def test_endpoints_per_signal():
    cfg = OTLPHTTPExporterConfig.model_validate({"endpoint": "https://gw:4318/", "logs_endpoint": "https://loki/otlp/v1/logs"})
    assert cfg.url(Signal.TRACES) == "https://gw:4318/v1/traces"
    assert cfg.url(Signal.METRICS) == "https://gw:4318/v1/metrics"
    assert cfg.url(Signal.LOGS) == "https://loki/otlp/v1/logs"


@pytest.mark.parametrize("body, problem", [
    ({}, "endpoint"),
    ({"endpoint": "gw:4318"}, "http://"),
    ({"endpoint": "http://gw:4318", "encoding": "xml"}, "encoding"),
    ({"endpoint": "http://gw:4318", "tls": {"key_file": "k"}}, "cert_file"),
])
def test_config_errors(body, problem):
    with pytest.raises(ValidationError) as e:
        OTLPHTTPExporterConfig.model_validate(body)
    assert problem in str(e.value)


# --- delivery ---------------------------------------------------------------------------------

def test_gzip_and_headers_arrive_and_data_is_intact(backend):
    exp, tel = make(backend.endpoint, headers={"Authorization": "Bearer t0k", "X-Scope-OrgID": "team-a"})
    sent = [logs(i) for i in range(5)]
    try:
        for req in sent:
            exp.consume(Envelope(Signal.LOGS, req))
        assert backend.wait_for_items(Signal.LOGS, 10, timeout=10)
    finally:
        exp.shutdown(time.monotonic() + 5)
    assert sorted(r.SerializeToString() for r in backend.requests[Signal.LOGS]) == \
        sorted(r.SerializeToString() for r in sent)
    seen = backend.headers_seen[0]
    assert seen["HTTP_CONTENT_ENCODING"] == "gzip"
    assert seen["HTTP_AUTHORIZATION"] == "Bearer t0k"
    assert seen["HTTP_X_SCOPE_ORGID"] == "team-a"
    assert tel.value("exported", Signal.LOGS) == 10


def test_503_with_retry_after_is_retried_then_delivered(backend):
    backend.failure = (None, 503, 1)
    backend.fail_times = 1
    exp, tel = make(backend.endpoint)
    try:
        t0 = time.monotonic()
        exp.consume(Envelope(Signal.LOGS, logs(1)))
        assert backend.wait_for_items(Signal.LOGS, 2, timeout=10)
        assert time.monotonic() - t0 >= 1.0  # the server's Retry-After, not the 50 ms backoff
    finally:
        exp.shutdown(time.monotonic() + 5)
    assert tel.value("retried", Signal.LOGS) == 2


def test_400_is_dropped_as_permanent(backend):
    backend.failure = (None, 400, None)
    exp, tel = make(backend.endpoint)
    try:
        exp.consume(Envelope(Signal.LOGS, logs(1)))
        wait_for(lambda: tel.value("dropped", Signal.LOGS, "permanent_error", "false") == 2)
    finally:
        exp.shutdown(time.monotonic() + 5)
    assert backend.calls == 1


def test_connection_refused_is_retried_until_the_backend_comes_up():
    port = free_port()
    exp, tel = make(f"http://127.0.0.1:{port}", compression="none")
    backend = OTLPHTTPBackend(port)
    try:
        exp.consume(Envelope(Signal.LOGS, logs(1)))
        wait_for(lambda: tel.value("retried", Signal.LOGS) > 0)
        backend.start()
        assert backend.wait_for_items(Signal.LOGS, 2, timeout=10)
    finally:
        exp.shutdown(time.monotonic() + 5)
        backend.stop()
    assert "HTTP_CONTENT_ENCODING" not in backend.headers_seen[-1]


class _JSONBackend:
    """Accepts OTLP/JSON and answers with a partial success, as JSON."""

    def __init__(self):
        self.bodies: list[tuple[str, dict]] = []
        self.got = threading.Event()
        self.server = BackgroundHTTPServer(self.app, "127.0.0.1", free_port(), name="json-backend", threads=2)

    def app(self, environ, start_response):
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        if environ.get("HTTP_CONTENT_ENCODING") == "gzip":
            body = gzip.decompress(body)
        self.bodies.append((environ["CONTENT_TYPE"], json.loads(body)))
        self.got.set()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b'{"partialSuccess": {"rejectedLogRecords": "1", "errorMessage": "body too large"}}']


def test_json_encoding_and_partial_success(caplog):
    backend = _JSONBackend()
    backend.server.start()
    exp, tel = make(f"http://127.0.0.1:{backend.server.port}", encoding="json")
    try:
        exp.consume(Envelope(Signal.LOGS, logs(7, records=3)))
        assert backend.got.wait(10)
        wait_for(lambda: tel.value("exported", Signal.LOGS) == 2)
    finally:
        exp.shutdown(time.monotonic() + 5)
        backend.server.stop()
    content_type, body = backend.bodies[0]
    assert content_type == "application/json"
    assert body["resourceLogs"][0]["scopeLogs"][0]["logRecords"][0]["traceId"] == (7).to_bytes(16, "big").hex()
    assert otlp_json.from_dict(Signal.LOGS, body) == logs(7, records=3)
    assert tel.value("dropped", Signal.LOGS, "rejected_by_backend", "false") == 1
    assert any("body too large" in r.getMessage() for r in caplog.records)
