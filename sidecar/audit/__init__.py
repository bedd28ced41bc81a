"""The audit trail: every inference on record, unsampled, durable before the acknowledgement.

- :mod:`sidecar.audit.records` — what a record is and how it is read off OTLP spans (pure functions)
- :mod:`sidecar.audit.store` — the SQL store (SQLite default), migrations, retention; :mod:`sidecar.audit.postgres`
- :mod:`sidecar.audit.urls` — ``open_store(url)``
- :mod:`sidecar.exporters.audit` — the ``audit`` exporter (``mode: records`` or ``kept_marker``)
- :mod:`sidecar.audit.cli` — ``python -m sidecar audit query``
"""

from sidecar.audit.records import AuditRecord, extract, kept_traces
from sidecar.audit.store import AuditStore, Query, StoreError
from sidecar.audit.urls import open_store

__all__ = ["AuditRecord", "AuditStore", "Query", "StoreError", "extract", "kept_traces", "open_store"]
