"""The audit journal: the request path appends a request's bytes; records are made from them later.

What a user relies on: a request acknowledged through the journal reads back exactly as if its
records had been written on the request path (same records, fragments merged, duplicates once,
kept marks), from any reader, in any process, after any crash; retention covers it; a damaged
entry is kept and reported, never retried forever nor blocking the others. SQLite (across seals)
and a real PostgreSQL.
"""

import random
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

from sidecar.audit.records import extract
from sidecar.audit.store import JOURNAL_BATCH, Query, SQLiteStore, StoreError
from sidecar.audit.urls import open_store

from .spans import App


@pytest.fixture(params=["sqlite", "postgres"])
def two_stores(request, tmp_path):
    """Two empty stores of one kind: one written on the request path, one journaled."""
    if request.param == "sqlite":
        # a small seal size: the journal's records cross seals as written records do
        stores = [SQLiteStore(str(tmp_path / f"{n}.db"), str(tmp_path / f"{n}.db"), seal_rows=23).open()
                  for n in ("written", "journaled")]
    else:
        server = request.getfixturevalue("postgres_server")
        stores = [open_store(server.new_database()).open() for _ in range(2)]
    yield stores
    for s in stores:
        s.close()


def _traffic(rng: random.Random, n: int) -> list:
    """Export requests as SDKs send them: spans of one trace split across requests (the model span before or
    after its server span), generation spans, errors, and retries of whole requests."""
    app = App()
    spans = []
    for i in range(n):
        generation = rng.random() < 0.3
        app.request(f"req-{i}", version=rng.choice(["1.0", "2.0"]), status=rng.choice([200, 200, 404, 503]),
                    generation=generation, user=f"user-{i % 7}")
        # one model per trace: with two, which one a record names depends on arrival order and seal timing
        spans.extend(s for s in app.exporter.get_finished_spans()
                     if not (generation and s.name.startswith("ml.forward")))
        app.exporter.clear()
    rng.shuffle(spans)  # a trace's spans end up in different requests, in either order
    requests, i = [], 0
    while i < len(spans):
        k = rng.randint(1, 12)
        requests.append(encode_spans(spans[i:i + k]).SerializeToString())
        i += k
    for _ in range(len(requests) // 5):  # client retries, some long after
        requests.insert(rng.randint(0, len(requests)), rng.choice(requests))
    return requests


def _journaled(tmp_path, *request_ids: str) -> tuple[SQLiteStore, App]:
    """A SQLite store at ``tmp_path/audit.db`` whose journal holds one export per request id, and the app."""
    path = tmp_path / "audit.db"
    store = SQLiteStore(str(path), str(path)).open()
    app = App()
    for rid in request_ids:
        app.request(rid)
        store.append(app.take().SerializeToString())
    return store, app


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_journaled_requests_read_back_exactly_as_requests_written_as_records(two_stores, seed):
    written, journaled = two_stores
    rng = random.Random(seed)
    requests = _traffic(rng, 60)
    trace_ids = sorted({r.trace_id for req in requests for r in extract(req).records})
    for n, req in enumerate(requests):
        written.write(extract(req))
        journaled.append(req)
        if n % 9 == 4:  # tail sampling's kept marks, before or after the records they mark
            marks = {t: rng.choice(["errors", "baseline"]) for t in rng.sample(trace_ids, 3)}
            written.mark_kept(marks)
            journaled.mark_kept(marks)
        if n % 31 == 30:  # a reader in between: what is journaled so far is indexed
            assert journaled.count() == written.count()
    expected = written.query(Query())
    assert len(expected) == 60 and len({(r.trace_id, r.span_id) for r in expected}) == 60
    assert journaled.query(Query()) == expected
    assert any(r.trace_kept for r in expected) and any(r.model_version for r in expected)
    assert journaled.count() == 60
    for q in (Query(model_version="2.0"), Query(status="ERROR"), Query(request_id="req-7"),
              Query(since=expected[10].time_unix_nano, limit=5)):
        assert journaled.query(q) == written.query(q), q
    assert journaled.journal_entries() == (0, 0)


def test_what_the_journal_holds_is_on_record_for_a_reader_in_another_process(tmp_path):
    """The sidecar appended and died (no close, no indexing); the operator's ``audit query`` sees it all."""
    path = tmp_path / "audit.db"
    store = SQLiteStore(str(path), str(path)).open()
    app = App()
    for i in range(3):
        app.request(f"req-{i}", version="3.1")
    store.append(app.take().SerializeToString())
    assert store.journal_entries() == (1, 0)
    out = subprocess.run([sys.executable, "-m", "sidecar", "audit", "query", "--store", str(path),
                          "--model-version", "3.1", "--format", "jsonl"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert sorted(line.split('"request_id": "')[1].split('"')[0] for line in out.stdout.splitlines()) == \
        ["req-0", "req-1", "req-2"]
    assert store.journal_entries() == (0, 0)  # indexed by that reader, once
    assert store.count() == 3
    store.close()


def test_a_damaged_entry_is_kept_with_its_error_and_the_others_are_indexed(tmp_path):
    path = tmp_path / "audit.db"
    store, app = _journaled(tmp_path, "before")
    db = sqlite3.connect(path, isolation_level=None)  # bytes damaged on disk, after they were accepted
    db.execute("INSERT INTO audit_journal (recorded_unix_nano, request) VALUES (1, x'0a05ffffffffff')")
    db.close()
    app.request("after")
    store.append(app.take().SerializeToString())
    done = store.index_journal()
    assert (done.entries, done.written, done.unreadable) == (2, 2, 1)
    assert sorted(r.request_id for r in store.query(Query())) == ["after", "before"]
    assert store.journal_entries() == (0, 1)  # kept for an operator, not retried at every read
    assert store.index_journal().unreadable == 0
    (error,) = sqlite3.connect(path).execute("SELECT error FROM audit_journal").fetchone()
    assert error
    store.close()


def test_running_out_of_memory_while_indexing_leaves_the_entry_journaled(tmp_path, monkeypatch):
    """Memory is the process's state, not the entry's: the entry is not marked unreadable, and the next run
    indexes it (the exporter's index task logs a StoreError and tries again at its next interval)."""
    import sidecar.audit.store as store_module

    store, _ = _journaled(tmp_path, "one")
    real = store_module._rows_of

    def no_memory(request, recorded, missing=None):
        raise MemoryError

    monkeypatch.setattr(store_module, "_rows_of", no_memory)
    with pytest.raises(StoreError, match="out of memory"):
        store.index_journal()
    assert store.journal_entries() == (1, 0)
    monkeypatch.setattr(store_module, "_rows_of", real)
    assert [r.request_id for r in store.query(Query())] == ["one"]
    store.close()


def test_appends_go_on_while_a_long_journal_is_indexed_in_batches(tmp_path):
    entries = JOURNAL_BATCH * 4 + 3
    store, app = _journaled(tmp_path, *(f"req-{i}" for i in range(entries)))
    commits = store.group_commit.commits
    appended = []

    def append_more():
        for i in range(entries, entries + 40):
            app.request(f"req-{i}")
            store.append(app.take().SerializeToString())
            appended.append(i)

    t = threading.Thread(target=append_more)
    t.start()
    done = store.index_journal()
    t.join()
    assert store.group_commit.commits - commits >= 5  # one transaction per batch, not one for everything
    assert done.entries >= entries and done.written == done.entries
    assert store.count() == entries + 40
    assert sorted(int(r.request_id.split("-")[1]) for r in store.query(Query())) == list(range(entries + 40))
    store.close()


def test_a_batch_holds_at_most_its_bytes_but_always_one_entry(tmp_path, monkeypatch):
    """Memory holds one batch of requests at most: big requests are indexed a few at a time."""
    import sidecar.audit.store as store_module

    store, _ = _journaled(tmp_path, *(f"req-{i}" for i in range(5)))
    monkeypatch.setattr(store_module, "JOURNAL_BATCH_BYTES", 1)  # every entry is bigger than that
    batches = []
    store.on_indexed = batches.append
    done = store.index_journal()
    assert [b.entries for b in batches] == [1, 1, 1, 1, 1] and done.written == 5
    assert not batches[-1].more and all(b.more for b in batches[:-1])
    store.close()


def test_two_processes_indexing_one_journal_make_each_record_once(tmp_path):
    """The sidecar's index task and an operator's ``audit query`` at the same time: each entry is indexed by one
    of them (the other skips it), and both counts add up to the records."""
    path = tmp_path / "audit.db"
    stores = [_journaled(tmp_path, *(f"req-{i}" for i in range(JOURNAL_BATCH * 3)))[0],
              SQLiteStore(str(path), str(path)).open()]
    done = [None, None]
    threads = [threading.Thread(target=lambda k=k: done.__setitem__(k, stores[k].index_journal())) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert done[0].written + done[1].written == JOURNAL_BATCH * 3
    assert done[0].entries + done[1].entries == JOURNAL_BATCH * 3
    assert done[0].duplicates == done[1].duplicates == 0
    assert stores[1].count() == JOURNAL_BATCH * 3 and stores[0].journal_entries() == (0, 0)
    for s in stores:
        s.close()


def test_retention_covers_journaled_requests(tmp_path):
    store, _ = _journaled(tmp_path, "old")
    assert store.delete_older_than(time.time_ns() + 3600 * 10**9) == 1  # journaled, then deleted by age
    assert store.count() == 0 and store.journal_entries() == (0, 0)
    store.close()
