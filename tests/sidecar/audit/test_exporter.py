"""The audit exporter in a real pipeline: an OTLP receiver, the OTel SDK (or a raw gRPC client) in front,
SQLite or a real PostgreSQL behind; acknowledgement means stored, a stuck store means a retryable refusal."""

import sqlite3
import time
import urllib.request

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.sdk.trace.export import SpanExportResult

from sidecar.audit import Query, open_store
from sidecar.config import ConfigError, parse_config
from sidecar.envelope import Envelope
from sidecar.pipeline import Service
from sidecar.signals import Signal
from sidecar.testing import free_port

from .spans import App


def _service(store: str, *, extra: str = "", metrics: bool = False, timeout: str = "5s"):
    port, mport = free_port(), free_port()
    cfg = parse_config(f"""
receivers:
  otlp: {{protocols: {{grpc: {{endpoint: 127.0.0.1:{port}}}}}}}
processors:
  memory_limiter/audit: {{check_interval: 1s, limit_mib: 4000}}
  redaction/audit: {{allow_all_keys: true, blocked_values: ["4[0-9]{{15}}"]}}
exporters:
  audit: {{store: "{store}", timeout: {timeout} {extra}}}
service:
  telemetry: {{metrics: {{address: {f'127.0.0.1:{mport}' if metrics else 'null'}}}}}
  pipelines:
    traces/audit: {{receivers: [otlp], processors: [memory_limiter/audit, redaction/audit], exporters: [audit]}}
""", environ={})
    service = Service(cfg)
    service.start()
    return service, port, mport


