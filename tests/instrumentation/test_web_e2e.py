"""End to end: real servers (uvicorn, waitress) running an instrumented torch model, exporting
over OTLP/gRPC to a real backend on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from sidecar.signals import Signal
from sidecar.testing import OTLPBackend, free_port

from .conftest import APPS, ROOT

pytestmark = pytest.mark.e2e

FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_BLRP_SCHEDULE_DELAY": "50",
               "OTEL_METRIC_EXPORT_INTERVAL": "600000"}


class App:
    def __init__(self, framework: str, endpoint: str) -> None:
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, **FAST_EXPORT}
        self.proc = subprocess.Popen([sys.executable, str(APPS / "web_app.py"), framework, str(self.port)],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app exited:\n{self.proc.stdout.read().decode()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError("app did not start")

    def get(self, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def backend():
    with OTLPBackend() as b:
        yield b


@pytest.fixture(scope="module", params=["fastapi", "flask"])
def app(request, backend):
    a = App(request.param, f"http://{backend.endpoint}")
    yield a
    a.stop()


def attrs(kv_list) -> dict:
    out = {}
    for kv in kv_list:
        v = kv.value
        kind = v.WhichOneof("value")
        out[kv.key] = [getattr(x, x.WhichOneof("value")) for x in v.array_value.values] if kind == "array_value" \
            else getattr(v, kind)
    return out


def wait_for_trace(backend, trace_id: bytes, predicate, timeout: float = 20.0):
    """Spans and log records of one trace once ``predicate(spans, logs)`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        spans = [(r, s) for r, _, s in backend.spans() if s.trace_id == trace_id]
        logs = [(r, rec) for r, _, rec in backend.log_records() if rec.trace_id == trace_id]
        if predicate(spans, logs) or time.monotonic() > deadline:
            return spans, logs
        time.sleep(0.05)


def trace_of_request(backend, request_id: str, timeout: float = 20.0) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _, _, s in backend.spans():
            if attrs(s.attributes).get("request.id") == request_id and s.kind == s.SPAN_KIND_SERVER:
                return s.trace_id
        time.sleep(0.05)
    raise AssertionError(f"no server span with request.id={request_id}")


def test_one_trace_per_request_with_server_span_inference_span_and_logs(app, backend):
    rid = f"req-{uuid.uuid4()}"
    status, headers, body = app.get("/predict?batch=3&intent=classify", {"X-Request-ID": rid})
    assert status == 200 and len(json.loads(body)["labels"]) == 3
    assert headers["x-request-id"] == rid
    trace_id = trace_of_request(backend, rid)
    spans, logs = wait_for_trace(backend, trace_id, lambda s, l: len(s) >= 2 and l)
    server = [s for _, s in spans if s.kind == s.SPAN_KIND_SERVER]
    fwd = [s for _, s in spans if s.name == "ml.forward tiny-classifier"]
    assert len(server) == 1 and len(fwd) == 1
    assert fwd[0].parent_span_id == server[0].span_id or any(
        s.span_id == fwd[0].parent_span_id and s.parent_span_id == server[0].span_id for _, s in spans)
    fa = attrs(fwd[0].attributes)
    assert fa["ml.model.id"] == "tiny-classifier" and fa["ml.model.version"] == "1"
    assert fa["ml.batch_size"] == 3 and fa["ml.input.shapes"] == ["3x16"] and fa["ml.output.shapes"] == ["3x4"]
    assert fa["request.id"] == rid and fa["tag.intent"] == "classify"
    assert attrs(server[0].attributes)["request.id"] == rid
    resource = attrs(spans[0][0].attributes)
    assert resource["service.name"].endswith("-classifier") and resource["deployment.environment"] == "test"
    (log,) = [rec for _, rec in logs if rec.body.string_value == "predicted 3 rows"]
    la = attrs(log.attributes)
    assert la["request.id"] == rid and la["execution_time_ms"] == 1.0 and la["tag.intent"] == "classify"
    assert la["ml.model.id"] == "tiny-classifier"
    assert log.span_id in {s.span_id for _, s in spans}


def test_request_id_is_generated_when_absent(app, backend):
    status, headers, _ = app.get("/predict")
    assert status == 200
    rid = headers["x-request-id"]
    assert uuid.UUID(rid).version == 4
    trace_of_request(backend, rid)


def test_incoming_traceparent_is_continued(app, backend):
    trace_hex, parent_hex = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    rid = f"tp-{uuid.uuid4()}"
    status, _, _ = app.get("/predict", {"traceparent": f"00-{trace_hex}-{parent_hex}-01", "X-Request-ID": rid})
    assert status == 200
    trace_id = trace_of_request(backend, rid)
    assert trace_id.hex() == trace_hex
    spans, _ = wait_for_trace(backend, trace_id, lambda s, l: len(s) >= 2)
    server = [s for _, s in spans if s.kind == s.SPAN_KIND_SERVER][0]
    assert server.parent_span_id.hex() == parent_hex


def test_500_carries_the_stack_trace_on_the_span_and_in_an_error_log(app, backend):
    rid = f"err-{uuid.uuid4()}"
    status, headers, _ = app.get("/fail", {"X-Request-ID": rid})
    assert status == 500
    assert headers["x-request-id"] == rid
    trace_id = trace_of_request(backend, rid)

    def complete(spans, logs):
        return any(rec.severity_number >= 17 for _, rec in logs) and any(
            e.name == "exception" for _, s in spans for e in s.events)

    spans, logs = wait_for_trace(backend, trace_id, complete)
    server = [s for _, s in spans if s.kind == s.SPAN_KIND_SERVER][0]
    assert server.status.code == server.status.STATUS_CODE_ERROR
    (event,) = [e for e in server.events if e.name == "exception"]
    ea = attrs(event.attributes)
    assert ea["exception.type"].endswith("BadInput") and "feature vector has NaN" in ea["exception.stacktrace"]
    assert "Traceback" in ea["exception.stacktrace"]
    errors = [rec for _, rec in logs if rec.severity_number >= 17]
    assert errors
    la = attrs(errors[0].attributes)
    assert "BadInput" in la["exception.type"] and "Traceback" in la["exception.stacktrace"]
    assert la["request.id"] == rid


def test_debug_header_forces_keep_on_server_and_child_spans(app, backend):
    rid = f"dbg-{uuid.uuid4()}"
    status, _, _ = app.get("/predict", {"X-Request-ID": rid, "X-Debug-Trace": "true"})
    assert status == 200
    trace_id = trace_of_request(backend, rid)
    spans, _ = wait_for_trace(backend, trace_id, lambda s, l: len(s) >= 2)
    assert len(spans) >= 2
    assert all(attrs(s.attributes).get("sampling.force_keep") is True for _, s in spans)
    rid2 = f"nodbg-{uuid.uuid4()}"
    app.get("/predict", {"X-Request-ID": rid2})
    spans, _ = wait_for_trace(backend, trace_of_request(backend, rid2), lambda s, l: len(s) >= 2)
    assert not any("sampling.force_keep" in attrs(s.attributes) for _, s in spans)


@pytest.mark.parametrize("framework", ["fastapi", "flask"])
def test_requests_succeed_promptly_with_the_sidecar_unreachable(framework):
    dead = free_port()  # nothing listens here
    a = App(framework, f"http://127.0.0.1:{dead}")
    try:
        a.get("/predict")  # warm-up
        worst = 0.0
        for i in range(30):
            t0 = time.perf_counter()
            status, headers, _ = a.get("/predict?batch=4", {"X-Request-ID": f"dead-{i}"})
            worst = max(worst, time.perf_counter() - t0)
            assert status == 200 and headers["x-request-id"] == f"dead-{i}"
        status, _, _ = a.get("/fail")
        assert status == 500
        assert worst < 2.0, f"a request took {worst:.2f}s while the sidecar was down"  # export never blocks
    finally:
        a.stop()


@pytest.mark.parametrize("framework", ["fastapi", "flask"])
def test_sigterm_flushes_what_the_app_buffered(framework):
    """Kubernetes stops pods with SIGTERM: spans and logs still buffered in the app must leave first."""
    with OTLPBackend() as b:
        slow_export = {"OTEL_BSP_SCHEDULE_DELAY": "60000", "OTEL_BLRP_SCHEDULE_DELAY": "60000"}
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{b.endpoint}",
               **FAST_EXPORT, **slow_export}
        proc = subprocess.Popen([sys.executable, str(APPS / "web_app.py"), framework, str(port)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline and proc.poll() is None, "app did not start"
                    time.sleep(0.1)
            for _ in range(10):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/predict", timeout=10).read()
            assert b.items[Signal.TRACES] == 0  # still buffered (60 s export schedule)
            proc.terminate()
            proc.wait(30)
            forwards = [s for _, _, s in b.spans() if s.name.startswith("ml.forward")]
            assert len(forwards) == 10
            assert b.items[Signal.LOGS] >= 10
        finally:
            if proc.poll() is None:
                proc.kill()
