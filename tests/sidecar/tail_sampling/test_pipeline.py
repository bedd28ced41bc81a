"""The recommended pipeline in-process over real gRPC: span_metrics -> tail_sampling, one instance for traces and logs."""

from __future__ import annotations


import grpc
import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from sidecar.config import parse_config
from sidecar.pipeline import Service
from sidecar.signals import Signal
from sidecar.testing import OTLPBackend, free_port

from .helpers import logs_request, span, tid, traces_request

CONFIG = """
receivers:
  otlp: {{protocols: {{grpc: {{endpoint: 127.0.0.1:{port}}}}}}}
processors:
  span_metrics: {{}}
  tail_sampling:
    decision_wait: 5s
    decision_wait_after_root_received: 20ms
    policies:
      - {{name: errors, type: status_code, status_code: {{status_codes: [ERROR]}}}}
      - {{name: debug, type: boolean_attribute, boolean_attribute: {{key: sampling.force_keep, value: true}}}}
      - {{name: rest, type: probabilistic, probabilistic: {{sampling_percentage: 10}}}}
exporters:
  otlp: {{endpoint: "{backend}", tls: {{insecure: true}}}}
service:
  telemetry: {{metrics: {{address: null}}}}
  pipelines:
    traces: {{receivers: [otlp], processors: [span_metrics, tail_sampling], exporters: [otlp]}}
    logs: {{receivers: [otlp], processors: [tail_sampling], exporters: [otlp]}}
"""


@pytest.mark.timeout(60)
def test_errors_forced_and_ten_percent_with_their_logs_reach_the_backend():
    with OTLPBackend() as backend:
        port = free_port()
        service = Service(parse_config(CONFIG.format(port=port, backend=backend.endpoint), environ={}))
        service.start()
        try:
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            traces_stub = trace_service_pb2_grpc.TraceServiceStub(channel)
            logs_stub = logs_service_pb2_grpc.LogsServiceStub(channel)
            errors = [tid() for _ in range(20)]
            forced = [tid() for _ in range(20)]
            plain = [tid() for _ in range(400)]
            spans = [s for t in errors for s in (span(t), span(t, root=True, error=True))]
            spans += [s for t in forced for s in (span(t, attrs={"sampling.force_keep": True}), span(t, root=True))]
            spans += [s for t in plain for s in (span(t), span(t, root=True))]
            for i in range(0, len(spans), 100):
                logs_stub.Export(logs_request(*[(s.trace_id, 9, "info") for s in spans[i:i + 100]]), timeout=10)
                traces_stub.Export(traces_request(*spans[i:i + 100]), timeout=10)
            threshold = 0xe6666666666666
            expected = set(errors) | set(forced) | {t for t in plain if int.from_bytes(t[9:], "big") >= threshold}
            assert backend.wait_for_items(Signal.TRACES, 2 * len(expected), timeout=30)
            assert backend.wait_for_items(Signal.LOGS, 2 * len(expected), timeout=30)
            channel.close()
        finally:
            service.shutdown(10)
        got = {s.trace_id for _, _, s in backend.spans()}
        assert got == expected
        assert {r.trace_id for _, _, r in backend.log_records()} == expected
        reg = service.telemetry.registry
        assert reg.get_sample_value("traces_span_metrics_calls_total", {
            "service_name": "svc", "span_name": "op", "span_kind": "SPAN_KIND_UNSPECIFIED",
            "status_code": "STATUS_CODE_ERROR", "model_id": "", "model_version": ""}) == 20
        assert reg.get_sample_value("traces_span_metrics_calls_total", {
            "service_name": "svc", "span_name": "op", "span_kind": "SPAN_KIND_UNSPECIFIED",
            "status_code": "STATUS_CODE_UNSET", "model_id": "", "model_version": ""}) == 860