def _wait(cond, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/audit.db"
    return request.getfixturevalue("pg_url")


def test_acknowledged_requests_are_on_record_after_redaction_and_never_twice(store_url):
    service, port, _ = _service(store_url)
    try:
        app = App()
        for i in range(5):
            app.request(f"req-{i}", user="4111111111111111" if i == 0 else f"user-{i}")
        spans = app.exporter.get_finished_spans()
        client = OTLPSpanExporter(endpoint=f"127.0.0.1:{port}", insecure=True)
        assert client.export(spans) is SpanExportResult.SUCCESS
        # acknowledged == stored: read straight away, from another connection
        store = open_store(store_url).open()
        records = {r.request_id: r for r in store.query(Query())}
        assert sorted(records) == [f"req-{i}" for i in range(5)]
        assert records["req-0"].user_id == "[REDACTED]"  # the audit pipeline's redaction ran first
        assert records["req-3"].model_version == "2.4.1" and records["req-3"].parameters["batch_size"] == 2
        assert client.export(spans) is SpanExportResult.SUCCESS  # a client retry
        assert store.count() == 5
        store.close()
        client.shutdown()
    finally:
        service.shutdown(5)


def _metric(text: str, name: str) -> float:
    return float(text.split(name + " ")[1].split()[0]) if name + " " in text else 0.0


def test_a_locked_store_refuses_with_a_retryable_code_then_recovers(tmp_path):
    path = tmp_path / "audit.db"
    service, port, mport = _service(f"sqlite:///{path}", timeout="200ms", metrics=True, extra=", index_interval: 50ms")
    try:
        app = App()
        app.request("held")
        request = app.take()
        stub = trace_service_pb2_grpc.TraceServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the database
        with pytest.raises(grpc.RpcError) as e:
            stub.Export(request, timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        blocker.execute("ROLLBACK")
        blocker.close()
        stub.Export(request, timeout=10)  # the client's retry
        stub.Export(request, timeout=10)  # and a duplicate of it

        def scrape() -> str:
            return urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()

        # the sidecar's background indexing makes the record; the duplicate is recognized, not stored
        assert _wait(lambda: _metric(scrape(), 'sidecar_audit_records_duplicate_total{component="audit"}') == 1)
        text = scrape()
        assert 'sidecar_audit_requests_journaled_total{component="audit"} 2.0' in text
        assert 'sidecar_audit_records_written_total{component="audit"} 1.0' in text
        assert 'sidecar_audit_journal_unreadable_total{component="audit"} 0.0' in text
        assert 'sidecar_audit_store_latency_seconds_count{component="audit"} 3.0' in text
        assert 'sidecar_audit_records_queued{component="audit"} 0.0' in text
        lag = float(text.split('sidecar_audit_lag_seconds{component="audit"} ')[1].split()[0])
        assert 0 < lag < 600
        assert 'sidecar_items_refused_total{component="audit",kind="exporter",reason="store_unavailable",' \
               'signal="traces"} 3.0' in text  # the 3 spans of the refused request
        store = open_store(str(path)).open()
        assert [r.request_id for r in store.query(Query())] == ["held"]
        store.close()
    finally:
        service.shutdown(5)


def test_with_hashed_user_ids_records_are_written_on_the_request_path(tmp_path):
    """The pseudonym replaces the user id before anything is stored: nothing is journaled."""
    path = tmp_path / "audit.db"
    service, port, mport = _service(f"sqlite:///{path}", metrics=True,
                                    extra=", hash_user_id: true, user_id_salt: s3cret, index_interval: 1h")
    try:
        app = App()
        app.request("hashed", user="alice")
        stub = trace_service_pb2_grpc.TraceServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        stub.Export(app.take(), timeout=10)
        db = sqlite3.connect(path)
        assert db.execute("SELECT count(*) FROM audit_journal").fetchone()[0] == 0
        raw = b"".join(bytes(str(row), "utf-8") for row in db.execute("SELECT * FROM audit_part_2"))
        db.close()
        assert b"alice" not in raw and b"sha256:" in raw
        text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
        assert 'sidecar_audit_records_written_total{component="audit"} 1.0' in text
        assert 'sidecar_audit_requests_journaled_total{component="audit"} 0.0' in text
    finally:
        service.shutdown(5)


def test_postgres_down_refuses_then_the_retry_lands_once(own_postgres_server):
    url = own_postgres_server.new_database()
    service, port, _ = _service(url, timeout="1s")
    try:
        app = App()
        app.request("before")
        app.request("during")
        first = app.take()
        stub = trace_service_pb2_grpc.TraceServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        spans = list(first.resource_spans[0].scope_spans[0].spans)
        before, during = type(first)(), type(first)()
        for req, rid in ((before, "before"), (during, "during")):
            req.CopyFrom(first)
            ss = req.resource_spans[0].scope_spans[0]
            tids = {s.trace_id for s in spans if any(a.value.string_value == rid for a in s.attributes)}
            del ss.spans[:]
            ss.spans.extend(s for s in spans if s.trace_id in tids)
        stub.Export(before, timeout=10)
        own_postgres_server.halt()
        with pytest.raises(grpc.RpcError) as e:
            stub.Export(during, timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        own_postgres_server.resume()
        stub.Export(during, timeout=10)  # the client's retry reconnects
        store = open_store(url).open()
        assert [r.request_id for r in store.query(Query())] == ["before", "during"]
        store.close()
    finally:
        service.shutdown(5)


def test_start_fails_fast_naming_the_store(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ValueError, match=r"exporters.audit.store: .*file/audit.db"):
        _service(f"sqlite:///{tmp_path}/file/audit.db")


def test_kept_marker_marks_the_records_of_kept_traces(tmp_path):
    url = f"sqlite:///{tmp_path}/audit.db"
    service, port, _ = _service(url)
    marker_cfg = parse_config(f"""
receivers: {{otlp: {{protocols: {{grpc: {{endpoint: 127.0.0.1:{free_port()}}}}}}}}}
exporters: {{audit/kept: {{store: "{url}", mode: kept_marker}}}}
service:
  telemetry: {{metrics: {{address: null}}}}
  pipelines: {{traces: {{receivers: [otlp], exporters: [audit/kept]}}}}
""", environ={})
    marker_service = Service(marker_cfg)
    marker_service.start()
    try:
        app = App()
        app.request("kept")
        app.request("dropped")
        request = app.take()
        trace_service_pb2_grpc.TraceServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}")).Export(request)
        kept_tid = next(s.trace_id for s in request.resource_spans[0].scope_spans[0].spans
                        if any(a.value.string_value == "kept" for a in s.attributes))
        sampled = type(request)()
        sampled.CopyFrom(request)
        ss = sampled.resource_spans[0].scope_spans[0]
        keep = [s for s in ss.spans if s.trace_id == kept_tid]
        del ss.spans[:]
        ss.spans.extend(keep)
        for s in ss.spans:
            s.attributes.add(key="sampling.policy").value.string_value = "baseline"
        marker_service.graph.exporters["audit/kept"].consume(Envelope(Signal.TRACES, sampled))
        store = open_store(url).open()
        got = {r.request_id: (r.trace_kept, r.kept_policy) for r in store.query(Query())}
        assert got == {"kept": (True, "baseline"), "dropped": (False, None)}
        store.close()
    finally:
        marker_service.shutdown(5)
        service.shutdown(5)


def test_retention_task_deletes_old_records(tmp_path):
    url = f"sqlite:///{tmp_path}/audit.db"
    service, port, _ = _service(url, extra=", retention: {max_age: 1h, check_interval: 50ms}")
    try:
        app = App()
        app.request("old")
        app.request("new")
        request = app.take()
        for s in request.resource_spans[0].scope_spans[0].spans:
            if any(a.value.string_value == "old" for a in s.attributes):
                s.start_time_unix_nano -= 2 * 3600 * 10**9
        trace_service_pb2_grpc.TraceServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}")).Export(request)
        store = open_store(url).open()
        assert _wait(lambda: [r.request_id for r in store.query(Query())] == ["new"])
        store.close()
    finally:
        service.shutdown(5)


@pytest.mark.parametrize("body, problem", [
    ("{hash_user_id: true}", "exporters.audit: user_id_salt: required when hash_user_id"),
    ("{store: 'mysql://db/audit'}", "exporters.audit.store"),
    ("{mode: sampled}", "exporters.audit.mode"),
    ("{retention: {max_age: 0s}}", "exporters.audit.retention.max_age"),
    ("{colour: red}", "exporters.audit.colour"),
])
def test_config_errors_name_the_yaml_path(body, problem):
    with pytest.raises(ConfigError) as e:
        parse_config(f"""
receivers: {{otlp: {{protocols: {{grpc: {{endpoint: 127.0.0.1:4317}}}}}}}}
exporters: {{audit: {body}}}
service: {{pipelines: {{traces: {{receivers: [otlp], exporters: [audit]}}}}}}
""", environ={})
    assert any(problem in p for p in e.value.problems), e.value.problems


def test_hashed_user_ids(tmp_path):
    url = f"sqlite:///{tmp_path}/audit.db"
    service, port, _ = _service(url, extra=", hash_user_id: true, user_id_salt: pepper")
    try:
        app = App()
        app.request("r", user="alice")
        trace_service_pb2_grpc.TraceServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}")).Export(app.take())
        store = open_store(url).open()
        (r,) = store.query(Query())
        assert r.user_id.startswith("sha256:") and "alice" not in r.user_id
        store.close()
    finally:
        service.shutdown(5)


def test_a_journal_left_by_the_previous_run_is_indexed_after_start_not_before(tmp_path):
    path = tmp_path / "audit.db"
    store = open_store(str(path)).open()
    app = App()
    for i in range(3):
        app.request(f"left-{i}")
        store.append(app.take().SerializeToString())  # the previous run journaled these and died
    store.close()
    service, _, mport = _service(f"sqlite:///{path}", metrics=True, extra=", index_interval: 1h")
    try:
        def written() -> float:
            text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
            return _metric(text, 'sidecar_audit_records_written_total{component="audit"}')

        assert _wait(lambda: written() == 3)  # at start, in the background: not an hour later
        db = sqlite3.connect(path)
        assert db.execute("SELECT count(*) FROM audit_journal").fetchone()[0] == 0
        db.close()
    finally:
        service.shutdown(5)
