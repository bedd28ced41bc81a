"""One file, two processes: the app and a real sidecar redact alike from rules written with ${env:…}.

The sidecar runs as a child process from the file; the app's redacting exporter reads the
same file. The same span goes through both; the backend and the app's output must agree.
A quoted ``"${env:EXPERIMENT_ID}"`` with ``EXPERIMENT_ID=0`` must start the sidecar and reach
the backend as the header text ``0``.
"""

from __future__ import annotations

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HTTPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from instrumentation.redaction import RedactingSpanExporter
from sidecar.signals import Signal
from sidecar.testing import OTLPHTTPBackend, SidecarProcess, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

CONFIG = """\
receivers:
  otlp:
    protocols:
      http: {{endpoint: "127.0.0.1:${{env:SIDECAR_HTTP_PORT}}"}}
processors:
  redaction:
    blocked_values:
      - name: order_id
        pattern: ${{env:ORDER_ID_PATTERN}}
        replacement: ${{env:ORDER_MASK:-[ORDER]}}
exporters:
  otlphttp:
    endpoint: {backend}
    headers: {{x-mlflow-experiment-id: "${{env:EXPERIMENT_ID}}"}}
service:
  telemetry:
    metrics: {{address: "127.0.0.1:${{env:SIDECAR_METRICS_PORT}}"}}
  pipelines:
    traces: {{receivers: [otlp], processors: [redaction], exporters: [otlphttp]}}
"""


def test_app_and_sidecar_redact_alike_from_one_file(tmp_path, monkeypatch):
    http_port = free_port()
    env = {"ORDER_ID_PATTERN": r"ORD-\d{4}", "EXPERIMENT_ID": "0",
           "SIDECAR_HTTP_PORT": str(http_port), "SIDECAR_METRICS_PORT": str(free_port())}
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # the app reads the process environment, as in its pod
    monkeypatch.delenv("ORDER_MASK", raising=False)
    with OTLPHTTPBackend() as backend, \
            SidecarProcess(CONFIG.format(backend=backend.endpoint), workdir=tmp_path, env=env) as sidecar:
        app_output = InMemorySpanExporter()
        provider = TracerProvider(resource=Resource.create({"service.name": "shop"}))
        provider.add_span_processor(SimpleSpanProcessor(RedactingSpanExporter(app_output, str(sidecar.config_path))))
        provider.add_span_processor(SimpleSpanProcessor(
            HTTPSpanExporter(endpoint=f"http://127.0.0.1:{http_port}/v1/traces")))  # unredacted, to the sidecar
        with provider.get_tracer("tests.contract").start_as_current_span(
                "refund", attributes={"note": "refund ORD-1234 today"}):
            pass
        provider.shutdown()
        assert backend.wait_for_items(Signal.TRACES, 1, timeout=30), sidecar.log()

    (app_span,) = app_output.get_finished_spans()
    ((_, _, backend_span),) = backend.spans()
    sidecar_note = next(kv.value.string_value for kv in backend_span.attributes if kv.key == "note")
    assert app_span.attributes["note"] == sidecar_note == "refund [ORDER] today"
    assert {h.get("HTTP_X_MLFLOW_EXPERIMENT_ID") for h in backend.headers_seen} == {"0"}
