"""The results of the wire scanner (``sidecar.wire``), shared by its C and pure-Python halves.

Both halves return instances of exactly these classes (the C extension imports them), so a
result compares, unpacks and reads by name the same whichever half produced it.
"""

from __future__ import annotations

from typing import NamedTuple


class SpanMetricRow(NamedTuple):
    """One span, as span_metrics counts it."""

    #: (service, name, kind, status_code, label per key...). A label is the span's first attribute with
    #: that key rendered as text (strings as they are, bools true/false, numbers as ``str()``, anything
    #: else ""); an empty label counts as absent and the resource's label for the key stands in. The
    #: service is the resource's label for ``service_key``.
    #: kind and status_code are the raw enum numbers: enums are open, any int32 can arrive.
    key: tuple
    duration_ns: int  #: end - start, or 0 when the end is not after the start
    end_ns: int
    status_code: int
    trace_id: bytes
    span_id: bytes


class SpanMetricGroup(NamedTuple):
    """The spans of one request with one SpanMetricRow key, counted (``span_metric_groups``): what span_metrics
    adds to a series, without an object per span. Exemplars are (duration_ns, trace_id, span_id, end_ns)."""

    key: tuple | None  #: as SpanMetricRow.key; None: the spans of the keys past ``max_groups``
    count: int
    sum_ns: int  #: of the spans' durations
    buckets: list  #: spans per histogram bucket: bucket i holds bounds[i-1] < duration <= bounds[i] (len(bounds) + 1)
    slowest: tuple  #: the exemplar of the first span with the greatest duration
    slowest_at: int  #: that span's index among the request's spans (to merge groups in arrival order)
    latest: tuple  #: the exemplar of the last span
    latest_at: int


class KeyHits(NamedTuple):
    """What the spans of one run hold for one attribute key."""

    absent: bool  #: some span of the run lacks the key (its resource decides for it)
    #: the encoded AnyValue of each span's first occurrence of the key (several value fields of one
    #: KeyValue concatenated, which parses as their merge); a repeat of the previous value left out
    values: list


class SpanRun(NamedTuple):
    """Consecutive spans of one scope with one trace id and one tracestate."""

    trace_id: bytes
    trace_state: str
    spans: tuple  #: each span's exact bytes as received (C: not tracked by the garbage collector)
    nbytes: int  #: their total length
    #: bit ``1 << code`` for each of the known status codes (UNSET 0, OK 1, ERROR 2) a span has;
    #: any other code (enums are open) sets no bit
    status_mask: int
    start_ns: int  #: earliest non-zero start
    end_ns: int  #: latest end
    has_root: bool  #: a span without a parent, or whose parent is remote (flags 0x300)
    hits: tuple  #: per key asked for: None when no span has it, else KeyHits


class LogRun(NamedTuple):
    """Consecutive log records of one scope with one trace id and one side of ``keep_severity``."""

    trace_id: bytes
    records: tuple  #: each record's exact bytes as received (C: not tracked by the garbage collector)
    nbytes: int
    keep: bool  #: severity_number >= keep_severity


class ScopeGroup(NamedTuple):
    """A Scope{Spans,Logs}: its head (the encoding without its items) and its runs."""

    head: bytes
    runs: list


class ResourceGroup(NamedTuple):
    """A Resource{Spans,Logs}: its head (fields 1 and 3 as encoded, an empty field 1 when absent), its scopes,
    and per key asked for the encoded AnyValue of the resource's first attribute with that key, or None."""

    head: bytes
    scopes: list
    values: tuple


class AuditSpan(NamedTuple):
    """One span an audit record can use: an entry span, or one with a wanted attribute (``audit_spans``).

    A value in ``attributes`` / ``events`` is None for an empty AnyValue; a str, bool, int or float when
    the AnyValue is one scalar field; else the AnyValue's encoding (bytes) for the caller to parse.
    """

    trace_id: bytes
    span_id: bytes
    entry: bool  #: kind SERVER or CONSUMER, or no parent
    name: str
    start_ns: int
    end_ns: int
    status_code: int  #: the raw enum number
    status_message: str
    attributes: dict  #: wanted key -> value (a repeated key: the last one)
    events: dict  #: wanted event attribute key -> value of its first occurrence over the span's events
    encoded: bool  #: some value in ``attributes`` or ``events`` is left encoded (bytes)
    span: bytes  #: the span's exact bytes as received


class AuditSpans(NamedTuple):
    """The spans of one ResourceSpans an audit record can use (``audit_spans``)."""

    resource: bytes  #: the Resource as encoded (several occurrences concatenated: the parser merges them)
    spans: list  #: an AuditSpan per selected span, in request order


__all__ = ["AuditSpan", "AuditSpans", "KeyHits", "LogRun", "ResourceGroup", "ScopeGroup", "SpanMetricGroup", "SpanMetricRow",
           "SpanRun"]
