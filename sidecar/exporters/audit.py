"""``audit``: every request on record, written durably before the receiver acknowledges it.

Place it in a traces pipeline that branches off the receiver *before* sampling, with only
``memory_limiter``, ``audit_fields`` (each request reduced to what a record reads) and a
``redaction`` instance in front, so it sees every request after the redaction rules::

    traces/audit:
      receivers: [otlp]
      processors: [memory_limiter/audit, audit_fields, redaction/audit]
      exporters: [audit]

``consume`` journals the request (:meth:`sidecar.audit.store.AuditStore.append`: its bytes, one row,
nothing parsed) in the caller's thread, no queue: when it returns the request is on disk, so the
receiver's OK means "on record". Records (:mod:`sidecar.audit.records`) are made from the journal
later, in bulk: every ``index_interval`` in the background, and before any read (``audit query``,
replay, retention), so a reader never sees less than was acknowledged. With ``hash_user_id`` the
records are made and written on the request path instead: the pseudonym must replace the user id
before anything is stored. A store that is down or slower than ``timeout`` makes it refuse with a
retryable reason (``store_unavailable``); the receiver answers UNAVAILABLE/503 and the client
retries. Records are idempotent on (trace_id, span_id), so retries never duplicate.

``mode: kept_marker``: the same exporter type placed after ``tail_sampling`` (next to the
backend exporter) marks the records of the traces it sees as kept, with the policy that
kept them; tail sampling itself is untouched.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Iterator, Literal

from prometheus_client import Counter, Gauge, Histogram
from pydantic import Field, field_validator, model_validator

from sidecar.audit.records import extract, kept_traces
from sidecar.audit.store import AuditStore, Indexed, StoreError
from sidecar.audit.urls import open_store
from sidecar.component import Component, Kind, Refused
from sidecar.config import ConfigModel, Duration
from sidecar.registry import CreateSettings, Factory
from sidecar.envelope import Envelope
from sidecar.signals import Signal
from sidecar.ticker import Ticker

log = logging.getLogger(__name__)


class RetentionConfig(ConfigModel):
    """Deleted by a background task every ``check_interval``; unset limits keep records forever."""

    #: records older than this (by their start time) are deleted, e.g. ``2160h`` for 90 days
    max_age: Duration | None = None
    #: the oldest records are deleted while the live records take more than this
    max_megabytes: float | None = Field(None, gt=0)
    check_interval: Duration = 60.0

    @field_validator("max_age", "check_interval")
    @classmethod
    def _positive(cls, v: float | None) -> float | None:
        if v is not None and v <= 0:
            raise ValueError("must be > 0")
        return v


class AuditExporterConfig(ConfigModel):
    #: ``sqlite:///var/audit/audit.db`` (relative), ``sqlite:////abs/audit.db``, a path, or ``postgresql://...``
    store: str = "sqlite:///var/audit/audit.db"
    #: ``records``: write one record per request; ``kept_marker``: mark records of traces tail sampling kept
    mode: Literal["records", "kept_marker"] = "records"
    #: longest a write may take (busy wait, connect, statement) before the request is refused
    timeout: Duration = 5.0
    #: how often journaled requests are made into records in the background (every read does it first anyway).
    #: Longer moves that CPU to later, in bursts that compete with the request path while they run
    index_interval: Duration = 1.0
    #: replace user ids by a salted SHA-256 pseudonym before they are stored
    hash_user_id: bool = False
    #: the secret salt for ``hash_user_id`` (e.g. ``${env:AUDIT_USER_SALT}``)
    user_id_salt: str | None = None
    retention: RetentionConfig = Field(default_factory=RetentionConfig)

    @field_validator("store")
    @classmethod
    def _store(cls, v: str) -> str:
        open_store(v)  # parses the URL only; raises ValueError naming what is wrong
        return v

    @field_validator("timeout", "index_interval")
    @classmethod
    def _timeout(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be > 0")
        return v

    @model_validator(mode="after")
    def _salt(self) -> "AuditExporterConfig":
        if self.hash_user_id and not self.user_id_salt:
            raise ValueError("user_id_salt: required when hash_user_id is true (a secret, so pseudonyms "
                             "cannot be reversed by hashing guessed ids)")
        return self


class _Metrics:
    """The audit families on ``/metrics``, bound to one exporter."""

    def __init__(self, settings: CreateSettings):
        root, cid = settings.telemetry.root, str(settings.id)
        self.journaled = root.family(Counter, "sidecar_audit_requests_journaled",
                                     "Requests journaled (durable when counted); their records are made when indexed.",
                                     ("component",)).labels(cid)
        self.unreadable = root.family(Counter, "sidecar_audit_journal_unreadable",
                                      "Journal entries that could not be read into records (kept in audit_journal "
                                      "with their error).", ("component",)).labels(cid)
        self.written = root.family(Counter, "sidecar_audit_records_written",
                                   "Audit records stored (durable when counted).", ("component",)).labels(cid)
        self.duplicates = root.family(Counter, "sidecar_audit_records_duplicate",
                                      "Audit records already stored (a retried export); not stored twice.",
                                      ("component",)).labels(cid)
        self._failed = root.family(Counter, "sidecar_audit_records_failed",
                                   "Audit records not stored; the export was refused with a retryable code.",
                                   ("component", "reason"))
        self.failed = lambda reason: self._failed.labels(cid, reason)
        self.kept = root.family(Counter, "sidecar_audit_traces_marked_kept",
                                "Traces whose audit records were marked as kept by tail sampling.",
                                ("component",)).labels(cid)
        self.latency = root.family(Histogram, "sidecar_audit_store_latency_seconds",
                                   "Time of one write or kept marks, until durable.", ("component",)).labels(cid)
        self.commits = root.family(Counter, "sidecar_audit_store_commits",
                                   "Store transactions committed; writes arriving together share one.",
                                   ("component",)).labels(cid)
        self.lag = root.family(Gauge, "sidecar_audit_lag_seconds",
                               "Now minus the start time of the newest stored record.", ("component",)).labels(cid)
        self.queued = root.family(Gauge, "sidecar_audit_records_queued",
                                  "Records (spans, when journaled) received and waiting for their write to complete.",
                                  ("component",)).labels(cid)
        self._deleted = root.family(Counter, "sidecar_audit_records_deleted",
                                    "Records deleted by retention.", ("component", "reason"))
        self.deleted = lambda reason: self._deleted.labels(cid, reason)


class AuditExporter(Component):
    def __init__(self, settings: CreateSettings, cfg: AuditExporterConfig):
        self.id = str(settings.id)
        self.telemetry = settings.telemetry
        self.cfg = cfg
        self.store: AuditStore = open_store(cfg.store, timeout=cfg.timeout)
        self._salt = cfg.user_id_salt if cfg.hash_user_id else None
        self.metrics = _Metrics(settings)
        self.store.on_commit = self.metrics.commits.inc
        self.store.on_indexed = self._indexed
        #: requests are journaled and indexed later; with a user id salt, records are written on the request path
        self.journal = cfg.mode == "records" and self._salt is None
        self._newest = 0
        self._queued = 0
        self._state = threading.Lock()
        self._stopping = threading.Event()
        r = cfg.retention
        self._retention: Ticker | None = None
        if cfg.mode == "records" and (r.max_age is not None or r.max_megabytes is not None):
            self._retention = Ticker(self._retain, r.check_interval, name=f"exporter-{self.id}-retention")
        self._indexer = Ticker(self._index, cfg.index_interval, name=f"exporter-{self.id}-index") \
            if self.journal else None

    def start(self, host) -> None:
        try:
            self.store.open()
            # a journal left by the previous run is indexed by the background task (or a read), not before the
            # pipeline starts: nor by a kept_marker instance on the same store
            self._newest = self.store.newest_time(index=False) or 0
        except StoreError as e:
            raise ValueError(f"exporters.{self.id}.store: {e}") from None
        self.metrics.lag.set_function(self._lag)
        self.metrics.queued.set_function(lambda: self._queued)
        self._stopping.clear()
        for ticker in (self._indexer, self._retention):
            if ticker is not None:
                ticker.start()
        if self._indexer is not None:
            self._indexer.wake()  # what the previous run journaled, now

    def _lag(self) -> float:
        return max(0.0, (time.time_ns() - self._newest) / 1e9) if self._newest else 0.0

    def consume(self, envelope: Envelope) -> None:
        """Write (or mark) now, in the caller's thread; returning means it is stored. The pipeline's
        edge counts received/accepted/refused; this counts what it exported and filtered."""
        signal, n = envelope.signal, envelope.items
        if self._stopping.is_set():
            raise Refused("shutting_down", message=f"exporter {self.id} is shutting down")
        if self.cfg.mode == "kept_marker":
            return self._mark_kept(signal, envelope.encoded, n)  # read only: nothing here changes it
        if self.journal:
            return self._append(signal, envelope.encoded, n)
        extraction = extract(envelope.encoded, user_id_salt=self._salt)
        records = len(extraction.records)
        with self._store_call(queued=records, failed=records):
            written = self.store.write(extraction)
        self.metrics.written.inc(written)
        self.metrics.duplicates.inc(records - written)
        if extraction.records:
            newest = max(r.time_unix_nano for r in extraction.records)
            with self._state:
                self._newest = max(self._newest, newest)
        used = records + len(extraction.fragments)
        self.telemetry.exported(signal, used)
        self.telemetry.dropped(signal, n - used, "filtered")  # spans that are neither a request nor an inference

    @contextlib.contextmanager
    def _store_call(self, *, queued: int = 0, failed: int | None = None) -> Iterator[None]:
        """One store call on the request path: ``queued`` items waiting while it runs, its latency observed, a
        StoreError refused with a retryable reason (and ``failed`` records counted as not stored)."""
        if queued:
            with self._state:
                self._queued += queued
        t0 = time.perf_counter()
        try:
            yield
        except StoreError as e:
            if failed is not None:
                self.metrics.failed("store_unavailable").inc(failed)
            raise Refused("store_unavailable", message=f"audit store: {e}") from None
        finally:
            self.metrics.latency.observe(time.perf_counter() - t0)
            if queued:
                with self._state:
                    self._queued -= queued

    def _append(self, signal: Signal, request: bytes, n: int) -> None:
        with self._store_call(queued=n):
            self.store.append(request)
        self.metrics.journaled.inc()
        self.telemetry.exported(signal, n)

    def _indexed(self, batch: Indexed) -> None:
        """Count what one batch of the journal became (whoever in this process indexed it: the background
        task, a retention pass)."""
        self.metrics.written.inc(batch.written)
        self.metrics.duplicates.inc(batch.duplicates)
        self.metrics.unreadable.inc(batch.unreadable)
        if batch.newest_time is not None:
            with self._state:
                self._newest = max(self._newest, batch.newest_time)

    def index_once(self) -> Indexed:
        """Index the journal now (the background task runs it every ``index_interval``)."""
        return self.store.index_journal(stop=self._stopping.is_set)

    def _index(self) -> None:
        try:
            self.index_once()
        except StoreError as e:
            log.warning("%s: indexing the audit journal failed, will retry at the next interval: %s", self.id, e)

    def _mark_kept(self, signal: Signal, request: bytes, n: int) -> None:
        kept = kept_traces(request)
        with self._store_call(failed=len(kept)):
            self.store.mark_kept(kept)
        self.metrics.kept.inc(len(kept))
        self.telemetry.exported(signal, n)

    def retain_once(self) -> None:
        """One retention pass (the background task runs it every ``check_interval``)."""
        r = self.cfg.retention
        if r.max_age is not None:
            n = self.store.delete_older_than(time.time_ns() - int(r.max_age * 1e9))
            self.metrics.deleted("age").inc(n)
        if r.max_megabytes is not None:
            n = self.store.shrink_to(int(r.max_megabytes * 1024 * 1024))
            self.metrics.deleted("size").inc(n)

    def _retain(self) -> None:
        try:
            self.retain_once()
        except StoreError as e:
            log.warning("%s: retention pass failed, will retry at the next check: %s", self.id, e)

    def shutdown(self, deadline: float) -> None:
        self._stopping.set()
        for ticker in (self._indexer, self._retention):  # the journal is durable: the next reader indexes it
            if ticker is not None:
                ticker.stop(deadline)
        self.store.close()


FACTORY = Factory(type="audit", kind=Kind.EXPORTER, config_model=AuditExporterConfig,
                  create=lambda settings, cfg, _next: AuditExporter(settings, cfg),
                  signals=frozenset({Signal.TRACES}),
                  telemetry=frozenset({"sidecar_audit_journal_unreadable", "sidecar_audit_lag_seconds",
                                       "sidecar_audit_records_deleted", "sidecar_audit_requests_journaled",
                                       "sidecar_audit_records_duplicate", "sidecar_audit_records_failed",
                                       "sidecar_audit_records_queued", "sidecar_audit_records_written",
                                       "sidecar_audit_store_commits", "sidecar_audit_store_latency_seconds",
                                       "sidecar_audit_traces_marked_kept"}))
