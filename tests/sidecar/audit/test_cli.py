"""``python -m sidecar audit query``: a real subprocess over a real store."""

import json
import subprocess
import sys

from sidecar.audit import open_store
from sidecar.audit.cli import parse_time
from sidecar.audit.records import extract

from .spans import App


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sidecar", "audit", *args], capture_output=True, text=True,
                          timeout=60)


def _filled(tmp_path) -> str:
    url = f"sqlite:///{tmp_path}/audit.db"
    app = App()
    app.request("req-a", version="2.4.1")
    app.request("req-b", version="2.5.0", status=500)
    store = open_store(url).open()
    ex = extract(app.take())
    store.write(ex)
    store.mark_kept({ex.records[1].trace_id: "errors"})
    store.close()
    return url


def test_jsonl_has_every_field_and_filters_apply(tmp_path):
    url = _filled(tmp_path)
    out = _run("query", "--store", url, "--format", "jsonl")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert [x["request_id"] for x in lines] == ["req-a", "req-b"]
    assert set(lines[0]) == {"trace_id", "span_id", "time_unix_nano", "service", "span_name", "request_id",
                             "model_id", "model_version", "user_id", "intent", "tags", "latency_ms", "status",
                             "error_code", "parameters", "input_payload", "output_payload", "trace_kept",
                             "kept_policy"}
    assert lines[1]["trace_kept"] is True and lines[1]["kept_policy"] == "errors"
    for args, expected in ((("--model-version", "2.5.0"), ["req-b"]), (("--status", "error"), ["req-b"]),
                           (("--request-id", "req-a"), ["req-a"]), (("--trace-id", lines[0]["trace_id"]), ["req-a"]),
                           (("--since", "1h"), ["req-a", "req-b"]), (("--until", "1h"), []),
                           (("--since", "2020-01-01T00:00:00Z", "--until", "2099-01-01"), ["req-a", "req-b"])):
        out = _run("query", "--store", url, "--format", "jsonl", *args)
        assert [json.loads(x)["request_id"] for x in out.stdout.splitlines()] == expected, args


def test_table(tmp_path):
    out = _run("query", "--store", _filled(tmp_path))
    assert out.returncode == 0, out.stderr
    header, a, b = out.stdout.splitlines()
    assert header.split() == ["time", "request_id", "trace_id", "service", "model", "status", "error",
                              "latency_ms", "kept"]
    assert "req-a" in a and "resnet@2.4.1" in a and a.rstrip().endswith("no")
    # the error column holds the HTTP status (a random trace id may hold any digits: columns, not substrings)
    cells = b.split()
    assert "req-b" in cells and cells[cells.index("ERROR") + 1] == "500" and b.rstrip().endswith("yes (errors)")
    assert "2 record(s)" in out.stderr


def test_bad_input_is_named(tmp_path):
    out = _run("query", "--store", _filled(tmp_path), "--since", "yesterday-ish")
    assert out.returncode == 2 and "yesterday-ish" in out.stderr and "ISO-8601" in out.stderr
    out = _run("query", "--store", "mysql://x/y")
    assert out.returncode == 2 and "unsupported store" in out.stderr


def test_parse_time():
    now = 10**18
    assert parse_time("2h", now) == now - 2 * 3600 * 10**9
    assert parse_time("1970-01-01T00:00:01Z", now) == 10**9
    assert parse_time("1970-01-01T01:00:01+01:00", now) == 10**9


def test_index_makes_records_of_the_journal_and_reports_damaged_entries(tmp_path):
    url = f"sqlite:///{tmp_path}/audit.db"
    app = App()
    app.request("req-j")
    store = open_store(url).open()
    store.append(app.take().SerializeToString())
    store.append(app.take().SerializeToString() or b"")  # an empty request: no records, nothing wrong
    store.close()
    out = _run("index", "--store", url)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "indexed 2 journaled request(s): 1 new record(s), 0 already stored; " \
                                 "0 entries kept unreadable"
    import sqlite3

    db = sqlite3.connect(tmp_path / "audit.db", isolation_level=None)
    db.execute("INSERT INTO audit_journal (recorded_unix_nano, request) VALUES (1, x'0a03ffffff')")
    db.close()
    out = _run("index", "--store", url)
    assert out.returncode == 1
    assert "1 entry kept unreadable" in out.stdout and "journal entry" in out.stderr
    out = _run("query", "--store", url, "--format", "jsonl")
    assert [json.loads(x)["request_id"] for x in out.stdout.splitlines()] == ["req-j"]
