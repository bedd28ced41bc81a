"""Exporter shutdown counts everything before it returns: requests a worker is still pushing at the
deadline are lost (memory queue) or kept on disk (persistent queue), counted once, never later.

The old count missed them: a push still running at the deadline was counted by its worker after
shutdown had returned (the test that failed 1 run in 25), so the process reported too little.
"""

from __future__ import annotations

import threading
import time

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidecar.component import Kind
from sidecar.config import ComponentId
from sidecar.envelope import Envelope
from sidecar.exporters.base import BaseExporter, ExporterConfig
from sidecar.extensions.file_storage import FACTORY as FILE_STORAGE
from sidecar.host import Host
from sidecar.registry import CreateSettings
from sidecar.signals import Signal
from sidecar.telemetry import SelfTelemetry


class StuckBackend(BaseExporter):
    """A push that hangs until released (a backend that stopped answering), then succeeds."""

    def __init__(self, settings, cfg: ExporterConfig):
        super().__init__(settings, timeout=cfg.timeout, queue=cfg.sending_queue, retry=cfg.retry_on_failure)
        self.release = threading.Event()
        self.pushing = threading.Semaphore(0)

    def push(self, envelope: Envelope, timeout: float) -> int:
        self.pushing.release()
        self.release.wait(30)
        return 0


def traces(spans: int) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    ss = req.resource_spans.add().scope_spans.add()
    for i in range(spans):
        ss.spans.add(name=f"s{i}", trace_id=b"\1" * 16, span_id=bytes([i + 1]) * 8)
    return req


def make(tmp_path, persistent: bool):
    tel = SelfTelemetry()
    host = Host(tel)
    queue = {"num_consumers": 2, "queue_size": 100}
    if persistent:
        ext = FILE_STORAGE.create(CreateSettings(ComponentId("file_storage"), Kind.EXTENSION, None),
                                  FILE_STORAGE.config_model.model_validate({"directory": str(tmp_path), "fsync": False}),
                                  None)
        ext.start(host)
        host.extensions["file_storage"] = ext
        queue["storage"] = "file_storage"
    comp = tel.component("exporter", "stuck")
    exp = StuckBackend(CreateSettings(ComponentId("stuck"), Kind.EXPORTER, comp),
                       ExporterConfig.model_validate({"sending_queue": queue}))
    exp.start(host)
    return exp, comp


@pytest.mark.parametrize("persistent", [False, True], ids=["memory", "persistent"])
def test_requests_being_pushed_at_the_deadline_are_counted_before_shutdown_returns_and_only_once(tmp_path,
                                                                                                 persistent):
    exp, tel = make(tmp_path, persistent)
    for i in range(10):
        exp.consume(Envelope(Signal.TRACES, traces(3)))
    for _ in range(2):  # both workers are inside a push that will not return before the deadline
        assert exp.pushing.acquire(timeout=10)
    exp.shutdown(time.monotonic() + 0.2)
    sender = exp._sender
    if persistent:
        assert sender.left_on_disk == {Signal.TRACES: 30} and sender.lost_at_shutdown == {}
        assert tel.value("dropped", Signal.TRACES, "shutdown", "false") == 0
    else:
        assert sender.lost_at_shutdown == {Signal.TRACES: 30} and sender.left_on_disk == {}
        assert tel.value("dropped", Signal.TRACES, "shutdown", "false") == 30

    exp.release.set()  # the stuck pushes now succeed, too late: nothing is counted twice or deleted
    for t in list(exp._sender._workers) + [w for w in threading.enumerate() if w.name.startswith("exporter-stuck")]:
        t.join(10)
    assert tel.value("exported", Signal.TRACES) == 0
    assert tel.value("dropped", Signal.TRACES, "shutdown", "false") == (0 if persistent else 30)
    if persistent:  # delivered again at the next start (at least once)
        assert len(list((tmp_path / "exporter_stuck").glob("*.otlp"))) == 10


def test_service_report_with_a_persistent_queue_keeps_everything_on_disk_and_loses_nothing(tmp_path):
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

    from sidecar.config import parse_config
    from sidecar.pipeline import Service
    from sidecar.testing import free_port

    grpc_port = free_port()
    cfg = parse_config(f"""
extensions:
  file_storage: {{directory: {tmp_path}, fsync: false}}
receivers:
  otlp: {{protocols: {{grpc: {{endpoint: 127.0.0.1:{grpc_port}}}}}}}
exporters:
  otlp/down:
    endpoint: 127.0.0.1:{free_port()}
    tls: {{insecure: true}}
    timeout: 1s
    sending_queue: {{storage: file_storage}}
service:
  extensions: [file_storage]
  pipelines:
    traces: {{receivers: [otlp], exporters: [otlp/down]}}
""")
    service = Service(cfg)
    service.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    for _ in range(7):
        trace_service_pb2_grpc.TraceServiceStub(channel).Export(traces(5), timeout=10)
    channel.close()
    report = service.shutdown(1.0)
    assert report.signals[Signal.TRACES].on_disk == 35
    assert report.signals[Signal.TRACES].lost == report.lost_in_shutdown == 0
    assert "traces: 0 spans delivered, 35 on disk for the next start, 0 lost (0 during shutdown)" in report.line()
