"""The audit trail: every inference on record, unsampled, durable before the acknowledgement.

- :mod:`sidecar.audit.records` — what a record is and how it is read off OTLP spans (pure functions)
- :mod:`sidecar.audit.store` — SQLite (default) and PostgreSQL stores, migrations, retention
- :mod:`sidecar.exporters.audit` — the ``audit`` exporter (``mode: records`` or ``kept_marker``)
- :mod:`sidecar.audit.cli` — ``python -m sidecar audit query``
"""

from sidecar.audit.records import AuditRecord, extract, kept_traces
from sidecar.audit.store import AuditStore, Query, StoreError, open_store

__all__ = ["AuditRecord", "AuditStore", "Query", "StoreError", "extract", "kept_traces", "open_store"]
