"""The wire scanner: per-item facts from encoded OTLP requests, for the hot loops of span_metrics,
tail_sampling and the receiver's id check.

One facade over two implementations with the same functions, signatures and result types
(``sidecar._wire_types``), chosen once here, as ``json.scanner`` does: the C extension
(``sidecar/_wire.c``) when it was built, else the pure-Python one (``sidecar/_wire_py.py``).
``SIDECAR_PURE_PYTHON=1`` selects the pure-Python one even when the extension is built: an escape
hatch, and how the test suite runs a second time. Callers never branch on which one runs.

    check_encoding(request: bytes, schema: bytes, request_type) -> Request | None   # see below
    check_ids(request: bytes, logs: bool) -> int
    span_metric_rows(request: bytes, service_key: bytes, keys: tuple[bytes, ...]) -> list[SpanMetricRow]
    span_metric_groups(request: bytes, service_key: bytes, keys: tuple[bytes, ...], bounds: tuple[int, ...],
                       max_groups: int) -> list[SpanMetricGroup]   # the same spans counted per key
    span_runs(request: bytes, keys: tuple[bytes, ...]) -> list[ResourceGroup]   # of ScopeGroup of SpanRun
    log_runs(request: bytes, keep_severity: int) -> list[ResourceGroup]         # of ScopeGroup of LogRun
    audit_spans(request: bytes, keys: tuple[bytes, ...], prefix: bytes, event_keys: tuple[bytes, ...])
        -> list[AuditSpans]                                                      # of AuditSpan
    audit_subset(request: bytes, keys: tuple[bytes, ...], prefix: bytes, event_keys: tuple[bytes, ...])
        -> tuple[bytes, int]              # the request with only what audit_spans reads; spans kept
    audit_rows(request: bytes, layout: tuple, recorded: int, missing=None) -> list[tuple] | None
        # the audit store's rows of the request's records (a text a record lacks: ``missing``),
        # or None: sidecar.audit.records.extract's to make

``check_encoding`` is the receiver's parse: it raises ValueError exactly where the protobuf parser
would refuse the bytes (the two halves are fuzzed against each other and the parser). The C half
checks on the wire and returns None, so the message is parsed only if a stage asks for it (most work
on the bytes); the pure-Python half is the parser itself and returns the message it made.

On input the protobuf parser accepts, both answer identically (unknown fields and groups skipped, a
field with an unexpected wire type treated as unknown, the last scalar winning, repeated message
fields merged, open enums carried as their number), with one exception: in a request with more keys
than ``span_metric_groups``' ``max_groups``, the C half tells keys apart by their bytes on the wire and
the Python half by their labels, so which keys reach the rest group can differ (every span is counted
either way). On input it rejects, the Python half raises
ValueError (it parses first); the C half raises ValueError where its reading finds the damage and
may answer where it does not look (the receiver only hands on what the parser accepted).
"""

from __future__ import annotations

import functools
from types import ModuleType

from google.protobuf.descriptor import FieldDescriptor

from contract.accelerators import choose, pure_python_requested
from sidecar import _wire_py
from sidecar._wire_py import any_label
from sidecar._wire_types import (AuditSpan, AuditSpans, KeyHits, LogRun, ResourceGroup, ScopeGroup,
                                  SpanMetricGroup, SpanMetricRow, SpanRun)


#: The implementation in use: the C extension, else the pure-Python module.
implementation: ModuleType = choose("sidecar._wire", _wire_py)
#: "c" or "python", for logs and diagnostics.
IMPLEMENTATION = "python" if implementation is _wire_py else "c"

MAX_KEYS: int = implementation.MAX_KEYS
SCHEMA_WIDTH: int = implementation.SCHEMA_WIDTH
check_encoding = implementation.check_encoding
check_ids = implementation.check_ids
span_metric_rows = implementation.span_metric_rows
span_metric_groups = implementation.span_metric_groups
span_runs = implementation.span_runs
log_runs = implementation.log_runs
audit_spans = implementation.audit_spans
audit_subset = implementation.audit_subset
audit_rows = implementation.audit_rows

@functools.lru_cache(maxsize=None)
def schema_of(request_type) -> bytes:
    """What ``check_encoding`` checks in a ``request_type``, from its protobuf descriptors: SCHEMA_WIDTH bytes
    per message type reachable from it (the request first), one per field number: 0 a field the parser
    does not look inside (numbers, enums, bytes), 1 a string (UTF-8), 2 + i a message of type i.

    Made from the installed opentelemetry-proto, so a field a newer version adds is checked as the
    parser would. Types the table cannot say exactly are refused here, once, not guessed at: field
    numbers from SCHEMA_WIDTH up, packed repeated numbers (metrics have them: they are parsed instead).
    """
    types: list = []
    index: dict[str, int] = {}

    def visit(desc) -> None:
        if desc.full_name not in index:
            index[desc.full_name] = len(types)
            types.append(desc)
            for f in desc.fields:
                if f.type == FieldDescriptor.TYPE_MESSAGE:
                    visit(f.message_type)

    visit(request_type.DESCRIPTOR)
    if len(types) > 254:  # 2 + i must fit a byte
        raise ValueError(f"{request_type.__name__}: {len(types)} message types, more than the schema holds")
    table = bytearray(len(types) * SCHEMA_WIDTH)
    for i, desc in enumerate(types):
        for f in desc.fields:
            if f.number >= SCHEMA_WIDTH:
                raise ValueError(f"{desc.full_name}.{f.name}: field number {f.number} >= {SCHEMA_WIDTH}")
            if f.type == FieldDescriptor.TYPE_GROUP or (f.is_repeated and f.type not in (
                    FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE)):
                raise ValueError(f"{desc.full_name}.{f.name}: a group or packed field the schema cannot describe")
            if f.type == FieldDescriptor.TYPE_STRING:
                table[i * SCHEMA_WIDTH + f.number] = 1
            elif f.type == FieldDescriptor.TYPE_MESSAGE:
                table[i * SCHEMA_WIDTH + f.number] = 2 + index[f.message_type.full_name]
    return bytes(table)


__all__ = ["IMPLEMENTATION", "MAX_KEYS", "SCHEMA_WIDTH", "AuditSpan", "AuditSpans", "KeyHits", "LogRun", "ResourceGroup", "ScopeGroup",
           "SpanMetricGroup", "SpanMetricRow", "SpanRun",
           "any_label", "audit_rows", "audit_spans", "audit_subset", "check_encoding", "check_ids", "choose", "implementation", "log_runs", "pure_python_requested",
           "schema_of", "span_metric_groups", "span_metric_rows", "span_runs"]
