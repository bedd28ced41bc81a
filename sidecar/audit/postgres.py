"""The production store: PostgreSQL by DSN through psycopg 3 (``pip install 'torch-otel-sidecar[audit-postgres]'``).

One ``audit_records`` table and the journal (schema version 3 of :data:`sidecar.audit.store.MIGRATIONS`;
SQLite has time-ordered partitions instead of the one table) and the SQL of
:class:`~sidecar.audit.store.AuditStore`; a write returns after its transaction committed
(``synchronous_commit`` as the server has it, ``on`` by default). ``timeout`` bounds connecting
and each statement, so a slow server makes the exporter refuse (retryable) instead of holding
the receiver.
"""

from __future__ import annotations

from sidecar.audit.store import AuditStore, StoreError


class PostgresStore(AuditStore):
    placeholder = "%s"
    _length = "octet_length"
    dialect = "postgresql"

    def __init__(self, url: str, *, timeout: float = 5.0):
        super().__init__(url)
        try:
            import psycopg
        except ImportError:
            raise ValueError("a postgresql:// audit store needs psycopg 3: "
                             "pip install 'torch-otel-sidecar[audit-postgres]'") from None
        self._psycopg = psycopg
        self._timeout = timeout

    def _errors(self) -> tuple[type, ...]:
        return (self._psycopg.Error, OSError)

    def _connect(self):
        ms = max(1, int(self._timeout * 1000))
        try:
            return self._psycopg.connect(self.url, connect_timeout=max(1, int(self._timeout + 0.999)),
                                         options=f"-c statement_timeout={ms} -c lock_timeout={ms}")
        except self._psycopg.Error as e:
            raise StoreError(f"{self.describe()}: cannot connect: {e}".strip()) from e

    def _lock_schema(self, cur) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(7274647)")  # any fixed key: one migration at a time

    def _lock_index(self, cur) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(7274648)")  # one indexer at a time: journal order is kept

    def size_bytes(self) -> int:
        """The live rows' bytes (deleted rows' space is reused by autovacuum, so the file size would mislead)."""
        with self._transaction(write=False) as cur:
            cur.execute("SELECT coalesce(sum(pg_column_size(r.*)), 0) FROM audit_records r")
            return int(cur.fetchone()[0])
