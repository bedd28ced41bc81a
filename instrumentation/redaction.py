"""Redaction in the app, before telemetry leaves the process: OTel SDK exporter wrappers.

``RedactingSpanExporter`` and ``RedactingLogExporter`` wrap the real exporter (OTLP,
in-memory, ...) and apply the shared rule engine (:mod:`redaction`) to redacted
copies of each batch. They sit *inside* ``BatchSpanProcessor`` /
``BatchLogRecordProcessor``, so redaction runs on the SDK's export worker thread and
the inference thread pays nothing for it.

Why exporter wrappers and not span processors: ``SpanProcessor.on_end`` runs on the
thread that ended the span (the request thread) and receives an immutable
``ReadableSpan``, so a processor would have to copy and scan on the hot path. The
exporter gets the same immutable objects in batches on the worker; it builds a new
``ReadableSpan`` / ``ReadableLogRecord`` only for items a rule changed and passes
clean ones through untouched.

Fails closed: if redacting a batch raises, the batch is not exported (the export
reports FAILURE, which the batch processor logs) rather than sent unredacted.

Configure from the sidecar's YAML (its ``processors.redaction`` section) or from code::

    engine = RedactionEngine(load_redaction_config("collector-config/sidecar.yaml"))
    BatchSpanProcessor(RedactingSpanExporter(OTLPSpanExporter(), engine))
"""

from __future__ import annotations

import copy
import logging
import os
import time
from typing import Any, Sequence

from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.sdk._logs.export import LogRecordExporter, LogRecordExportResult
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, Status

from redaction import DROP, RedactionConfig, RedactionEngine, load_redaction_config
from redaction._engine import MASKED_COUNT, MASKED_KEYS, REDACTED_COUNT, REDACTED_KEYS, Tally
from redaction.values import Redacted, redact_roots

__all__ = ["RedactingLogExporter", "RedactingSpanExporter", "RedactionConfig", "RedactionEngine",
           "export_redaction_counts", "load_redaction_config", "make_engine"]

#: The sidecar's counter (``sidecar/processors/redaction.py``): Prometheus shows both as
#: ``sidecar_redaction_values_total{component, rule, action}``, so one dashboard panel sums them.
METRIC_NAME = "sidecar_redaction_values"
IN_PROCESS_COMPONENT = "in_process"

log = logging.getLogger(__name__)

EngineLike = RedactionEngine | RedactionConfig | dict | str | os.PathLike | None


def make_engine(source: EngineLike = None) -> RedactionEngine:
    """An engine from an engine, a config, a dict, a YAML path, or None (the defaults: every detector on)."""
    if isinstance(source, RedactionEngine):
        return source
    return RedactionEngine(load_redaction_config(source))


def export_redaction_counts(engine: RedactionEngine, meter_provider: Any,
                           component: str = IN_PROCESS_COMPONENT) -> Any:
    """Export ``engine``'s per-rule counts as an OTel counter named and labelled like the sidecar's.

    Read from the engine's stats when the metric reader collects, so redaction itself touches
    no instrument.
    """
    from opentelemetry.metrics import CallbackOptions, Observation

    def observe(_options: CallbackOptions) -> list[Observation]:
        return [Observation(n, {"component": component, "rule": rule, "action": action})
                for (rule, action), n in sorted(engine.stats.snapshot().items())]

    meter = meter_provider.get_meter("instrumentation.redaction")
    return meter.create_observable_counter(METRIC_NAME, callbacks=[observe],
                                           description="Values changed by a redaction rule, by action.")


class _Redactor:
    """Shared by both exporters: the engine, and resources/scopes redacted once and remembered."""

    def __init__(self, engine: EngineLike):
        self.engine = make_engine(engine)
        # resources and scopes are few and long-lived: redact each once (keyed by id, original kept alive)
        self._resources: dict[int, tuple[Resource, Resource]] = {}
        self._scopes: dict[int, tuple[Any, Any]] = {}

    def resource(self, resource: Resource | None, tally: Tally) -> Resource | None:
        if resource is None:
            return None
        hit = self._resources.get(id(resource))
        if hit is not None and hit[0] is resource:
            return hit[1]
        out = redact_roots(self.engine, [resource.attributes], [None], tally)
        new = resource if out is None else Resource(out.roots[0], resource.schema_url)
        if len(self._resources) > 64:
            self._resources.clear()
        self._resources[id(resource)] = (resource, new)
        return new

    def scope(self, scope: InstrumentationScope | None, tally: Tally) -> InstrumentationScope | None:
        if scope is None or not scope.attributes:
            return scope
        hit = self._scopes.get(id(scope))
        if hit is not None and hit[0] is scope:
            return hit[1]
        out = redact_roots(self.engine, [scope.attributes], [None], tally)
        new = scope if out is None else InstrumentationScope(scope.name, scope.version, scope.schema_url,
                                                              out.roots[0])
        if len(self._scopes) > 256:
            self._scopes.clear()
        self._scopes[id(scope)] = (scope, new)
        return new

    def attributes(self, dropped: int, new: dict, out: Redacted | None) -> BoundedAttributes:
        """New attributes with the summary added and the original's dropped count (SDK limits) kept."""
        if out is not None and self.engine.summary != "silent":
            _summarize(new, out, self.engine.summary == "debug")
        attrs = BoundedAttributes(maxlen=None, attributes=new, immutable=True)
        attrs.dropped = dropped
        return attrs


