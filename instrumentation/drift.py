"""Drift and cost summaries per model version, aggregated in process and exported as OTel metrics.

::

    from instrumentation.drift import enable_drift

    handle = enable_drift()         # every instrumented forward and generation, within 5% of forward time
    ...
    handle.disable()

Nothing lands on spans: each sampled forward adds a few values to in-process histograms with
fixed explicit buckets (:data:`BOUNDS`), so windows and processes merge by adding bucket counts
and the sidecar's ``drift`` processor can compare any window with a reference. They are exported
as OTel histogram and sum metrics with the app's other metrics (appended to each export of the
meter provider's periodic readers; cumulative, restarted after ``fork``). Aggregating them here
instead of through SDK instruments is what keeps them cheap: one SDK ``record`` costs ~10 us of
attribute handling, and a forward has dozens of features. Metrics (all with ``ml.model.id``,
``ml.model.version`` and ``ml.drift.feature``):

- ``ml.drift.value`` (histogram; negative values as magnitudes with ``ml.drift.sign="-"``):
  numeric features, one value per sampled forward —
  ``batch_size``; per input/output tensor ``input.0.mean|std|min|max|nan_share|inf_share|zero_share``
  (``output.0...``); per column of a 2-D input with at most ``max_columns`` columns
  ``input.0[3].mean|std``; for classifiers ``output.top_score`` (batch mean of the top
  softmax probability); for generations ``prompt_tokens`` and ``output_tokens``.
- ``ml.drift.category`` (counter, plus ``ml.drift.category``): categorical features —
  ``input.0.shape`` (batch dimension written ``*``), ``input.0.dtype``, ``output.label``
  (predicted class, one count per row).
- Cost, on every forward: ``ml.cost.duration`` (histogram, seconds per forward or generation,
  from the forward span: none when it is not recording) and ``ml.cost.items``
  (counter, batch rows) by ``ml.cost.size_bucket`` (elements per row of the first input, or prompt
  tokens, rounded up to a power of 4: ``<=4Ki``) and ``ml.intent`` (the request's ``intent`` tag);
  ``ml.cost.tokens`` (histogram) adds ``gen_ai.token.type``.

Statistics are a handful of reductions on at most ``sample_rows`` rows (and ``sample_elements``
evenly strided elements of those), moved off the device only once reduced: one small transfer per
sampled forward. torch is imported on the first forward.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry import trace

from contract.attributes import (
    GEN_AI_TOKEN_TYPE,
    INTENT_TAG,
    ML_DRIFT_CATEGORY,
    ML_DRIFT_FEATURE,
    ML_DRIFT_SIGN,
    ML_MODEL_ID,
    ML_MODEL_VERSION,
)
from instrumentation._context import _CURRENT
from instrumentation._drift_export import ride_on_readers, to_metrics

_SCOPE = "instrumentation.drift"
_log = logging.getLogger(__name__)
MODEL_ID = ML_MODEL_ID
MODEL_VERSION = ML_MODEL_VERSION
FEATURE = ML_DRIFT_FEATURE
CATEGORY = ML_DRIFT_CATEGORY
SIGN = ML_DRIFT_SIGN
SIZE_BUCKET = "ml.cost.size_bucket"
INTENT = "ml.intent"


def _log_bounds(lo_exp: int = -3, hi_exp: int = 4, per_decade: int = 10) -> tuple[float, ...]:
    return (0.0,) + tuple(round(10 ** (k / per_decade), 12) for k in range(lo_exp * per_decade,
                                                                           hi_exp * per_decade + 1))


#: Fixed bucket bounds of every ``ml.drift.value`` histogram: 0 and 10^(k/10) for 1e-3..1e4 (a 26%
#: step), so any two windows of any process have the same buckets. OTel histograms take no negative
#: values: a negative value is recorded as its magnitude in the series marked ``ml.drift.sign="-"``,
#: and the sidecar mirrors that series to rebuild the signed distribution.
BOUNDS = _log_bounds()
_DURATION_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TOKEN_BOUNDS = tuple(float(4 ** k) for k in range(1, 12))
_STATS = ("mean", "std", "min", "max", "nan_share", "inf_share", "zero_share")
_COLUMN_STATS = ("mean", "std")
_OTHER = "__other__"
_INF = float("inf")
_UNITS = ("", "Ki", "Mi", "Gi")


def size_bucket(n: int) -> str:
    """``n`` rounded up to a power of 4 (at least 16), as a label: ``<=64``, ``<=4Ki``, ``<=1Mi``."""
    bound = 16
    while bound < n:
        bound *= 4
    unit = 0
    while bound >= 1024 and unit < len(_UNITS) - 1:
        bound //= 1024
        unit += 1
    return f"<={bound}{_UNITS[unit]}"


class _Series:
    """One cumulative histogram series (a feature, the magnitudes of its negative values, a cost)."""

    __slots__ = ("attributes", "bounds", "counts", "count", "sum", "min", "max", "items")

    def __init__(self, attributes: dict[str, str], bounds: tuple[float, ...] = BOUNDS) -> None:
        self.attributes = attributes
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum = 0.0
        self.min = _INF
        self.max = -_INF
        self.items = 0  # cost series: batch rows served

    def add(self, v: float) -> None:
        self.counts[bisect_left(self.bounds, v)] += 1
        self.count += 1
        self.sum += v
        if v < self.min:
            self.min = v
        if v > self.max:
            self.max = v


class _ModelState:
    """Per (model id, version): the sample counter, the drift histograms and category counts, cost attributes."""

    def __init__(self, model_id: str, model_version: str | None, max_categories: int) -> None:
        self.base = {MODEL_ID: model_id, MODEL_VERSION: model_version or ""}
        self.counter = itertools.count()
        #: the budget's balance in seconds (see DriftObserver) and how far it may grow
        self.credit = 0.0
        self.credit_cap = 0.0
        self.lock = threading.Lock()
        self.series: dict[tuple[str, bool], _Series] = {}
        self.categories: dict[tuple[str, str], list] = {}  # -> [attributes, count]
        self._per_feature: dict[str, int] = {}
        #: (size bucket, intent) -> duration series (with items); (size bucket, intent, token type) -> tokens
        self.cost: dict[tuple, _Series] = {}
        self.tokens: dict[tuple, _Series] = {}
        self._max_categories = max_categories

    def add_values(self, names: Any, values: Any) -> None:
        """Count each finite value into its feature's histogram (negative ones as magnitudes)."""
        series = self.series
        bounds = BOUNDS
        with self.lock:
            for name, v in zip(names, values):
                if v >= 0.0:
                    if v == _INF:
                        continue
                    neg = False
                elif v > -_INF:  # NaN fails both tests: NaN/Inf are counted as shares instead
                    v, neg = -v, True
                else:
                    continue
                s = series.get((name, neg))
                if s is None:
                    attrs = {**self.base, FEATURE: name, SIGN: "-"} if neg else {**self.base, FEATURE: name}
                    s = series[(name, neg)] = _Series(attrs)
                s.counts[bisect_left(bounds, v)] += 1
                s.count += 1
                s.sum += v
                if v < s.min:
                    s.min = v
                if v > s.max:
                    s.max = v

    def add_category(self, feature: str, value: str, n: int) -> None:
        with self.lock:
            c = self.categories.get((feature, value))
            if c is None:
                seen = self._per_feature.get(feature, 0)
                if seen >= self._max_categories:  # bounded cardinality: the rest share one category
                    value = _OTHER
                    c = self.categories.get((feature, value))
                if c is None:
                    self._per_feature[feature] = seen + 1
                    c = self.categories[(feature, value)] = [{**self.base, FEATURE: feature, CATEGORY: value}, 0]
            c[1] += n

    def add_cost(self, bucket: str, intent: str, seconds: float | None, items: int,
                 tokens: tuple[tuple[str, int], ...] = ()) -> None:
        with self.lock:
            s = self.cost.get((bucket, intent))
            if s is None:
                s = self.cost[(bucket, intent)] = _Series({**self.base, SIZE_BUCKET: bucket, INTENT: intent},
                                                          _DURATION_BOUNDS)
            if seconds is not None:
                s.add(seconds)
            s.items += items
            for kind, n in tokens:
                t = self.tokens.get((bucket, intent, kind))
                if t is None:
                    t = self.tokens[(bucket, intent, kind)] = _Series(
                        {**self.base, SIZE_BUCKET: bucket, INTENT: intent, GEN_AI_TOKEN_TYPE: kind}, _TOKEN_BOUNDS)
                t.add(float(n))


