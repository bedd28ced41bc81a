"""The file exporter: OTLP/JSON lines that round-trip, size rotation, and the debug exporter's output."""

from __future__ import annotations

import time

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidecar.envelope import Envelope
from sidecar import otlp_json
from sidecar.component import Kind, Refused
from sidecar.config import ComponentId
from sidecar.exporters import debug, file
from sidecar.host import Host
from sidecar.registry import CreateSettings
from sidecar.signals import Signal
from sidecar.telemetry import SelfTelemetry
from sidecar.testing import Counted


def traces(marker: int, spans: int = 2) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "classifier"
    ss = rs.scope_spans.add()
    for i in range(spans):
        sp = ss.spans.add(name=f"forward {marker}", trace_id=(marker + 1).to_bytes(16, "big"),
                          span_id=(i + 1).to_bytes(8, "big"), start_time_unix_nano=1_000_000,
                          end_time_unix_nano=13_500_000)
        sp.status.code = 2 if i else 0
        sp.attributes.add(key="ml.model.id").value.string_value = "resnet50"
    return req


def logs() -> ExportLogsServiceRequest:
    req = ExportLogsServiceRequest()
    rl = req.resource_logs.add()
    rl.resource.attributes.add(key="service.name").value.string_value = "classifier"
    rec = rl.scope_logs.add().log_records.add(severity_number=17, severity_text="ERROR", trace_id=b"\x01" * 16)
    rec.body.string_value = "CUDA out of memory"
    rec.attributes.add(key="request.id").value.string_value = "r-1"
    return req


def metrics() -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    m = req.resource_metrics.add().scope_metrics.add().metrics.add(name="latency")
    m.gauge.data_points.add(as_double=1.5)
    m.gauge.data_points.add(as_double=2.5)
    return req


def make(factory, body: dict, name: str = ""):
    tel = SelfTelemetry()
    cid = ComponentId(factory.type, name)
    comp = tel.component("exporter", str(cid))
    exp = factory.create(CreateSettings(cid, Kind.EXPORTER, comp), factory.config_model.model_validate(body), None)
    exp.start(Host(tel))
    return Counted(exp, comp), comp  # behind the pipeline's counting edge, as the graph runs it


def test_writes_json_lines_that_round_trip(tmp_path):
    exp, tel = make(file.FACTORY, {"directory": str(tmp_path / "out")})
    sent = {Signal.TRACES: [traces(1), traces(2)], Signal.LOGS: [logs()], Signal.METRICS: [metrics()]}
    for signal, reqs in sent.items():
        for req in reqs:
            exp.consume(Envelope(signal, req))
    exp.shutdown(time.monotonic() + 5)
    for signal, reqs in sent.items():
        lines = (tmp_path / "out" / f"{signal.value}.jsonl").read_text().splitlines()
        assert [otlp_json.from_json(signal, line) for line in lines] == reqs
    assert '"traceId":"00000000000000000000000000000002"' in (tmp_path / "out" / "traces.jsonl").read_text()
    assert tel.value("exported", Signal.TRACES) == 4
    assert tel.value("exported", Signal.METRICS) == 2


def test_appends_across_restarts(tmp_path):
    for i in range(2):
        exp, _ = make(file.FACTORY, {"directory": str(tmp_path)})
        exp.consume(Envelope(Signal.TRACES, traces(i)))
        exp.shutdown(time.monotonic() + 5)
    assert len((tmp_path / "traces.jsonl").read_text().splitlines()) == 2


def test_rotates_by_size_and_keeps_max_backups(tmp_path):
    line_len = len(otlp_json.to_json(Signal.TRACES, traces(1))) + 1
    max_mb = 3.5 * line_len / (1024 * 1024)  # three lines fit in one file
    exp, _ = make(file.FACTORY, {"directory": str(tmp_path), "rotation": {"max_megabytes": max_mb, "max_backups": 2},
                                 "sending_queue": {"num_consumers": 1}})
    for i in range(12):
        exp.consume(Envelope(Signal.TRACES, traces(i)))
    exp.shutdown(time.monotonic() + 5)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["traces.jsonl", "traces.jsonl.1", "traces.jsonl.2"]

    def markers(name):
        return [otlp_json.from_json(Signal.TRACES, line).resource_spans[0].scope_spans[0].spans[0].name
                for line in (tmp_path / name).read_text().splitlines()]

    assert markers("traces.jsonl") == ["forward 9", "forward 10", "forward 11"]
    assert markers("traces.jsonl.1") == ["forward 6", "forward 7", "forward 8"]  # newest backup is .1
    assert markers("traces.jsonl.2") == ["forward 3", "forward 4", "forward 5"]


