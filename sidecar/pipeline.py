"""service.pipelines -> a graph of components.

One instance per component id. Receivers and exporters are shared by every pipeline
that names them; a processor may serve one pipeline per signal (that is how
``tail_sampling`` sees a trace's spans and logs together). The graph starts back
to front (extensions, exporters, processors, receivers) and stops front to back so
every stage drains into a live one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from sidecar.component import Component, Consumer, Kind, Refused
from sidecar.config import ComponentConfig, Config, pipeline_signal
from sidecar.host import Host
from sidecar.registry import CreateSettings, factory_for
from sidecar.signals import Request, Signal, forget_encoding
from sidecar.telemetry import SelfTelemetry

log = logging.getLogger(__name__)


class SignalRouter:
    """The next stage of a component that serves several signals: one consumer per signal."""

    def __init__(self, owner: str):
        self.owner = owner
        self.routes: dict[Signal, Consumer] = {}
        #: set for the output of a stage that mutates data: the received encoding is stale after it
        self.after_mutation = False

    def consume(self, signal: Signal, request: Request) -> None:
        if self.after_mutation:
            forget_encoding(request)
        try:
            nxt = self.routes[signal]
        except KeyError:
            raise Refused("unsupported_signal", retryable=False,
                          message=f"{self.owner} is not in any {signal.value} pipeline") from None
        nxt.consume(signal, request)


class Fanout:
    """Delivers one request to several consumers, each independently.

    When any branch mutates data, every branch but the last gets its own copy — a branch
    that only holds data (batch, tail sampling) must not see another branch's redaction.
    Decided once, at build time. If any consumer refuses, the sender is told to retry:
    a duplicate is better than a loss.
    """

    def __init__(self, consumers: list[Consumer], mutates: list[bool]):
        self.consumers = consumers
        any_mutates = any(mutates)
        self.copy_for = [any_mutates and i < len(consumers) - 1 for i in range(len(consumers))]

    def consume(self, signal: Signal, request: Request) -> None:
        refused: Refused | None = None
        for consumer, copy in zip(self.consumers, self.copy_for):
            data = request
            if copy:
                data = type(request)()
                data.CopyFrom(request)
            try:
                consumer.consume(signal, data)
            except Refused as e:
                refused = refused or e
        if refused is not None:
            raise refused


def _fan(consumers: list[Consumer], mutates: list[bool]) -> Consumer:
    if len(consumers) == 1:
        return consumers[0]
    return Fanout(consumers, mutates)


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
        self._build()

    # --- building ---------------------------------------------------------------------------

    def _create(self, cc: ComponentConfig, next_consumer: Consumer | None) -> Component:
        factory = factory_for(cc.kind, cc.id.type)
        settings = CreateSettings(id=cc.id, kind=cc.kind,
                                  telemetry=self.telemetry.component(cc.kind.value, str(cc.id)))
        return factory.create(settings, cc.config, next_consumer)

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
                    routers[proc_id].after_mutation = g.processors[proc_id].mutates_data
        g.processor_order = _front_to_back([p.processors for p in pipelines.values()])

        # wire each pipeline back to front; remember its head per receiver
        heads: dict[str, dict[Signal, list[tuple[Consumer, bool]]]] = {}
        for pid, pipe in pipelines.items():
            signal = pipeline_signal(pid)
            nxt: Consumer = _fan([g.exporters[e] for e in pipe.exporters], [False] * len(pipe.exporters))
            mutates = False
            for proc_id in reversed(pipe.processors):
                routers[proc_id].routes[signal] = nxt
                nxt = g.processors[proc_id]
                mutates = mutates or g.processors[proc_id].mutates_data
            for rec_id in pipe.receivers:
                heads.setdefault(rec_id, {}).setdefault(signal, []).append((nxt, mutates))

        for rec_id, by_signal in heads.items():
            router = SignalRouter(f"receiver {rec_id}")
            for signal, entries in by_signal.items():
                router.routes[signal] = _fan([c for c, _ in entries], [m for _, m in entries])
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
        self._metrics_server = BackgroundHTTPServer(make_wsgi_app(self.telemetry.registry), host, port,
                                                    name="metrics-http", threads=2)
        self._metrics_server.start()

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_server.port if self._metrics_server else None

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, drain every stage, flush queues; all within ``timeout`` seconds."""
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