#: Items redacted between two chances for request threads to take the GIL (see _in_slices).
_SLICE = 32


def _in_slices(redact: Any, items: Sequence[Any], tally: Tally) -> list[Any]:
    """Redact a batch a slice at a time, yielding the GIL between slices.

    The export thread shares the interpreter with the threads serving inference: redacting a
    512-item batch in one go would hold the GIL for milliseconds and show up in request p99.
    """
    out: list[Any] = []
    for start in range(0, len(items), _SLICE):
        out.extend([redact(item, tally) for item in items[start:start + _SLICE]])
        time.sleep(0)  # let a waiting request thread run
    return out


class RedactingSpanExporter(SpanExporter):
    """Redacts each batch of spans (attributes, events, links, status, resource, scope), then exports it."""

    def __init__(self, exporter: SpanExporter, engine: EngineLike = None):
        self._exporter = exporter
        self._r = _Redactor(engine)
        self.engine = self._r.engine

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        tally: Tally = {}
        try:
            redacted = _in_slices(self._span, spans, tally)
        except Exception:  # fail closed
            log.exception("redaction failed; %d spans not exported", len(spans))
            return SpanExportResult.FAILURE
        finally:
            self.engine.stats.merge(tally)
        return self._exporter.export(redacted)

    def _span(self, span: ReadableSpan, tally: Tally) -> ReadableSpan:
        r = self._r
        events, links, status = span.events, span.links, span.status
        roots: list[Any] = [span.attributes]
        roots.extend(ev.attributes for ev in events)
        roots.extend(link.attributes for link in links)
        roots.append(status.description)
        labels = [None] * (len(roots) - 1) + ["status.message"]
        out = redact_roots(r.engine, roots, labels, tally)
        resource = r.resource(span.resource, tally)
        scope = r.scope(span.instrumentation_scope, tally)
        if out is None and resource is span.resource and scope is span.instrumentation_scope:
            return span
        if out is not None:
            new = out.roots
            attributes = r.attributes(span.dropped_attributes, dict(new[0] or {}), out)
            i = 1
            new_events = []
            for ev in events:
                if new[i] is not ev.attributes:
                    ev = Event(ev.name, r.attributes(ev.dropped_attributes, dict(new[i] or {}), None), ev.timestamp)
                new_events.append(ev)
                i += 1
            new_links = []
            for link in links:
                if new[i] is not link.attributes:
                    link = Link(link.context, r.attributes(link.dropped_attributes, dict(new[i] or {}), None))
                new_links.append(link)
                i += 1
            description = new[i]
            if description is not status.description:
                status = Status(status.status_code, None if description is DROP else description)
            events, links = new_events, new_links
        else:
            attributes = span.attributes
        return ReadableSpan(
            name=span.name, context=span.context, parent=span.parent, resource=resource,
            attributes=attributes, events=events, links=links, kind=span.kind, status=status,
            start_time=span.start_time, end_time=span.end_time, instrumentation_scope=scope,
        )

    def shutdown(self) -> None:
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporter.force_flush(timeout_millis)


class RedactingLogExporter(LogRecordExporter):
    """Redacts each batch of log records (body: strings, maps and lists; attributes; resource; scope)."""

    def __init__(self, exporter: LogRecordExporter, engine: EngineLike = None):
        self._exporter = exporter
        self._r = _Redactor(engine)
        self.engine = self._r.engine

    def export(self, batch: Sequence[ReadableLogRecord]) -> LogRecordExportResult:
        tally: Tally = {}
        try:
            redacted = _in_slices(self._record, batch, tally)
        except Exception:  # fail closed
            log.exception("redaction failed; %d log records not exported", len(batch))
            return LogRecordExportResult.FAILURE
        finally:
            self.engine.stats.merge(tally)
        return self._exporter.export(redacted)

    def _record(self, rec: ReadableLogRecord, tally: Tally) -> ReadableLogRecord:
        r = self._r
        lr = rec.log_record
        out = redact_roots(r.engine, [lr.attributes, lr.body], [None, "body"], tally)
        resource = r.resource(rec.resource, tally)
        scope = r.scope(rec.instrumentation_scope, tally)
        if out is None and resource is rec.resource and scope is rec.instrumentation_scope:
            return rec
        if out is not None:
            lr = copy.copy(lr)
            lr.attributes = r.attributes(rec.dropped_attributes, dict(out.roots[0] or {}), out)
            lr.body = None if out.roots[1] is DROP else out.roots[1]
        return ReadableLogRecord(log_record=lr, resource=resource, instrumentation_scope=scope, limits=rec.limits)

    def shutdown(self) -> None:
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporter.force_flush(timeout_millis)


def _summarize(attrs: dict, out: Redacted, debug: bool) -> None:
    if out.masked:
        attrs[MASKED_COUNT] = len(out.masked)
        if debug:
            attrs[MASKED_KEYS] = ",".join(sorted(set(out.masked)))
    if out.dropped:
        attrs[REDACTED_COUNT] = len(out.dropped)
        if debug:
            attrs[REDACTED_KEYS] = ",".join(sorted(set(out.dropped)))
