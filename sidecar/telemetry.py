"""Self-telemetry: what every component received, accepted, refused, dropped and exported.

Counters are Prometheus metrics on one registry, served on ``/metrics`` together with
the span metrics. Components get a :class:`ComponentTelemetry` whose children are
bound per (signal, reason) on first use and cached, so the hot path is one dict
lookup and one locked add. The pipeline counts ``received`` / ``accepted`` / ``refused``
at its edges (:class:`sidecar.pipeline.Edge`); a component reports only what it drops
and what it exports. A component's own metrics are declared one way: a family from
:meth:`SelfTelemetry.family` (or a scrape-time collector from :meth:`SelfTelemetry.collector`),
named in its ``Factory.telemetry``.

Outcomes, per component and signal, in items (spans, log records, data points):

- ``received``  offered to the component
- ``accepted``  taken; the component now owns it
- ``refused``   not taken, the sender was told to retry (reason: memory_limit, queue_full, disk_full, ...)
- ``dropped``   taken and then discarded (reason; ``intended="true"`` for sampling, ``false`` for loss)
- ``exported``  delivered to a backend
- ``retried``   re-sent after a retryable failure
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge

from sidecar.signals import Signal

T = TypeVar("T")

#: Drop reasons that are the product working as designed rather than data loss.
INTENDED_DROP_REASONS = frozenset({"sampled_out", "filtered", "policy_drop", "rate_limited"})


class SelfTelemetry:
    """Owns the registry and the metric families; hands out per-component views."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        labels = ("kind", "component", "signal")
        r = self.registry
        self.received = Counter("sidecar_items_received", "Items offered to the component.", labels, registry=r)
        self.accepted = Counter("sidecar_items_accepted", "Items the component took ownership of.", labels, registry=r)
        self.refused = Counter("sidecar_items_refused", "Items not taken; the sender was told to retry or fix them.",
                               labels + ("reason",), registry=r)
        self.dropped = Counter("sidecar_items_dropped", "Items taken and then discarded, by reason.",
                               labels + ("reason", "intended"), registry=r)
        self.exported = Counter("sidecar_items_exported", "Items delivered to a backend.", labels, registry=r)
        self.retried = Counter("sidecar_items_retried", "Items re-sent after a retryable failure.", labels, registry=r)
        self.queue_size = Gauge("sidecar_queue_size", "Requests waiting in a sending queue.", ("component",), registry=r)
        self.queue_capacity = Gauge("sidecar_queue_capacity", "Capacity of a sending queue, in requests.",
                                    ("component",), registry=r)
        self.queue_items = Gauge("sidecar_queue_items", "Items waiting in a sending queue.", ("component",), registry=r)
        self.up = Gauge("sidecar_up", "1 while the pipelines are running.", registry=r)
        self._families: dict[str, object] = {}
        self._families_lock = threading.Lock()

    def family(self, metric_type: type, name: str, documentation: str, labelnames: tuple[str, ...]):
        """A component-specific metric family, created once per registry and shared by every instance
        of the component type (registering the same name twice on one registry is an error)."""
        with self._families_lock:
            metric = self._families.get(name)
            if metric is None:
                metric = metric_type(name, documentation, labelnames, registry=self.registry)
                self._families[name] = metric
            return metric

    def collector(self, name: str, make: Callable[[], T]) -> T:
        """A collector rendered at scrape time (one per registry, shared by every instance of the
        component type): made by ``make()`` and registered on first use, the same object after."""
        with self._families_lock:
            collector = self._families.get(name)
            if collector is None:
                collector = self._families[name] = make()
                self.registry.register(collector)
            return collector

    def component(self, kind: str, component_id: str) -> "ComponentTelemetry":
        return ComponentTelemetry(self, kind, component_id)


class ComponentTelemetry:
    """Counters of one component, pre-bound to its kind and id."""

    def __init__(self, root: SelfTelemetry, kind: str, component_id: str):
        self.root = root
        self.kind = str(kind)
        self.id = str(component_id)
        self._children: dict[tuple, object] = {}
        self._lock = threading.Lock()

    @property
    def registry(self) -> CollectorRegistry:
        return self.root.registry

    def _child(self, family: str, signal: Signal, *extra: str):
        key = (family, signal, extra)
        child = self._children.get(key)
        if child is None:
            with self._lock:
                metric = getattr(self.root, family)
                child = metric.labels(self.kind, self.id, signal.value, *extra)
                self._children[key] = child
        return child

    def received(self, signal: Signal, n: int) -> None:
        if n:
            self._child("received", signal).inc(n)

    def accepted(self, signal: Signal, n: int) -> None:
        if n:
            self._child("accepted", signal).inc(n)

    def refused(self, signal: Signal, n: int, reason: str) -> None:
        if n:
            self._child("refused", signal, reason).inc(n)

    def dropped(self, signal: Signal, n: int, reason: str) -> None:
        if n:
            intended = "true" if reason in INTENDED_DROP_REASONS else "false"
            self._child("dropped", signal, reason, intended).inc(n)

    def exported(self, signal: Signal, n: int) -> None:
        if n:
            self._child("exported", signal).inc(n)

    def retried(self, signal: Signal, n: int) -> None:
        if n:
            self._child("retried", signal).inc(n)

    def queue_gauges(self, capacity: int, size_fn: Callable[[], int], items_fn: Callable[[], int] | None = None) -> None:
        """Register a sending queue's capacity and live size (read at scrape time, not on the hot path)."""
        self.root.queue_capacity.labels(self.id).set(capacity)
        self.root.queue_size.labels(self.id).set_function(size_fn)
        if items_fn is not None:
            self.root.queue_items.labels(self.id).set_function(items_fn)

    def value(self, family: str, signal: Signal, *extra: str) -> float:
        """Current value of one counter (tests and the demo read it)."""
        return self._child(family, signal, *extra)._value.get()  # noqa: SLF001 - prometheus_client has no public getter
