"""Where audit records live: SQLite (embedded default) or PostgreSQL, one schema, one SQL dialect.

``open_store(url)`` (:mod:`sidecar.audit.urls`): ``sqlite:///var/audit.db`` (or a bare path) or ``postgresql://...``.
Every write is durable when :meth:`AuditStore.write` returns (SQLite: WAL with
``synchronous=FULL``; PostgreSQL: a committed transaction), so the exporter can acknowledge
after it. Writes that arrive together share one transaction and one commit (group commit,
:mod:`sidecar.group_commit`, as the persistent queue does): each in its own savepoint, so
one failing write refuses only its own request, and every writer returns only after the
shared commit. Records are keyed by (trace_id, span_id): writing the same record twice keeps
the first, so a retried export never duplicates.

Schema changes are versioned migrations applied in order at open; a store written by a
newer sidecar is refused rather than guessed at. Errors surface as :class:`StoreError`
(the exporter refuses with a retryable code on it).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from sidecar.audit.records import AuditRecord, Extraction, Fragment, merge
from sidecar.group_commit import GroupCommit, Member

#: version -> statements. Append, never edit: a store remembers the version it reached.
MIGRATIONS: list[tuple[int, list[str]]] = [
    (1, [
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
    ]),
    (2, [
        "CREATE INDEX audit_records_request ON audit_records (request_id)",
        "CREATE INDEX audit_records_model ON audit_records (model_version, time_unix_nano)",
        "CREATE INDEX audit_kept_recorded ON audit_kept (recorded_unix_nano)",
    ]),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]

COLUMNS = ("trace_id", "span_id", "time_unix_nano", "recorded_unix_nano", "service", "span_name", "request_id",
           "model_id", "model_version", "user_id", "intent", "tags", "latency_ms", "status", "error_code",
           "parameters", "input_payload", "output_payload", "trace_kept", "kept_policy")
_JSON_COLUMNS = ("tags", "parameters")
_FRAGMENT_FIELDS = ("model_id", "model_version", "parameters", "input_payload", "output_payload")


#: a write's part of a group's transaction: ``work(cursor, now)`` -> how many records were new
_Work = Callable[[Any, int], int]


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


_SORTED_JSON = json.JSONEncoder(sort_keys=True).encode  # one encoder: json.dumps(sort_keys=True) builds one per call


def _json(d: dict) -> str:
    return _SORTED_JSON(d) if d else "{}"


def _row(rec: AuditRecord, now: int) -> tuple:
    """The record's values in :data:`COLUMNS` order (runs per record: no intermediate dict)."""
    return (rec.trace_id, rec.span_id, rec.time_unix_nano, now, rec.service, rec.span_name, rec.request_id,
            rec.model_id, rec.model_version, rec.user_id, rec.intent, _json(rec.tags), rec.latency_ms, rec.status,
            rec.error_code, _json(rec.parameters), rec.input_payload, rec.output_payload, int(rec.trace_kept),
            rec.kept_policy)


