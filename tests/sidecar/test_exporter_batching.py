"""sending_queue.batch: waiting requests leave as one export, nothing lost, nothing copied."""

from __future__ import annotations

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from sidecar.envelope import Envelope
from sidecar.signals import Signal
from sidecar.testing import OTLPBackend, OTLPHTTPBackend, free_port
from tests.sidecar.test_exporter_otlp import make, traces, wait_for


def logs(marker: int) -> ExportLogsServiceRequest:
    req = ExportLogsServiceRequest()
    rec = req.resource_logs.add().scope_logs.add().log_records.add(trace_id=marker.to_bytes(16, "big"))
    rec.body.string_value = f"log {marker}"
    return req


@pytest.mark.parametrize("max_size", [10_000, 7])
def test_waiting_requests_are_merged_into_fewer_exports(max_size):
    backend = OTLPBackend()  # down: requests pile up in the queue
    exp, tel = make(backend.endpoint, sending_queue={"num_consumers": 1, "batch": {"max_size": max_size}})
    try:
        sent = [traces(m) for m in range(1, 31)]
        for req in sent:
            exp.consume(Envelope(Signal.TRACES, req))
        for m in range(1, 6):
            exp.consume(Envelope(Signal.LOGS, logs(m)))
        backend.start()
        assert backend.wait_for_items(Signal.TRACES, 90, timeout=15)
        assert backend.wait_for_items(Signal.LOGS, 5, timeout=15)
        got = sorted(s.SerializeToString(deterministic=True) for _, _, s in backend.spans())
        want = sorted(s.SerializeToString(deterministic=True) for r in sent for s in r.resource_spans[0].scope_spans[0].spans)
        assert got == want  # every span, exactly once, intact
        n_exports = len(backend.requests[Signal.TRACES])
        assert n_exports < 30
        if max_size == 7:  # 3 spans per request: at most 3 requests (9 items) per export
            assert all(sum(len(ss.spans) for rs in r.resource_spans for ss in rs.scope_spans) <= 9
                       for r in backend.requests[Signal.TRACES])
        assert tel.value("exported", Signal.TRACES) == 90
    finally:
        exp.shutdown(0)
        backend.stop()


def test_otlphttp_batches_by_concatenating_encodings():
    from sidecar.exporters.otlphttp import FACTORY, OTLPHTTPExporterConfig
    from sidecar.component import Kind
    from sidecar.config import ComponentId
    from sidecar.host import Host
    from sidecar.registry import CreateSettings
    from sidecar.telemetry import SelfTelemetry

    port = free_port()
    backend = OTLPHTTPBackend(port)
    tel = SelfTelemetry()
    cfg = OTLPHTTPExporterConfig.model_validate({
        "endpoint": f"http://127.0.0.1:{port}", "retry_on_failure": {"initial_interval": "50ms", "max_interval": "100ms"},
        "sending_queue": {"num_consumers": 1, "batch": {"max_size": 1000}}})
    exp = FACTORY.create(CreateSettings(ComponentId("otlphttp"), Kind.EXPORTER, tel.component("exporter", "otlphttp")),
                         cfg, None)
    exp.start(Host(tel))
    try:
        for m in range(1, 21):
            exp.consume(Envelope(Signal.TRACES, traces(m)))
        backend.start()
        assert backend.wait_for_items(Signal.TRACES, 60, timeout=15)
        assert len(backend.requests[Signal.TRACES]) < 20
    finally:
        exp.shutdown(0)
        backend.stop()
