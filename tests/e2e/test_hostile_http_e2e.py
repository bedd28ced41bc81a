"""Issue 9: slow and lying HTTP clients cannot blind the OTLP/HTTP receiver of a real sidecar process.

120 connections that send half a request line and then stall (slowloris), and a few that promise a
body they never send (a lying ``Content-Length``), once made every OTLP/HTTP export time out while
``/healthz`` stayed green. Here a normal export by the OTel SDK succeeds while they hang on, and
the sidecar cuts each of them off after its read timeout and counts it on ``/metrics``.
"""

from __future__ import annotations

import re
import socket
import time
import urllib.request

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sidecar.signals import Signal
from sidecar.testing import OTLPBackend, SidecarProcess, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

SLOW = 120
LYING = 5


def config(backend: str, http_port: int, metrics_port: int) -> str:
    return f"""
receivers:
  otlp:
    protocols:
      http: {{endpoint: 127.0.0.1:{http_port}, read_header_timeout: 3s, read_timeout: 4s}}
exporters:
  otlp/backend:
    endpoint: {backend}
    tls: {{insecure: true}}
service:
  telemetry:
    metrics: {{address: 127.0.0.1:{metrics_port}}}
  pipelines:
    traces: {{receivers: [otlp], exporters: [otlp/backend]}}
"""


def refused(metrics_port: int, reason: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    m = re.search(r'sidecar_receiver_requests_refused_total\{[^}]*protocol="http",reason="%s"\} (\S+)' % reason, text)
    return float(m.group(1)) if m else 0.0


def closed_by_server(sock: socket.socket, deadline: float) -> bool:
    sock.settimeout(max(0.1, deadline - time.monotonic()))
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except OSError:
        return False


def finished_spans(n: int):
    memory = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(memory))
    tracer = tp.get_tracer("test")
    for i in range(n):
        with tracer.start_as_current_span(f"predict-{i}"):
            pass
    return memory.get_finished_spans()


@pytest.mark.parametrize("env", [{}, {"SIDECAR_PURE_PYTHON": "1"}], ids=["c", "python"])
def test_a_normal_export_succeeds_while_120_slow_clients_hang_on_and_they_are_cut_off_and_counted(env):
    http_port, metrics_port = free_port(), free_port()
    with OTLPBackend() as backend, SidecarProcess(config(backend.endpoint, http_port, metrics_port), env=env):
        hostile = []
        for _ in range(SLOW):
            s = socket.create_connection(("127.0.0.1", http_port))
            s.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: sidecar\r\n")  # the headers never end
            hostile.append(s)
        for _ in range(LYING):
            s = socket.create_connection(("127.0.0.1", http_port))
            s.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: sidecar\r\nContent-Type: application/x-protobuf\r\n"
                      b"Content-Length: 100000\r\n\r\n" + b"\n" * 10)  # promises 100 kB, sends 10 bytes
            hostile.append(s)

        exporter = OTLPSpanExporter(endpoint=f"http://127.0.0.1:{http_port}/v1/traces", timeout=10)
        assert exporter.export(finished_spans(3)) is SpanExportResult.SUCCESS
        # answered while every slow client still held its connection, not after they were cut off
        assert refused(metrics_port, "read_header_timeout") == refused(metrics_port, "read_timeout") == 0
        assert backend.wait_for_items(Signal.TRACES, 3, timeout=30)

        deadline = time.monotonic() + 30
        assert all(closed_by_server(s, deadline) for s in hostile)
        for s in hostile:
            s.close()
        assert refused(metrics_port, "read_header_timeout") == SLOW
        assert refused(metrics_port, "read_timeout") == LYING
        assert exporter.export(finished_spans(1)) is SpanExportResult.SUCCESS  # still serving
        assert backend.wait_for_items(Signal.TRACES, 4, timeout=30)


# --- SIGTERM with the backend down: the loss is reported and the exit code says so ----------------------


def loss_config(backend: str, grpc_port: int) -> str:
    return f"""
receivers:
  otlp:
    protocols:
      grpc: {{endpoint: 127.0.0.1:{grpc_port}}}
exporters:
  otlp/backend:
    endpoint: {backend}
    tls: {{insecure: true}}
    timeout: 1s
    sending_queue: {{num_consumers: 2, queue_size: 1000}}
    retry_on_failure: {{initial_interval: 100ms, max_interval: 200ms, max_elapsed_time: 10m}}
service:
  shutdown_timeout: 2s
  pipelines:
    traces: {{receivers: [otlp], exporters: [otlp/backend]}}
"""


@pytest.mark.parametrize("env", [{}, {"SIDECAR_PURE_PYTHON": "1"}], ids=["c", "python"])
def test_sigterm_with_the_backend_down_reports_the_exact_loss_and_exits_non_zero(env):
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    grpc_port = free_port()
    down = f"127.0.0.1:{free_port()}"  # nothing listens there
    requests, spans_each = 40, 256
    with SidecarProcess(loss_config(down, grpc_port), env=env) as sc:
        stub = trace_service_pb2_grpc.TraceServiceStub(grpc.insecure_channel(f"127.0.0.1:{grpc_port}"))
        for r in range(requests):
            req = ExportTraceServiceRequest()
            ss = req.resource_spans.add().scope_spans.add()
            for i in range(spans_each):
                ss.spans.add(name="predict", trace_id=(r + 1).to_bytes(16, "big"), span_id=(i + 1).to_bytes(8, "big"))
            stub.Export(req, timeout=10)  # acknowledged: raises on anything but OK
        code = sc.terminate(60)
        last = [line for line in sc.log().splitlines() if line.strip()][-1]
    acknowledged = requests * spans_each
    assert code != 0, sc.log()
    assert f"traces: 0 spans delivered, 0 on disk for the next start, {acknowledged} lost " \
           f"({acknowledged} during shutdown)" in last, last
    assert "acknowledged data was lost during shutdown" in last
