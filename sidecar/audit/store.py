"""Where audit records live: SQLite (embedded default) or PostgreSQL, one schema, one SQL dialect.

``open_store(url)`` (:mod:`sidecar.audit.urls`): ``sqlite:///var/audit.db`` (or a bare path) or ``postgresql://...``.
The request path journals (:meth:`AuditStore.append`: the request's bytes, one row) and records are made
from the journal later, in bulk (:meth:`AuditStore.index_journal`; every read does it first).
Every write is durable when :meth:`AuditStore.write` or ``append`` returns (SQLite: WAL with
``synchronous=FULL``; PostgreSQL: a committed transaction), so the exporter can acknowledge
after it. Writes that arrive together share one transaction and one commit (group commit,
:mod:`sidecar.group_commit`, as the persistent queue does): each in its own savepoint, so
one failing write refuses only its own request, and every writer returns only after the
shared commit. Records are keyed by (trace_id, span_id): writing the same record twice keeps
the first, so a retried export never duplicates.

Schema changes are versioned migrations, per dialect (:data:`MIGRATIONS`), applied in order at
open; a store written by a newer sidecar is refused rather than guessed at. Errors surface as
:class:`StoreError` (the exporter refuses with a retryable code on it).

Two layouts. PostgreSQL (:class:`AuditStore`'s own methods): one ``audit_records`` table keyed
by (trace_id, span_id). SQLite (:class:`SQLiteStore`): time-ordered partitions, so a record's
write costs the same whatever the store holds; see there.
"""

from __future__ import annotations

import functools
import heapq
import json
import logging
import os
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterator

from sidecar import wire
from sidecar.audit.records import ROW_LAYOUT, SORTED_JSON, AuditRecord, Extraction, Fragment, extract, merge
from sidecar.group_commit import GroupCommit, Member

log = logging.getLogger(__name__)

_RECORD_COLUMNS = """trace_id TEXT NOT NULL, span_id TEXT NOT NULL,
            time_unix_nano BIGINT NOT NULL, recorded_unix_nano BIGINT NOT NULL,
            service TEXT NOT NULL, span_name TEXT NOT NULL, request_id TEXT,
            model_id TEXT, model_version TEXT, user_id TEXT, intent TEXT, tags TEXT NOT NULL,
            latency_ms DOUBLE PRECISION NOT NULL, status TEXT NOT NULL, error_code TEXT,
            parameters TEXT NOT NULL, input_payload TEXT, output_payload TEXT,
            trace_kept INTEGER NOT NULL DEFAULT 0, kept_policy TEXT"""

#: the steps both dialects share: one ``audit_records`` table (PostgreSQL stays at this layout)
_ONE_TABLE: list[tuple[int, list[str]]] = [
    (1, [
        f"""CREATE TABLE audit_records (
            {_RECORD_COLUMNS},
            PRIMARY KEY (trace_id, span_id))""",
        """CREATE TABLE audit_fragments (
            trace_id TEXT NOT NULL, span_id TEXT NOT NULL, service TEXT NOT NULL, fields TEXT NOT NULL,
            recorded_unix_nano BIGINT NOT NULL, PRIMARY KEY (trace_id, span_id))""",
        """CREATE TABLE audit_kept (
            trace_id TEXT PRIMARY KEY, policy TEXT NOT NULL, recorded_unix_nano BIGINT NOT NULL)""",
        "CREATE INDEX audit_records_time ON audit_records (time_unix_nano)",
    ]),
    (2, [
        "CREATE INDEX audit_records_request ON audit_records (request_id)",
        "CREATE INDEX audit_records_model ON audit_records (model_version, time_unix_nano)",
        "CREATE INDEX audit_kept_recorded ON audit_kept (recorded_unix_nano)",
    ]),
]

COLUMNS = ("trace_id", "span_id", "time_unix_nano", "recorded_unix_nano", "service", "span_name", "request_id",
           "model_id", "model_version", "user_id", "intent", "tags", "latency_ms", "status", "error_code",
           "parameters", "input_payload", "output_payload", "trace_kept", "kept_policy")
_COLUMN_LIST = ", ".join(COLUMNS)
#: set from ``audit_kept`` (SQLite: by reads and the view; the last two columns)
_MARK_COLUMNS = ("trace_kept", "kept_policy")
assert COLUMNS[-2:] == _MARK_COLUMNS
#: the record columns that may be NULL (all of them TEXT): see :func:`_insert`
_NULLABLE = tuple(i for i, part in enumerate(_RECORD_COLUMNS.split(",")) if "NOT NULL" not in part)
_NULLABLE_NAMES = tuple(COLUMNS[i] for i in _NULLABLE)

#: SQLite 3: the table becomes the first sealed partition (its indexes follow it), an empty active partition
#: starts, the catalog lists both and ``audit_records`` becomes a view over them (see :class:`SQLiteStore`)
_PARTITIONS: tuple[int, list[str]] = (3, [
    "ALTER TABLE audit_records RENAME TO audit_part_1",
    """CREATE TABLE audit_partitions (
        number INTEGER PRIMARY KEY, sealed INTEGER NOT NULL, rows INTEGER NOT NULL,
        min_time BIGINT, max_time BIGINT, sealed_unix_nano BIGINT)""",
    "INSERT INTO audit_partitions (number, sealed, rows, min_time, max_time, sealed_unix_nano) "
    "SELECT 1, 1, count(*), min(time_unix_nano), max(time_unix_nano), 0 FROM audit_part_1",
    f"CREATE TABLE audit_part_2 ({_RECORD_COLUMNS})",
    "CREATE INDEX audit_part_2_time ON audit_part_2 (time_unix_nano)",
    "INSERT INTO audit_partitions (number, sealed, rows) VALUES (2, 0, 0)",
    f"CREATE VIEW audit_records AS SELECT {_COLUMN_LIST} FROM audit_part_1 "
    f"UNION ALL SELECT {_COLUMN_LIST} FROM audit_part_2",
])

#: the journal: requests acknowledged and not yet indexed into records (see :meth:`AuditStore.append`);
#: ``error`` is set on an entry that could not be read into records (kept, skipped, reported)
_JOURNAL = "CREATE TABLE audit_journal (seq {seq} PRIMARY KEY, recorded_unix_nano BIGINT NOT NULL, " \
           "request {blob} NOT NULL, error TEXT)"

#: dialect -> (version, statements) in order. Append, never edit: a store remembers the version it reached.
MIGRATIONS: dict[str, list[tuple[int, list[str]]]] = {
    "postgresql": _ONE_TABLE + [(3, [_JOURNAL.format(seq="BIGSERIAL", blob="BYTEA")])],
    "sqlite": _ONE_TABLE + [_PARTITIONS, (4, [_JOURNAL.format(seq="INTEGER", blob="BLOB")])],
}
#: dialect -> the schema version this sidecar writes
SCHEMA_VERSIONS: dict[str, int] = {dialect: steps[-1][0] for dialect, steps in MIGRATIONS.items()}

_JSON_COLUMNS = ("tags", "parameters")
_FRAGMENT_FIELDS = ("model_id", "model_version", "parameters", "input_payload", "output_payload")


#: a write's part of a group's transaction: ``work(cursor, now)`` -> its result (e.g. how many records were new)
_Work = Callable[[Any, int], Any]

#: journal entries indexed per transaction, and their most bytes (one entry at least): appends arriving meanwhile
#: wait for at most one batch, and memory holds at most one batch of requests
JOURNAL_BATCH = 32
JOURNAL_BATCH_BYTES = 8 << 20


class StoreError(Exception):
    """The store could not do what was asked (down, slow, full, locked); retrying may help."""