def _intent() -> str:
    ctx = _CURRENT.get()
    return ctx.tags.get(INTENT_TAG, "") if ctx is not None else ""


def _span_seconds() -> float | None:
    """Seconds since the current (forward) span started; None when it is not recording."""
    start = getattr(trace.get_current_span(), "start_time", None)
    return (time.time_ns() - start) / 1e9 if start else None


class DriftObserver:
    """Sees every instrumented forward (and generation) and records drift and cost summaries.

    Statistics are computed on every ``sample_every``-th forward of each model version, and within
    ``budget``: each forward earns ``budget`` times its duration, each summary spends what it took,
    and a forward is summarized only while the balance is not negative — so a large model gets every
    forward summarized and a tiny one every few, never costing more than ``budget`` of the forward
    time in the long run (None: no budget). The choice never depends on the data, so the samples
    stay representative. Cost metrics are recorded for every forward. ``classifier=None`` treats a
    single 2-D float output with 2..``max_classes`` columns as class scores (logits or probabilities).
    """

    def __init__(self, *, sample_every: int = 1, budget: float | None = 0.05, sample_rows: int = 256,
                 sample_elements: int = 16384, max_tensors: int = 4, max_columns: int = 16,
                 max_classes: int = 1000, max_categories: int = 64, classifier: bool | None = None,
                 cost: bool = True, clock: Callable[[], float] = time.perf_counter) -> None:
        if budget is not None and not 0 < budget <= 1:
            raise ValueError(f"budget: must be a fraction in (0, 1] or None, got {budget!r}")
        for name, v in (("sample_every", sample_every), ("sample_rows", sample_rows), ("max_tensors", max_tensors),
                        ("max_categories", max_categories), ("sample_elements", sample_elements)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {v!r}")
        self.sample_every = sample_every
        self.budget = budget
        self._clock = clock
        self.sample_rows = sample_rows
        self.sample_elements = sample_elements
        self.max_tensors = max_tensors
        self.max_columns = max_columns
        self.max_classes = max_classes
        self.max_categories = max_categories
        self.classifier = classifier
        self.cost = cost
        self._states: dict[tuple[str, str | None], _ModelState] = {}
        self._lock = threading.Lock()
        self._torch: Any = None
        self._start_ns = time.time_ns()
        self._pid = os.getpid()
        #: summaries of GPU tensors whose copy to the host is in flight: (event, state, names, rows, host, labels)
        self._pending: collections.deque = collections.deque()
        self.max_pending = 1024
        #: sampled forwards not summarized because ``max_pending`` copies were in flight
        self.dropped = 0
        #: device types whose summaries are read at once; others are copied off asynchronously
        self._host_types = frozenset({"cpu"})
        if hasattr(os, "register_at_fork"):  # a DataLoader worker or pre-fork server child starts afresh
            ref = weakref.ref(self)
            os.register_at_fork(after_in_child=lambda: (o := ref()) is not None and o._forked())

    def _state(self, model_id: str, model_version: str | None) -> _ModelState:
        s = self._states.get((model_id, model_version))
        if s is None:
            if self._pid != os.getpid():
                self._forked()
            with self._lock:
                s = self._states.setdefault((model_id, model_version),
                                            _ModelState(model_id, model_version, self.max_categories))
        return s

    # --- forward --------------------------------------------------------------------------------

    def observe_forward(self, model_id: str, model_version: str | None, args: tuple, kwargs: dict,
                        output: Any) -> None:
        """The forward observer (``instrumentation.torch.add_forward_observer`` calls it)."""
        torch = self._torch
        if torch is None:
            import torch as _torch

            torch = self._torch = _torch
        state = self._state(model_id, model_version)
        inputs = _tensors(torch.Tensor, args, kwargs.values() if kwargs else ())
        first = inputs[0] if inputs else None
        rows = (first.shape[0] if first.dim() else 1) if first is not None else 1
        seconds = _span_seconds()
        if self.cost:
            per_row = first.numel() // max(rows, 1) if first is not None else 0
            state.add_cost(size_bucket(per_row), _intent(), seconds, rows)
        if self._pending:
            self._reap()
        budget = self.budget
        if budget is not None and seconds is not None:
            state.credit = min(state.credit + budget * seconds, state.credit_cap)
            if state.credit < 0:
                return
        if next(state.counter) % self.sample_every:
            return
        outputs = _tensors(torch.Tensor, (output,), ())
        t0 = self._clock()
        self._summarize(torch, state, rows, inputs[:self.max_tensors], outputs[:self.max_tensors])
        if budget is not None and seconds is not None:
            spent = self._clock() - t0
            state.credit -= spent
            state.credit_cap = 4 * spent  # a quiet spell saves up for a few summaries, not for a burst

    def _summarize(self, torch: Any, state: _ModelState, rows: int, inputs: list, outputs: list) -> None:
        names: list[str] = ["batch_size"]
        parts: list[Any] = []
        device = (inputs or outputs)[0].device if inputs or outputs else None
        on_host = device is None or device.type in self._host_types
        with torch.no_grad():
            for prefix, tensors in (("input", inputs), ("output", outputs)):
                for i, t in enumerate(tensors):
                    name = f"{prefix}.{i}"
                    state.add_category(name + ".shape", _shape(t), rows)
                    state.add_category(name + ".dtype", str(t.dtype).removeprefix("torch."), rows)
                    if t.numel() == 0 or t.is_complex():
                        continue
                    x = t.detach()
                    if x.dim() and x.shape[0] > self.sample_rows:
                        x = x[:self.sample_rows]
                    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
                        x = x.float()
                    flat = x.reshape(-1)
                    if flat.numel() > self.sample_elements:  # evenly strided: every part of the tensor
                        flat = flat[::-(-flat.numel() // self.sample_elements)]
                    parts.append(_stats(torch, flat, on_host))
                    names.extend(f"{name}.{s}" for s in _STATS)
                    if prefix == "input" and x.dim() == 2 and 1 < x.shape[1] <= self.max_columns:
                        std = x.std(0, correction=0) if x.shape[0] > 1 else torch.zeros_like(x[0])
                        parts.append(torch.cat((x.mean(0), std)))
                        names.extend(f"{name}[{c}].{s}" for s in _COLUMN_STATS for c in range(x.shape[1]))
            labels = None
            if outputs and self._is_classifier(outputs):
                scores = outputs[0].detach()[:self.sample_rows].float()
                # rows already summing to 1 are probabilities, else logits (on a device: decided there, no sync)
                is_probs = (scores.sum(1) - 1).abs().amax() <= 1e-3
                if on_host:
                    probs = scores if bool(is_probs) else scores.softmax(1)
                else:
                    probs = torch.where(is_probs, scores, scores.softmax(1))
                top, labels = probs.max(1)
                parts.append(top.mean().reshape(1))
                names.append("output.top_score")
                labels = torch.bincount(labels, minlength=outputs[0].shape[1])
            if not parts:
                state.add_values(names, [float(rows)])
                return
            values = torch.cat([p if p.dtype == torch.float32 else p.float() for p in parts])
            if not on_host:  # copy off the device without waiting for it; reaped once the copy is done
                self._defer(torch, state, names, rows, values, labels)
                return
        self._add(state, names, rows, values.tolist(), labels.tolist() if labels is not None else None)

    @staticmethod
    def _add(state: _ModelState, names: list[str], rows: int, values: list, labels: list | None) -> None:
        state.add_values(names, [float(rows), *values])
        if labels is not None:
            for label, n in enumerate(labels):
                if n:
                    state.add_category("output.label", str(label), n)

    def _defer(self, torch: Any, state: _ModelState, names: list[str], rows: int, values: Any, labels: Any) -> None:
        if len(self._pending) >= self.max_pending:
            self.dropped += 1  # the device is far behind: never grow without bound
            return
        host = values.to("cpu", non_blocking=True)
        host_labels = labels.to("cpu", non_blocking=True) if labels is not None else None
        done = torch.cuda.Event() if values.device.type == "cuda" else None
        if done is not None:
            done.record()
        self._pending.append((done, state, names, rows, host, host_labels))

    def _reap(self) -> None:
        """Count every deferred summary whose device-to-host copy has completed (in order)."""
        pending = self._pending
        while pending:
            try:
                entry = pending.popleft()
            except IndexError:  # another thread took it
                return
            done = entry[0]
            if done is not None and not done.query():
                pending.appendleft(entry)  # copies on a stream complete in order: the rest are not done
                return
            _, state, names, rows, host, host_labels = entry
            self._add(state, names, rows, host.tolist(), host_labels.tolist() if host_labels is not None else None)

    def _is_classifier(self, outputs: list) -> bool:
        if self.classifier is not None:
            return self.classifier and outputs[0].dim() == 2
        o = outputs[0]
        return len(outputs) == 1 and o.dim() == 2 and o.is_floating_point() and 2 <= o.shape[1] <= self.max_classes

    def observe_values(self, model_id: str, model_version: str | None, values: Mapping[str, float],
                       categories: Mapping[str, str] | None = None, rows: int = 1) -> None:
        """Record features the app computes itself (any framework): numeric ``values`` and ``categories``.

        Each call is one observation per feature (categories count ``rows``); NaN and Inf are skipped.
        """
        state = self._state(model_id, model_version)
        state.add_values(values.keys(), [float(v) for v in values.values()])
        for name, cat in (categories or {}).items():
            state.add_category(name, str(cat), rows)

    # --- generation -----------------------------------------------------------------------------

    def observe_generation(self, model: str, model_version: str | None, input_tokens: int | None,
                           output_tokens: int, seconds: float) -> None:
        """The generation observer (``instrumentation.genai`` calls it when a generation ends)."""
        state = self._state(model, model_version)
        if self.cost:
            tokens = (("input", input_tokens), ("output", output_tokens)) if input_tokens is not None else \
                (("output", output_tokens),)
            state.add_cost(size_bucket(input_tokens or 0), _intent(), seconds, 1, tokens)
        if next(state.counter) % self.sample_every:
            return
        if input_tokens is not None:
            state.add_values(("prompt_tokens", "output_tokens"), (float(input_tokens), float(output_tokens)))
        else:
            state.add_values(("output_tokens",), (float(output_tokens),))

    # --- export ---------------------------------------------------------------------------------

    def _forked(self) -> None:
        """In a forked child: start from zero with a new start time (the parent keeps exporting its own)."""
        self._lock = threading.Lock()  # another thread may have held it at the fork
        with self._lock:
            if self._pid != os.getpid():
                self._states = {}
                self._pending = collections.deque()
                self._start_ns = time.time_ns()
                self._pid = os.getpid()

    def metrics(self) -> list[Any]:
        """The drift histograms, category counts and cost metrics as SDK ``Metric`` objects (cumulative)."""
        if self._pid != os.getpid():
            self._forked()
        if self._pending:
            self._reap()
        return to_metrics(list(self._states.values()), self._start_ns)

    def metrics_data(self, resource: Any = None) -> Any:
        """:meth:`metrics` wrapped as one SDK ``MetricsData`` (what a metric exporter takes)."""
        from opentelemetry.sdk.metrics.export import MetricsData, ResourceMetrics, ScopeMetrics
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        scope = ScopeMetrics(InstrumentationScope(_SCOPE), self.metrics(), "")
        return MetricsData([ResourceMetrics(resource or Resource.create(), [scope], "")])


def _tensors(tensor_type: type, args: Any, more: Any) -> list:
    out = []
    for a in itertools.chain(args, more):
        if isinstance(a, tensor_type):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, tensor_type))
        elif isinstance(a, Mapping):
            out.extend(x for x in a.values() if isinstance(x, tensor_type))
    return out


def _shape(t: Any) -> str:
    dims = list(t.shape)
    return "x".join(["*", *map(str, dims[1:])]) if dims else "scalar"


def _stats(torch: Any, x: Any, on_host: bool) -> Any:
    """mean, std, min, max, NaN share, Inf share, zero share of a flat tensor, in one stacked tensor.

    Min, max, mean and std are over the finite values. On the host, a finite sum lets the fast path
    skip the masks; on a device the masked path always runs (asking would wait for the device).
    """
    n = x.numel()
    total = x.sum()
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    if on_host and bool(total.isfinite()):  # then no value is NaN or Inf
        lo, hi = x.aminmax()
        std = x.std(correction=0) if n > 1 else zero
        body = torch.stack((total / n, std, lo, hi))
        shares = torch.stack((zero, zero, (x == 0).sum().to(x.dtype) / n))
    else:
        nan, inf = x.isnan(), x.isinf()
        n_nan, n_inf = nan.sum(), inf.sum()
        finite = ~(nan | inf)
        k = finite.sum().clamp(min=1)
        xf = torch.where(finite, x, zero)
        mean = xf.sum() / k
        std = ((torch.where(finite, x - mean, zero) ** 2).sum() / k).sqrt()
        big = torch.full((), _INF, dtype=x.dtype, device=x.device)  # a fill, not a copy from the host
        body = torch.stack((mean, std, torch.where(finite, x, big).amin(), torch.where(finite, x, -big).amax()))
        shares = torch.stack((n_nan, n_inf, (x == 0).sum())).to(x.dtype) / n
    return torch.cat((body, shares))


class DriftHandle:
    """What :func:`enable_drift` returns: the observer and how to turn it off."""

    def __init__(self, observer: DriftObserver, removers: list[Any]) -> None:
        self.observer = observer
        self._removers = removers

    def disable(self) -> None:
        for remove in self._removers:
            remove()
        self._removers = []


def enable_drift(meter_provider: Any = None, **options: Any) -> DriftHandle:
    """Record drift and cost summaries for every instrumented forward and generation (see the module doc).

    ``options`` are :class:`DriftObserver`'s (``sample_every``, ``sample_rows``, ``sample_elements``,
    ``max_columns``, ``classifier``, ``cost``, ...). The summaries are exported with the metrics of
    ``meter_provider`` (default: the global one ``configure()`` set). :meth:`DriftHandle.disable` stops.
    """
    observer = DriftObserver(**options)
    removers = [ride_on_readers(observer, meter_provider)]
    from instrumentation import genai

    removers.append(genai.add_generation_observer(observer.observe_generation))
    try:
        from instrumentation.torch import add_forward_observer
    except ImportError:  # no torch in this app: generations only
        pass
    else:
        removers.append(add_forward_observer(observer.observe_forward))
    return DriftHandle(observer, removers)
