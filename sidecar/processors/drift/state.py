"""From OTLP ``ml.drift.*`` metrics to per-feature windows of counts, and the reference file format.

The app exports cumulative histograms (the SDK default) or deltas; :class:`DeltaTracker` turns
either into deltas per series, keyed by the resource, the series' start time (one per process,
so two workers with the same resource never mix) and its attributes. :class:`Window` holds the
counts of one window of one (model id, model version, feature).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from typing import Any

from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality

from contract.attributes import (
    ML_DRIFT_CATEGORY,
    ML_DRIFT_FEATURE,
    ML_DRIFT_SIGN,
    ML_DRIFT_VALUE,
    ML_MODEL_ID,
    ML_MODEL_VERSION,
)
from sidecar.processors.drift.scores import signed_counts

VALUE_METRIC = ML_DRIFT_VALUE
CATEGORY_METRIC = ML_DRIFT_CATEGORY
MODEL_ID = ML_MODEL_ID
MODEL_VERSION = ML_MODEL_VERSION
FEATURE = ML_DRIFT_FEATURE
CATEGORY = ML_DRIFT_CATEGORY
SIGN = ML_DRIFT_SIGN
FORMAT = "otel-sidecar-drift-reference/1"
_DELTA = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA

#: (model id, model version, feature)
Key = tuple[str, str, str]


class Window:
    """Counts of one feature over some time: signed bins (numeric) or per category."""

    __slots__ = ("bounds", "counts", "categories")

    def __init__(self, bounds: tuple[float, ...] | None = None) -> None:
        self.bounds = bounds
        self.counts: list[int] | None = [0] * (2 * len(bounds) + 1) if bounds is not None else None
        self.categories: dict[str, int] | None = None if bounds is not None else {}

    @property
    def numeric(self) -> bool:
        return self.bounds is not None

    @property
    def total(self) -> int:
        return sum(self.counts) if self.counts is not None else sum(self.categories.values())

    def add(self, other: "Window") -> None:
        if other.counts is not None:
            self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        else:
            for k, v in other.categories.items():
                self.categories[k] = self.categories.get(k, 0) + v

    def copy(self) -> "Window":
        w = Window.__new__(Window)
        w.bounds = self.bounds
        w.counts = list(self.counts) if self.counts is not None else None
        w.categories = dict(self.categories) if self.categories is not None else None
        return w

    def to_json(self, key: Key) -> dict[str, Any]:
        model_id, version, feature = key
        if self.numeric:
            return {"model_id": model_id, "model_version": version, "feature": feature, "kind": "numeric",
                    "bounds": list(self.bounds), "counts": self.counts}
        return {"model_id": model_id, "model_version": version, "feature": feature, "kind": "categorical",
                "counts": dict(sorted(self.categories.items()))}


def _attrs(kvs: Iterable[Any]) -> dict[str, str]:
    return {kv.key: kv.value.string_value for kv in kvs if kv.value.HasField("string_value")}


class DeltaTracker:
    """Turns exported data points into per-(model, version, feature) deltas.

    ``max_series`` bounds the cumulative state kept (further series are dropped and reported as
    ``max_series``); :meth:`evict` forgets series not seen for a while (processes that ended).
    :meth:`deltas` does not move the baselines: :meth:`commit` does, once the request was accepted,
    so a request refused and sent again is counted once.
    """

    def __init__(self, max_series: int = 50_000) -> None:
        self._last: dict[tuple, Any] = {}
        self._seen: dict[tuple, float] = {}
        self._max = max_series

    def deltas(self, request: Any) -> tuple[dict[Key, Window], dict[str, int], dict[tuple, Any]]:
        """Deltas of every drift data point in one ExportMetricsServiceRequest, dropped counts by reason,
        and the new baselines to :meth:`commit`."""
        out: dict[Key, Window] = {}
        drops: dict[str, int] = {}
        updates: dict[tuple, Any] = {}
        pending_neg: dict[Key, tuple[tuple[float, ...], list[int]]] = {}
        for rm in request.resource_metrics:
            resource = None
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == VALUE_METRIC and m.WhichOneof("data") == "histogram":
                        points, delta_t = m.histogram.data_points, m.histogram.aggregation_temporality == _DELTA
                    elif m.name == CATEGORY_METRIC and m.WhichOneof("data") == "sum":
                        points, delta_t = m.sum.data_points, m.sum.aggregation_temporality == _DELTA
                    else:
                        continue
                    if resource is None:
                        resource = tuple(sorted((kv.key, str(kv.value)) for kv in rm.resource.attributes))
                    for dp in points:
                        self._point(m.name, resource, dp, delta_t, out, pending_neg, drops, updates)
        for key, (bounds, neg) in pending_neg.items():  # a negative series without positive values this time
            w = out.get(key)
            if w is None:
                w = out[key] = Window(bounds)
            if w.bounds != bounds:
                drops["bounds_mismatch"] = drops.get("bounds_mismatch", 0) + 1
                continue
            w.add(_numeric(bounds, [0] * (len(bounds) + 1), neg))
        return out, drops, updates

    def commit(self, updates: dict[tuple, Any], now: float) -> None:
        """Make the cumulative values of an accepted request the baselines of their series."""
        self._last.update(updates)
        for series in updates:
            self._seen[series] = now

    def evict(self, before: float) -> int:
        """Forget series last seen before ``before``; returns how many."""
        stale = [series for series, seen in self._seen.items() if seen < before]
        for series in stale:
            del self._seen[series]
            self._last.pop(series, None)
        return len(stale)

    def _point(self, name: str, resource: tuple, dp: Any, delta_t: bool, out: dict[Key, Window],
               pending_neg: dict, drops: dict[str, int], updates: dict[tuple, Any]) -> None:
        a = _attrs(dp.attributes)
        feature = a.get(FEATURE)
        if not feature or MODEL_ID not in a:
            drops["missing_attributes"] = drops.get("missing_attributes", 0) + 1
            return
        key: Key = (a[MODEL_ID], a.get(MODEL_VERSION, ""), feature)
        series = (resource, dp.start_time_unix_nano, name, tuple(sorted(a.items())))
        if name == VALUE_METRIC:
            now = list(dp.bucket_counts)
            bounds = tuple(dp.explicit_bounds)
            if len(now) != len(bounds) + 1 or not bounds:
                drops["malformed"] = drops.get("malformed", 0) + 1
                return
        else:
            now = int(dp.as_int) if dp.HasField("as_int") else int(dp.as_double)
            bounds = None
        if not delta_t:
            last = updates.get(series, self._last.get(series))
            if last is None and len(self._last) + len(updates) >= self._max:
                drops["max_series"] = drops.get("max_series", 0) + 1
                return
            updates[series] = now
            if last is not None:
                if name == VALUE_METRIC:
                    d = [x - y for x, y in zip(now, last)] if len(last) == len(now) else now
                    now = now if any(x < 0 for x in d) else d  # a reset: the point holds everything since it
                else:
                    now = now - last if now >= last else now
        if name == VALUE_METRIC:
            if not any(now):
                return
            if a.get(SIGN) == "-":
                prev = pending_neg.get(key)
                pending_neg[key] = (bounds, now if prev is None else [x + y for x, y in zip(prev[1], now)])
                return
            w = out.get(key)
            if w is None:
                w = out[key] = Window(bounds)
            if w.bounds != bounds:
                drops["bounds_mismatch"] = drops.get("bounds_mismatch", 0) + 1
                return
            w.add(_numeric(bounds, now, None))
        else:
            if not now:
                return
            w = out.get(key)
            if w is None:
                w = out[key] = Window(None)
            if w.numeric:
                drops["kind_mismatch"] = drops.get("kind_mismatch", 0) + 1
                return
            cat = a.get(CATEGORY, "")
            w.categories[cat] = w.categories.get(cat, 0) + now


def _numeric(bounds: tuple[float, ...], pos: list[int], neg: list[int] | None) -> Window:
    w = Window.__new__(Window)
    w.bounds, w.categories = bounds, None
    w.counts = signed_counts(pos, neg)
    return w


# --- the reference file -------------------------------------------------------------------------


class ReferenceError(ValueError):
    """A reference file that cannot be used; the message names the file and what is wrong."""


def dump_reference(windows: dict[Key, Window], *, created: str, source: str) -> dict[str, Any]:
    return {"format": FORMAT, "created": created, "source": source,
            "features": [w.to_json(k) for k, w in sorted(windows.items())]}


def load_reference(path: str) -> dict[Key, Window]:
    """Windows keyed by (model id, model version or ``*``, feature) from a reference file."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as e:
        raise ReferenceError(f"{path}: cannot read: {e.strerror or e}") from None
    except ValueError as e:
        raise ReferenceError(f"{path}: not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ReferenceError(f"{path}: format: expected {FORMAT!r} (write it with `python -m sidecar drift "
                             f"export-reference`)")
    out: dict[Key, Window] = {}
    for i, f in enumerate(doc.get("features") or []):
        where = f"{path}: features[{i}]"
        try:
            key = (str(f["model_id"]), str(f["model_version"]), str(f["feature"]))
            if f["kind"] == "numeric":
                bounds = tuple(float(b) for b in f["bounds"])
                counts = [int(c) for c in f["counts"]]
                if len(counts) != 2 * len(bounds) + 1 or any(c < 0 for c in counts) or not bounds:
                    raise ReferenceError(f"{where}.counts: expected {2 * len(bounds) + 1} non-negative counts "
                                         f"for {len(bounds)} bounds")
                if any(not math.isfinite(b) for b in bounds) or list(bounds) != sorted(set(bounds)):
                    raise ReferenceError(f"{where}.bounds: must be finite and strictly increasing")
                w = Window(bounds)
                w.counts = counts
            elif f["kind"] == "categorical":
                w = Window(None)
                w.categories = {str(k): int(v) for k, v in dict(f["counts"]).items()}
            else:
                raise ReferenceError(f"{where}.kind: must be 'numeric' or 'categorical', got {f['kind']!r}")
        except KeyError as e:
            raise ReferenceError(f"{where}: missing key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, ReferenceError):
                raise
            raise ReferenceError(f"{where}: {e}") from None
        out[key] = w
    return out


def iter_otlp_json_metrics(path: str) -> Iterator[Any]:
    """ExportMetricsServiceRequests from a ``file`` exporter's metrics.jsonl (OTLP/JSON lines)."""
    from sidecar.otlp_json import from_json
    from sidecar.signals import Signal

    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                yield from_json(Signal.METRICS, line)
            except Exception as e:  # noqa: BLE001 - any parse error: name the line
                raise ReferenceError(f"{path}:{n}: not an OTLP/JSON metrics request: {e}") from None