def test_flush_interval_batches_writes_but_shutdown_flushes(tmp_path):
    exp, _ = make(file.FACTORY, {"directory": str(tmp_path), "flush_interval": "1h"})
    exp.consume(Envelope(Signal.LOGS, logs()))
    exp.shutdown(time.monotonic() + 5)
    assert [otlp_json.from_json(Signal.LOGS, x) for x in (tmp_path / "logs.jsonl").read_text().splitlines()] == [logs()]


def test_unwritable_directory_fails_at_start(tmp_path):
    (tmp_path / "f").write_text("not a directory")
    with pytest.raises(ValueError, match="exporters.file.directory"):
        make(file.FACTORY, {"directory": str(tmp_path / "f" / "out")})


def test_write_error_is_retried_until_the_file_can_be_written(tmp_path):
    target = tmp_path / "out"
    exp, tel = make(file.FACTORY, {"directory": str(target), "sending_queue": {"num_consumers": 1},
                                   "retry_on_failure": {"initial_interval": "20ms", "max_interval": "20ms"}})
    exp.consume(Envelope(Signal.TRACES, traces(1)))
    deadline = time.monotonic() + 10
    while tel.value("exported", Signal.TRACES) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    (target / "traces.jsonl").unlink()
    (target / "traces.jsonl").mkdir()  # the file's place is taken: every open fails until it is freed
    exp._files[Signal.TRACES].close()
    exp.consume(Envelope(Signal.TRACES, traces(2)))
    while tel.value("retried", Signal.TRACES) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    (target / "traces.jsonl").rmdir()
    while tel.value("exported", Signal.TRACES) < 4:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    exp.shutdown(time.monotonic() + 5)
    assert [otlp_json.from_json(Signal.TRACES, x) for x in (target / "traces.jsonl").read_text().splitlines()] == \
        [traces(2)]


# --- debug ------------------------------------------------------------------------------------

def test_debug_basic_prints_one_line_per_request(capsys):
    exp, tel = make(debug.FACTORY, {})
    exp.consume(Envelope(Signal.TRACES, traces(1, spans=37)))
    exp.consume(Envelope(Signal.LOGS, logs()))
    exp.shutdown(time.monotonic() + 1)
    err = capsys.readouterr().err.splitlines()
    assert err == ["debug: traces: 1 resources, 37 spans", "debug: logs: 1 resources, 1 log records"]
    assert tel.value("exported", Signal.TRACES) == 37


def test_debug_normal_and_detailed(capsys):
    exp, _ = make(debug.FACTORY, {"verbosity": "normal"})
    exp.consume(Envelope(Signal.TRACES, traces(1)))
    exp.consume(Envelope(Signal.LOGS, logs()))
    out = capsys.readouterr().err
    assert "span classifier 'forward 1' trace=00000000000000000000000000000002" in out
    assert "12.500ms status=ERROR" in out
    assert "log classifier ERROR trace=01010101010101010101010101010101 body='CUDA out of memory'" in out
    assert "ml.model.id" not in out

    exp, _ = make(debug.FACTORY, {"verbosity": "detailed"})
    exp.consume(Envelope(Signal.TRACES, traces(1)))
    exp.consume(Envelope(Signal.LOGS, logs()))
    exp.consume(Envelope(Signal.METRICS, metrics()))
    out = capsys.readouterr().err
    assert "attrs={ml.model.id=resnet50}" in out
    assert "attrs={request.id=r-1}" in out
    assert "resource service.name=classifier" in out
    assert "metric ? latency gauge 2 points" in out


def test_debug_refuses_after_shutdown():
    exp, tel = make(debug.FACTORY, {})
    exp.shutdown(time.monotonic() + 1)
    with pytest.raises(Refused):
        exp.consume(Envelope(Signal.TRACES, traces(1)))
    assert tel.value("refused", Signal.TRACES, "shutting_down") == 2
