"""The ``drift`` processor: drift scores per model id, model version and feature, from the app's summaries.

Passes metrics through unchanged. From each request it takes the ``ml.drift.value`` histograms
and ``ml.drift.category`` counts (see :mod:`instrumentation.drift`) as deltas and adds them to

- the **reference** of each (model id, version, feature): the entry of ``reference.file`` for
  that version (or for version ``*``), else the version's first ``reference.window`` as this
  sidecar saw it, pinned after that (kept in memory: a restart pins anew; use a file to keep one);
- the **current** window: the last ``window``, a ring of ``window / slices`` time slices.

Scores (:mod:`.scores`) are computed when Prometheus scrapes and every ``flush_interval`` for
OTLP, once both windows hold ``min_samples`` values:

- ``sidecar_drift_psi``, ``sidecar_drift_js``, ``sidecar_drift_wasserstein`` (numeric features)
- ``sidecar_drift_js``, ``sidecar_drift_chi2`` (categorical features)
- ``sidecar_drift_samples{window="reference|current"}``

all labelled ``model_id``, ``model_version``, ``feature``; as OTLP gauges ``sidecar.drift.psi``,
... with ``ml.model.id``, ``ml.model.version``, ``ml.drift.feature``.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily

from sidecar.component import Component, Consumer, Refused
from sidecar.envelope import Envelope
from sidecar.processors.drift.config import DriftConfig
from sidecar.processors.drift.scores import (
    NumericScores,
    categorical_vectors,
    chi_squared,
    js_divergence,
    signed_edges,
)
from sidecar.processors.drift.state import (
    FEATURE,
    MODEL_ID,
    MODEL_VERSION,
    DeltaTracker,
    Key,
    ReferenceError,
    Window,
    load_reference,
)
from sidecar.registry import CreateSettings
from sidecar.signals import Signal
from sidecar.ticker import Ticker

log = logging.getLogger(__name__)

#: statistic -> (Prometheus help, applies to numeric, applies to categorical)
STATISTICS = {
    "psi": ("Population stability index of the current window against the reference (numeric features).",
            True, False),
    "js": ("Jensen-Shannon divergence (base 2, 0..1) of the current window against the reference.", True, True),
    "wasserstein": ("Wasserstein-1 distance of the current window from the reference, over the reference's "
                    "spread (numeric features).", True, False),
    "chi2": ("Chi-squared statistic of current vs reference category counts (categorical features).", False, True),
}


class _Feature:
    """Reference and current window of one (model id, version, feature)."""

    __slots__ = ("reference", "pinned", "first_seen", "slices", "file_reference")

    def __init__(self, now: float, file_reference: Window | None) -> None:
        self.reference: Window | None = file_reference.copy() if file_reference is not None else None
        self.file_reference = file_reference is not None
        self.pinned = file_reference is not None
        self.first_seen = now
        self.slices: dict[int, Window] = {}


class DriftProcessor(Component):
    """Scores drift per model version and feature; forwards every metric untouched."""

    def __init__(self, settings: CreateSettings, cfg: DriftConfig, next_consumer: Consumer, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._id = str(settings.id)
        self._cfg = cfg
        self._next = next_consumer
        self._clock = clock
        self._slice = cfg.window / cfg.slices
        self._tracker = DeltaTracker(cfg.max_series * 8)
        self._features: dict[Key, _Feature] = {}
        self._lock = threading.Lock()
        self._file: dict[Key, Window] = {}
        if cfg.reference.file:
            try:
                self._file = load_reference(cfg.reference.file)
            except ReferenceError as e:
                raise ReferenceError(f"processors.{self._id}.reference.file: {e}") from None
        self._edges: dict[tuple[float, ...], list] = {}
        family = settings.telemetry.root.family
        self._dropped = family(Counter, "sidecar_drift_dropped_points",
                               "Drift data points not scored, by reason.", ("component", "reason"))
        settings.telemetry.root.collector("sidecar_drift", _DriftMetrics).processors.add(self)
        self._ticker = Ticker(self._periodic, cfg.flush_interval, name=f"drift[{self._id}]")

    # --- pipeline ---------------------------------------------------------------------------------

    @property
    def emits_metrics(self) -> bool:
        return Signal.METRICS in getattr(self._next, "routes", {Signal.METRICS: None})

    def start(self, host) -> None:
        self._ticker.start()

    def _periodic(self) -> None:
        with self._lock:  # series of processes that stopped exporting
            self._tracker.evict(self._clock() - self._cfg.stale_after)
        self.flush_metrics()

    def shutdown(self, deadline: float) -> None:
        self._ticker.stop(deadline)

    def consume(self, envelope: Envelope) -> None:
        if envelope.signal is not Signal.METRICS:
            raise Refused("unsupported_signal", retryable=False,
                          message=f"drift does not take {envelope.signal.value}")
        deltas, drops, baselines = self._tracker.deltas(envelope.message)
        self._next.consume(envelope)  # refused: the sender retries, so its points count then
        with self._lock:
            self._tracker.commit(baselines, self._clock())
        if deltas:
            self.add(deltas)
        for reason, n in drops.items():
            self._dropped.labels(self._id, reason).inc(n)

    # --- windows ----------------------------------------------------------------------------------

    def add(self, deltas: dict[Key, Window]) -> None:
        """Add one request's deltas to the reference (while it is being pinned) and the current slice."""
        now = self._clock()
        slice_no = int(now // self._slice)
        overflow = 0
        with self._lock:
            for key, delta in deltas.items():
                f = self._features.get(key)
                if f is None:
                    if len(self._features) >= self._cfg.max_series:
                        overflow += 1
                        continue
                    f = self._features[key] = _Feature(now, self._file.get(key) or self._file.get(
                        (key[0], "*", key[2])))
                if f.reference is not None and (f.reference.numeric != delta.numeric or
                                                f.reference.bounds != delta.bounds):
                    self._dropped.labels(self._id, "bounds_mismatch").inc()
                    continue
                if not f.pinned:
                    if now - f.first_seen < self._cfg.reference.window:
                        if f.reference is None:
                            f.reference = delta.copy()
                        else:
                            f.reference.add(delta)
                        continue  # the reference period is not also the current window
                    f.pinned = True
                s = f.slices.get(slice_no)
                if s is None:
                    s = f.slices[slice_no] = delta.copy()
                    oldest = slice_no - self._cfg.slices
                    for old in [n for n in f.slices if n <= oldest]:
                        del f.slices[old]
                else:
                    s.add(delta)
        if overflow:
            self._dropped.labels(self._id, "max_series").inc(overflow)

    def windows(self) -> Iterator[tuple[Key, Window | None, Window | None]]:
        """(key, reference, current) per feature, copied under the lock."""
        now = self._clock()
        oldest = int(now // self._slice) - self._cfg.slices
        settled = now - self._cfg.reference.window
        with self._lock:
            items = []
            for key, f in self._features.items():
                cur = None
                for n, s in f.slices.items():
                    if n > oldest:
                        if cur is None:
                            cur = s.copy()
                        else:
                            cur.add(s)
                pinned = f.pinned or f.first_seen <= settled  # the reference period is over
                ref = f.reference.copy() if f.reference is not None and pinned else None
                items.append((key, ref, cur))
        return iter(items)

    def scores(self) -> dict[Key, dict[str, float]]:
        """Every statistic per feature whose two windows hold ``min_samples`` values, plus the sample counts."""
        out: dict[Key, dict[str, float]] = {}
        groups = self._cfg.psi_bins
        for key, ref, cur in self.windows():
            row: dict[str, float] = {"samples_reference": float(ref.total) if ref else 0.0,
                                     "samples_current": float(cur.total) if cur else 0.0}
            out[key] = row
            if ref is None or cur is None or ref.total < self._cfg.min_samples or cur.total < self._cfg.min_samples:
                continue
            if ref.numeric:
                edges = self._edges.get(ref.bounds)
                if edges is None:
                    edges = self._edges[ref.bounds] = signed_edges(ref.bounds)
                s = NumericScores(ref.counts, cur.counts, edges, groups)
                row.update(psi=s.psi, js=s.js, wasserstein=s.wasserstein)
            else:
                r, c = categorical_vectors(ref.categories, cur.categories)
                row.update(js=js_divergence(r, c), chi2=chi_squared(ref.categories, cur.categories))
        return out

    # --- OTLP -------------------------------------------------------------------------------------

    def build_metrics_request(self) -> ExportMetricsServiceRequest:
        now_ns = int(self._clock() * 1e9)
        req = ExportMetricsServiceRequest()
        sm = req.resource_metrics.add().scope_metrics.add()
        sm.scope.name = "sidecar/drift"
        gauges = {}
        for key, row in sorted(self.scores().items()):
            for stat, value in row.items():
                if stat.startswith("samples_"):
                    continue
                g = gauges.get(stat)
                if g is None:
                    m = sm.metrics.add()
                    m.name, m.description = f"sidecar.drift.{stat}", STATISTICS[stat][0]
                    g = gauges[stat] = m.gauge.data_points
                dp = g.add()
                dp.time_unix_nano, dp.as_double = now_ns, value
                dp.attributes.extend([KeyValue(key=k) for k in (MODEL_ID, MODEL_VERSION, FEATURE)])
                for kv, v in zip(dp.attributes, key):
                    kv.value.string_value = v
        return req

    def flush_metrics(self) -> None:
        """Send the current scores into the metrics pipeline (gauges: a refused flush is simply skipped)."""
        if not self.emits_metrics:
            return
        req = self.build_metrics_request()
        if not any(len(m.gauge.data_points) for m in req.resource_metrics[0].scope_metrics[0].metrics):
            return
        try:
            self._next.consume(Envelope(Signal.METRICS, req))
        except Refused as e:
            log.debug("drift flush refused (%s); the next flush carries fresh scores", e.reason)


class _DriftMetrics:
    """One Prometheus collector per registry rendering every drift processor's scores at scrape time."""

    def __init__(self) -> None:
        self.processors: "weakref.WeakSet[DriftProcessor]" = weakref.WeakSet()

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ("model_id", "model_version", "feature")
        families = {stat: GaugeMetricFamily(f"sidecar_drift_{stat}", doc, labels=labels)
                    for stat, (doc, _, _) in STATISTICS.items()}
        samples = GaugeMetricFamily("sidecar_drift_samples", "Values in each drift window, per feature.",
                                    labels=labels + ("window",))
        for p in list(self.processors):
            for key, row in sorted(p.scores().items()):
                for stat, value in row.items():
                    if stat.startswith("samples_"):
                        samples.add_metric(key + (stat.removeprefix("samples_"),), value)
                    else:
                        families[stat].add_metric(key, value)
        yield from families.values()
        yield samples
