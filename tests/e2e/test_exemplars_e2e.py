"""Issue 12 through a real sidecar: every exemplar on /metrics leads to a trace the backend received.

The OTel SDK sends traces (a server span and a child, some errors, varied latency) to a
sidecar process running span_metrics -> tail_sampling (errors + 10%) -> OTLP backend. Once
every trace is decided and every kept one is in the backend, /metrics is scraped as
OpenMetrics and each exemplar's trace id is looked up in the backend. Prints the share
found (run with ``-s``); before exemplars waited for the decision it was about 0.1 for
non-error series (docs/exemplars.md).
"""

from __future__ import annotations

import random
import time
import urllib.request

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from sidecar.testing import OTLPBackend, SidecarProcess, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

TRACES = 400


def config(backend: str, grpc_port: int, metrics_port: int) -> str:
    return f"""
receivers:
  otlp:
    protocols:
      grpc: {{endpoint: 127.0.0.1:{grpc_port}}}
processors:
  span_metrics: {{}}
  tail_sampling:
    decision_wait: 2s
    decision_wait_after_root_received: 200ms
    policies:
      - {{name: errors, type: status_code, status_code: {{status_codes: [ERROR]}}}}
      - {{name: rest, type: probabilistic, probabilistic: {{sampling_percentage: 10}}}}
exporters:
  otlp/backend:
    endpoint: {backend}
    tls: {{insecure: true}}
service:
  telemetry:
    metrics: {{address: 127.0.0.1:{metrics_port}}}
  pipelines:
    traces: {{receivers: [otlp], processors: [span_metrics, tail_sampling], exporters: [otlp/backend]}}
"""


def send_traffic(grpc_port: int) -> None:
    """TRACES traces from the real SDK, in many small export requests (many exemplar candidates)."""
    rnd = random.Random(12)
    provider = TracerProvider(resource=Resource.create({"service.name": "inference"}))
    provider.add_span_processor(BatchSpanProcessor(
        OTLPSpanExporter(endpoint=f"127.0.0.1:{grpc_port}", insecure=True),
        max_export_batch_size=32, schedule_delay_millis=50))
    tracer = provider.get_tracer("e2e")
    t0 = time.time_ns()
    for i in range(TRACES):
        start = t0 + i * 1_000_000
        duration = int(rnd.lognormvariate(3, 1) * 1_000_000)  # ms-scale, long tail
        root = tracer.start_span(rnd.choice(["POST /predict", "POST /generate"]), kind=SpanKind.SERVER,
                                 start_time=start)
        with_error = rnd.random() < 0.05
        child = tracer.start_span("forward", context=_ctx(root), start_time=start + 1000,
                                  attributes={"ml.model.id": "resnet", "ml.model.version": rnd.choice(["v1", "v2"])})
        if with_error:
            child.set_status(Status(StatusCode.ERROR))
            root.set_status(Status(StatusCode.ERROR))
        child.end(end_time=start + duration - 1000)
        root.end(end_time=start + duration)
    provider.force_flush(30_000)
    provider.shutdown()


def _ctx(span):
    from opentelemetry import trace

    return trace.set_span_in_context(span)


def scrape(port: int, openmetrics: bool = False) -> str:
    headers = {"Accept": "application/openmetrics-text; version=1.0.0"} if openmetrics else {}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read().decode()


def decided(port: int) -> dict[str, float]:
    """sidecar_tail_sampling_traces_total by decision."""
    out: dict[str, float] = {}
    for fam in parse_text(scrape(port)):
        for s in fam.samples:
            if s.name == "sidecar_tail_sampling_traces_total":
                out[s.labels["decision"]] = out.get(s.labels["decision"], 0) + s.value
    return out


def exemplars(port: int) -> list[tuple[str, str]]:
    """(status_code label, trace id) of every exemplar on the span-metrics duration histogram."""
    out = []
    for fam in parse_openmetrics(scrape(port, openmetrics=True)):
        for s in fam.samples:
            if s.name.startswith("traces_span_metrics_duration_seconds") and s.exemplar is not None:
                out.append((s.labels["status_code"], s.exemplar.labels["trace_id"]))
    return out


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("env", [{}, {"SIDECAR_PURE_PYTHON": "1"}], ids=["c", "python"])
def test_every_exemplar_trace_id_is_a_trace_the_backend_received(env):
    grpc_port, metrics_port = free_port(), free_port()
    with OTLPBackend() as backend, SidecarProcess(config(backend.endpoint, grpc_port, metrics_port), env=env):
        send_traffic(grpc_port)
        wait_for(lambda: sum(decided(metrics_port).values()) >= TRACES, 60, f"{TRACES} decisions")
        n_kept = decided(metrics_port).get("sampled", 0)
        stored = wait_for(lambda: (ids := {s.trace_id.hex() for _, _, s in backend.spans()}) and
                          len(ids) >= n_kept and ids, 60, f"{n_kept} kept traces in the backend")
        found = exemplars(metrics_port)
        non_error = [t for code, t in found if code != "STATUS_CODE_ERROR"]
        share = sum(t in stored for _, t in found) / max(len(found), 1)
        share_ok = sum(t in stored for t in non_error) / max(len(non_error), 1)
        print(f"\nexemplars: {len(found)} ({len(non_error)} non-error); traces kept {n_kept:.0f}/{TRACES}; "
              f"share of exemplar trace ids in the backend: {share:.2f} (non-error {share_ok:.2f})")
        assert found and non_error, "no exemplars at all: the gate would be vacuous"
        assert share == 1.0 and share_ok == 1.0
