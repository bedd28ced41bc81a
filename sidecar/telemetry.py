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

Where the CPU goes, on the served ``/metrics`` (:meth:`SelfTelemetry.measure_process`):
``sidecar_thread_cpu_seconds_total{thread}`` (:class:`ThreadCPU`), per thread name (a pool's threads
together), next to the standard ``process_*`` metrics.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Callable, Iterator, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector
from prometheus_client.core import CounterMetricFamily

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

    def measure_process(self) -> None:
        """Add what this process spends (``process_*``, :class:`ThreadCPU`): for the served ``/metrics``, where
        one registry is one process (a test's registries stay about the telemetry they were given)."""
        self.collector("process_", lambda: ProcessCollector(registry=None))
        self.collector("sidecar_thread_cpu_seconds", ThreadCPU)


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


class ThreadCPU:
    """``sidecar_thread_cpu_seconds_total{thread}``: the CPU time (user + system) of the process's threads by
    name, read from ``/proc`` at scrape time, so that an operator (and ``benchmarks/throughput.py``) sees which
    stage spends it: the receivers' handler pools (``otlp-grpc``), ``tail_sampling[...]``, an exporter's
    consumers, the audit indexer. Threads of one pool count together (``otlp-grpc_3`` -> ``otlp-grpc``); a
    thread's time stays counted after it exits (as of the last scrape that saw it), and the time of threads
    Python did not start (gRPC's own) and of exited threads since that scrape is ``thread="other"``, so the
    series add up to ``process_cpu_seconds_total`` (within a clock tick: "other" never goes down). Linux only
    (nothing elsewhere); nothing on the hot path.
    """

    _POOL_SUFFIX = re.compile(r"(?:[_-]\d+)+$")  # a pool's index, and the pool's own (ThreadPoolExecutor-3_1)
    _DEFAULT_NAME = re.compile(r"^Thread-\d+")

    def __init__(self, proc: str = "/proc/self") -> None:
        self._proc = proc
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._lock = threading.Lock()
        self._seen: dict[threading.Thread, tuple[str, float]] = {}  # live thread -> (name, seconds at last scrape)
        self._retired: dict[str, float] = {}  # name -> seconds of its threads that have exited
        self._other = 0.0  # "other" as last reported

    @classmethod
    def name_of(cls, thread: threading.Thread) -> str:
        """The series a thread counts in: its name without a pool's index (``Thread-7 (_serve)`` -> ``Thread (_serve)``)."""
        return cls._POOL_SUFFIX.sub("", cls._DEFAULT_NAME.sub("Thread", thread.name))

    def _seconds(self, stat_path: str) -> float | None:
        try:
            with open(stat_path, "rb") as f:
                stat = f.read()
        except OSError:  # the thread has just exited, or no /proc
            return None
        fields = stat[stat.rindex(b")") + 2:].split()  # after "pid (comm) ": comm may hold spaces
        return (int(fields[11]) + int(fields[12])) / self._tick  # utime, stime (fields 14 and 15 of stat)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("sidecar_thread_cpu_seconds", "CPU time (user + system) of the sidecar's "
                                     "threads, by thread name (a pool's threads together; thread=\"other\": "
                                     "threads Python did not start).", labels=("thread",))
        with self._lock:
            live = {t for t in threading.enumerate() if t.native_id is not None}
            for t in [t for t in self._seen if t not in live]:
                name, seconds = self._seen.pop(t)
                self._retired[name] = self._retired.get(name, 0.0) + seconds
            by_name = dict(self._retired)
            for t in live:
                name = self.name_of(t)
                seconds = self._seconds(f"{self._proc}/task/{t.native_id}/stat")
                if seconds is None:  # exiting: as last seen (a counter must not go down), retired at the next scrape
                    name, seconds = self._seen.get(t, (name, 0.0))
                self._seen[t] = (name, seconds)
                by_name[name] = by_name.get(name, 0.0) + seconds
            # read after the threads, so it holds what they were seen to spend; the kernel adjusts a thread's and
            # the process's times separately, so the difference can still dip by a tick: "other" never goes down
            total = self._seconds(f"{self._proc}/stat")
            if total is None:  # no /proc: nothing to report
                return
            self._other = max(self._other, total - sum(by_name.values()))
        for name, seconds in sorted(by_name.items()):
            family.add_metric([name], seconds)
        family.add_metric(["other"], self._other)
        yield family
