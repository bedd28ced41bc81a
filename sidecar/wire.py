"""The wire scanner: per-item facts from encoded OTLP requests, for the hot loops of span_metrics,
tail_sampling and the receiver's id check.

One facade over two implementations with the same functions, signatures and result types
(``sidecar._wire_types``), chosen once here, as ``json.scanner`` does: the C extension
(``sidecar/_wire.c``) when it was built, else the pure-Python one (``sidecar/_wire_py.py``).
``SIDECAR_PURE_PYTHON=1`` selects the pure-Python one even when the extension is built: an escape
hatch, and how the test suite runs a second time. Callers never branch on which one runs.

    check_ids(request: bytes, logs: bool) -> int
    span_metric_rows(request: bytes, service_key: bytes, keys: tuple[bytes, ...]) -> list[SpanMetricRow]
    span_runs(request: bytes, keys: tuple[bytes, ...]) -> list[ResourceGroup]   # of ScopeGroup of SpanRun
    log_runs(request: bytes, keep_severity: int) -> list[ResourceGroup]         # of ScopeGroup of LogRun
    audit_spans(request: bytes, keys: tuple[bytes, ...], prefix: bytes, event_keys: tuple[bytes, ...])
        -> list[AuditSpans]                                                      # of AuditSpan
    audit_subset(request: bytes, keys: tuple[bytes, ...], prefix: bytes, event_keys: tuple[bytes, ...])
        -> tuple[bytes, int]              # the request with only what audit_spans reads; spans kept

On input the protobuf parser accepts, both answer identically (unknown fields and groups skipped, a
field with an unexpected wire type treated as unknown, the last scalar winning, repeated message
fields merged, open enums carried as their number). On input it rejects, the Python half raises
ValueError (it parses first); the C half raises ValueError where its reading finds the damage and
may answer where it does not look (the receiver only hands on what the parser accepted).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from sidecar import _wire_py
from sidecar._wire_py import any_label
from sidecar._wire_types import (AuditSpan, AuditSpans, KeyHits, LogRun, ResourceGroup, ScopeGroup, SpanMetricRow,
                                  SpanRun)


def pure_python_requested() -> bool:
    """SIDECAR_PURE_PYTHON=1 (or true / yes): use the pure-Python half of every accelerated module."""
    return os.environ.get("SIDECAR_PURE_PYTHON", "").strip().lower() in ("1", "true", "yes")


def choose(c_module: str, fallback: ModuleType) -> ModuleType:
    """The C extension ``c_module`` when it is built and not switched off, else ``fallback`` (its
    pure-Python twin): the one rule for every accelerator in the sidecar."""
    if not pure_python_requested():
        try:
            return importlib.import_module(c_module)
        except ImportError:  # pragma: no cover - built by `pip install -e .` wherever a compiler is present
            pass
    return fallback


#: The implementation in use: the C extension, else the pure-Python module.
implementation: ModuleType = choose("sidecar._wire", _wire_py)
#: "c" or "python", for logs and diagnostics.
IMPLEMENTATION = "python" if implementation is _wire_py else "c"

MAX_KEYS: int = implementation.MAX_KEYS
check_ids = implementation.check_ids
span_metric_rows = implementation.span_metric_rows
span_runs = implementation.span_runs
log_runs = implementation.log_runs
audit_spans = implementation.audit_spans
audit_subset = implementation.audit_subset

__all__ = ["IMPLEMENTATION", "MAX_KEYS", "AuditSpan", "AuditSpans", "KeyHits", "LogRun", "ResourceGroup", "ScopeGroup",
           "SpanMetricRow", "SpanRun",
           "any_label", "audit_spans", "audit_subset", "check_ids", "choose", "implementation", "log_runs", "pure_python_requested",
           "span_metric_rows", "span_runs"]
