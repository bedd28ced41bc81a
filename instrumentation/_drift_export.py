"""How :mod:`instrumentation.drift` exports what it aggregates: SDK metric objects, riding on the app's readers."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from opentelemetry import metrics

from contract.attributes import ML_DRIFT_CATEGORY, ML_DRIFT_VALUE

_SCOPE = "instrumentation.drift"
_log = logging.getLogger("instrumentation.drift")


def to_metrics(states: list[Any], start: int) -> list[Any]:
    """SDK ``Metric`` objects (cumulative since ``start``) from every model state's series."""
    from opentelemetry.sdk.metrics.export import (
        AggregationTemporality,
        Histogram,
        HistogramDataPoint,
        Metric,
        NumberDataPoint,
        Sum,
    )

    now = time.time_ns()

    def point(s: Any) -> Any:
        return HistogramDataPoint(dict(s.attributes), start, now, s.count, s.sum, list(s.counts), s.bounds,
                                  s.min if s.count else 0.0, s.max if s.count else 0.0)

    hist, cats, durations, items, tokens = [], [], [], [], []
    for state in states:
        with state.lock:
            hist.extend(point(s) for s in state.series.values())
            cats.extend(NumberDataPoint(dict(attrs), start, now, n) for attrs, n in state.categories.values())
            durations.extend(point(s) for s in state.cost.values() if s.count)
            items.extend(NumberDataPoint(dict(s.attributes), start, now, s.items) for s in state.cost.values())
            tokens.extend(point(s) for s in state.tokens.values())
    cumulative = AggregationTemporality.CUMULATIVE
    out = []
    for name, description, unit, points, kind in (
            (ML_DRIFT_VALUE, "Per-forward summary statistics of model inputs and outputs", "", hist, Histogram),
            (ML_DRIFT_CATEGORY, "Categorical input/output features (shape, dtype, label)", "{row}", cats, Sum),
            ("ml.cost.duration", "Forward or generation duration by input size and intent", "s", durations,
             Histogram),
            ("ml.cost.items", "Batch rows served, by input size and intent", "{item}", items, Sum),
            ("ml.cost.tokens", "Tokens per generation by prompt size and intent", "{token}", tokens, Histogram)):
        if points:
            data = Histogram(points, cumulative) if kind is Histogram else Sum(points, cumulative, True)
            out.append(Metric(name, description, unit, data))
    return out


def ride_on_readers(observer: Any, meter_provider: Any) -> Callable[[], None]:
    """Append the observer's metrics to every export of the provider's periodic readers; returns the undo.

    The SDK has no public hook for metrics aggregated outside its instruments, so the exporter of
    each reader that has one (``PeriodicExportingMetricReader``) gets a wrapper around ``export``.
    """
    provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
    # an SDK instrument of our own, so every collection has data and the readers export (and we ride along)
    from opentelemetry.metrics import Observation

    metrics.get_meter(_SCOPE, meter_provider=provider).create_observable_counter(
        "ml.drift.dropped", [lambda _options: [Observation(observer.dropped)]], unit="{forward}",
        description="Sampled forwards not summarized because too many device copies were in flight")
    resource = getattr(getattr(provider, "_sdk_config", None), "resource", None)
    exporters = [e for e in (getattr(r, "_exporter", None) for r in getattr(provider, "_metric_readers", ()))
                 if e is not None]
    if not exporters:
        _log.warning("drift: the meter provider has no exporting metric reader; drift summaries are kept "
                     "in process only (DriftObserver.metrics_data() reads them)")
    for exporter in exporters:
        riders = exporter.__dict__.get("_drift_observers")
        if riders is None:
            riders = exporter._drift_observers = []
            exporter.export = _with_drift(exporter.export, riders, resource)
        riders.append(observer)

    def undo() -> None:
        for exporter in exporters:
            riders = exporter.__dict__.get("_drift_observers", [])
            if observer in riders:
                riders.remove(observer)

    return undo


def _with_drift(export: Callable[..., Any], riders: list, resource: Any) -> Callable[..., Any]:
    from opentelemetry.sdk.metrics.export import MetricsData, ResourceMetrics, ScopeMetrics
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    scope = InstrumentationScope(_SCOPE)

    def export_with_drift(metrics_data: Any, *args: Any, **kwargs: Any) -> Any:
        extra = [m for observer in list(riders) for m in observer.metrics()]
        if extra:
            res = resource if resource is not None else (
                metrics_data.resource_metrics[0].resource if metrics_data.resource_metrics else None)
            if res is not None:
                metrics_data = MetricsData([*metrics_data.resource_metrics,
                                            ResourceMetrics(res, [ScopeMetrics(scope, extra, "")], "")])
        return export(metrics_data, *args, **kwargs)

    return export_with_drift