@dataclass
class Query:
    """``audit query`` filters; None means no filter. Times are unix nanoseconds."""

    request_id: str | None = None
    trace_id: str | None = None
    model_version: str | None = None
    status: str | None = None
    since: int | None = None
    until: int | None = None
    limit: int | None = None


@dataclass
class Indexed:
    """What one :meth:`AuditStore.index_journal` did: journal entries read, records new and already stored,
    entries that could not be read (left in the journal with their error), the newest record's start time."""

    entries: int = 0
    written: int = 0
    duplicates: int = 0
    unreadable: int = 0
    newest_time: int | None = None
    #: entries were left for another batch
    more: bool = False

    def add(self, other: "Indexed") -> None:
        self.entries += other.entries
        self.written += other.written
        self.duplicates += other.duplicates
        self.unreadable += other.unreadable
        if other.newest_time is not None and (self.newest_time is None or other.newest_time > self.newest_time):
            self.newest_time = other.newest_time


def _json(d: dict) -> str:
    return SORTED_JSON(d) if d else "{}"


def _row(rec: AuditRecord, now: int, missing: Any = None) -> tuple:
    """The record's values in :data:`COLUMNS` order, ``missing`` for each text it lacks (see :func:`_insert`)."""
    row = (rec.trace_id, rec.span_id, rec.time_unix_nano, now, rec.service, rec.span_name, rec.request_id,
           rec.model_id, rec.model_version, rec.user_id, rec.intent, _json(rec.tags), rec.latency_ms, rec.status,
           rec.error_code, _json(rec.parameters), rec.input_payload, rec.output_payload, int(rec.trace_kept),
           rec.kept_policy)
    return row if missing is None else tuple(missing if v is None else v for v in row)


def _rows_of(request: bytes, recorded: int, missing: Any = None) -> tuple[list[tuple], list[Fragment]]:
    """The rows of a journaled request's records (``recorded``: when it was journaled; ``missing``: a text a record
    lacks) and its fragments: one C pass (:func:`sidecar.wire.audit_rows`) for the usual request, else
    :func:`sidecar.audit.records.extract`."""
    rows = wire.audit_rows(request, ROW_LAYOUT, recorded, missing)
    if rows is not None:
        return rows, []
    extraction = extract(request)
    return [_row(rec, recorded, missing) for rec in extraction.records], extraction.fragments


def _with_fragments(rec: AuditRecord, fragments: list[dict]) -> AuditRecord:
    """The record with the facts of the fragments that waited for it merged in (:func:`records.merge`)."""
    fields_ = rec.to_json()
    for frag in fragments:
        merge(fields_, frag)
    return AuditRecord(**fields_)


def _completed(row: tuple, fragments: list[dict] | None, kept: dict[str, str]) -> tuple:
    """A row with the fragments that waited for its record merged in and its trace's kept mark set (PostgreSQL's
    write: SQLite's leaves them to reads and the seal)."""
    if fragments:
        row = _row(_with_fragments(_record(row), fragments), row[3])
    if row[0] in kept:
        row = row[:18] + (1, kept[row[0]])
    return row


def _record(row: tuple) -> AuditRecord:
    """The record of a row, as read or as written (a missing text bound as 0 is None)."""
    d = dict(zip(COLUMNS, row))
    for c in _NULLABLE_NAMES:
        if type(d[c]) is int:
            d[c] = None
    for c in _JSON_COLUMNS:
        d[c] = json.loads(d[c]) if d[c] else {}
    d["trace_kept"] = bool(d["trace_kept"])
    d.pop("recorded_unix_nano")
    return AuditRecord(**d)


