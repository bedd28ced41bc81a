"""Redaction of OTLP protobuf requests, in place.

Covers resource, scope, span, span event and link attributes, span status messages,
log bodies (strings, and maps and arrays recursively; bytes are left alone), log
attributes, and metric data point and exemplar attributes of every metric kind.

Span names and span event names are scanned too, but only the matched part is masked
(``GET /users/[EMAIL]/card/[CARD]``) whatever the rule's action, so names stay
groupable in every backend. Metric names and descriptions are left alone: they are
fixed by instrumentation, not places where request data lands.

Walking a message from Python costs far more than serializing it in C, so each span,
log record, metric, resource and scope is first serialized and all of them are scanned
together as bytes (:meth:`RedactionEngine.wire_candidates`). Only the flagged ones —
on realistic traffic the few that hold PII — are walked: key rules apply while
walking, every string value is collected, and all of them are scanned together
(:meth:`RedactionEngine.candidates`). A whole request is not worth testing first: with
a few percent of traces carrying PII, nearly every request of a hundred traces holds
some. Summary attributes (``redaction.masked.count`` ...) go on spans and log records
that changed, never on metric data points (they would split time series).
"""

from __future__ import annotations

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from redaction._engine import (
    DROP,
    IGNORE,
    MASKED_COUNT,
    MASKED_KEYS,
    REDACTED_COUNT,
    REDACTED_KEYS,
    SCAN,
    KeyAction,
    RedactionEngine,
    Tally,
)
from redaction._config import Action

__all__ = ["OtlpRedactor"]


class OtlpRedactor:
    """Applies one :class:`RedactionEngine` to Export{Trace,Logs,Metrics}ServiceRequest messages.

    ``prefilter=False`` walks every message (for tests that prove the prefilter changes nothing).
    """

    def __init__(self, engine: RedactionEngine, *, prefilter: bool = True):
        self.engine = engine
        self._prefilter = prefilter

    def redact(self, signal: str, request) -> Tally:
        """Dispatch on the signal name (``traces``, ``logs``, ``metrics``); returns what changed per rule."""
        if signal == "traces":
            return self.redact_traces(request)
        if signal == "logs":
            return self.redact_logs(request)
        if signal == "metrics":
            return self.redact_metrics(request)
        raise ValueError(f"unknown signal {signal!r}")

    def _flagged(self, items, serialize) -> "range | list[int] | tuple":
        """Indices of ``items`` that need the walk."""
        if self._prefilter:
            return self.engine.wire_candidates(items, serialize)
        return range(len(items))

    def _holder(self, b: "_Batch", holder, serialize) -> None:
        """A resource or a scope: its attributes, if they can hold anything to redact."""
        if self._flagged((holder,), serialize):
            b.attrs(holder.attributes, None)

    def redact_traces(self, request) -> Tally:
        b = _Batch(self.engine)
        for rs in request.resource_spans:
            self._holder(b, rs.resource, _RESOURCE)
            for ss in rs.scope_spans:
                self._holder(b, ss.scope, _SCOPE)
                spans = ss.spans
                for i in self._flagged(spans, _SPAN):
                    span = spans[i]
                    b.name(span, span)
                    b.attrs(span.attributes, span)
                    for ev in span.events:
                        b.name(ev, span)
                        b.attrs(ev.attributes, span)
                    for link in span.links:
                        b.attrs(link.attributes, span)
                    status = span.status
                    if status.message:
                        b.text(status, "message", status.message, None, None, "status.message", span)
        return b.finish()

    def redact_logs(self, request) -> Tally:
        b = _Batch(self.engine)
        for rl in request.resource_logs:
            self._holder(b, rl.resource, _RESOURCE)
            for sl in rl.scope_logs:
                self._holder(b, sl.scope, _SCOPE)
                records = sl.log_records
                for i in self._flagged(records, _LOG):
                    lr = records[i]
                    b.attrs(lr.attributes, lr)
                    if lr.HasField("body"):
                        b.value(lr.body, None, None, "body", lr)
        return b.finish()

    def redact_metrics(self, request) -> Tally:
        b = _Batch(self.engine)
        for rm in request.resource_metrics:
            self._holder(b, rm.resource, _RESOURCE)
            for sm in rm.scope_metrics:
                self._holder(b, sm.scope, _SCOPE)
                metrics = sm.metrics
                for i in self._flagged(metrics, _METRIC):
                    metric = metrics[i]
                    kind = metric.WhichOneof("data")
                    if kind is None:
                        continue
                    for dp in getattr(metric, kind).data_points:
                        b.attrs(dp.attributes, None)
                        if kind != "summary":
                            for ex in dp.exemplars:
                                b.attrs(ex.filtered_attributes, None)
        return b.finish()


# unbound, so serializing a repeated field is one map() in C
_RESOURCE = Resource.SerializeToString
_SCOPE = InstrumentationScope.SerializeToString
_SPAN = Span.SerializeToString
_LOG = LogRecord.SerializeToString
_METRIC = Metric.SerializeToString


