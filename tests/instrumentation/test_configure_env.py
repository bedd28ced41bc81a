"""The standard OTEL_* variables per signal, bounded flush with the sidecar down, stderr, redaction counts."""

from __future__ import annotations

import re

import pytest

from instrumentation._exporters import StderrLimiter, endpoint_for, exporter_names, protocol_for
from sidecar.testing import OTLPBackend, OTLPHTTPBackend, free_port

from .conftest import run_script

FAST = {"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_BLRP_SCHEDULE_DELAY": "50"}
CLEAN = {k: "" for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_TRACES_EXPORTER",
                         "OTEL_LOGS_EXPORTER", "OTEL_METRICS_EXPORTER")}


def test_each_signal_goes_where_its_own_variables_say():
    with OTLPBackend() as grpc_backend, OTLPHTTPBackend() as http_backend:
        run_script("configure_scenarios.py", "per-signal", env={
            **CLEAN, **FAST,
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{grpc_backend.endpoint}",   # gRPC by default
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",           # only traces over HTTP
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{http_backend.endpoint}/v1/traces",
            "OTEL_METRICS_EXPORTER": "none"})
        assert [s.name for _, _, s in http_backend.spans()] == ["per-signal"]
        assert grpc_backend.spans() == [] and http_backend.log_records() == []
        assert [r.body.string_value for _, _, r in grpc_backend.log_records()] == ["log from per-signal"]
        assert grpc_backend.metrics() == [] and http_backend.metrics() == []


def test_exporter_none_exports_nothing_for_that_signal():
    with OTLPBackend() as backend:
        run_script("configure_scenarios.py", "per-signal", env={
            **CLEAN, **FAST, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{backend.endpoint}",
            "OTEL_TRACES_EXPORTER": "none", "OTEL_LOGS_EXPORTER": "otlp"})
        assert backend.spans() == []
        assert len(backend.log_records()) == 1 and backend.metrics()


def test_console_exporter_from_the_environment():
    proc = run_script("configure_scenarios.py", "per-signal", env={
        **CLEAN, **FAST, "OTEL_TRACES_EXPORTER": "console", "OTEL_LOGS_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "none"})
    assert '"name": "per-signal"' in proc.stdout


def test_after_the_sdks_own_configurator_each_span_and_log_once_redacted():
    """The issue's setup: a distro configured the SDK, then the app calls configure() too."""
    with OTLPBackend() as backend:
        run_script("configure_scenarios.py", "sdk-configurator", env={
            **CLEAN, **FAST, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{backend.endpoint}",
            "OTEL_TRACES_EXPORTER": "otlp", "OTEL_LOGS_EXPORTER": "otlp", "OTEL_METRICS_EXPORTER": "none",
            "OTEL_PYTHON_LOGGING_AUTO_INSTRUMENTATION_ENABLED": "true"})
        (span,) = [s for _, _, s in backend.spans()]
        note = {kv.key: kv.value.string_value for kv in span.attributes}
        assert note["request.id"] == "req-9" and "jane.doe@example.com" not in note["note"]
        (log,) = [r for _, _, r in backend.log_records()]
        assert "jane.doe@example.com" not in log.body.string_value and log.trace_id == span.trace_id
        assert {kv.key: kv.value.string_value for kv in log.attributes}["request.id"] == "req-9"


def test_variable_rules_and_errors():
    env = {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL": "grpc",
           "OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}
    assert protocol_for("traces", None, env) == "http/protobuf" and protocol_for("logs", None, env) == "grpc"
    assert protocol_for("logs", "http/protobuf", env) == "http/protobuf"  # an explicit argument wins
    assert endpoint_for("traces", "http/protobuf", None, env) == "http://collector:4318/v1/traces"
    assert endpoint_for("metrics", "grpc", None, {}) == "http://127.0.0.1:4317"  # the sidecar: plaintext
    assert endpoint_for("logs", "grpc", None, env) == "collector:4318"  # TLS or not: OTEL_EXPORTER_OTLP_INSECURE
    assert exporter_names("logs", {"OTEL_LOGS_EXPORTER": "console, otlp"}) == ["console", "otlp"]
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: must be"):
        protocol_for("traces", None, {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"})
    with pytest.raises(ValueError, match="OTEL_METRICS_EXPORTER: 'none' cannot"):
        exporter_names("metrics", {"OTEL_METRICS_EXPORTER": "none,otlp"})


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_flush_and_shutdown_return_within_their_deadline_with_the_sidecar_down(protocol):
    proc = run_script("configure_scenarios.py", "unreachable", env={
        **CLEAN, "ENDPOINT": f"127.0.0.1:{free_port()}", "PROTOCOL": protocol})
    m = re.search(r"flush ([\d.]+) ok (\w+) shutdown ([\d.]+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    flush, ok, stop = float(m[1]), m[2], float(m[3])
    assert ok == "False"  # nothing could be sent: the flush says so instead of waiting
    assert flush < 1.0 + 0.5 and stop < 1.0 + 0.5, (flush, stop)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("torch-otel: ")]
    # the failure is on stderr, as one line per signal (rate-limited), not one per retry or batch
    signals = [m[1] for m in (re.search(r"(?:exporting (?:\d+ )?|/v1/)(traces|logs|metrics)\b", ln) for ln in lines) if m]
    assert signals, proc.stderr  # the failure is shown, naming its signal
    assert len(set(signals)) == len(signals), proc.stderr  # never two lines for one signal


def test_app_without_logging_setup_still_sees_its_errors_and_exports_info():
    with OTLPBackend() as backend:
        proc = run_script("configure_scenarios.py", "console", env={**CLEAN, **FAST, "ENDPOINT": backend.endpoint})
        assert "error shown on the console too" in proc.stderr
        assert "info goes to the sidecar only" not in proc.stderr
        bodies = sorted(r.body.string_value for _, _, r in backend.log_records())
        assert bodies == ["error shown on the console too", "info goes to the sidecar only"]


def test_in_process_redaction_counts_are_exported_like_the_sidecars():
    with OTLPBackend() as backend:
        run_script("configure_scenarios.py", "redaction-counts", env={**CLEAN, **FAST, "ENDPOINT": backend.endpoint})
        (log,) = [r for _, _, r in backend.log_records()]
        assert "4111" not in log.body.string_value
        counts = {}
        for _, _, metric in backend.metrics():
            if metric.name == "sidecar_redaction_values":
                assert metric.sum.is_monotonic
                for p in metric.sum.data_points:
                    labels = {kv.key: kv.value.string_value for kv in p.attributes}
                    counts[(labels["component"], labels["rule"], labels["action"])] = p.as_int
        assert counts[("in_process", "email", "mask")] == 1
        assert counts[("in_process", "payment_card", "mask")] == 1


def test_stderr_limiter_holds_back_repeats_and_counts_them():
    import io

    out = io.StringIO()
    limiter = StderrLimiter(interval=3600, stream=out)
    assert limiter.report("traces", "down") and not limiter.report("traces", "down")
    assert limiter.report("logs", "down")  # per signal
    limiter.interval = 0
    limiter.report("traces", "still down")
    assert out.getvalue().splitlines() == ["torch-otel: down", "torch-otel: down",
                                           "torch-otel: still down (1 more since the last report)"]
