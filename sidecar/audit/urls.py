"""Store URL -> store: ``sqlite:///path``, a plain path, or ``postgresql://...``."""

from __future__ import annotations

from sidecar.audit.store import AuditStore, SQLiteStore


def open_store(url: str, *, timeout: float = 5.0) -> AuditStore:
    """A store for ``url`` (not yet opened): ``sqlite:///path``, a plain path, or ``postgresql://...``."""
    if url.startswith(("postgresql://", "postgres://")):
        from sidecar.audit.postgres import PostgresStore

        return PostgresStore(url, timeout=timeout)
    if url.startswith("sqlite://"):
        path = url[len("sqlite://"):]  # sqlite:///rel.db -> rel.db, sqlite:////abs.db -> /abs.db
        if not path.startswith("/"):
            raise ValueError(f"{url!r}: expected sqlite:///relative/path or sqlite:////absolute/path")
        path = path[1:]
        if not path:
            raise ValueError(f"{url!r}: no file path")
        return SQLiteStore(url, path, busy_timeout=timeout)
    if "://" in url:
        raise ValueError(f"{url!r}: unsupported store; use sqlite:///path/audit.db or postgresql://user@host/db")
    return SQLiteStore(url, url, busy_timeout=timeout)
