"""service.pipelines -> a graph of components.

One instance per component id. Receivers and exporters are shared by every pipeline
that names them; a processor may serve one pipeline per signal (that is how
``tail_sampling`` sees a trace's spans and logs together). The graph starts back
to front (extensions, exporters, processors, receivers) and stops front to back so
every stage drains into a live one.

Data travels as :class:`~sidecar.envelope.Envelope` objects. Every component's input is
an :class:`Edge` that counts received / accepted / refused for it (a receiver's edge is
its output); a fan-out hands each branch a read-only view, so a branch that changes the
data gets its own copy.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from sidecar.component import Component, Consumer, Kind, Refused
from sidecar.config import ComponentConfig, Config, pipeline_signal
from sidecar.host import Host
from sidecar.registry import CreateSettings, factory_for
from sidecar.envelope import Commitments, Envelope
from sidecar.signals import Signal
from sidecar.telemetry import ComponentTelemetry, SelfTelemetry

log = logging.getLogger(__name__)


class Edge:
    """Counts what crosses one edge of the graph, for the component it leads into.

    Every component's input is wrapped in one: ``received`` when offered, then ``accepted``
    or ``refused`` (with the reason). A refusal is counted once, by the edge into the stage
    that raised it; the stages in front only pass it back to the sender, so one queue-full
    event is one refusal, not one per stage. Components count nothing themselves; they
    report only what they drop after accepting it (``telemetry.dropped(signal, n, reason)``).
    Model: otelcol's ``service/internal/obsconsumer``.
    """

    __slots__ = ("next", "telemetry")

    def __init__(self, consumer: Consumer, telemetry: ComponentTelemetry):
        self.next = consumer
        self.telemetry = telemetry

    def consume(self, envelope: Envelope) -> None:
        tel = self.telemetry
        signal, n = envelope.signal, envelope.items
        tel.received(signal, n)
        try:
            self.next.consume(envelope)
        except Refused as e:
            if not e.counted:
                e.counted = True
                tel.refused(signal, n, e.reason)
            raise
        tel.accepted(signal, n)


class SignalRouter:
    """The next stage of a component that serves several signals: one consumer per signal."""

    def __init__(self, owner: str):
        self.owner = owner
        self.routes: dict[Signal, Consumer] = {}

    def consume(self, envelope: Envelope) -> None:
        try:
            nxt = self.routes[envelope.signal]
        except KeyError:
            raise Refused("unsupported_signal", retryable=False,
                          message=f"{self.owner} is not in any {envelope.signal.value} pipeline") from None
        nxt.consume(envelope)


class Fanout:
    """Delivers one request to several consumers, each independently.

    Each branch gets a read-only view of the same data: nothing is copied unless a branch
    changes it, and then ``Envelope.mutable()`` gives that branch its own copy, so a branch
    that only holds data (batch, tail sampling) never sees another branch's redaction. If any
    consumer refuses, the sender is told to retry: a duplicate is better than a loss.

    The views carry the request's :class:`~sidecar.envelope.Commitments`: a branch may leave its
    wait for a sync there, and the fan-out runs the waits after the last branch, before it returns
    (a fan-out inside a branch leaves them to the outer one). So one branch's sync overlaps the
    next branch's work; a failed sync refuses the request like a refusing branch.
    """

    def __init__(self, consumers: list[Consumer]):
        self.consumers = consumers

    def consume(self, envelope: Envelope) -> None:
        commitments = envelope.commitments
        settles = commitments is None
        if settles:
            commitments = Commitments()
        refused: Refused | None = None
        try:
            for consumer in self.consumers:
                view = envelope.share()
                view.commitments = commitments
                try:
                    consumer.consume(view)
                except Refused as e:
                    refused = refused or e
        finally:
            if settles:
                try:
                    commitments.settle()
                except Refused as e:
                    refused = refused or e
        if refused is not None:
            raise refused


def _fan(consumers: list[Consumer]) -> Consumer:
    if len(consumers) == 1:
        return consumers[0]
    return Fanout(consumers)


@dataclass
class Graph:
    receivers: dict[str, Component] = field(default_factory=dict)
    processors: dict[str, Component] = field(default_factory=dict)
    exporters: dict[str, Component] = field(default_factory=dict)
    extensions: dict[str, Component] = field(default_factory=dict)
    processor_order: list[str] = field(default_factory=list)


class Service:
    """Builds the graph from a validated config and runs it."""

    def __init__(self, config: Config, telemetry: SelfTelemetry | None = None):
        self.config = config
        self.telemetry = telemetry or SelfTelemetry()
        self.host = Host(self.telemetry)
        self.graph = Graph()
        self._metrics_server = None
        #: the counted edge into each component, by (kind, id): what every stage in front of it calls
        self._inputs: dict[tuple[Kind, str], Edge] = {}
        self._build()

    # --- building ---------------------------------------------------------------------------

    def _create(self, cc: ComponentConfig, next_consumer: Consumer | None) -> Component:
        factory = factory_for(cc.kind, cc.id.type)
        tel = self.telemetry.component(cc.kind.value, str(cc.id))
        settings = CreateSettings(id=cc.id, kind=cc.kind, telemetry=tel)
        if cc.kind is Kind.RECEIVER:  # a receiver's edge is its output: what it offered the pipeline
            next_consumer = Edge(next_consumer, tel)
        comp = factory.create(settings, cc.config, next_consumer)
        self._inputs[(cc.kind, str(cc.id))] = Edge(comp, tel)
        return comp

    def _build(self) -> None:
        cfg = self.config
        g = self.graph
        for ext_id in cfg.service.extensions:
            g.extensions[ext_id] = self._create(cfg.extensions[ext_id], None)

        pipelines = cfg.service.pipelines
        for pipe in pipelines.values():
            for exp_id in pipe.exporters:
                if exp_id not in g.exporters:
                    g.exporters[exp_id] = self._create(cfg.exporters[exp_id], None)

        # processors: create each once, with a router filled per signal
        routers: dict[str, SignalRouter] = {}
        for pipe in pipelines.values():
            for proc_id in pipe.processors:
                if proc_id not in g.processors:
                    routers[proc_id] = SignalRouter(f"processor {proc_id}")
                    g.processors[proc_id] = self._create(cfg.processors[proc_id], routers[proc_id])
        g.processor_order = _front_to_back([p.processors for p in pipelines.values()])

        # wire each pipeline back to front; remember its head per receiver
        heads: dict[str, dict[Signal, list[Consumer]]] = {}
        for pid, pipe in pipelines.items():
            signal = pipeline_signal(pid)
            nxt: Consumer = _fan([self._inputs[(Kind.EXPORTER, e)] for e in pipe.exporters])
            for proc_id in reversed(pipe.processors):
                routers[proc_id].routes[signal] = nxt
                nxt = self._inputs[(Kind.PROCESSOR, proc_id)]
            for rec_id in pipe.receivers:
                heads.setdefault(rec_id, {}).setdefault(signal, []).append(nxt)

        for rec_id, by_signal in heads.items():
            router = SignalRouter(f"receiver {rec_id}")
            for signal, entries in by_signal.items():
                router.routes[signal] = _fan(entries)
            g.receivers[rec_id] = self._create(cfg.receivers[rec_id], router)

    # --- running ----------------------------------------------------------------------------

    def start(self) -> None:
        g = self.graph
        self.host.extensions = dict(g.extensions)
        started: list[Component] = []
        try:
            for comp in list(g.extensions.values()) + list(g.exporters.values()) + \
                    [g.processors[p] for p in reversed(g.processor_order)] + list(g.receivers.values()):
                comp.start(self.host)
                started.append(comp)
            address = self.config.service.telemetry.metrics.address
            if address:
                self._start_metrics_server(address)
        except Exception:
            deadline = time.monotonic() + 5
            for comp in reversed(started):
                try:
                    comp.shutdown(deadline)
                except Exception:  # pragma: no cover
                    log.exception("shutdown after failed start")
            raise
        self.telemetry.up.set(1)
        self.host.ready.set()

    def _start_metrics_server(self, address: str) -> None:
        from prometheus_client import make_wsgi_app

        from sidecar.config import split_host_port
        from sidecar.httpserver import BackgroundHTTPServer

        host, port = split_host_port(address)
        self.telemetry.measure_process()
        try:
            self._metrics_server = BackgroundHTTPServer(make_wsgi_app(self.telemetry.registry), host, port,
                                                        name="metrics-http", threads=2)
        except OSError as e:
            raise OSError(f"service.telemetry.metrics.address: cannot listen on {address}: {e.strerror or e}") from None
        self._metrics_server.start()

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_server.port if self._metrics_server else None

    def shutdown(self, timeout: float | None = None) -> "ShutdownReport":
        """Stop accepting, drain every stage, flush queues; all within ``timeout`` seconds.

        Returns what the run delivered, left on disk and lost, per signal, complete when it returns.
        """
        from sidecar.shutdown_report import build_report, lost_by_signal

        lost_before = lost_by_signal(self.telemetry.registry)
        timeout = self.config.service.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self.host.ready.clear()
        self.host.stopping.set()
        g = self.graph
        order = list(g.receivers.values()) + [g.processors[p] for p in g.processor_order] + \
            list(g.exporters.values()) + list(g.extensions.values())
        for comp in order:
            try:
                comp.shutdown(deadline)
            except Exception:
                log.exception("error while shutting down %r", comp)
        self.telemetry.up.set(0)
        if self._metrics_server:
            self._metrics_server.stop()
        components = list(g.exporters.values()) + list(g.processors.values())
        return build_report(self.telemetry.registry, lost_before, components)


def _front_to_back(chains: list[list[str]]) -> list[str]:
    """Order processors so each comes before every processor after it in any pipeline."""
    nodes: list[str] = []
    for chain in chains:
        for p in chain:
            if p not in nodes:
                nodes.append(p)
    after: dict[str, set[str]] = {p: set() for p in nodes}
    indeg = {p: 0 for p in nodes}
    for chain in chains:
        for a, b in zip(chain, chain[1:]):
            if b not in after[a]:
                after[a].add(b)
                indeg[b] += 1
    ready = [p for p in nodes if indeg[p] == 0]
    out = []
    while ready:
        p = ready.pop(0)
        out.append(p)
        for q in sorted(after[p], key=nodes.index):
            indeg[q] -= 1
            if indeg[q] == 0:
                ready.append(q)
    return out if len(out) == len(nodes) else nodes  # a cycle across signals: config order
