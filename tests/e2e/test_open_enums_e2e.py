"""Issue 9 items 1 and 2, and issue 8's unknown group, through a real sidecar process on both scanner halves.

Spans with a kind or status code outside the known range (enums are open: 7, 3, 2**31-1, negative)
and spans holding an unknown group are valid OTLP. Sent over gRPC and OTLP/HTTP to a real
``python -m sidecar`` running span_metrics -> tail_sampling -> batch -> otlp, each request must be
answered OK, reach the backend, be counted in /metrics under its number, and leave /metrics
serving (HTTP 200) and the span-metrics OTLP export flowing, with the sidecar's memory bounded: once,
one such span broke /metrics and the export until restart, a negative code was answered INTERNAL,
and 2**31-1 allocated 256 MiB on the pure path.
"""

from __future__ import annotations

import time
import urllib.request

import grpc
import psutil
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidecar.signals import Signal
from sidecar.testing import OTLPBackend, SidecarProcess, free_port
from tests.sidecar.wire_gen import tag, varint

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

OPEN_ENUMS = [7, 3, 2**31 - 1, -1, -(2**31)]
TRACE_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def config(backend: str, grpc_port: int, http_port: int, metrics_port: int) -> str:
    return f"""
receivers:
  otlp:
    protocols:
      grpc: {{endpoint: 127.0.0.1:{grpc_port}}}
      http: {{endpoint: 127.0.0.1:{http_port}}}
processors:
  span_metrics: {{metrics_flush_interval: 200ms}}
  tail_sampling:
    decision_wait: 300ms
    policies:
      - {{name: errors, type: status_code, status_code: {{status_codes: [ERROR]}}}}
      - {{name: everything, type: always_sample}}
  batch: {{timeout: 50ms}}
exporters:
  otlp/backend:
    endpoint: {backend}
    tls: {{insecure: true}}
service:
  telemetry:
    metrics: {{address: 127.0.0.1:{metrics_port}}}
  pipelines:
    traces: {{receivers: [otlp], processors: [span_metrics, tail_sampling, batch], exporters: [otlp/backend]}}
    metrics: {{receivers: [otlp], processors: [span_metrics], exporters: [otlp/backend]}}
"""


def open_enum_request(first: int) -> bytes:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "enum-svc"
    ss = rs.scope_spans.add()
    for i, code in enumerate(OPEN_ENUMS):
        sp = ss.spans.add(trace_id=(first + i).to_bytes(16, "big"), span_id=b"s" * 8, name="op", kind=code,
                          start_time_unix_nano=1_700_000_000_000_000_000, end_time_unix_nano=1_700_000_000_001_000_000)
        sp.status.code = code
    return req.SerializeToString()


def unknown_group_request(first: int) -> bytes:
    """One span with an unknown group (field 99, with a nested group inside) before its known fields."""
    group = tag(99, 3) + tag(1, 0) + varint(5) + tag(7, 3) + tag(2, 2) + b"\x01x" + tag(7, 4) + tag(99, 4)
    span = group + tag(1, 2) + varint(16) + first.to_bytes(16, "big") + tag(2, 2) + varint(8) + b"s" * 8 \
        + tag(5, 2) + b"\x07grouped"
    scope = tag(2, 2) + varint(len(span)) + span
    resource = tag(2, 2) + varint(len(scope)) + scope
    data = tag(1, 2) + varint(len(resource)) + resource
    assert ExportTraceServiceRequest.FromString(data).resource_spans[0].scope_spans[0].spans[0].name == "grouped"
    return data


def post(url: str, body: bytes) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/x-protobuf"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def scrape(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


@pytest.mark.parametrize("env", [{}, {"SIDECAR_PURE_PYTHON": "1"}], ids=["c", "python"])
def test_open_enums_and_unknown_groups_are_accepted_counted_and_forwarded(env):
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    with OTLPBackend() as backend, SidecarProcess(config(backend.endpoint, grpc_port, http_port, metrics_port),
                                                  env=env) as sc:
        rss_before = psutil.Process(sc.pid).memory_info().rss
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        export = channel.unary_unary(TRACE_EXPORT, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        export(open_enum_request(1_000), timeout=10)  # raises on any status but OK
        export(unknown_group_request(2_000), timeout=10)
        assert post(f"http://127.0.0.1:{http_port}/v1/traces", open_enum_request(3_000))[0] == 200
        assert post(f"http://127.0.0.1:{http_port}/v1/traces", unknown_group_request(4_000))[0] == 200

        sent = 2 * len(OPEN_ENUMS) + 2
        assert backend.wait_for_items(Signal.TRACES, sent, timeout=30), backend.items
        spans = [span for _, _, span in backend.spans()]
        assert sorted(s.name for s in spans) == sorted(["op"] * 2 * len(OPEN_ENUMS) + ["grouped"] * 2)
        assert sorted(s.kind for s in spans if s.name == "op") == sorted(OPEN_ENUMS * 2)  # carried as received
        assert sorted(s.status.code for s in spans if s.name == "op") == sorted(OPEN_ENUMS * 2)

        status, text = scrape(metrics_port)
        assert status == 200
        for code in (7, 2**31 - 1, -1):
            assert f'span_kind="{code}"' in text and f'status_code="{code}"' in text
        assert 'span_name="grouped"' in text
        def exported_codes() -> set[str]:
            return {kv.value.string_value for _, _, m in backend.metrics() if m.name.endswith(".calls")
                    for dp in m.sum.data_points for kv in dp.attributes if kv.key == "status.code"}

        deadline = time.monotonic() + 30
        while not {"7", "2147483647", "-1"} <= exported_codes() and time.monotonic() < deadline:
            backend.wait_for_items(Signal.METRICS, backend.items[Signal.METRICS] + 1, timeout=1)
        assert {"7", "2147483647", "-1"} <= exported_codes()  # the span-metrics export carries them
        rss_after = psutil.Process(sc.pid).memory_info().rss
        assert rss_after - rss_before < 100 * 1024 * 1024, (rss_before, rss_after)
        assert sc.proc.poll() is None
