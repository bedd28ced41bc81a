"""The trace viewer's reading of the file exporter's output: real exporter files, rotation, partial lines.

(The viewer on a whole demo's data is tested in tests/e2e/test_demo.py.)
"""

from __future__ import annotations

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidecar import otlp_json
from sidecar.cli import main
from sidecar.cli.render import tree
from sidecar.cli.store import TraceStore
from sidecar.signals import Signal

T0 = 1_700_000_000_000_000_000


def trace(tid: int, *, error: bool = False, request_id: str | None = None) -> str:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "svc"
    ss = rs.scope_spans.add()
    root = ss.spans.add(name="POST /classify", trace_id=tid.to_bytes(16, "big"), span_id=b"\x01" * 8, kind=2,
                        start_time_unix_nano=T0 + tid * 1_000_000, end_time_unix_nano=T0 + tid * 1_000_000 + 5_000_000)
    if request_id:
        root.attributes.add(key="request.id").value.string_value = request_id
    child = ss.spans.add(name="ml.forward m", trace_id=root.trace_id, span_id=b"\x02" * 8, parent_span_id=root.span_id, kind=1,
                         start_time_unix_nano=root.start_time_unix_nano + 1_000_000,
                         end_time_unix_nano=root.start_time_unix_nano + 3_000_000)
    child.attributes.add(key="ml.model.version").value.string_value = "v7"
    if error:
        child.status.code = 2
        child.status.message = "bad input"
    return otlp_json.to_json(Signal.TRACES, req) + "\n"


def log_for(tid: int, body: str) -> str:
    req = ExportLogsServiceRequest()
    rec = req.resource_logs.add().scope_logs.add().log_records.add(
        trace_id=tid.to_bytes(16, "big"), span_id=b"\x02" * 8, time_unix_nano=T0 + tid * 1_000_000 + 2_000_000,
        severity_text="ERROR")
    rec.body.string_value = body
    return otlp_json.to_json(Signal.LOGS, req) + "\n"


def test_reads_rotated_files_and_only_whole_lines(tmp_path):
    (tmp_path / "traces.jsonl.2").write_text(trace(1))
    (tmp_path / "traces.jsonl.1").write_text(trace(2))
    (tmp_path / "traces.jsonl").write_text(trace(3) + trace(4)[:50])  # the last line is still being written
    store = TraceStore(tmp_path)
    store.refresh()
    assert [t.trace_id[-1] for t in store.recent()] == ["3", "2", "1"]
    with open(tmp_path / "traces.jsonl", "a") as f:
        f.write(trace(4)[50:])
    assert store.refresh() == {f"{4:032x}"}  # incremental: only what was appended
    # the exporter rotates: traces.jsonl becomes .1 (same file), a new traces.jsonl starts
    (tmp_path / "traces.jsonl.1").rename(tmp_path / "traces.jsonl.2")
    (tmp_path / "traces.jsonl").rename(tmp_path / "traces.jsonl.1")
    (tmp_path / "traces.jsonl").write_text(trace(5))
    assert store.refresh() == {f"{5:032x}"}
    assert len(store.recent()) == 5 and all(len(t.spans) == 2 for t in store.recent())


def test_tree_nests_spans_and_puts_logs_inside_their_span(tmp_path):
    (tmp_path / "traces.jsonl").write_text(trace(9, error=True, request_id="req-9"))
    (tmp_path / "logs.jsonl").write_text(log_for(9, "could not classify\nsecond line"))
    store = TraceStore(tmp_path)
    store.refresh()
    (t,) = store.find("req-9")
    lines = tree(t)
    assert lines[0].startswith(f"trace {9:032x}") and "ERROR" in lines[0]
    i = next(i for i, line in enumerate(lines) if "ml.forward m" in line)
    assert lines[i - 1].startswith("└─ POST /classify  [server] +0.0ms 5.0ms")
    assert lines[i].strip().startswith("└─ ml.forward m  [internal] +1.0ms 2.0ms  ERROR: bad input")
    assert lines[i + 1].strip() == "≡ +2.0ms ERROR could not classify"
    assert lines[i + 2].strip() == "second line" and lines[i + 2].startswith("         ")


def test_show_exits_1_naming_the_directory_and_ls_on_a_missing_directory_exits_2(tmp_path, capsys):
    (tmp_path / "traces.jsonl").write_text(trace(1))
    assert main(["show", "nope", "--dir", str(tmp_path)]) == 1
    assert str(tmp_path) in capsys.readouterr().err
    assert main(["ls", "--dir", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
