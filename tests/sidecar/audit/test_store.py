"""The stores, SQLite and a real PostgreSQL, through one set of tests: durability settings, idempotence,
fragments and kept marks in either order, queries, migrations, retention, private files."""

import os
import sqlite3
import stat
import time

import pytest

from sidecar.audit.records import extract
from sidecar.audit.store import SCHEMA_VERSION, Query, SQLiteStore, StoreError
from sidecar.audit.urls import open_store

from .spans import App


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = open_store(f"sqlite:///{tmp_path}/audit/audit.db")  # tmp_path is absolute: sqlite:////tmp/...
    else:
        url = request.getfixturevalue("pg_url")
        s = open_store(url)
    s.open()
    yield s
    s.close()


def _records(app, n, **kw):
    for i in range(n):
        app.request(f"req-{i}", **kw)
    return extract(app.take())


def test_write_is_idempotent_on_trace_and_span_id(store):
    ex = _records(App(), 3)
    assert store.write(ex) == 3
    assert store.write(ex) == 0  # a retried export
    assert store.count() == 3
    got = store.query(Query(request_id="req-1"))
    assert len(got) == 1 and got[0] == next(r for r in ex.records if r.request_id == "req-1")


def test_fragment_before_or_after_its_entry_span_ends_up_in_the_record(store):
    app = App()
    app.request("early")
    app.request("late")
    req = app.take()
    spans = list(req.resource_spans[0].scope_spans[0].spans)
    forward = [s for s in spans if s.name.startswith("ml.forward")]
    rest = [s for s in spans if not s.name.startswith("ml.forward")]

    def subset(chosen):
        out = type(req)()
        out.CopyFrom(req)
        ss = out.resource_spans[0].scope_spans[0]
        del ss.spans[:]
        ss.spans.extend(chosen)
        return out

    early_tid, late_tid = forward[0].trace_id, forward[1].trace_id
    # "early": the forward span arrives before its server span; "late": after it
    store.write(extract(subset([forward[0]])))
    store.write(extract(subset(rest)))
    store.write(extract(subset([forward[1]])))
    store.write(extract(subset([forward[1]])))  # retried: no change
    for tid in (early_tid, late_tid):
        (r,) = store.query(Query(trace_id=tid.hex()))
        assert (r.model_id, r.model_version) == ("resnet", "2.4.1")
        assert r.parameters["batch_size"] == 2 and r.parameters["input_shapes"] == ["2x3"]


def test_kept_mark_before_or_after_the_record(store):
    app = App()
    app.request("a")
    app.request("b")
    ex = extract(app.take())
    a, b = ex.records
    store.mark_kept({a.trace_id: "errors"})
    store.write(ex)
    store.mark_kept({b.trace_id: "baseline"})
    got = {r.request_id: (r.trace_kept, r.kept_policy) for r in store.query(Query())}
    assert got == {"a": (True, "errors"), "b": (True, "baseline")}


def test_query_filters(store):
    app = App()
    app.request("ok-old", version="2.4.1")
    app.request("err", version="2.5.0", status=500)
    ex = extract(app.take())
    store.write(ex)
    t_err = next(r.time_unix_nano for r in ex.records if r.request_id == "err")
    assert [r.request_id for r in store.query(Query(model_version="2.5.0"))] == ["err"]
    assert [r.request_id for r in store.query(Query(status="error"))] == ["err"]
    assert [r.request_id for r in store.query(Query(since=t_err))] == ["err"]
    assert [r.request_id for r in store.query(Query(until=t_err))] == ["ok-old"]
    assert store.query(Query(request_id="nope")) == []


def test_schema_is_versioned_and_a_newer_store_is_refused(store):
    assert store.schema_version() == SCHEMA_VERSION
    with store._transaction() as cur:
        cur.execute("UPDATE audit_schema SET version = 99")
    again = open_store(store.url)
    with pytest.raises(StoreError, match="newer than this sidecar"):
        again.open()
    again.close()


def test_retention_by_age_and_by_size(store):
    app = App()
    ex = _records(app, 40, payload_in='{"format": "ml.tensors/v1", "pad": "' + "x" * 20000 + '"}')
    old = ex.records[:10]
    for r in old:
        r.time_unix_nano -= 10 * 24 * 3600 * 10**9  # ten days ago
    store.write(ex)
    assert store.delete_older_than(time.time_ns() - 24 * 3600 * 10**9) == 10
    assert store.count() == 30
    size = store.size_bytes()
    deleted = store.shrink_to(size // 3)
    assert store.size_bytes() <= size // 3
    assert deleted > 0 and store.count() == 30 - deleted
    newest = max(r.time_unix_nano for r in ex.records)
    assert max(r.time_unix_nano for r in store.query(Query())) == newest  # the oldest went first


def test_sqlite_is_wal_full_sync_and_private(tmp_path):
    path = tmp_path / "private" / "audit.db"
    s = open_store(str(path)).open()
    s.write(_records(App(), 1))
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    assert s._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    for f in (path, path.with_name("audit.db-wal")):
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f
    s.close()


def test_sqlite_migrates_a_version_1_store(tmp_path):
    path = tmp_path / "v1.db"
    s = SQLiteStore(str(path), str(path))
    from sidecar.audit import store as store_mod

    v1 = store_mod.MIGRATIONS[:1]
    original, store_mod.MIGRATIONS = store_mod.MIGRATIONS, v1
    try:
        s.open()
    finally:
        store_mod.MIGRATIONS = original
    s.close()
    s = open_store(str(path)).open()
    assert s.schema_version() == SCHEMA_VERSION
    names = {r[0] for r in s._conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "audit_records_request" in names
    s.close()


def test_urls_are_checked():
    for bad in ("mysql://x/y", "sqlite://relative.db", "sqlite:///"):
        with pytest.raises(ValueError):
            open_store(bad)
    assert isinstance(open_store("sqlite:///var/a.db"), SQLiteStore)
    assert open_store("sqlite:///var/a.db").path.as_posix() == "var/a.db"
    assert open_store("sqlite:////tmp/a.db").path.as_posix() == "/tmp/a.db"


def test_postgres_down_is_a_store_error(postgres_server):
    from sidecar.testing import free_port

    s = open_store(f"postgresql://audit:pw@127.0.0.1:{free_port()}/postgres", timeout=1)
    with pytest.raises(StoreError, match="cannot connect") as e:
        s.open()
    assert "pw" not in str(e.value)


def test_times_beyond_what_sql_integers_hold_are_clamped_not_refused(store):
    """A hostile client's end time of 2**64-1 used to raise OverflowError in the store (HTTP 500; found by fuzzing)."""
    app = App()
    app.request("req-far-future")
    req = app.take()
    for rs in req.resource_spans:
        for ss in rs.scope_spans:
            for span in ss.spans:
                span.start_time_unix_nano, span.end_time_unix_nano = 2**64 - 2, 2**64 - 1
    assert store.write(extract(req)) == 1
    (rec,) = store.query(Query(request_id="req-far-future"))
    assert rec.time_unix_nano == 2**63 - 1 and rec.latency_ms == 0.0