class _Batch:
    """The strings of one request, collected, then scanned together; key rules apply while collecting."""

    __slots__ = ("engine", "cache", "targets", "bufs", "drops", "changed", "tally", "summary", "names")

    def __init__(self, engine: RedactionEngine):
        self.engine = engine
        self.cache = engine._key_cache  # noqa: SLF001 - read-only fast path; misses go through key_action
        # (holder, field, container, element, key, item): where to write back the value of bufs[i]
        self.targets: list[tuple] = []
        self.bufs: list[bytes] = []
        self.drops: list[tuple] = []
        self.changed: dict[int, list] | None = None if engine.summary == "silent" else {}
        self.tally: Tally = {}
        self.names: list = []  # spans and events whose name is scanned in name mode

    def name(self, holder, item) -> None:
        """A span or event name: masked in place, never dropped (see the module docstring)."""
        if holder.name:
            self.names.append((holder, item))

    def attrs(self, attrs, item) -> None:
        get = self.cache.get
        for kv in attrs:
            key = kv.key
            decision = get(key)
            if decision is None:
                decision = self.engine.key_action(key)
            if decision is SCAN:
                self.value(kv.value, attrs, kv, key, item)
            elif decision is not IGNORE:
                self.key_rule(decision, kv, attrs, key, item)

    def value(self, v: AnyValue, container, element, key: str, item) -> None:
        kind = v.WhichOneof("value")
        if kind == "string_value":
            s = v.string_value
            if s:
                self.targets.append((v, "string_value", container, element, key, item))
                self.bufs.append(s.encode())
        elif kind == "kvlist_value":
            self.attrs(v.kvlist_value.values, item)
        elif kind == "array_value":
            values = v.array_value.values
            for av in values:
                self.value(av, values, av, key, item)

    def text(self, holder, field: str, s: str, container, element, key: str, item) -> None:
        self.targets.append((holder, field, container, element, key, item))
        self.bufs.append(s.encode())

    def key_rule(self, decision: KeyAction, kv, attrs, key: str, item) -> None:
        self.tally[decision.stat] = self.tally.get(decision.stat, 0) + 1
        if decision.action is Action.DROP:
            self.drops.append((attrs, kv))
            self.note(item, key, dropped=True)
            return
        v = kv.value
        text = _as_text(v) if decision.action is Action.HASH else ""
        v.string_value = self.engine.key_replacement(decision, text)
        self.note(item, key, dropped=False)

    def note(self, item, key: str, dropped: bool) -> None:
        if self.changed is None or item is None:
            return
        entry = self.changed.get(id(item))
        if entry is None:
            entry = self.changed[id(item)] = [item, [], []]
        entry[2 if dropped else 1].append(key)

    def finish(self) -> Tally:
        engine = self.engine
        bufs = self.bufs
        for i in engine.candidates(bufs):
            out = engine.scan(bufs[i], self.tally)
            if out is None:
                continue
            holder, field, container, element, key, item = self.targets[i]
            if out is DROP:
                if container is not None:
                    self.drops.append((container, element))
                elif field == "string_value":
                    holder.Clear()  # a log body: no value left
                else:
                    setattr(holder, field, "")
                self.note(item, key, dropped=True)
            else:
                setattr(holder, field, out.decode())
                self.note(item, key, dropped=False)
        if self.names:
            encoded_names = [holder.name.encode() for holder, _ in self.names]
            for i in engine.candidates(encoded_names):
                out = engine.scan(encoded_names[i], self.tally, name=True)
                if out is not None:
                    holder, item = self.names[i]
                    holder.name = out.decode()
                    self.note(item, "span.name" if holder is item else "event.name", dropped=False)
        for container, element in self.drops:
            container.remove(element)
        if self.changed:
            debug = engine.summary == "debug"
            for item, masked, dropped in self.changed.values():
                _summarize(item.attributes, masked, dropped, debug)
        engine.stats.merge(self.tally)
        return self.tally


def _as_text(v: AnyValue) -> str:
    """A value as text for hashing a blocked key's value that is not a string."""
    kind = v.WhichOneof("value")
    if kind == "string_value":
        return v.string_value
    if kind == "bool_value":
        return "true" if v.bool_value else "false"
    if kind in ("int_value", "double_value"):
        return str(getattr(v, kind))
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return v.SerializeToString().hex() if kind else ""


def _summarize(attrs, masked: list[str], dropped: list[str], debug: bool) -> None:
    """Add (or, when an earlier redaction stage already wrote them, update) the summary attributes."""
    existing = {kv.key: kv for kv in attrs if kv.key.startswith("redaction.")}
    for name, keys, count_name in ((MASKED_KEYS, masked, MASKED_COUNT), (REDACTED_KEYS, dropped, REDACTED_COUNT)):
        if not keys:
            continue
        kv = existing.get(count_name) or attrs.add(key=count_name)
        kv.value.int_value = kv.value.int_value + len(keys)
        if debug:
            kv = existing.get(name) or attrs.add(key=name)
            earlier = [k for k in kv.value.string_value.split(",") if k]
            kv.value.string_value = ",".join(sorted(set(keys) | set(earlier)))
