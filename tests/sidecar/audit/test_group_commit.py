"""Group commit in the audit stores (SQLite and a real PostgreSQL): writes arriving together share one
transaction, each returns only after it committed, and one failing write refuses only its own request."""

import threading
import time

import pytest

from sidecar.audit.records import AuditRecord, Extraction, extract
from sidecar.audit.store import Query
from sidecar.audit.urls import open_store

from .spans import App

DEADLINE = 30.0


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = open_store(f"sqlite:///{tmp_path}/audit/audit.db")
    else:
        s = open_store(request.getfixturevalue("pg_url"))
    s.open()
    yield s
    s.close()


def _wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _writes_while_a_commit_runs(store, extractions: list[Extraction]) -> list:
    """Hold the store's connection while the first write leads its commit, let the others queue behind it
    (they form the next group), then release; returns each write's result or exception."""
    results: list = [None] * len(extractions)

    def write(i):
        try:
            results[i] = store.write(extractions[i])
        except Exception as e:  # noqa: BLE001 - the test inspects it
            results[i] = e

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(extractions))]
    with store._lock:  # the connection: the first leader waits here with its group of one
        threads[0].start()
        _wait_for(lambda: store.group_commit.committing, "the first write to lead a commit")
        for t in threads[1:]:
            t.start()
        _wait_for(lambda: len(store.group_commit.waiting()) == len(threads) - 1, "the others to join the next group")
        assert all(r is None for r in results)  # nobody is acknowledged before their commit
    for t in threads:
        t.join(DEADLINE)
    return results


def test_writes_arriving_together_share_one_commit_and_each_is_stored(store):
    app = App()
    extractions = []
    for i in range(6):
        app.request(f"req-{i}")
        extractions.append(extract(app.take()))
    before, counted = store.group_commit.commits, []
    store.on_commit = lambda: counted.append(1)  # the exporter's sidecar_audit_store_commits_total
    results = _writes_while_a_commit_runs(store, extractions)
    assert results == [1] * 6
    assert store.group_commit.commits - before == 2 == len(counted)  # the first alone, then the five that arrived meanwhile
    assert sorted(r.request_id for r in store.query(Query())) == [f"req-{i}" for i in range(6)]
    # idempotent across groups too: the same records again store nothing new
    assert _writes_while_a_commit_runs(store, extractions) == [0] * 6
    assert store.count() == 6


def test_a_failing_write_refuses_only_its_own_request(store):
    app = App()
    extractions = []
    for i in range(4):
        app.request(f"req-{i}")
        extractions.append(extract(app.take()))
    bad = AuditRecord(trace_id="ab" * 16, span_id="cd" * 8, time_unix_nano=1, parameters={"x": object()})
    extractions.insert(2, Extraction([bad], []))  # cannot be stored (not JSON): this write alone fails
    results = _writes_while_a_commit_runs(store, extractions)
    assert isinstance(results[2], TypeError)
    assert results[:2] + results[3:] == [1] * 4
    assert sorted(r.request_id for r in store.query(Query())) == [f"req-{i}" for i in range(4)]
