"""Issue 9 item 3 through a real sidecar: PII in a span name never reaches /metrics, the span-metrics
export or the backend's spans (span_metrics masks its labels; the redaction processor the span names)."""

from __future__ import annotations

import time
import urllib.request

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidecar.signals import Signal
from sidecar.testing import OTLPBackend, SidecarProcess, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

PII_NAME = "GET /users/jane.doe@example.com/card/4111111111111111"
SECRETS = ("jane.doe@example.com", "4111111111111111", "jane.doe%40example.com")


def config(backend: str, http_port: int, metrics_port: int) -> str:
    return f"""
receivers:
  otlp:
    protocols:
      http: {{endpoint: 127.0.0.1:{http_port}}}
processors:
  span_metrics: {{metrics_flush_interval: 200ms}}
  redaction: {{allow_all_keys: true}}
exporters:
  otlp/backend:
    endpoint: {backend}
    tls: {{insecure: true}}
service:
  telemetry:
    metrics: {{address: 127.0.0.1:{metrics_port}}}
  pipelines:
    traces: {{receivers: [otlp], processors: [span_metrics, redaction], exporters: [otlp/backend]}}
    metrics: {{receivers: [otlp], processors: [span_metrics], exporters: [otlp/backend]}}
"""


def request() -> bytes:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "shop"
    ss = rs.scope_spans.add()
    for i in range(3):
        sp = ss.spans.add(trace_id=(i + 1).to_bytes(16, "big"), span_id=b"s" * 8, name=PII_NAME, kind=2,
                          start_time_unix_nano=1_700_000_000_000_000_000, end_time_unix_nano=1_700_000_000_002_000_000)
        sp.attributes.add(key="ml.model.id").value.string_value = "jane.doe@example.com"
        sp.events.add(name=f"retry for {SECRETS[0]}", time_unix_nano=1_700_000_000_001_000_000)
    return req.SerializeToString()


@pytest.mark.parametrize("env", [{}, {"SIDECAR_PURE_PYTHON": "1"}], ids=["c", "python"])
def test_pii_in_span_names_reaches_neither_metrics_nor_the_backend(env):
    http_port, metrics_port = free_port(), free_port()
    with OTLPBackend() as backend, SidecarProcess(config(backend.endpoint, http_port, metrics_port), env=env):
        post = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/traces", data=request(),
                                      headers={"Content-Type": "application/x-protobuf"})
        with urllib.request.urlopen(post, timeout=10) as r:
            assert r.status == 200
        assert backend.wait_for_items(Signal.TRACES, 3, timeout=30)

        def exported_calls():
            return [dp for _, _, m in backend.metrics() if m.name.endswith(".calls") for dp in m.sum.data_points]

        deadline = time.monotonic() + 30
        while not exported_calls() and time.monotonic() < deadline:
            backend.wait_for_items(Signal.METRICS, backend.items[Signal.METRICS] + 1, timeout=1)
        calls = exported_calls()
        assert calls and sum(dp.as_int for dp in calls) == 3
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            scraped = r.read().decode()
        assert 'span_name="GET /users/[EMAIL]/card/[CARD]"' in scraped
        everything = scraped + "".join(str(m) for _, _, m in backend.metrics()) + \
            "".join(str(s) for _, _, s in backend.spans())
        for secret in SECRETS:
            assert secret not in everything
        assert {s.name for _, _, s in backend.spans()} == {"GET /users/[EMAIL]/card/[CARD]"}
