"""The stores, SQLite and a real PostgreSQL, through one set of tests: durability settings, idempotence,
fragments and kept marks in either order, queries, migrations, retention, private files; then SQLite's
time-ordered partitions (a small ``seal_rows``): the same semantics on both sides of a seal."""

import os
import sqlite3
import stat
import threading
import time

import pytest

from sidecar.audit.records import AuditRecord, Extraction, Fragment, extract
from sidecar.audit.store import MIGRATIONS, SCHEMA_VERSIONS, Query, SQLiteStore, StoreError, _row
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
    assert store.schema_version() == SCHEMA_VERSIONS[store.dialect]
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
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    conn.execute("CREATE TABLE audit_schema (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO audit_schema VALUES (1)")
    for stmt in MIGRATIONS["sqlite"][0][1]:
        conn.execute(stmt)
    conn.close()
    s = open_store(str(path)).open()
    assert s.schema_version() == SCHEMA_VERSIONS["sqlite"]
    names = {r[0] for r in s._conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "audit_records_request" in names
    s.close()


def test_migrations_are_per_dialect_and_postgres_keeps_one_table():
    assert [v for v, _ in MIGRATIONS["postgresql"]] == [1, 2, 3]
    assert [v for v, _ in MIGRATIONS["sqlite"]] == [1, 2, 3, 4]
    assert MIGRATIONS["sqlite"][:2] == MIGRATIONS["postgresql"][:2]  # the shared steps are one list, not a copy


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


def test_empty_and_zero_texts_stay_texts_and_missing_ones_stay_null(store):
    """SQLite binds a missing text as the integer 0 and turns it back into NULL in the statement (a bound None
    costs a formatted error message in the sqlite3 module): ``""`` and ``"0"`` must stay what they were, on the
    request path and through the journal (made in C where it is built)."""
    app = App()
    app.request("0", user="", version="0")
    app.request("", user="0", version="")
    req = app.take()
    expected = {r.request_id: r for r in extract(req).records}
    assert store.write(extract(req)) == 2
    assert {r.request_id: r for r in store.query(Query())} == expected
    assert (expected["0"].user_id, expected["0"].model_version, expected[""].user_id, expected[""].model_version,
            expected["0"].error_code) == ("", "0", "0", "", None)
    rec = AuditRecord(trace_id="ab" * 16, span_id="cd" * 8, time_unix_nano=T0, service="svc", span_name="x")
    assert _write(store, rec) == 1
    (back,) = store.query(Query(trace_id=rec.trace_id))
    assert back == rec and back.request_id is None and back.intent is None and back.kept_policy is None


def test_the_journal_keeps_empty_and_zero_texts(tmp_path):
    store = _sqlite(tmp_path / "audit.db")
    app = App()
    app.request("0", user="", version="0")
    app.request("", user="0", version="")
    req = app.take()
    store.append(req.SerializeToString())
    assert store.index_journal().written == 2
    assert sorted(store.query(Query()), key=repr) == sorted(extract(req).records, key=repr)
    assert _raw(store, "SELECT typeof(request_id), typeof(user_id), typeof(intent), typeof(error_code) "
                       "FROM audit_records") == [("text", "text", "text", "null")] * 2
    store.close()


# --- SQLite partitions ---------------------------------------------------------------------------

T0 = 1_700_000_000 * 10**9
SECOND = 10**9


def _rec(i: int, *, t: int | None = None, version: str | None = "1.0", status: str = "OK",
         service: str = "svc") -> AuditRecord:
    return AuditRecord(trace_id=f"{i:032x}", span_id=f"{i:016x}", time_unix_nano=T0 + i * SECOND if t is None else t,
                       service=service, span_name="POST /predict", request_id=f"req-{i}", model_version=version,
                       status=status, parameters={"batch_size": i})


def _frag(i: int, **fields) -> Fragment:
    return Fragment(trace_id=f"{i:032x}", span_id=f"{i + 10**6:016x}", service="svc", fields=fields)


def _write(store, *records: AuditRecord, fragments: tuple[Fragment, ...] = ()) -> int:
    return store.write(Extraction(list(records), list(fragments)))


def _sqlite(path, **kw) -> SQLiteStore:
    return SQLiteStore(str(path), str(path), **kw).open()


def _partitions(store) -> list[tuple[int, bool]]:
    with store._transaction(write=False) as cur:
        return [(p.number, p.sealed) for p in store._catalog(cur)]


def _raw(store, sql: str) -> list[tuple]:
    with store._transaction(write=False) as cur:
        return cur.execute(sql).fetchall()


def _by_request(store, q: Query | None = None) -> dict[str, AuditRecord]:
    got = store.query(q or Query())
    ids = [r.request_id for r in got]
    assert len(ids) == len(set(ids)), f"a record returned twice: {ids}"
    return {r.request_id: r for r in got}


def test_what_waited_for_a_record_is_read_with_it_and_in_its_row_after_the_seal(tmp_path):
    """A fragment and a kept mark that arrived before their record: every read applies them at once; the
    active partition holds the record as written (no lookup per record). ``SELECT ... FROM audit_records``
    shows the mark at once (the view applies ``audit_kept``) and the fragment once the seal folded it in
    (docs/audit.md); in a batch with other records."""
    store = _sqlite(tmp_path / "audit.db")
    _write(store, fragments=(_frag(1, model_version="9.9"),))
    store.mark_kept({f"{1:032x}": "errors"})
    assert _write(store, *(_rec(i, version=None) for i in range(4))) == 4
    raw = "SELECT request_id, model_version, trace_kept, kept_policy FROM audit_records ORDER BY request_id"
    exact = [("req-0", None, 0, None), ("req-1", "9.9", 1, "errors"), ("req-2", None, 0, None),
             ("req-3", None, 0, None)]
    assert [(r.request_id, r.model_version, int(r.trace_kept), r.kept_policy)
            for r in store.query(Query())] == exact
    assert _raw(store, raw)[1] == ("req-1", None, 1, "errors")  # the mark at once, the fragment not yet
    assert store.seal(force=True)
    assert _raw(store, raw) == exact
    assert _raw(store, "SELECT count(*) FROM audit_fragments") == [(0,)]
    store.close()


def test_fragments_and_kept_marks_in_either_order_on_both_sides_of_a_seal(tmp_path):
    s = _sqlite(tmp_path / "a.db", seal_rows=4)
    # 1: fragment before its record; 2: fragment after it (both: read time, then the seal)
    _write(s, fragments=(_frag(1, model_id="m1", model_version="9.1"),))
    _write(s, _rec(1, version=None), _rec(2, version=None))
    _write(s, fragments=(_frag(2, model_id="m2", model_version="9.2", parameters={"seed": 2}),))
    # 3: mark before its record; 2: mark after it
    s.mark_kept({_rec(3).trace_id: "errors"})
    _write(s, _rec(3))
    s.mark_kept({_rec(2).trace_id: "baseline"})

    def check(expected_sealed: list[int]):
        got = _by_request(s)
        assert (got["req-1"].model_id, got["req-1"].model_version) == ("m1", "9.1")
        assert (got["req-2"].model_id, got["req-2"].model_version) == ("m2", "9.2")
        assert got["req-2"].parameters == {"batch_size": 2, "seed": 2}  # the record's own value wins per key
        assert (got["req-2"].trace_kept, got["req-2"].kept_policy) == (True, "baseline")
        assert (got["req-3"].trace_kept, got["req-3"].kept_policy) == (True, "errors")
        assert not got["req-1"].trace_kept
        assert [r.request_id for r in s.query(Query(model_version="9.2"))] == ["req-2"]  # from the fragment
        assert [n for n, sealed in _partitions(s) if sealed][1:] == expected_sealed

    check([])
    _write(s, _rec(4))  # the fourth row: the write that reaches seal_rows seals the partition
    check([2])
    # the fragment folded in for good (the late fragment is gone), the mark applied by the view
    assert _raw(s, f"SELECT model_version FROM audit_part_2 WHERE trace_id = '{_rec(2).trace_id}'") == [("9.2",)]
    assert _raw(s, f"SELECT model_version, trace_kept, kept_policy FROM audit_records WHERE trace_id = "
                   f"'{_rec(2).trace_id}'") == [("9.2", 1, "baseline")]
    assert _raw(s, "SELECT count(*) FROM audit_fragments") == [(0,)]
    # after the seal: a fragment and a mark for a sealed record, and for records of the new active partition
    _write(s, fragments=(_frag(4, model_id="m4", model_version="9.4"), _frag(5, model_id="m5")))
    s.mark_kept({_rec(4).trace_id: "late", _rec(6).trace_id: "early"})
    _write(s, _rec(5, version=None), _rec(6))
    got = _by_request(s)
    assert got["req-4"].model_version == "1.0" and got["req-4"].model_id == "m4"  # the record's own version wins
    assert (got["req-4"].trace_kept, got["req-4"].kept_policy) == (True, "late")
    assert got["req-5"].model_id == "m5" and got["req-6"].kept_policy == "early"
    _write(s, _rec(7), _rec(8))  # seals partition 3; the late mark and fragment of req-4 fold into partition 2
    check([2, 3])
    assert _raw(s, f"SELECT model_id, trace_kept FROM audit_records WHERE trace_id = '{_rec(4).trace_id}'") == \
        [("m4", 1)]
    assert s.count() == 8
    s.close()


def test_a_duplicate_is_returned_once_and_sealed_away_even_straddling_a_seal(tmp_path):
    path = tmp_path / "a.db"
    s = _sqlite(path, seal_rows=3)
    assert _write(s, _rec(1), _rec(2), _rec(3)) == 3  # sealed
    assert _write(s, _rec(3)) == 0  # a retry this store remembers: not written again
    other = _sqlite(path, seal_rows=3)  # a second writer (another process) does not remember it
    assert _write(other, _rec(3), _rec(4)) == 2
    assert _write(other, _rec(4, status="ERROR")) == 0
    third = _sqlite(path, seal_rows=100)  # so this write does not seal
    assert _write(third, _rec(4, status="ERROR")) == 1  # a duplicate inside the active partition
    assert _raw(s, "SELECT count(*) FROM audit_records") == [(6,)]  # the raw view holds both
    for store in (s, other, third):
        assert store.count() == 4
        got = _by_request(store)
        assert sorted(got) == ["req-1", "req-2", "req-3", "req-4"]
        assert got["req-4"].status == "OK"  # the first written
        assert [r.request_id for r in store.query(Query(status="error"))] == []
        assert [r.request_id for r in store.query(Query(since=_rec(3).time_unix_nano))] == ["req-3", "req-4"]
    assert s.seal(force=True)
    assert _raw(s, "SELECT count(*) FROM audit_records") == [(4,)]  # sealed away
    assert _raw(s, "SELECT request_id, status FROM audit_part_3") == [("req-4", "OK")]
    assert s.count() == 4 and sorted(_by_request(s)) == ["req-1", "req-2", "req-3", "req-4"]
    for store in (s, other, third):
        store.close()


def test_queries_see_sealed_and_active_partitions_as_one_table(tmp_path):
    s = _sqlite(tmp_path / "a.db", seal_rows=7)
    rng = __import__("random").Random(5)
    records = []
    for i in range(1, 40):  # out of time order, as exports from several clients arrive
        r = _rec(i, t=T0 + rng.randrange(0, 30) * SECOND, version=rng.choice(["1.0", "2.0", None]),
                 status=rng.choice(["OK", "ERROR"]))
        records.append(r)
    for i in range(0, len(records), 3):
        _write(s, *records[i:i + 3])
    assert len([1 for _, sealed in _partitions(s) if sealed]) == 1 + 4  # the migrated empty one, four of 9 rows
    order = sorted(records, key=lambda r: (r.time_unix_nano, r.trace_id, r.span_id))

    def ids(q: Query) -> list[str]:
        return [r.request_id for r in s.query(q)]

    assert s.query(Query()) == order
    assert ids(Query(limit=5)) == [r.request_id for r in order[:5]]
    assert ids(Query(request_id="req-17")) == ["req-17"]
    assert ids(Query(trace_id=_rec(33).trace_id.upper())) == ["req-33"]
    assert ids(Query(model_version="2.0")) == [r.request_id for r in order if r.model_version == "2.0"]
    assert ids(Query(status="error", limit=3)) == [r.request_id for r in order if r.status == "ERROR"][:3]
    since, until = T0 + 10 * SECOND, T0 + 20 * SECOND
    assert ids(Query(since=since, until=until)) == \
        [r.request_id for r in order if since <= r.time_unix_nano < until]
    assert s.count() == 39
    assert s.newest_time() == order[-1].time_unix_nano
    # the operators' view: plain SQL over every partition
    conn = sqlite3.connect(s.path)
    assert conn.execute("SELECT count(*), max(time_unix_nano) FROM audit_records").fetchone() == \
        (39, order[-1].time_unix_nano)
    conn.close()
    s.close()


def test_retention_drops_whole_partitions_and_cuts_the_one_that_straddles(tmp_path):
    s = _sqlite(tmp_path / "a.db", seal_rows=10)
    pad = "x" * 4000
    for part in range(4):  # partitions 2..4 sealed, 5 active: ten records each, a minute apart
        recs = [_rec(part * 10 + i, t=T0 + (part * 60 + i) * SECOND) for i in range(10)]
        for r in recs:
            r.input_payload = pad
        _write(s, *recs)
    s.mark_kept({_rec(35).trace_id: "p"})
    assert _partitions(s) == [(1, True), (2, True), (3, True), (4, True), (5, True), (6, False)]

    def tables() -> set[str]:
        return {r[0] for r in _raw(s, "SELECT name FROM sqlite_master WHERE type = 'table' "
                                      "AND name GLOB 'audit_part_[0-9]*'")}

    # a cutoff inside the second partition: the first goes whole, the second is cut
    assert s.delete_older_than(T0 + 65 * SECOND) == 15
    assert tables() == {"audit_part_3", "audit_part_4", "audit_part_5", "audit_part_6"}
    assert s.count() == 25 and min(r.time_unix_nano for r in s.query(Query())) == T0 + 65 * SECOND
    assert _raw(s, "SELECT count(*) FROM audit_records") == [(25,)]
    assert _raw(s, "PRAGMA freelist_count") == [(0,)]  # the dropped pages went back
    # by size: the oldest partitions first, the newest records stay
    size = s.size_bytes()
    deleted = s.shrink_to(size // 2)
    assert s.size_bytes() <= size // 2 and deleted >= 12 and s.count() == 25 - deleted
    assert "audit_part_3" not in tables()
    got = s.query(Query())
    assert max(r.time_unix_nano for r in got) == T0 + 189 * SECOND
    assert sorted(r.request_id for r in got) == sorted(f"req-{i}" for i in range(40 - len(got), 40))
    assert next(r for r in got if r.request_id == "req-35").kept_policy == "p"
    _write(s, _rec(40, t=T0 + 300 * SECOND))  # still writable, into the active partition
    assert s.count() == 25 - deleted + 1
    s.close()


def test_a_seal_leaves_kept_marks_to_the_view_and_a_store_from_before_gets_that_view_at_open(tmp_path):
    """A seal folds no kept mark into its rows (rewriting every page of the partition): ``audit_records``, the
    view for ad-hoc SQL, applies ``audit_kept``. A store whose view predates that gets it when opened."""
    path = tmp_path / "a.db"
    s = _sqlite(path, seal_rows=2)
    s.mark_kept({_rec(1).trace_id: "errors"})
    _write(s, _rec(1), _rec(2))  # sealed
    assert _raw(s, "SELECT trace_kept FROM audit_part_2 ORDER BY request_id") == [(0,), (0,)]
    raw = "SELECT request_id, trace_kept, kept_policy FROM audit_records ORDER BY request_id"
    assert _raw(s, raw) == [("req-1", 1, "errors"), ("req-2", 0, None)]
    s.close()
    with sqlite3.connect(path) as conn:  # the view as sidecars before 2026-12 made it: the partitions' rows
        conn.execute("DROP VIEW audit_records")
        conn.execute("CREATE VIEW audit_records AS SELECT * FROM audit_part_2 UNION ALL SELECT * FROM audit_part_3")
    s = _sqlite(path, seal_rows=2)
    assert _raw(s, raw) == [("req-1", 1, "errors"), ("req-2", 0, None)]
    s.close()


def test_retention_keeps_what_late_marks_and_fragments_said_of_a_record_it_keeps(tmp_path):
    """Marks and fragments go by when they were stored, records by their start time (a client clock ahead)."""
    s = _sqlite(tmp_path / "a.db", seal_rows=2)
    ahead = time.time_ns() + 3600 * SECOND
    _write(s, _rec(1, t=ahead, version=None), _rec(2, t=ahead + 1))  # sealed
    _write(s, _rec(3, t=ahead + 2, version=None))  # active
    for i in (1, 3):  # after their records
        _write(s, fragments=(_frag(i, model_version=f"9.{i}"),))
        s.mark_kept({_rec(i).trace_id: f"p{i}"})
    assert s.delete_older_than(time.time_ns() + SECOND) == 0  # the marks and fragments are older than that
    assert _raw(s, "SELECT count(*) FROM audit_kept") == [(0,)]
    assert _raw(s, "SELECT count(*) FROM audit_fragments") == [(0,)]
    got = _by_request(s)
    for i in (1, 3):
        assert (got[f"req-{i}"].model_version, got[f"req-{i}"].kept_policy) == (f"9.{i}", f"p{i}")
    assert not got["req-2"].trace_kept
    s.close()


#: the layout of schema version 2, frozen here as a store written by an older sidecar has it
_V2_DDL = [
    """CREATE TABLE audit_records (
        trace_id TEXT NOT NULL, span_id TEXT NOT NULL,
        time_unix_nano BIGINT NOT NULL, recorded_unix_nano BIGINT NOT NULL,
        service TEXT NOT NULL, span_name TEXT NOT NULL, request_id TEXT,
        model_id TEXT, model_version TEXT, user_id TEXT, intent TEXT, tags TEXT NOT NULL,
        latency_ms DOUBLE PRECISION NOT NULL, status TEXT NOT NULL, error_code TEXT,
        parameters TEXT NOT NULL, input_payload TEXT, output_payload TEXT,
        trace_kept INTEGER NOT NULL DEFAULT 0, kept_policy TEXT,
        PRIMARY KEY (trace_id, span_id))""",
    """CREATE TABLE audit_fragments (
        trace_id TEXT NOT NULL, span_id TEXT NOT NULL, service TEXT NOT NULL, fields TEXT NOT NULL,
        recorded_unix_nano BIGINT NOT NULL, PRIMARY KEY (trace_id, span_id))""",
    """CREATE TABLE audit_kept (
        trace_id TEXT PRIMARY KEY, policy TEXT NOT NULL, recorded_unix_nano BIGINT NOT NULL)""",
    "CREATE INDEX audit_records_time ON audit_records (time_unix_nano)",
    "CREATE INDEX audit_records_request ON audit_records (request_id)",
    "CREATE INDEX audit_records_model ON audit_records (model_version, time_unix_nano)",
    "CREATE INDEX audit_kept_recorded ON audit_kept (recorded_unix_nano)",
    "CREATE TABLE audit_schema (version INTEGER NOT NULL)",
    "INSERT INTO audit_schema (version) VALUES (2)",
]


def _indexes(store, table: str) -> set[str]:
    return {r[0] for r in _raw(store, f"SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = '{table}'")}


def test_the_active_partition_has_no_index_and_its_seal_builds_them(tmp_path):
    """A record is one append to one B-tree; the reads' indexes are built once, when the partition is sealed.
    A store whose active partition had a time index (written before) drops it at open: the seal makes it again."""
    path = tmp_path / "a.db"
    s = _sqlite(path, seal_rows=10)
    assert _partitions(s)[-1] == (2, False) and _indexes(s, "audit_part_2") == set()
    with s._transaction() as cur:  # as a store written before this change left its active partition
        cur.execute("CREATE INDEX audit_part_2_time ON audit_part_2 (time_unix_nano)")
    s.close()
    s = _sqlite(path, seal_rows=10)
    assert _indexes(s, "audit_part_2") == set()
    _write(s, *[_rec(i) for i in range(1, 13)])
    assert _partitions(s)[-2:] == [(2, True), (3, False)]
    assert _indexes(s, "audit_part_2") == {"audit_part_2_time", "audit_part_2_trace", "audit_part_2_request",
                                           "audit_part_2_model"}
    assert _indexes(s, "audit_part_3") == set()
    assert [r.request_id for r in s.query(Query(since=T0 + 5 * SECOND, until=T0 + 7 * SECOND))] == ["req-5", "req-6"]
    s.close()


def test_a_version_2_store_becomes_the_first_sealed_partition(tmp_path):
    path = tmp_path / "v2.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    conn.execute("PRAGMA journal_mode = WAL")
    for stmt in _V2_DDL:
        conn.execute(stmt)
    old = [_rec(i) for i in range(1, 301)]
    conn.executemany(f"INSERT INTO audit_records VALUES ({', '.join('?' * 20)})", [_row(r, T0) for r in old])
    conn.execute("INSERT INTO audit_fragments VALUES (?, ?, 'svc', ?, ?)",  # waiting for a record not yet written
                 (_rec(301).trace_id, "ff" * 8, '{"model_id": "m301"}', T0))
    conn.close()
    s = _sqlite(path, seal_rows=50)
    assert s.schema_version() == SCHEMA_VERSIONS["sqlite"]
    assert _partitions(s) == [(1, True), (2, False)]
    indexes = {r[0] for r in _raw(s, "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = "
                                     "'audit_part_1'")}
    assert {"audit_records_time", "audit_records_request", "audit_records_model"} <= indexes  # they followed
    assert s.query(Query()) == old
    assert [r.request_id for r in s.query(Query(request_id="req-150"))] == ["req-150"]
    assert s.count() == 300
    assert _write(s, _rec(300), _rec(301)) == 2  # a retry of a migrated record (not in this store's memory)
    got = _by_request(s)
    assert len(got) == 301 and got["req-301"].model_id == "m301"
    assert s.seal(force=True)
    assert _raw(s, "SELECT count(*) FROM audit_records") == [(301,)]
    s.close()
    again = open_store(str(path)).open()  # reopening migrates nothing more
    assert again.schema_version() == SCHEMA_VERSIONS["sqlite"] and again.count() == 301
    again.close()


def test_a_reader_in_another_connection_during_seals_sees_every_record_once(tmp_path):
    path = tmp_path / "a.db"
    writer = _sqlite(path, seal_rows=10**9)  # sealed by hand below
    records = [_rec(i, t=T0 + i) for i in range(1, 3001)]
    for i in range(0, 3000, 500):
        _write(writer, *records[i:i + 500])
    _write(_sqlite(path), *records[:200])  # duplicates from a writer that does not remember them
    expected = [r.request_id for r in records]
    reader = open_store(str(path)).open()  # another connection
    reads, bad, stop = [0], [], threading.Event()

    def read():
        while not stop.is_set():
            got = [r.request_id for r in reader.query(Query())]
            n = reader.count()
            if got != expected or n != 3000:
                bad.append((len(got), len(set(got)), n))
            reads[0] += 1

    t = threading.Thread(target=read)
    t.start()
    try:
        deadline = time.monotonic() + 60
        for _ in range(3):  # seal while reads run: each read sees before or after, never between
            before = reads[0]
            while reads[0] == before:
                assert time.monotonic() < deadline and t.is_alive()
                time.sleep(0.001)
            assert writer.seal(force=True)
            _write(_sqlite(path), *records[2000:2100])  # and duplicates straddling it
    finally:
        stop.set()
        t.join(60)
    assert not bad, bad[:3]
    assert reads[0] >= 3
    assert _raw(writer, "SELECT count(*) FROM audit_records") == [(3100,)]  # the last straddling duplicates
    reader.close()
    writer.close()


def test_two_stores_on_one_file_write_records_and_marks_across_seals(tmp_path):
    """The audit exporter and the audit/kept exporter: two connections, one seals while the other marks."""
    path = tmp_path / "a.db"
    records, marks = _sqlite(path, seal_rows=20), _sqlite(path, seal_rows=20)
    recs = [_rec(i) for i in range(100)]
    errors = []

    def mark():
        try:
            for r in recs:
                marks.mark_kept({r.trace_id: f"p{r.request_id}"})
        except Exception as e:  # noqa: BLE001 - the test reports it
            errors.append(e)

    t = threading.Thread(target=mark)
    t.start()
    for i in range(0, 100, 5):
        _write(records, *recs[i:i + 5])
    t.join(60)
    assert not errors
    got = _by_request(marks)
    assert len(got) == 100 and all(r.kept_policy == f"p{r.request_id}" for r in got.values())
    assert len(_partitions(records)) == 1 + 5 + 1  # migrated empty, five sealed, the active one
    records.close()
    marks.close()


def test_a_large_group_of_records_fragments_and_marks_is_stored_whole_and_once(store):
    """A write holding more records than one INSERT statement carries (several statements per group) loses,
    reorders and repeats nothing; so do fragments and kept marks on the same path."""
    n = 300  # 256 + 32 + 8 + 4 rows per statement
    records = [_rec(i) for i in range(n)]
    fragments = tuple(_frag(i, model_id="resnet") for i in range(n, n + 300))
    assert _write(store, *records, fragments=fragments) == n
    assert store.mark_kept({f"{i:032x}": "errors" for i in range(0, n, 2)}) == 150
    got = _by_request(store)
    assert sorted(got) == sorted(f"req-{i}" for i in range(n))
    assert all(got[f"req-{i}"].parameters == {"batch_size": i} for i in range(n))
    assert [i for i in range(n) if got[f"req-{i}"].trace_kept] == list(range(0, n, 2))
    assert store.count() == n
    assert _write(store, *records) == 0  # the retry of the whole group
    assert store.count() == n
    # the fragments waited for records of their own traces: each one is there, and completes its record
    late = [_rec(i) for i in range(n, n + 300)]
    _write(store, *late)
    assert all(r.model_id == "resnet" for r in store.query(Query()) if int(r.trace_id, 16) >= n)


def test_in_lists_bind_any_number_of_values_in_a_few_statement_texts():
    """The store's IN lists are padded to a power of two with the last value (the same answer), so a few
    statement texts serve every size and stay in the driver's statement cache (docs/benchmarks.md, eighth round)."""
    from sidecar.audit.store import _in

    assert _in(["a"]) == ("(?)", ["a"])
    assert _in(["a", "b", "c"]) == ("(?, ?, ?, ?)", ["a", "b", "c", "c"])
    texts = set()
    for n in range(1, 513):
        text, args = _in(list(range(n)))
        assert text.count("?") == len(args) >= n and set(args) == set(range(n))
        texts.add(text)
    assert len(texts) == 10


def test_what_retention_deletes_is_gone_from_the_database_file(tmp_path):
    """A deleted record's text must not stay readable in the file: neither in the pages that held it (the cut
    partition's rows) nor on pages freed whole (dropped partitions, long payloads' overflow pages), whatever
    the SQLite build's own secure_delete default."""
    s = _sqlite(tmp_path / "a.db", seal_rows=10)
    for part in range(3):  # partitions 2 and 3 sealed, 4 active; each record's payloads carry its own marker
        recs = [_rec(part * 10 + i, t=T0 + (part * 60 + i) * SECOND) for i in range(10)]
        for r in recs:
            r.input_payload = f"short-marker-{r.request_id}."
            r.output_payload = f"long-marker-{r.request_id}." * 400  # past a page: overflow pages
        _write(s, *recs)
    assert s.delete_older_than(T0 + 65 * SECOND) == 15  # partition 2 dropped, 3 cut in its middle
    _raw(s, "PRAGMA wal_checkpoint(TRUNCATE)")
    s.close()
    data = b"".join(f.read_bytes() for f in tmp_path.iterdir())  # the database; its log, if closing left one
    for i in range(30):
        gone = i < 15
        for marker in (f"short-marker-req-{i}.", f"long-marker-req-{i}."):
            assert (marker.encode() in data) != gone, f"{marker} {'still in' if gone else 'missing from'} the file"