def _record(row: tuple) -> AuditRecord:
    d = dict(zip(COLUMNS, row))
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

    def __init__(self, url: str):
        self.url = url
        self._lock = threading.Lock()
        self._conn = None
        #: writes arriving together share one transaction; its .commits and .committed: writes per commit
        self.group_commit: GroupCommit[_Work, int] = GroupCommit(self._commit_group, on_commit=self._after_commit)
        #: called after each group's transaction committed (the exporter counts commits on /metrics)
        self.on_commit: Callable[[], None] | None = None

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
        """Connect and bring the schema to :data:`SCHEMA_VERSION`."""
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
        if current > SCHEMA_VERSION:
            raise StoreError(f"{self.describe()}: schema version {current} is newer than this sidecar's "
                             f"{SCHEMA_VERSION}; upgrade the sidecar")
        for version, statements in MIGRATIONS:
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
        return self._together(lambda cur, now: self._write(cur, extraction, now))

    def _write(self, cur, extraction: Extraction, now: int) -> int:
        for frag in extraction.fragments:
            self._store_fragment(cur, frag, now)
        records = extraction.records
        traces = sorted({r.trace_id for r in records})
        pending = self._fragments_for(cur, traces)
        kept = self._kept_for(cur, traces)
        rows = []
        for rec in records:
            frags = pending.get((rec.trace_id, rec.service))
            if frags:
                fields_ = rec.to_json()
                for frag in frags:
                    merge(fields_, frag)
                rec = AuditRecord(**fields_)
            if rec.trace_id in kept:
                rec.trace_kept, rec.kept_policy = True, kept[rec.trace_id]
            rows.append(_row(rec, now))
        cur.executemany(self._sql(f"INSERT INTO audit_records ({', '.join(COLUMNS)}) VALUES "
                                  f"({', '.join('?' * len(COLUMNS))}) ON CONFLICT (trace_id, span_id) DO NOTHING"),
                        rows)
        written = max(cur.rowcount, 0)
        if pending:
            cur.executemany(self._sql("DELETE FROM audit_fragments WHERE trace_id = ? AND service = ?"),
                            list(pending))
        return written

    def _together(self, work: _Work) -> int:
        """Run ``work(cursor, now)`` in the transaction of the writes arriving together; return its result
        once that transaction is committed (raise its own error, or the commit's StoreError)."""
        return self.group_commit.join(work) or 0

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

    def _in(self, n: int) -> str:
        return "(" + ", ".join("?" * n) + ")"

    def _fragments_for(self, cur, traces: list[str]) -> dict[tuple[str, str], list[dict]]:
        out: dict[tuple[str, str], list[dict]] = {}
        for chunk in _chunks(traces):
            cur.execute(self._sql(f"SELECT trace_id, service, fields FROM audit_fragments WHERE trace_id IN "
                                  f"{self._in(len(chunk))} ORDER BY span_id"), chunk)
            for tid, svc, fields_ in cur.fetchall():
                out.setdefault((tid, svc), []).append(json.loads(fields_))
        return out

    def _kept_for(self, cur, traces: list[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for chunk in _chunks(traces):
            cur.execute(self._sql(f"SELECT trace_id, policy FROM audit_kept WHERE trace_id IN {self._in(len(chunk))}"),
                        chunk)
            out.update(dict(cur.fetchall()))
        return out

    def mark_kept(self, kept: dict[str, str]) -> int:
        """Tail sampling kept these traces (trace id -> policy): say so on their records, now or on arrival."""
        if not kept:
            return 0
        items = sorted(kept.items())
        return self._together(lambda cur, now: self._mark_kept(cur, items, now))

    def _mark_kept(self, cur, items: list[tuple[str, str]], now: int) -> int:
        cur.executemany(self._sql("INSERT INTO audit_kept (trace_id, policy, recorded_unix_nano) VALUES (?, ?, ?) "
                                  "ON CONFLICT (trace_id) DO NOTHING"), [(t, p, now) for t, p in items])
        cur.executemany(self._sql("UPDATE audit_records SET trace_kept = 1, kept_policy = ? "
                                  "WHERE trace_id = ? AND trace_kept = 0"), [(p, t) for t, p in items])
        return len(items)

    # --- reading ---------------------------------------------------------------------------

    def query(self, q: Query) -> list[AuditRecord]:
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

    def count(self) -> int:
        with self._transaction(write=False) as cur:
            cur.execute("SELECT count(*) FROM audit_records")
            return cur.fetchone()[0]

    def newest_time(self) -> int | None:
        with self._transaction(write=False) as cur:
            cur.execute("SELECT max(time_unix_nano) FROM audit_records")
            return cur.fetchone()[0]

    # --- retention -------------------------------------------------------------------------

    def delete_older_than(self, cutoff_unix_nano: int) -> int:
        """Records that started before the cutoff, and marks and fragments stored before it."""
        with self._transaction() as cur:
            cur.execute(self._sql("DELETE FROM audit_records WHERE time_unix_nano < ?"), (cutoff_unix_nano,))
            n = max(cur.rowcount, 0)
            cur.execute(self._sql("DELETE FROM audit_kept WHERE recorded_unix_nano < ?"), (cutoff_unix_nano,))
            cur.execute(self._sql("DELETE FROM audit_fragments WHERE recorded_unix_nano < ?"), (cutoff_unix_nano,))
        return n

    def shrink_to(self, max_bytes: int) -> int:
        """Delete the oldest records until the live size is at most ``max_bytes``; returns how many."""
        deleted = 0
        for _ in range(64):  # each round removes a share proportional to the excess
            size = self.size_bytes()
            if size <= max_bytes:
                break
            total = self.count()
            if total == 0:
                break
            n = max(1, int(total * (1 - max_bytes / size)) + total // 100)
            with self._transaction() as cur:
                cur.execute(self._sql("SELECT time_unix_nano FROM audit_records ORDER BY time_unix_nano "
                                      f"LIMIT 1 OFFSET {min(n, total) - 1}"))
                cutoff = cur.fetchone()[0]
                cur.execute(self._sql("DELETE FROM audit_records WHERE time_unix_nano <= ?"), (cutoff,))
                deleted += max(cur.rowcount, 0)
            with self._transaction() as cur:
                self._reclaim(cur)
        return deleted


def _chunks(items: list[str], size: int = 400) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


_CHECKPOINT_PAGES = 8192  # of 4 KiB: the -wal file stays under about 32 MiB


class SQLiteStore(AuditStore):
    """The embedded default: one file, WAL, ``synchronous=FULL``, private to the sidecar's user (0600/0700)."""

    def __init__(self, url: str, path: str, *, busy_timeout: float = 5.0):
        super().__init__(url)
        self.path = Path(path)
        self._busy_timeout = busy_timeout

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
        # Each record dirties a page of each random-keyed index (trace, request): checkpointing every 32 MiB
        # of log instead of SQLite's 4 MiB copies a page rewritten by many commits once (a quarter less CPU
        # per record in benchmarks/audit_bench.py). A larger page cache gained ~10% and cost its memory.
        conn.execute(f"PRAGMA wal_autocheckpoint = {_CHECKPOINT_PAGES}")
        return conn

    def _begin(self, cur, write: bool) -> None:
        cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def size_bytes(self) -> int:
        with self._transaction(write=False) as cur:
            page = cur.execute("PRAGMA page_size").fetchone()[0]
            pages = cur.execute("PRAGMA page_count").fetchone()[0]
            free = cur.execute("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * page

    def _reclaim(self, cur) -> None:
        cur.execute("PRAGMA incremental_vacuum").fetchall()  # one page per step: run it to the end