class AuditStore(ABC):
    """Schema, writes, kept marks, queries and retention over a DB-API connection.

    One connection, used under a lock: writes are serialized, as the database would serialize them anyway.
    Subclasses open the connection and say how the dialect differs (placeholders, sizes, vacuum).
    """

    placeholder = "?"
    #: the SQL function giving a blob's length in bytes
    _length = "length"
    #: the key of this store's :data:`MIGRATIONS` (set by each subclass)
    dialect: str
    #: what a record row holds for a text the record lacks: what the driver binds cheaply (see :func:`_insert`)
    _missing_text: Any = None

    def __init__(self, url: str):
        self.url = url
        self._lock = threading.Lock()
        self._conn = None
        #: writes arriving together share one transaction; its .commits and .committed: writes per commit
        self.group_commit: GroupCommit[_Work, int] = GroupCommit(self._commit_group, on_commit=self._after_commit)
        #: called after each group's transaction committed (the exporter counts commits on /metrics)
        self.on_commit: Callable[[], None] | None = None
        #: called with what each batch of :meth:`index_journal` indexed, once committed (the exporter's counters)
        self.on_indexed: Callable[[Indexed], None] | None = None

    # --- dialect ---------------------------------------------------------------------------

    @abstractmethod
    def _connect(self):
        """A new connection, configured for durability; raises StoreError."""

    @abstractmethod
    def _errors(self) -> tuple[type, ...]:
        """The driver's exception types that mean "the store failed" (mapped to StoreError)."""

    @abstractmethod
    def size_bytes(self) -> int:
        """Bytes the live records take (what ``retention.max_megabytes`` bounds)."""

    def _reclaim(self, cur) -> None:
        """Give space freed by deletes back (called after retention deleted rows)."""

    # --- plumbing --------------------------------------------------------------------------

    def _sql(self, text: str) -> str:
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)

    def _transaction(self, write: bool = True) -> Iterator[Any]:
        """Runs the body in one transaction on the (re)opened connection; driver errors -> StoreError."""
        import contextlib

        @contextlib.contextmanager
        def tx():
            with self._lock:
                try:
                    if self._conn is None:
                        self._conn = self._connect()
                    cur = self._conn.cursor()
                    self._begin(cur, write)
                    try:
                        yield cur
                    except BaseException:
                        self._conn.rollback()
                        raise
                    self._conn.commit()
                except self._errors() as e:
                    self._drop_connection()
                    raise StoreError(f"{self.describe()}: {e}".strip()) from e
        return tx()

    def _begin(self, cur, write: bool) -> None:
        """Start a transaction (drivers that begin implicitly need nothing)."""

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - already failed; closing is best effort
                pass

    def describe(self) -> str:
        """The store's URL without a password (for logs and errors)."""
        import re

        return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", self.url)

    def open(self) -> "AuditStore":
        """Connect and bring the schema to this dialect's :data:`SCHEMA_VERSIONS`."""
        with self._transaction() as cur:
            self._migrate(cur)
        return self

    def close(self) -> None:
        with self._lock:
            self._drop_connection()

    def _lock_schema(self, cur) -> None:
        """Serialize migrations between sidecars sharing one database (SQLite's write lock already does)."""

    def _migrate(self, cur) -> None:
        self._lock_schema(cur)
        cur.execute("CREATE TABLE IF NOT EXISTS audit_schema (version INTEGER NOT NULL)")
        cur.execute("SELECT version FROM audit_schema")
        row = cur.fetchone()
        current = row[0] if row else 0
        if row is None:
            cur.execute(self._sql("INSERT INTO audit_schema (version) VALUES (?)"), (0,))
        target = SCHEMA_VERSIONS[self.dialect]
        if current > target:
            raise StoreError(f"{self.describe()}: schema version {current} is newer than this sidecar's "
                             f"{target}; upgrade the sidecar")
        for version, statements in MIGRATIONS[self.dialect]:
            if version > current:
                for stmt in statements:
                    cur.execute(stmt)
                cur.execute(self._sql("UPDATE audit_schema SET version = ?"), (version,))

    def schema_version(self) -> int:
        with self._transaction() as cur:
            cur.execute("SELECT version FROM audit_schema")
            return cur.fetchone()[0]

    # --- writing ---------------------------------------------------------------------------

    def write(self, extraction: Extraction) -> int:
        """Store records and fragments, durably (committed with the writes arriving together); returns
        how many records were new."""
        if not extraction.records and not extraction.fragments:
            return 0
        return self._together(lambda cur, now: self._write(cur, [_row(rec, now, self._missing_text)
                                                                 for rec in extraction.records],
                                                           extraction.fragments, now)) or 0

    def _write(self, cur, rows: list[tuple], fragments: list[Fragment], now: int) -> int:
        """Store fragments and record rows (:data:`COLUMNS` order), merged with what already waits for them;
        how many records were new."""
        for frag in fragments:
            self._store_fragment(cur, frag, now)
        if not rows:
            return 0
        pending, kept = self._waiting_for(cur, rows)
        if pending or kept:
            rows = [_completed(row, pending.get((row[0], row[4])), kept) for row in rows]
        cur.executemany(self._sql(f"INSERT INTO audit_records ({', '.join(COLUMNS)}) VALUES "
                                  f"({', '.join('?' * len(COLUMNS))}) ON CONFLICT (trace_id, span_id) DO NOTHING"),
                        rows)
        written = max(cur.rowcount, 0)
        if pending:
            cur.executemany(self._sql("DELETE FROM audit_fragments WHERE trace_id = ? AND service = ?"),
                            list(pending))
        return written

    # --- the journal ------------------------------------------------------------------------

    def append(self, request: bytes) -> None:
        """Journal one encoded ExportTraceServiceRequest, durably (committed with the writes arriving together).

        The request path's write: one row holding the bytes, nothing read from them. :meth:`index_journal`
        turns entries into records later, in order, exactly as :meth:`write` of each one's extraction would
        have (same records, fragments, duplicates and kept marks); every read indexes first, so a reader never
        sees less than was acknowledged. Entries are read without a user id salt: an exporter that hashes
        user ids writes records instead (the pseudonym must replace the id before anything is stored).
        """
        self._together(lambda cur, now: cur.execute(
            self._sql("INSERT INTO audit_journal (recorded_unix_nano, request) VALUES (?, ?)"), (now, request)))

    def index_journal(self, stop: Callable[[], bool] | None = None) -> Indexed:
        """Turn every journal entry into records, oldest first, in batches of at most :data:`JOURNAL_BATCH` entries
        and :data:`JOURNAL_BATCH_BYTES`; entries appended meanwhile are indexed too. Each batch is read, then its
        records are made outside any transaction, then written in one transaction shared with the appends arriving
        together (which so wait for the SQL part alone). ``stop()`` true ends it between batches (shutdown)."""
        total = Indexed()
        while True:
            entries, more = self._journal_batch()
            batch: Indexed = self._together(lambda cur, now: self._index_batch(cur, entries)) if entries \
                else Indexed()
            batch.more = more
            total.add(batch)
            if batch.entries + batch.unreadable and self.on_indexed is not None:
                self.on_indexed(batch)
            if not more or (stop is not None and stop()):
                return total

    def _journal_batch(self) -> tuple[list[tuple[int, int, Any]], bool]:
        """The next batch, oldest first, each entry as (seq, recorded_unix_nano, (rows, fragments) or the error reading
        it), and whether entries were left for another batch."""
        with self._transaction(write=False) as cur:
            cur.execute(self._sql(f"SELECT seq, {self._length}(request) FROM audit_journal WHERE error IS NULL "
                                  f"ORDER BY seq LIMIT {JOURNAL_BATCH + 1}"))
            waiting = cur.fetchall()
            chosen, size = [], 0
            for seq, length in waiting[:JOURNAL_BATCH]:
                if chosen and size + length > JOURNAL_BATCH_BYTES:
                    break
                chosen.append(seq)
                size += length
            if not chosen:
                return [], False
            # exactly the entries chosen: in PostgreSQL another sidecar's append may commit a lower seq meanwhile
            listed, args = _in(chosen)
            cur.execute(self._sql(f"SELECT seq, recorded_unix_nano, request FROM audit_journal WHERE seq IN "
                                  f"{listed} ORDER BY seq"), args)
            rows = cur.fetchall()
        entries = []
        for seq, recorded, request in rows:
            try:
                entries.append((seq, recorded, _rows_of(bytes(request), recorded, self._missing_text)))
            except MemoryError:  # this process's state, not the entry's: it stays journaled for the next run
                raise StoreError(f"{self.describe()}: out of memory reading audit journal entry {seq}") from None
            except Exception as e:  # noqa: BLE001 - damaged bytes: kept with the reason, never retried forever
                entries.append((seq, recorded, e))
        return entries, len(chosen) < len(waiting)

    def _lock_index(self, cur) -> None:
        """Serialize indexing between processes sharing the store (SQLite's write lock already does)."""

    def _index_batch(self, cur, entries: list[tuple[int, int, Any]]) -> Indexed:
        """Write the records of the entries still in the journal (another process may have indexed some since
        they were read) and delete those entries, in the caller's transaction; mark the unreadable ones."""
        self._lock_index(cur)
        seqs = [seq for seq, _, _ in entries]
        listed, args = _in(seqs)
        cur.execute(self._sql(f"SELECT seq FROM audit_journal WHERE error IS NULL AND seq IN {listed}"), args)
        present = {seq for (seq,) in cur.fetchall()}
        out = Indexed()
        indexed: list[int] = []
        waiting: list[tuple] = []  # rows of entries without fragments: written together, one statement per 256

        def write(rows: list[tuple], fragments: list[Fragment], recorded: int) -> None:
            written = self._write(cur, rows, fragments, recorded)
            out.written += written
            out.duplicates += len(rows) - written

        for seq, recorded, made in entries:
            if seq not in present:
                continue
            if isinstance(made, Exception):
                log.error("%s: audit journal entry %d cannot be read into records, kept with its error: %s",
                          self.describe(), seq, made)
                cur.execute(self._sql("UPDATE audit_journal SET error = ? WHERE seq = ?"), (str(made)[:500], seq))
                out.unreadable += 1
                continue
            indexed.append(seq)
            rows, fragments = made
            if rows:
                newest = max(row[2] for row in rows)
                if out.newest_time is None or newest > out.newest_time:
                    out.newest_time = newest
            if not fragments:
                waiting += rows
                continue
            if waiting:  # in journal order: the records before these fragments first
                write(waiting, [], recorded)
                waiting = []
            write(rows, fragments, recorded)
        if waiting:
            write(waiting, [], recorded)  # no fragment: the rows carry their own recorded time
        out.entries = len(indexed)
        if indexed:
            listed, args = _in(indexed)
            cur.execute(self._sql(f"DELETE FROM audit_journal WHERE seq IN {listed}"), args)
        return out

    def journal_entries(self) -> tuple[int, int]:
        """Journal entries waiting to be indexed, and those kept because they could not be read."""
        with self._transaction(write=False) as cur:
            cur.execute("SELECT count(*) - count(error), count(error) FROM audit_journal")
            waiting, unreadable = cur.fetchone()
        return int(waiting), int(unreadable)

    def _together(self, work: _Work) -> Any:
        """Run ``work(cursor, now)`` in the transaction of the writes arriving together; return its result
        once that transaction is committed (raise its own error, or the commit's StoreError)."""
        return self.group_commit.join(work)

    def _commit_group(self, members: list[Member[_Work, int]]) -> None:
        """One transaction for the group; each member in a savepoint, so its failure undoes only its own work.
        A failed transaction or commit raises: nothing of the group is stored, and every member gets the error."""
        now = time.time_ns()
        with self._transaction() as cur:
            for m in members:
                if len(members) == 1:
                    m.result = m.item(cur, now)
                    break
                cur.execute("SAVEPOINT audit_write")
                try:
                    m.result = m.item(cur, now)
                except Exception as e:  # noqa: BLE001 - this member's own failure: handed to it alone
                    cur.execute("ROLLBACK TO SAVEPOINT audit_write")
                    m.error = StoreError(f"{self.describe()}: {e}".strip()) if isinstance(e, self._errors()) else e
                cur.execute("RELEASE SAVEPOINT audit_write")

    def _after_commit(self) -> None:
        if self.on_commit is not None:
            self.on_commit()

    def _store_fragment(self, cur, frag: Fragment, now: int) -> None:
        """Merge into the trace's record when it is already stored, else keep the fragment for it."""
        cur.execute(self._sql(f"SELECT span_id, {', '.join(_FRAGMENT_FIELDS)} FROM audit_records "
                              "WHERE trace_id = ? AND service = ?"), (frag.trace_id, frag.service))
        rows = cur.fetchall()
        if not rows:
            cur.execute(self._sql("INSERT INTO audit_fragments (trace_id, span_id, service, fields, recorded_unix_nano)"
                                  " VALUES (?, ?, ?, ?, ?) ON CONFLICT (trace_id, span_id) DO NOTHING"),
                        (frag.trace_id, frag.span_id, frag.service, json.dumps(frag.fields), now))
            return
        for row in rows:
            current = dict(zip(_FRAGMENT_FIELDS, row[1:]))
            current["parameters"] = json.loads(current["parameters"] or "{}")
            merged = merge(dict(current), frag.fields)
            if merged != current:
                merged["parameters"] = _json(merged["parameters"])
                cur.execute(self._sql(f"UPDATE audit_records SET {', '.join(f + ' = ?' for f in _FRAGMENT_FIELDS)} "
                                      "WHERE trace_id = ? AND span_id = ?"),
                            tuple(merged[f] for f in _FRAGMENT_FIELDS) + (frag.trace_id, row[0]))

    def _waiting_for(self, cur, rows: list[tuple]) -> tuple[dict[tuple[str, str], list[dict]], dict[str, str]]:
        """What already waits for these rows' records: fragments per (trace, service), kept marks per trace."""
        traces = sorted({row[0] for row in rows})
        return self._fragments_for(cur, traces), self._kept_for(cur, traces)

    def _fragments_for(self, cur, traces: list[str]) -> dict[tuple[str, str], list[dict]]:
        out: dict[tuple[str, str], list[dict]] = {}
        for chunk in _chunks(traces):
            listed, args = _in(chunk)
            cur.execute(self._sql(f"SELECT trace_id, service, fields FROM audit_fragments WHERE trace_id IN "
                                  f"{listed} ORDER BY span_id"), args)
            for tid, svc, fields_ in cur.fetchall():
                out.setdefault((tid, svc), []).append(json.loads(fields_))
        return out

    def _kept_for(self, cur, traces: list[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for chunk in _chunks(traces):
            listed, args = _in(chunk)
            cur.execute(self._sql(f"SELECT trace_id, policy FROM audit_kept WHERE trace_id IN {listed}"), args)
            out.update(dict(cur.fetchall()))
        return out

    def mark_kept(self, kept: dict[str, str]) -> int:
        """Tail sampling kept these traces (trace id -> policy): say so on their records, now or on arrival."""
        if not kept:
            return 0
        items = sorted(kept.items())
        return self._together(lambda cur, now: self._mark_kept(cur, items, now)) or 0

    def _mark_kept(self, cur, items: list[tuple[str, str]], now: int) -> int:
        cur.executemany(self._sql("INSERT INTO audit_kept (trace_id, policy, recorded_unix_nano) VALUES (?, ?, ?) "
                                  "ON CONFLICT (trace_id) DO NOTHING"), [(t, p, now) for t, p in items])
        cur.executemany(self._sql("UPDATE audit_records SET trace_kept = 1, kept_policy = ? "
                                  "WHERE trace_id = ? AND trace_kept = 0"), [(p, t) for t, p in items])
        return len(items)

    # --- reading ---------------------------------------------------------------------------

    # every read and retention pass makes the records of what is journaled first: a reader never sees less than
    # was acknowledged, and journaled requests are records to retention too. Dialects implement the _methods.

    def query(self, q: Query) -> list[AuditRecord]:
        self.index_journal()
        return self._query(q)

    def count(self) -> int:
        self.index_journal()
        return self._count()

    def newest_time(self, *, index: bool = True) -> int | None:
        """The newest record's start time; ``index=False``: of the records made so far (a fast start)."""
        if index:
            self.index_journal()
        return self._newest_time()

    def delete_older_than(self, cutoff_unix_nano: int) -> int:
        """Records that started before the cutoff, and marks and fragments stored before it."""
        self.index_journal()
        return self._delete_older_than(cutoff_unix_nano)

    def _query(self, q: Query) -> list[AuditRecord]:
        where, args = [], []
        for col, value in (("request_id", q.request_id), ("trace_id", q.trace_id),
                           ("model_version", q.model_version), ("status", q.status)):
            if value is not None:
                where.append(f"{col} = ?")
                args.append(value.upper() if col == "status" else value.lower() if col == "trace_id" else value)
        if q.since is not None:
            where.append("time_unix_nano >= ?")
            args.append(q.since)
        if q.until is not None:
            where.append("time_unix_nano < ?")
            args.append(q.until)
        sql = f"SELECT {', '.join(COLUMNS)} FROM audit_records"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY time_unix_nano, trace_id, span_id"
        if q.limit is not None:
            sql += f" LIMIT {int(q.limit)}"
        with self._transaction(write=False) as cur:
            cur.execute(self._sql(sql), args)
            return [_record(r) for r in cur.fetchall()]

    def _count(self) -> int:
        with self._transaction(write=False) as cur:
            cur.execute("SELECT count(*) FROM audit_records")
            return cur.fetchone()[0]

    def _newest_time(self) -> int | None:
        with self._transaction(write=False) as cur:
            cur.execute("SELECT max(time_unix_nano) FROM audit_records")
            return cur.fetchone()[0]

    # --- retention -------------------------------------------------------------------------

    def _delete_older_than(self, cutoff_unix_nano: int) -> int:
        with self._transaction() as cur:
            cur.execute(self._sql("DELETE FROM audit_records WHERE time_unix_nano < ?"), (cutoff_unix_nano,))
            n = max(cur.rowcount, 0)
            cur.execute(self._sql("DELETE FROM audit_kept WHERE recorded_unix_nano < ?"), (cutoff_unix_nano,))
            cur.execute(self._sql("DELETE FROM audit_fragments WHERE recorded_unix_nano < ?"), (cutoff_unix_nano,))
        return n

    def shrink_to(self, max_bytes: int) -> int:
        """Delete the oldest records until the live size is at most ``max_bytes``; returns how many."""
        self.index_journal()
        deleted = 0
        for _ in range(64):  # each round removes a share proportional to the excess
            size = self.size_bytes()
            if size <= max_bytes:
                break
            total = self._count()
            if total == 0:
                break
            with self._transaction() as cur:
                deleted += self._delete_oldest(cur, max(1, int(total * (1 - max_bytes / size)) + total // 100),
                                               total)
            with self._transaction() as cur:
                self._reclaim(cur)
        return deleted

    def _delete_oldest(self, cur, need: int, total: int) -> int:
        """Delete the ``need`` oldest of ``total`` records (and any sharing the newest one's time)."""
        cur.execute(self._sql("SELECT time_unix_nano FROM audit_records ORDER BY time_unix_nano "
                              f"LIMIT 1 OFFSET {min(need, total) - 1}"))
        cutoff = cur.fetchone()[0]
        cur.execute(self._sql("DELETE FROM audit_records WHERE time_unix_nano <= ?"), (cutoff,))
        return max(cur.rowcount, 0)


def _chunks(items: list[str], size: int = 512) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


@functools.lru_cache(maxsize=16)
def _placeholders(n: int) -> str:
    return "(" + ", ".join("?" * n) + ")"


def _in(values: list) -> tuple[str, list]:
    """``IN (?, ...)`` for ``values`` (not empty), and what to bind: padded to a power of two by repeating the last
    value (the same answer). So a few statement texts serve every size and stay in the driver's statement cache;
    a text per size filled it and evicted the record INSERTs, which then were compiled again (a 256-row INSERT
    takes 9x its run to compile: docs/benchmarks.md, eighth round)."""
    n = len(values)
    size = 1 << (n - 1).bit_length()
    return _placeholders(size), list(values) + [values[-1]] * (size - n)


_ROWS_PER_INSERT = 256  # x 20 columns: far under the 32766 values SQLite binds in one statement


@functools.lru_cache(maxsize=64)
def _values_sql(head: str, width: int, rows: int, tail: str, nulls: tuple[int, ...]) -> str:
    one = "(" + ", ".join("NULLIF(?, 0)" if i in nulls else "?" for i in range(width)) + ")"
    return f"{head} VALUES {', '.join([one] * rows)}{tail}"


def _insert(cur, head: str, rows: list[tuple], tail: str = "", nulls: tuple[int, ...] = ()) -> None:
    """``head VALUES (...), (...), ... tail``: ``rows`` in a few statements, not one step per row.

    The sqlite3 module releases the GIL around each step of a statement, and ``executemany`` steps once
    per row. With other threads waiting for the GIL (receivers parsing, tail sampling), each release
    hands it over and waits to get it back: two context switches per row. One busy Python thread beside
    a writer of 128-row groups made ``executemany`` cost 7x the CPU per row and this 2x
    (docs/benchmarks.md, third round). Chunks are powers of two, so a few statements stay cached.

    ``nulls``: the positions of TEXT columns that may be NULL, whose missing values the rows hold as the
    integer 0 (``SQLiteStore._missing_text``: the C rows pass and :func:`_row` put it there); the statement
    turns it back into NULL (``NULLIF(?, 0)``: no text equals an integer, so ``'0'`` stays ``'0'``). The
    module binds every None through a failing attribute lookup that formats an error message: the five NULLs
    of a usual record were a third of its INSERT's CPU, and replacing them here, value by value, another
    1.3 µs per record (docs/benchmarks.md, seventh and eighth rounds). A None still binds, as NULL.
    """
    i, n = 0, len(rows)
    while i < n:
        k = 1 << (min(n - i, _ROWS_PER_INSERT).bit_length() - 1)
        cur.execute(_values_sql(head, len(rows[i]), k, tail, nulls), list(chain.from_iterable(rows[i:i + k])))
        i += k


class _RecentKeys:
    """The (trace_id, span_id) keys of records this store committed lately: two generations of sets, so memory
    is bounded and a retried export within about ``size`` records is recognized without reading the records."""

    def __init__(self, size: int):
        self._size = size
        self._new: set[str] = set()
        self._old: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self._new or key in self._old

    def isdisjoint(self, keys: set[str]) -> bool:
        return keys.isdisjoint(self._new) and keys.isdisjoint(self._old)

    def add(self, keys) -> None:
        self._new.update(keys)
        if len(self._new) >= self._size:
            self._old, self._new = self._new, set()


@dataclass
class _Partition:
    """A row of the ``audit_partitions`` catalog."""

    number: int
    sealed: bool
    rows: int  # sealed: records; active: rows written (duplicates not yet removed)
    min_time: int | None
    max_time: int | None
    sealed_unix_nano: int | None

    @property
    def table(self) -> str:
        return f"audit_part_{self.number}"

    def overlaps(self, lo: int | None, hi: int | None) -> bool:
        return (self.min_time is not None and lo is not None and self.min_time <= hi  # type: ignore[operator]
                and self.max_time >= lo)  # type: ignore[operator]


def _key(trace_id: str, span_id: str) -> str:
    return f"{trace_id}:{span_id}"  # hex never holds ':': no two id pairs share a key


_CHECKPOINT_PAGES = 8192  # of 4 KiB: the -wal file stays under about 32 MiB
_VIEW_ARMS = 400  # SQLite allows 500 terms in one compound SELECT: larger views nest
SEAL_ROWS = 100_000


class SQLiteStore(AuditStore):
    """The embedded default: one file, WAL, ``synchronous=FULL``, private to the sidecar's user (0600/0700).

    **Time-ordered partitions.** A record is appended to the *active partition* (``audit_part_N``, the
    columns of ``audit_records``, no index: a row is one append to one B-tree, so a record costs the same
    whatever the store holds; a time index on it cost 40% more per record, and a read scans at most
    ``seal_rows`` unindexed rows). When the active partition holds
    ``seal_rows`` records it is *sealed* in its own transaction: duplicates removed (the first written per
    (trace_id, span_id) stays, checked by building the unique index on them; so does a row already in a
    sealed partition whose time range covers it: a retried export straddling a seal), the fragments
    waiting for its records folded in, the indexes built (unique (trace_id, span_id), time,
    request_id, (model_version, time)); a new active partition starts. Sealing 100 000 records costs about
    0.24 s of CPU and holds the write lock as long or longer on a busy machine
    (``benchmarks/audit_bench.py --stages-only --prefill 1000000``): writers arriving meanwhile wait for it,
    as for any long transaction (``busy_timeout``), and the one whose write crossed the size returns after
    it.
    ``audit_partitions`` catalogs the partitions (number, sealed, rows, time range).

    The write path reads only the catalog: a record is appended as it came. Fragments and kept marks stay in
    their tables, whether they arrived before or after their record, and are applied when reading; fragments
    are folded in at the next seal, marks (in ``audit_kept``, also applied by the view) when retention deletes
    them while their record stays. A retried export recognized by this store's memory of recent keys
    (:class:`_RecentKeys`) is not written again (and counted as a duplicate); one it does not recognize is
    written and removed by reads and the seal.

    Reads (:meth:`query`, :meth:`count`) see every partition with the single table's semantics: no
    duplicate (trace_id, span_id), fragments and marks merged, filters applied after merging. Readers in
    other connections or processes see a seal whole or not at all (one transaction; WAL snapshots).
    ``audit_records`` is a VIEW over all partitions, kept marks applied, for operators' ad-hoc SQL; rows of the
    active partition appear there raw (a duplicate, a fragment not yet folded in): ``python -m sidecar.audit
    query`` is the exact reader. Retention drops whole partitions older than the cutoff (or the oldest first,
    for size) and cuts the one that straddles it; dropped pages go back to the file system
    (``auto_vacuum=INCREMENTAL``).
    """

    dialect = "sqlite"
    _missing_text = 0

    def __init__(self, url: str, path: str, *, busy_timeout: float = 5.0, seal_rows: int = SEAL_ROWS,
                 recent_keys: int = 16384):
        super().__init__(url)
        if seal_rows < 1:
            raise ValueError("seal_rows: must be >= 1")
        self.path = Path(path)
        self._busy_timeout = busy_timeout
        #: records per partition: the active one is sealed when it holds this many
        self.seal_rows = seal_rows
        self._recent = _RecentKeys(recent_keys)
        self._txn_keys: set[str] = set()  # keys written by the group's transaction so far
        self._txn_active: int | None = None  # the active partition, read once per group's transaction
        self._active_rows = 0  # rows of the active partition after this store's last write
        self._seal_after = 0.0  # monotonic time before which a failed seal is not retried
        #: seconds the last seal held the write lock (benchmarks read it)
        self.last_seal_seconds: float | None = None

    def _errors(self) -> tuple[type, ...]:
        return (sqlite3.Error, OSError)

    def _connect(self):
        d = self.path.parent
        if not d.exists():
            d.mkdir(parents=True, mode=0o700)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))  # the -wal and -shm files copy this mode
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False)
        # auto_vacuum must be chosen before the first table exists; incremental lets retention return space
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
            conn.close()
            raise StoreError(f"{self.path}: cannot switch to WAL mode")
        conn.execute("PRAGMA synchronous = FULL")
        # deleted content is zeroed on the pages that hold it, whatever the build's default (upstream: off, so a
        # deleted record's text stays readable in the file; Debian's: on, which also rewrites every page freed whole
        # with zeros: each indexed journal entry's bytes were written to the log twice). Pages freed whole go to the
        # free list, are reused by the next appends, and retention's incremental_vacuum moves live pages over them
        # and truncates the file (docs/benchmarks.md, ninth round)
        conn.execute("PRAGMA secure_delete = FAST")
        # checkpointing every 32 MiB of log instead of SQLite's 4 MiB copies a page rewritten by many commits
        # (the active partition's last pages) once
        conn.execute(f"PRAGMA wal_autocheckpoint = {_CHECKPOINT_PAGES}")
        return conn

    def _begin(self, cur, write: bool) -> None:
        cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def _migrate(self, cur) -> None:
        super()._migrate(cur)
        # the active partition has no index (see the class); its seal builds the time index. Schema version 3 made
        # partition 2 with one, and stores written before 2026-12 kept one on every partition.
        active = cur.execute("SELECT max(number) FROM audit_partitions").fetchone()[0]
        cur.execute(f"DROP INDEX IF EXISTS audit_part_{active}_time")
        # the view applies kept marks since 2026-12 (seals no longer fold them into rows)
        view = cur.execute("SELECT sql FROM sqlite_master WHERE type = 'view' AND name = 'audit_records'").fetchone()
        if view is None or "audit_kept" not in view[0]:
            self._create_view(cur, self._catalog(cur))

    def size_bytes(self) -> int:
        with self._transaction(write=False) as cur:
            page = cur.execute("PRAGMA page_size").fetchone()[0]
            pages = cur.execute("PRAGMA page_count").fetchone()[0]
            free = cur.execute("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * page

    def _reclaim(self, cur) -> None:
        # one page per step, and the sqlite3 module steps a statement without result columns once:
        # executescript runs it to the end (after committing the otherwise empty transaction it is given)
        cur.executescript("PRAGMA incremental_vacuum")

    # --- the catalog ---------------------------------------------------------------------------

    @staticmethod
    def _catalog(cur) -> list[_Partition]:
        cur.execute("SELECT number, sealed, rows, min_time, max_time, sealed_unix_nano FROM audit_partitions "
                    "ORDER BY number")
        return [_Partition(n, bool(s), r, lo, hi, at) for n, s, r, lo, hi, at in cur.fetchall()]

    @staticmethod
    def _create_view(cur, parts: list[_Partition]) -> None:
        """``audit_records``: every partition's rows as written, with the kept marks of ``audit_kept`` applied
        (recreated whenever partitions come or go)."""
        arms = [f"SELECT {_COLUMN_LIST} FROM {p.table}" for p in parts]
        while len(arms) > _VIEW_ARMS:
            arms = [f"SELECT {_COLUMN_LIST} FROM (" + " UNION ALL ".join(arms[i:i + _VIEW_ARMS]) + ")"
                    for i in range(0, len(arms), _VIEW_ARMS)]
        columns = ", ".join(f"r.{c}" for c in COLUMNS if c not in _MARK_COLUMNS)
        cur.execute("DROP VIEW IF EXISTS audit_records")
        cur.execute(f"CREATE VIEW audit_records AS SELECT {columns}, "
                    "(r.trace_kept OR k.trace_id IS NOT NULL) AS trace_kept, coalesce(r.kept_policy, k.policy) AS "
                    f"kept_policy FROM ({' UNION ALL '.join(arms)}) r LEFT JOIN audit_kept k ON k.trace_id = r.trace_id")

    # --- writing ---------------------------------------------------------------------------

    def _commit_group(self, members: list[Member[_Work, int]]) -> None:
        self._txn_keys, self._txn_active = set(), None
        super()._commit_group(members)  # raises when nothing of the group was stored
        self._recent.add(self._txn_keys)

    def _write(self, cur, rows: list[tuple], fragments: list[Fragment], now: int) -> int:
        """Append: fragments to ``audit_fragments``, records as they are to the active partition. Nothing here
        reads a table but the catalog: fragments and kept marks, whenever they arrive, are applied by every read
        and folded in at the seal (looking them up for every record cost 12% of indexing: docs/benchmarks.md,
        eighth round)."""
        if fragments:
            _insert(cur, "INSERT INTO audit_fragments (trace_id, span_id, service, fields, recorded_unix_nano)",
                    [(f.trace_id, f.span_id, f.service, json.dumps(f.fields), now) for f in fragments],
                    " ON CONFLICT (trace_id, span_id) DO NOTHING")
        if not rows:
            return 0
        seen, recent = self._txn_keys, self._recent
        keys = [_key(row[0], row[1]) for row in rows]
        fresh = set(keys)
        if len(fresh) == len(rows) and fresh.isdisjoint(seen) and recent.isdisjoint(fresh):
            seen |= fresh  # the usual batch: every row new
            times = [row[2] for row in rows]
            lo, hi = min(times), max(times)
        else:
            new, written = [], []
            lo = hi = None
            for row, key in zip(rows, keys):
                if key in seen or key in recent:
                    continue  # written already (a retried export): the first stays
                seen.add(key)
                written.append(key)
                new.append(row)
                t = row[2]
                lo = t if lo is None or t < lo else lo
                hi = t if hi is None or t > hi else hi
            rows, keys = new, written
            if not rows:
                return 0
        try:
            if self._txn_active is None:
                self._txn_active = cur.execute("SELECT max(number) FROM audit_partitions").fetchone()[0]
            active = self._txn_active
            _insert(cur, f"INSERT INTO audit_part_{active} ({_COLUMN_LIST})", rows, nulls=_NULLABLE)
            cur.execute("UPDATE audit_partitions SET rows = rows + ?, min_time = min(coalesce(min_time, ?), ?), "
                        "max_time = max(coalesce(max_time, ?), ?) WHERE number = ? RETURNING rows",
                        (len(rows), lo, lo, hi, hi, active))
            self._active_rows = cur.fetchone()[0]
        except BaseException:
            seen.difference_update(keys)  # rolled back with this write's savepoint
            raise
        return len(rows)

    def _mark_kept(self, cur, items: list[tuple[str, str]], now: int) -> int:
        """Only the mark: records already written get it when read, and for good at their partition's seal."""
        _insert(cur, "INSERT INTO audit_kept (trace_id, policy, recorded_unix_nano)", [(t, p, now) for t, p in items],
                " ON CONFLICT (trace_id) DO NOTHING")
        return len(items)

    def _after_commit(self) -> None:
        super()._after_commit()
        if self._active_rows >= self.seal_rows and time.monotonic() >= self._seal_after:
            try:
                self.seal()
            except Exception as e:  # noqa: BLE001 - the write that got here is committed: never fail it
                self._seal_after = time.monotonic() + 30
                log.warning("%s: sealing the active audit partition failed, will retry: %s", self.describe(), e)

    # --- sealing ---------------------------------------------------------------------------

    def seal(self, *, force: bool = False) -> bool:
        """Seal the active partition when it holds ``seal_rows`` rows (any, with ``force``) and start the next;
        whether it sealed. One transaction: readers see all of it or nothing."""
        t0 = time.perf_counter()
        with self._transaction() as cur:
            parts = self._catalog(cur)
            active = parts[-1]
            if active.rows < (1 if force else self.seal_rows):
                self._active_rows = active.rows
                return False
            self._seal(cur, parts)
        self._active_rows = 0
        self.last_seal_seconds = time.perf_counter() - t0
        log.info("%s: sealed audit partition %d (%d rows written) in %.2f s", self.describe(), active.number,
                 active.rows, self.last_seal_seconds)
        return True

    def _seal(self, cur, parts: list[_Partition]) -> None:
        active, t = parts[-1], parts[-1].table
        sealed = [p for p in parts[:-1] if p.sealed]
        # duplicates (a retried export this store's recent keys did not recognize): the first written stays. The
        # unique index refuses to be built over one, so building it is the check; only then are they removed (a
        # sort of the whole partition: a third of the seal's CPU, paid on every seal while it ran first)
        unique = f"CREATE UNIQUE INDEX {t}_trace ON {t} (trace_id, span_id)"
        try:
            cur.execute(unique)
        except sqlite3.IntegrityError:
            cur.execute(f"DELETE FROM {t} WHERE rowid NOT IN (SELECT min(rowid) FROM {t} GROUP BY trace_id, span_id)")
            cur.execute(unique)
        # and what a sealed partition already holds (a retried export straddling a seal)
        for p in sealed:
            if p.overlaps(active.min_time, active.max_time):
                cur.execute(f"DELETE FROM {t} WHERE {self._held_by(p, t)}")
        cur.execute(f"CREATE INDEX IF NOT EXISTS {t}_time ON {t} (time_unix_nano)")  # a store from before 2026-12
        cur.execute(f"CREATE INDEX {t}_request ON {t} (request_id)")
        cur.execute(f"CREATE INDEX {t}_model ON {t} (model_version, time_unix_nano)")
        # what arrived after its record: into this partition, and the previous one (records sealed just before)
        previous = sealed[-1] if sealed else None
        now = time.time_ns()
        for p in (active, previous):
            if p is None:
                continue
            used = self._fold_fragments(cur, p.table)
            cur.executemany("DELETE FROM audit_fragments WHERE trace_id = ? AND span_id = ?", used)
        # kept marks stay in audit_kept, applied by every read and by the view. Folding them in rewrote every page
        # of the partition (a tenth of the traces are kept, a dozen records a page): a third of the seal's CPU,
        # and as many pages again through the WAL and the checkpoint (docs/benchmarks.md, sixteenth round)
        cur.execute(f"UPDATE audit_partitions SET sealed = 1, sealed_unix_nano = ?, "
                    f"(rows, min_time, max_time) = (SELECT count(*), min(time_unix_nano), max(time_unix_nano) "
                    f"FROM {t}) WHERE number = ?", (now, active.number))
        nxt = _Partition(active.number + 1, False, 0, None, None, None)
        cur.execute(f"CREATE TABLE {nxt.table} ({_RECORD_COLUMNS})")
        cur.execute("INSERT INTO audit_partitions (number, sealed, rows) VALUES (?, 0, 0)", (nxt.number,))
        self._create_view(cur, parts + [nxt])

    @staticmethod
    def _held_by(p: _Partition, alias: str) -> str:
        """SQL: the row ``alias`` is already in sealed partition ``p`` (which only holds its time range)."""
        return (f"{alias}.time_unix_nano BETWEEN {int(p.min_time)} AND {int(p.max_time)} "  # type: ignore[arg-type]
                f"AND EXISTS (SELECT 1 FROM {p.table} s WHERE s.trace_id = {alias}.trace_id "
                f"AND s.span_id = {alias}.span_id)")

    def _fold_fragments(self, cur, table: str, where: str = "1", args: tuple = ()) -> list[tuple[str, str]]:
        """Merge the fragments (those matching ``where``, over alias ``f``) waiting for records of ``table`` into
        them; the keys of the fragments that found a record. One pass over ``table``, or its trace index."""
        cur.execute(f"SELECT f.trace_id, f.service, f.span_id, f.fields FROM audit_fragments f WHERE {where} "
                    "ORDER BY f.trace_id, f.service, f.span_id", args)
        waiting: dict[tuple[str, str], list[tuple[str, dict]]] = {}
        for tid, svc, sid, fields_ in cur.fetchall():
            waiting.setdefault((tid, svc), []).append((sid, json.loads(fields_)))
        if not waiting:
            return []
        cur.execute(f"SELECT rowid, trace_id, service, {', '.join(_FRAGMENT_FIELDS)} FROM {table} WHERE trace_id IN "
                    f"(SELECT f.trace_id FROM audit_fragments f WHERE {where})", args)
        found, updates = set(), []
        for row in cur.fetchall():
            frags = waiting.get((row[1], row[2]))
            if frags is None:
                continue
            found.add((row[1], row[2]))
            current = dict(zip(_FRAGMENT_FIELDS, row[3:]))
            current["parameters"] = json.loads(current["parameters"] or "{}")
            merged = dict(current)
            for _sid, frag in frags:
                merge(merged, frag)
            if merged != current:
                merged["parameters"] = _json(merged["parameters"])
                updates.append(tuple(merged[f] for f in _FRAGMENT_FIELDS) + (row[0],))
        cur.executemany(f"UPDATE {table} SET {', '.join(f + ' = ?' for f in _FRAGMENT_FIELDS)} WHERE rowid = ?",
                        updates)
        return [(key[0], sid) for key in found for sid, _ in waiting[key]]

    @staticmethod
    def _fold_marks(cur, table: str, where: str = "1", args: tuple = ()) -> None:
        """Set the kept marks (those matching ``where``, over alias ``k``) on the records of ``table``."""
        cur.execute(f"UPDATE {table} SET trace_kept = 1, kept_policy = k.policy FROM audit_kept k "
                    f"WHERE k.trace_id = {table}.trace_id AND {table}.trace_kept = 0 AND {where}", args)

    # --- reading ---------------------------------------------------------------------------

    def _visible(self, cur, parts: list[_Partition]) -> tuple[str, set[int]]:
        """For the active partition (alias ``p``): SQL excluding its rows a sealed partition already holds,
        and the rowids of its rows that repeat an earlier row's (trace_id, span_id)."""
        active = parts[-1]
        held = [f"NOT ({self._held_by(s, 'p')})" for s in parts[:-1]
                if s.sealed and s.overlaps(active.min_time, active.max_time)]
        repeats: set[int] = set()
        if active.rows:
            cur.execute(f"SELECT group_concat(rowid) FROM {active.table} GROUP BY trace_id, span_id "
                        f"HAVING count(*) > 1")
            for (ids,) in cur.fetchall():
                rowids = sorted(int(i) for i in ids.split(","))
                repeats.update(rowids[1:])
        return " AND ".join(held), repeats

    def _query(self, q: Query) -> list[AuditRecord]:
        where, args = [], []
        for col, value in (("request_id", q.request_id), ("trace_id", q.trace_id), ("status", q.status)):
            if value is not None:
                where.append(f"p.{col} = ?")
                args.append(value.upper() if col == "status" else value.lower() if col == "trace_id" else value)
        if q.model_version is not None:  # a fragment not yet folded in may name it: checked again after merging
            where.append("(p.model_version = ? OR (p.model_version IS NULL AND EXISTS (SELECT 1 FROM audit_fragments "
                         "f WHERE f.trace_id = p.trace_id AND f.service = p.service)))")
            args.append(q.model_version)
        if q.since is not None:
            where.append("p.time_unix_nano >= ?")
            args.append(q.since)
        if q.until is not None:
            where.append("p.time_unix_nano < ?")
            args.append(q.until)
        limit = q.limit if q.limit is not None and q.limit >= 0 else None
        out: list[AuditRecord] = []
        if limit == 0:
            return out
        with self._transaction(write=False) as cur:
            parts = self._catalog(cur)
            held, repeats = self._visible(cur, parts)
            streams, cursors = [], []
            for p in parts:
                if p.min_time is None or (q.since is not None and p.max_time < q.since) or \
                        (q.until is not None and p.min_time >= q.until):
                    continue
                cond = list(where)
                if not p.sealed and held:
                    cond.append(held)
                sql = (f"SELECT {', '.join('p.' + c for c in COLUMNS)}, p.rowid, k.trace_id IS NOT NULL, k.policy, "
                       "EXISTS (SELECT 1 FROM audit_fragments f WHERE f.trace_id = p.trace_id AND "
                       f"f.service = p.service) FROM {p.table} p LEFT JOIN audit_kept k ON k.trace_id = p.trace_id"
                       + (" WHERE " + " AND ".join(cond) if cond else "")
                       + " ORDER BY p.time_unix_nano, p.trace_id, p.span_id")
                c = self._conn.cursor()
                cursors.append(c)
                c.execute(sql, args)
                rows: Iterator[tuple] = iter(c)
                if not p.sealed and repeats:
                    rows = (r for r in rows if r[20] not in repeats)
                streams.append(rows)
            try:
                self._merge_rows(cur, heapq.merge(*streams, key=lambda r: (r[2], r[0], r[1])), q, limit, out)
            finally:
                for c in cursors:  # a stream left unfinished (the limit) would hold its read snapshot
                    c.close()
        return out

    def _merge_rows(self, cur, rows: Iterator[tuple], q: Query, limit: int | None, out: list[AuditRecord]) -> None:
        """Rows as a reader sees them: waiting fragments and kept marks applied, then the model_version filter."""
        waiting: dict[tuple[str, str], list[dict]] = {}
        for row in rows:
            rec = _record(row[:20])
            if row[23]:
                key = (rec.trace_id, rec.service)
                if key not in waiting:
                    cur.execute("SELECT fields FROM audit_fragments WHERE trace_id = ? AND service = ? "
                                "ORDER BY span_id", key)
                    waiting[key] = [json.loads(f) for (f,) in cur.fetchall()]
                rec = _with_fragments(rec, waiting[key])
            if row[21] and not rec.trace_kept:
                rec.trace_kept, rec.kept_policy = True, row[22]
            if q.model_version is not None and rec.model_version != q.model_version:
                continue
            out.append(rec)
            if limit is not None and len(out) >= limit:
                break

    def _active_count(self, cur, parts: list[_Partition], where: str = "1", args: tuple = ()) -> int:
        """Records of the active partition a reader sees (and that match ``where``, over alias ``p``)."""
        active = parts[-1]
        if not active.rows:
            return 0
        held, repeats = self._visible(cur, parts)
        cond = f"({where})" + (f" AND {held}" if held else "")
        n = cur.execute(f"SELECT count(*) FROM {active.table} p WHERE {cond}", args).fetchone()[0]
        ids = sorted(repeats)
        for k in range(0, len(ids), 500):
            chunk = ids[k:k + 500]
            n -= cur.execute(f"SELECT count(*) FROM {active.table} p WHERE p.rowid IN ({', '.join('?' * len(chunk))}) "
                             f"AND {cond}", tuple(chunk) + args).fetchone()[0]
        return n

    def _count(self) -> int:
        with self._transaction(write=False) as cur:
            parts = self._catalog(cur)
            return sum(p.rows for p in parts if p.sealed) + self._active_count(cur, parts)

    def _newest_time(self) -> int | None:
        with self._transaction(write=False) as cur:
            newest = None
            for p in self._catalog(cur):
                t = cur.execute(f"SELECT max(time_unix_nano) FROM {p.table}").fetchone()[0]
                if t is not None and (newest is None or t > newest):
                    newest = t
            return newest

    # --- retention -------------------------------------------------------------------------

    def _drop(self, cur, p: _Partition) -> None:
        cur.execute(f"DROP TABLE {p.table}")
        cur.execute("DELETE FROM audit_partitions WHERE number = ?", (p.number,))

    def _cut(self, cur, parts: list[_Partition], p: _Partition, op: str, cutoff: int) -> int:
        """Delete the rows of ``p`` with ``time_unix_nano {op} cutoff``; how many records a reader loses."""
        lost = self._active_count(cur, parts, f"p.time_unix_nano {op} ?", (cutoff,)) if not p.sealed else None
        cur.execute(f"DELETE FROM {p.table} WHERE time_unix_nano {op} ?", (cutoff,))
        deleted = max(cur.rowcount, 0)
        cur.execute(f"UPDATE audit_partitions SET rows = rows - ?, min_time = (SELECT min(time_unix_nano) FROM "
                    f"{p.table}), max_time = (SELECT max(time_unix_nano) FROM {p.table}) WHERE number = ?",
                    (deleted, p.number))
        p.rows -= deleted
        return deleted if lost is None else lost

    def _delete_older_than(self, cutoff_unix_nano: int) -> int:
        """Whole partitions dropped, the straddling one cut (see :meth:`AuditStore.delete_older_than`)."""
        n = 0
        with self._transaction() as cur:
            parts = self._catalog(cur)
            keep = []
            for p in parts:
                if p.sealed and (p.max_time is None or p.max_time < cutoff_unix_nano):
                    self._drop(cur, p)
                    n += p.rows
                    continue
                keep.append(p)
            for p in keep:
                if p.min_time is not None and p.min_time < cutoff_unix_nano:
                    n += self._cut(cur, keep, p, "<", cutoff_unix_nano)
            if len(keep) < len(parts):
                self._create_view(cur, keep)
            # marks and fragments about to go may still be waiting for a record that stays: fold them in first
            for p in keep:
                self._fold_marks(cur, p.table, "k.recorded_unix_nano < ?", (cutoff_unix_nano,))
                self._fold_fragments(cur, p.table, "f.recorded_unix_nano < ?", (cutoff_unix_nano,))
            cur.execute("DELETE FROM audit_kept WHERE recorded_unix_nano < ?", (cutoff_unix_nano,))
            cur.execute("DELETE FROM audit_fragments WHERE recorded_unix_nano < ?", (cutoff_unix_nano,))
        with self._transaction() as cur:
            self._reclaim(cur)
        return n

    def _delete_oldest(self, cur, need: int, total: int) -> int:
        """The oldest partitions whole, then the oldest rows of the next."""
        deleted = 0
        parts = self._catalog(cur)
        keep = list(parts)
        for p in parts:
            if need <= 0:
                break
            if p.sealed and p.rows <= need:
                self._drop(cur, p)
                keep.remove(p)
                deleted += p.rows
                need -= p.rows
                continue
            if p.rows == 0:
                continue
            skip = min(need, p.rows) - 1  # the newest time among the ``need`` oldest rows
            cutoff = cur.execute(f"SELECT time_unix_nano FROM {p.table} ORDER BY time_unix_nano "
                                 f"LIMIT 1 OFFSET {skip}").fetchone()[0]
            n = self._cut(cur, keep, p, "<=", cutoff)
            deleted += n
            need -= max(n, 1)
        if len(keep) < len(parts):
            self._create_view(cur, keep)
        return deleted
