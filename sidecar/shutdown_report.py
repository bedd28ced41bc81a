"""What a run delivered, left on disk and lost, per signal in items: the sidecar's last log line.

``/metrics`` goes away with the process, so the totals an operator needs after a stop are
logged once the pipelines have shut down (every exporter has counted what it still held by
then), and a shutdown that lost acknowledged data makes the process exit non-zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from sidecar.signals import Signal


@dataclass
class SignalTally:
    #: items exported to a backend over the run (summed over exporters: a fan-out counts once per exporter)
    delivered: int = 0
    #: items in persistent sending queues when they stopped: delivered at the next start
    on_disk: int = 0
    #: items taken and lost over the run (every unintended drop: shutdown, backend rejections, overflow, ...)
    lost: int = 0
    #: of those, lost while shutting down (a memory queue's backlog and pushes cut off by the deadline)
    lost_in_shutdown: int = 0


@dataclass
class ShutdownReport:
    signals: dict[Signal, SignalTally] = field(default_factory=lambda: {s: SignalTally() for s in Signal})

    @property
    def lost_in_shutdown(self) -> int:
        return sum(t.lost_in_shutdown for t in self.signals.values())

    def line(self) -> str:
        parts = []
        for signal, t in self.signals.items():
            items = signal.item_name.replace("_", " ")
            parts.append(f"{signal.value}: {t.delivered} {items} delivered, {t.on_disk} on disk for the next start, "
                         f"{t.lost} lost ({t.lost_in_shutdown} during shutdown)")
        verdict = ("acknowledged data was lost during shutdown" if self.lost_in_shutdown
                   else "nothing acknowledged was lost during shutdown")
        return "sidecar stopped: " + "; ".join(parts) + f"; {verdict}"


def lost_by_signal(registry: CollectorRegistry) -> dict[Signal, int]:
    """Items dropped unintentionally so far, per signal, from the self-telemetry counters."""
    out = {s: 0 for s in Signal}
    for metric in registry.collect():
        if metric.name != "sidecar_items_dropped":
            continue
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels.get("intended") == "false":
                out[Signal(sample.labels["signal"])] += int(sample.value)
    return out


def build_report(registry: CollectorRegistry, lost_before: dict[Signal, int], components) -> ShutdownReport:
    """The report after shutdown: ``lost_before`` is :func:`lost_by_signal` taken as shutdown began; every
    component with a ``left_on_disk`` mapping (exporters' persistent queues) adds what it kept for the next start."""
    report = ShutdownReport()
    for metric in registry.collect():
        if metric.name != "sidecar_items_exported":
            continue
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels.get("kind") == "exporter":
                report.signals[Signal(sample.labels["signal"])].delivered += int(sample.value)
    for signal, lost in lost_by_signal(registry).items():
        report.signals[signal].lost = lost
        report.signals[signal].lost_in_shutdown = lost - lost_before.get(signal, 0)
    for comp in components:
        for signal, n in (getattr(comp, "left_on_disk", None) or {}).items():
            report.signals[signal].on_disk += n
    return report
