"""``opentelemetry-instrument uvicorn app:app``: this project's distro, configurator and instrumentors, for real.

A plain FastAPI app (no import of ours) runs under the OpenTelemetry launcher against a real
OTLP/gRPC receiver; every span and log arrives once, with request ids and redaction.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from sidecar.signals import Signal
from sidecar.testing import OTLPBackend, free_port

from .conftest import APPS

pytestmark = pytest.mark.e2e
LAUNCHER = Path(sys.executable).with_name("opentelemetry-instrument")


def attrs(item) -> dict:
    return {kv.key: next(iter(kv.value.ListFields()))[1] if kv.value.ListFields() else None for kv in item.attributes}


def wait_until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(params=[{}, {"APP_CONFIGURES_ITSELF": "1"}, {"OTEL_SEMCONV_STABILITY_OPT_IN": "http/dup"}],
                ids=["plain-app", "app-calls-configure-too", "semconv-dup"])
def served(request):
    """Start the app under opentelemetry-instrument; yield (base url, backend, process, extra env)."""
    port = free_port()
    with OTLPBackend() as backend:
        # not ROOT: its (ignored, possibly stale) egg-info would shadow the installed entry points
        env = {**os.environ, "PYTHONPATH": str(APPS),
               "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{backend.endpoint}", "OTEL_SERVICE_NAME": "auto-app",
               "OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_BLRP_SCHEDULE_DELAY": "50",
               "OTEL_METRIC_EXPORT_INTERVAL": "500"}
        for k in ("OTEL_PYTHON_DISTRO", "OTEL_PYTHON_CONFIGURATOR", "OTEL_SEMCONV_STABILITY_OPT_IN",
                  "OTEL_TRACES_EXPORTER", "OTEL_LOGS_EXPORTER", "OTEL_METRICS_EXPORTER"):
            env.pop(k, None)
        env.update(request.param)
        proc = subprocess.Popen([str(LAUNCHER), sys.executable, "-m", "uvicorn", "auto_app:app",
                                 "--port", str(port), "--log-level", "warning"],
                                env=env, cwd=APPS, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert proc.poll() is None, proc.communicate()
            try:
                return httpx.get(url + "/docs", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_until(up, "the app to serve", timeout=60)
            yield url, backend, proc, request.param
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def test_each_span_and_log_once_with_request_ids_force_keep_and_redaction(served):
    url, backend, proc, extra = served
    r = httpx.get(url + "/predict", params={"user": "jane.doe@example.com"},
                  headers={"X-Request-ID": "req-auto-1", "X-Debug-Trace": "1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-auto-1"
    r = httpx.get(url + "/fail", headers={"X-Request-ID": "req-auto-2"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "req-auto-2"
    wait_until(lambda: len([s for _, _, s in backend.spans() if s.kind == 2]) >= 3 and
               len(backend.log_records()) >= 2, "server spans and logs")  # /docs, /predict, /fail

    proc.send_signal(signal.SIGTERM)  # uvicorn's graceful shutdown, then our flush
    _, stderr = proc.communicate(timeout=30)

    spans = [s for _, _, s in backend.spans()]
    ids = [(s.trace_id, s.span_id) for s in spans]
    assert len(ids) == len(set(ids)), "a span was exported twice"
    server = {attrs(s).get("request.id"): s for s in spans if s.kind == 2}  # SERVER
    assert len([s for s in spans if s.kind == 2]) == 3, [s.name for s in spans]  # one server span per request
    predict, failed = server["req-auto-1"], server["req-auto-2"]
    a = attrs(predict)
    assert a["sampling.force_keep"] is True
    assert a["http.request.method"] == "GET" and a["http.response.status_code"] == 200  # stable semconv
    assert attrs(failed)["http.response.status_code"] == 500
    if extra.get("OTEL_SEMCONV_STABILITY_OPT_IN") == "http/dup":  # old and new names side by side
        assert a["http.method"] == "GET" and a["http.status_code"] == 200
    else:
        assert "http.method" not in a and "http.status_code" not in a

    logs = [rec for _, _, rec in backend.log_records()]
    keys = [(rec.trace_id, rec.time_unix_nano, rec.body.string_value) for rec in logs]
    assert len(keys) == len(set(keys)), "a log record was exported twice"
    (info,) = [rec for rec in logs if rec.body.string_value.startswith("scoring for")]
    assert "jane.doe@example.com" not in info.body.string_value  # redacted in process
    assert attrs(info)["request.id"] == "req-auto-1" and info.trace_id == predict.trace_id
    (error,) = [rec for rec in logs if attrs(rec).get("exception.type") == "RuntimeError"]
    assert attrs(error)["request.id"] == "req-auto-2"
    # the developer watching the console sees the 500's traceback too
    assert "RuntimeError: model weights missing" in stderr and "Traceback" in stderr
    assert backend.items[Signal.METRICS] > 0


def test_stops_within_the_shutdown_deadline_with_the_sidecar_gone():
    """uvicorn's graceful stop, the lifespan flush and SIGTERM share one 5 s deadline, sidecar or not."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(APPS), "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    for k in ("OTEL_PYTHON_DISTRO", "OTEL_PYTHON_CONFIGURATOR", "OTEL_TRACES_EXPORTER", "OTEL_LOGS_EXPORTER",
              "OTEL_METRICS_EXPORTER"):
        env.pop(k, None)
    proc = subprocess.Popen([str(LAUNCHER), sys.executable, "-m", "uvicorn", "auto_app:app", "--port", str(port)],
                            env=env, cwd=APPS, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def up() -> bool:
            assert proc.poll() is None, proc.communicate()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/predict", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, "the app to serve", timeout=60)
        for _ in range(20):
            httpx.get(f"http://127.0.0.1:{port}/predict")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        elapsed = time.monotonic() - t0
        print(f"stopped in {elapsed:.2f} s")
        assert elapsed < 5 + 2.5, stderr
        assert "torch-otel: " in stderr  # the failure was reported, once per signal
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("extra", [{}, {"APP_CONFIGURES_ITSELF": "1"}], ids=["plain-app", "app-calls-configure-too"])
def test_flask_app_under_the_launcher(extra):
    port = free_port()
    with OTLPBackend() as backend:
        env = {**os.environ, "PYTHONPATH": str(APPS), "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{backend.endpoint}",
               "OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_BLRP_SCHEDULE_DELAY": "50", **extra}
        for k in ("OTEL_PYTHON_DISTRO", "OTEL_PYTHON_CONFIGURATOR", "OTEL_SEMCONV_STABILITY_OPT_IN",
                  "OTEL_TRACES_EXPORTER", "OTEL_LOGS_EXPORTER", "OTEL_METRICS_EXPORTER"):
            env.pop(k, None)
        proc = subprocess.Popen([str(LAUNCHER), sys.executable, str(APPS / "auto_flask_app.py"), str(port)],
                                env=env, cwd=APPS, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            def up() -> bool:
                assert proc.poll() is None, proc.communicate()
                try:
                    return httpx.get(f"http://127.0.0.1:{port}/predict", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(up, "the app to serve", timeout=60)
            r = httpx.get(f"http://127.0.0.1:{port}/predict", params={"user": "jane.doe@example.com"},
                          headers={"X-Request-ID": "req-flask-1"})
            assert r.headers["x-request-id"] == "req-flask-1"
            r = httpx.get(f"http://127.0.0.1:{port}/fail", headers={"X-Request-ID": "req-flask-2"})
            assert r.status_code == 500 and r.headers["x-request-id"] == "req-flask-2"
            wait_until(lambda: len([s for _, _, s in backend.spans() if s.kind == 2]) >= 3, "server spans")
            wait_until(lambda: any(attrs(r).get("request.id") == "req-flask-2" for _, _, r in backend.log_records()),
                       "the error log")
        finally:
            proc.kill()
            proc.communicate()
        spans = [s for _, _, s in backend.spans()]
        server = [s for s in spans if s.kind == 2]
        assert len(server) == 3 and len({s.span_id for s in spans}) == len(spans)  # one server span a request
        by_rid = {attrs(s).get("request.id"): s for s in server}
        assert attrs(by_rid["req-flask-1"])["http.request.method"] == "GET"
        failed = by_rid["req-flask-2"]
        assert [e.name for e in failed.events].count("exception") == 1
        logs = [rec for _, _, rec in backend.log_records()]
        (info,) = [rec for rec in logs if attrs(rec).get("request.id") == "req-flask-1"]  # once
        assert info.body.string_value.startswith("scoring for") and "jane.doe" not in info.body.string_value
