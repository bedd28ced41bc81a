"""``span_metrics``: request rate, errors and latency from every span, before sampling drops any.

Passes trace data through unchanged. Per span the work is one scan of its
attributes in C (or the pure-Python scanner), counted into its raw key's totals there;
Python works per raw key of a request, not per span. Prometheus sees
the aggregate through a collector that renders it at scrape time:

- ``traces_span_metrics_calls_total{service_name, span_name, span_kind, status_code, model_id, model_version, ...}``
- ``traces_span_metrics_duration_seconds_bucket{...}`` (+ ``_sum``, ``_count``), with OpenMetrics exemplars
  carrying the trace id of the latest error and of the slowest span of each series. With a ``tail_sampling``
  processor behind this one, only traces it kept qualify: candidates wait for its decision
  (``host.sampling_decisions``, exemplar_gate.py), so every exemplar leads to a stored trace.

Errors are calls with ``status_code="STATUS_CODE_ERROR"``; error rate per model version over five minutes is
``sum by (model_id, model_version) (rate(traces_span_metrics_calls_total{status_code="STATUS_CODE_ERROR"}[5m]))
/ sum by (model_id, model_version) (rate(traces_span_metrics_calls_total[5m]))``.

In a metrics pipeline too, it also emits the cumulative metrics as OTLP every
``metrics_flush_interval`` and passes incoming metrics through. Series beyond
``max_series`` are folded into one ``otel_metric_overflow="true"`` series and counted; so are
the spans of one request's keys past ``max_series`` (the scanner counts at most that many keys
apart), so a hostile request's memory follows the cap, not its number of keys.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import weakref
from bisect import bisect_left
from typing import Callable, Optional

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Exemplar
from pydantic import Field, field_validator, model_validator

from contract.attributes import GEN_AI_REQUEST_MODEL, ML_MODEL_ID, ML_MODEL_VERSION, SERVICE_NAME
from sidecar import wire
from sidecar.component import Component, Consumer, Kind, Refused
from sidecar.config import ConfigModel, Duration
from sidecar.registry import CreateSettings, Factory
from sidecar.envelope import Envelope
from sidecar.processors.exemplar_gate import PendingExemplars
from sidecar.signals import Signal
from sidecar.ticker import Ticker

log = logging.getLogger(__name__)

# --- config ------------------------------------------------------------------------------------

DEFAULT_BUCKETS = [0.002, 0.004, 0.006, 0.008, 0.01, 0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.4, 2.0, 5.0, 10.0, 15.0]


class ExplicitBucketsConfig(ConfigModel):
    #: Upper bounds, as durations (``2ms``, ``1s``), strictly increasing.
    buckets: list[Duration] = Field(default_factory=lambda: list(DEFAULT_BUCKETS))

    @field_validator("buckets")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("must list at least one bucket bound")
        for a, b in zip(v, v[1:]):
            if b <= a:
                raise ValueError(f"must be strictly increasing ({b}s follows {a}s)")
        return v


class HistogramConfig(ConfigModel):
    explicit: ExplicitBucketsConfig = Field(default_factory=ExplicitBucketsConfig)


class DimensionConfig(ConfigModel):
    """An extra label from a span (else resource) attribute; ``default`` when absent (else the label is empty)."""

    name: str
    default: Optional[str] = None


class ExemplarsConfig(ConfigModel):
    enabled: bool = True
    #: With a ``tail_sampling`` processor behind this one, an exemplar is published only once the sampler
    #: has kept its trace (it waits as a candidate until the decision), so every exemplar leads to a stored
    #: trace. ``false``: published at once, as upstream's spanmetrics connector does.
    only_sampled: bool = True
    #: Candidates waiting for a decision, at most (about 250 bytes each); further ones are dropped and counted.
    max_pending: int = 20_000

    @field_validator("max_pending")
    @classmethod
    def _max_pending(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v


_BUILTIN_LABELS = ("service_name", "span_name", "span_kind", "status_code", "model_id", "model_version")


def label_name(attribute: str) -> str:
    """A Prometheus label name for an attribute name (``http.route`` -> ``http_route``)."""
    name = re.sub(r"[^a-zA-Z0-9_]", "_", attribute)
    return "_" + name if name[:1].isdigit() else name


class SpanMetricsConfig(ConfigModel):
    histogram: HistogramConfig = Field(default_factory=HistogramConfig)
    dimensions: list[DimensionConfig] = Field(default_factory=list)
    namespace: str = "traces.span.metrics"
    metrics_flush_interval: Duration = 15.0
    exemplars: ExemplarsConfig = Field(default_factory=ExemplarsConfig)
    #: Distinct label sets kept; spans of further ones are counted under one overflow series (and so are those of
    #: one request's distinct keys past this many).
    max_series: int = 10_000
    #: Mask PII in label values (span names, model ids, service, dimensions) in place, with the redaction
    #: engine's default detectors (``GET /users/[EMAIL]``): this processor runs before the redaction
    #: processor, and /metrics is often scraped from outside the pod.
    redact_labels: bool = True

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", v):
            raise ValueError("must start with a letter or _ and contain only letters, digits, _ and .")
        return v

    @field_validator("metrics_flush_interval")
    @classmethod
    def _interval(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be > 0")
        return v

    @field_validator("max_series")
    @classmethod
    def _max_series(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v

    @model_validator(mode="after")
    def _dimension_names(self) -> "SpanMetricsConfig":
        most = wire.MAX_KEYS - 3  # the scanner also looks for the model id, gen_ai model and version
        if len(self.dimensions) > most:
            raise ValueError(f"dimensions: at most {most} (got {len(self.dimensions)})")
        seen = set(_BUILTIN_LABELS)
        for i, d in enumerate(self.dimensions):
            label = label_name(d.name)
            if label in seen:
                raise ValueError(f"dimensions[{i}]: {d.name!r} collides with the label {label!r}")
            seen.add(label)
        return self


# --- aggregation -------------------------------------------------------------------------------

MODEL_ID = ML_MODEL_ID
GENAI_MODEL = GEN_AI_REQUEST_MODEL
MODEL_VERSION = ML_MODEL_VERSION
_SERVICE_KEY = SERVICE_NAME.encode()
_ERROR = Status.STATUS_CODE_ERROR

# series layout (a list, mutated in place): count, sum_ns, per-bucket counts, slowest (ns, trace, span, end),
# latest error (ns, trace, span, end)
_COUNT, _SUM, _BUCKETS, _SLOW, _ERR = range(5)


def enum_label(enum, value: int) -> str:
    """An enum's name, or its number for a value outside the known range (enums are open: any int32
    can arrive, and one such span must not break /metrics or the OTLP export)."""
    try:
        return enum.Name(value)
    except ValueError:
        return str(value)


class _Collector:
    """Renders every span_metrics instance on one registry when Prometheus scrapes.

    Created through ``SelfTelemetry.family`` (hence the metric-family signature), so each
    registry gets one, shared by its instances.
    """

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...], registry: CollectorRegistry):
        self.processors: "weakref.WeakSet[SpanMetricsProcessor]" = weakref.WeakSet()
        registry.register(self)

    def describe(self):
        return []  # names depend on config; instances on one registry are merged in collect()

    def collect(self):
        families: dict[str, Metric] = {}
        for p in list(self.processors):
            p.render(families)
        return list(families.values())


_MASK_CACHE_SIZE = 20_000


class SpanMetricsProcessor(Component):
    """Counts every span into per-series calls and duration histograms; forwards the spans untouched."""

    def __init__(self, settings: CreateSettings, cfg: SpanMetricsConfig, next_consumer: Consumer, *,
                 wall_clock: Callable[[], float] = time.time, clock: Callable[[], float] = time.monotonic):
        self._tel = settings.telemetry
        self._id = str(settings.id)
        self._cfg = cfg
        self._next = next_consumer
        self._wall = wall_clock
        self._bounds_s = list(cfg.histogram.explicit.buckets)
        self._bounds_ns = [round(b * 1e9) for b in self._bounds_s]
        self._n_buckets = len(self._bounds_ns) + 1
        #: the bounds as the wire scanner takes them (no duration exceeds 2**64 - 1 ns: a larger bound acts as it)
        self._bounds_wire = tuple(min(b, (1 << 64) - 1) for b in self._bounds_ns)
        self._exemplars = cfg.exemplars.enabled
        # attribute key -> slot; slots: service, model id, gen_ai model, model version, then dimensions
        keys = [SERVICE_NAME, MODEL_ID, GENAI_MODEL, MODEL_VERSION] + [d.name for d in cfg.dimensions]
        self._dim_defaults = [d.default or "" for d in cfg.dimensions]
        self._dim_labels = [label_name(d.name) for d in cfg.dimensions]
        self._dim_attrs = [d.name for d in cfg.dimensions]
        #: span attribute keys in slot order (slot 1 on; service.name comes from the resource only)
        self._span_keys = tuple(k.encode() for k in keys[1:])
        #: the default detectors, masking in place (``redact_name``); this instance's own engine and counts
        self._mask: Optional[Callable[[str], str]] = None
        if cfg.redact_labels:
            from redaction import RedactionEngine

            self._mask = RedactionEngine().redact_name
        #: series key as read -> as labelled (masked); bounded, so per distinct key per request one lookup
        self._masked_keys: dict[tuple, tuple] = {}
        prefix = label_name(cfg.namespace)
        self._calls_name = prefix + "_calls"
        self._duration_name = prefix + "_duration_seconds"
        self._series: dict[tuple, list] = {}
        self._overflow_key: tuple = ("__overflow__",)
        self._lock = threading.Lock()
        self._start_ns = int(self._wall() * 1e9)
        family = settings.telemetry.root.family
        self._overflow_counter = family(
            Counter, "sidecar_span_metrics_overflow_spans",
            "Spans counted under the overflow series because max_series was reached.", ("component",)).labels(self._id)
        family(_Collector, "span_metrics_collector", "", ()).processors.add(self)
        self._clock = clock
        #: exemplar candidates waiting for a tail-sampling decision (set by start() when a sampler is behind)
        self._pending: Optional[PendingExemplars] = None
        candidates = family(Counter, "sidecar_span_metrics_exemplar_candidates",
                            "Exemplar candidates by outcome: kept (its trace was kept: publishable), not_sampled, "
                            "expired (no decision in time), overflow (max_pending reached).", ("component", "outcome"))
        self._candidates = {o: candidates.labels(self._id, o) for o in ("kept", "not_sampled", "expired", "overflow")}
        self._labels_masked = family(
            Counter, "sidecar_span_metrics_labels_masked",
            "Label values (span name, model id or version, dimension) in which PII was masked, counted when a "
            "series key is first labelled (redact_labels).", ("component",)).labels(self._id)
        self._ticker = Ticker(self._periodic, cfg.metrics_flush_interval, name=f"span_metrics[{self._id}]")

    # --- pipeline ---------------------------------------------------------------------------------

    @property
    def emits_metrics(self) -> bool:
        """Whether this instance is also in a metrics pipeline (its router has a metrics route)."""
        return Signal.METRICS in getattr(self._next, "routes", {})

    def start(self, host) -> None:
        channel = getattr(host, "sampling_decisions", None)
        if self._exemplars and self._cfg.exemplars.only_sampled and channel is not None and channel.publishers:
            # samplers behind this stage started first (the graph starts back to front) and registered
            wait = channel.max_wait
            self._pending = PendingExemplars(wait + max(1.0, wait / 2), self._cfg.exemplars.max_pending)
            channel.subscribe(self._on_decisions)
        self._ticker.start()

    def _periodic(self) -> None:
        if self.emits_metrics:
            self.flush_metrics()
        self._age_slowest()
        if self._pending is not None:
            with self._lock:
                self._pending.expire(self._clock())
                outcomes = self._pending.take_outcomes()
            self._count_candidates(outcomes)

    def shutdown(self, deadline: float) -> None:
        self._ticker.stop(deadline)
        if self.emits_metrics:
            self.flush_metrics()

    def consume(self, envelope: Envelope) -> None:
        signal = envelope.signal
        if signal is Signal.TRACES:
            delta = self._aggregate(envelope)
            self._next.consume(envelope)  # refused: the sender retries, so its spans count then, not now
            self._merge(delta)
        elif signal is Signal.METRICS:
            self._next.consume(envelope)
        else:
            raise Refused("unsupported_signal", retryable=False, message=f"span_metrics does not take {signal.value}")

    # --- the hot path -------------------------------------------------------------------------------

    def _aggregate(self, envelope: Envelope) -> dict[tuple, list]:
        """Per-series deltas of one request (merged only once the next stage has accepted it).

        The wire scanner (C or Python) reads only the encoding and counts the spans per raw key
        (service, name, kind, status, slot 1.. labels; an empty or missing span label being its
        resource's): count, duration sum, histogram buckets and two exemplar candidates per raw key,
        no object per span. The series key is built once per raw key. A raw key holds one status, so
        its exemplar is its latest span (errors) or its first slowest (the rest). A series fed by
        several raw keys (labels that normalise or mask to the same values) merges their counts,
        and their exemplars by the spans' positions in the request, as if counted span by span.
        """
        groups = wire.span_metric_groups(envelope.encoded, _SERVICE_KEY, self._span_keys, self._bounds_wire,
                                         self._cfg.max_series)
        delta: dict[tuple, list] = {}
        exemplars = self._exemplars
        for g in groups:
            raw = g.key
            if raw is None:  # more keys in this one request than max_series: their spans overflow (see _merge)
                delta[self._overflow_key] = [g.count, g.sum_ns, g.buckets, None, None, -1, -1]
                continue
            key = raw[:4] + self._tail(raw[3:])  # _tail reads slots 1.. (raw[4:]); raw[3] stands in for 0
            if self._mask is not None:
                key = self._masked(key)
            error = raw[3] == _ERROR
            s = delta.get(key)
            if s is None:  # [count, sum, buckets, slowest, latest error, their positions in the request]
                s = delta[key] = [g.count, g.sum_ns, g.buckets, None, None, -1, -1]
            else:
                s[0] += g.count
                s[1] += g.sum_ns
                s[2] = [a + b for a, b in zip(s[2], g.buckets)]
            if not exemplars:
                continue
            if error:
                if g.latest_at > s[6]:
                    s[4], s[6] = g.latest, g.latest_at
            elif s[3] is None or g.slowest[0] > s[3][0] or (g.slowest[0] == s[3][0] and g.slowest_at < s[5]):
                s[3], s[5] = g.slowest, g.slowest_at
        return delta

    def _masked(self, key: tuple) -> tuple:
        """The series key with PII masked in each label value; cached, the cache emptied when full."""
        masked = self._masked_keys.get(key)
        if masked is None:
            if len(self._masked_keys) >= _MASK_CACHE_SIZE:
                self._masked_keys.clear()
            mask = self._mask
            masked = self._masked_keys[key] = tuple(mask(v) if v and type(v) is str else v for v in key)
            changed = sum(a != b for a, b in zip(key, masked))
            if changed:
                self._labels_masked.inc(changed)
        return masked

    def _tail(self, vals: list[str]) -> tuple:
        """The model, version and dimension labels of a series key, from slot values."""
        return (vals[1] or vals[2], vals[3]) + tuple([v or d for v, d in zip(vals[4:], self._dim_defaults)])

    def _merge(self, delta: dict[tuple, list]) -> None:
        pending = self._pending
        outcomes = None
        with self._lock:
            if pending is not None:
                now = self._clock()
                pending.expire(now)
            series = self._series
            overflowed = 0
            for key, d in delta.items():
                s = series.get(key)
                if key is self._overflow_key:  # the request's keys past max_series (_aggregate)
                    overflowed += d[0]
                elif s is None and len(series) >= self._cfg.max_series + (self._overflow_key in series):
                    key = self._overflow_key
                    overflowed += d[0]
                    s = series.get(key)
                if s is None:
                    s = series[key] = [0, 0, [0] * self._n_buckets, None, None]
                s[0] += d[0]
                s[1] += d[1]
                buckets = s[2]
                for i, c in enumerate(d[2]):
                    if c:
                        buckets[i] += c
                if pending is not None:  # a tail sampler is behind: publish once its trace is kept
                    for slot in (_SLOW, _ERR):
                        if d[slot] is not None and d[slot][1]:
                            pending.hold(s, slot, d[slot], now)
                    continue
                if d[3] is not None and (s[3] is None or d[3][0] > s[3][0]):
                    s[3] = d[3]
                if d[4] is not None:
                    s[4] = d[4]
            if pending is not None:
                outcomes = pending.take_outcomes()
        if overflowed:
            self._overflow_counter.inc(overflowed)
        if outcomes:
            self._count_candidates(outcomes)

    def _on_decisions(self, decisions) -> None:
        """Tail sampling decided these traces (``host.sampling_decisions``): publish the kept ones' candidates."""
        with self._lock:
            self._pending.decide(decisions)
            outcomes = self._pending.take_outcomes()
        self._count_candidates(outcomes)

    def _count_candidates(self, outcomes: dict[str, int]) -> None:
        for outcome, n in outcomes.items():
            self._candidates[outcome].inc(n)

    @property
    def pending_exemplars(self) -> int:
        """Exemplar candidates waiting for their trace's decision."""
        return self._pending.n if self._pending is not None else 0

    def _age_slowest(self) -> None:
        """Let a newer slow span take the exemplar slot: the slowest is tracked per flush interval."""
        with self._lock:
            for s in self._series.values():
                if s[3] is not None:
                    s[3] = (-1,) + s[3][1:4] + (_duration_ns(s[3]),)  # any slow span beats it; shown as it was

    # --- reading ----------------------------------------------------------------------------------

    def snapshot(self) -> dict[tuple, tuple[int, int, list[int]]]:
        """(count, sum_ns, per-bucket counts) per series key; tests and the OTLP export read it."""
        with self._lock:
            return {k: (s[0], s[1], list(s[2]), s[3], s[4]) for k, s in self._series.items()}

    def _labels(self, key: tuple) -> dict[str, str]:
        if key == self._overflow_key:
            return {"otel_metric_overflow": "true"}
        labels = {
            "service_name": key[0], "span_name": key[1], "span_kind": enum_label(Span.SpanKind, key[2]),
            "status_code": enum_label(Status.StatusCode, key[3]), "model_id": key[4], "model_version": key[5],
        }
        labels.update(zip(self._dim_labels, key[6:]))
        return labels

    def render(self, families: dict[str, Metric]) -> None:
        """Add this instance's series to the Prometheus families being collected."""
        calls = families.get(self._calls_name)
        if calls is None:
            calls = families[self._calls_name] = Metric(
                self._calls_name, "Spans counted before sampling, by service, operation, status and model.", "counter")
        hist = families.get(self._duration_name)
        if hist is None:
            hist = families[self._duration_name] = Metric(
                self._duration_name, "Span duration before sampling, by service, operation, status and model.",
                "histogram")
        les = [_le(b) for b in self._bounds_s] + ["+Inf"]
        for key, (count, sum_ns, buckets, slow, err) in self.snapshot().items():
            labels = self._labels(key)
            calls.add_sample(self._calls_name + "_total", labels, count)
            ex_by_bucket: dict[int, Exemplar] = {}
            for ex in (slow, err):  # the error exemplar wins a shared bucket
                if ex is not None and ex[1]:
                    d = _duration_ns(ex)
                    i = bisect_left(self._bounds_ns, d)
                    ex_by_bucket[i] = Exemplar({"trace_id": ex[1].hex(), "span_id": ex[2].hex()},
                                               d / 1e9, ex[3] / 1e9 if ex[3] else None)
            cumulative = 0
            for i, (le, c) in enumerate(zip(les, buckets)):
                cumulative += c
                hist.add_sample(self._duration_name + "_bucket", {**labels, "le": le}, cumulative,
                                exemplar=ex_by_bucket.get(i))
            hist.add_sample(self._duration_name + "_count", labels, count)
            hist.add_sample(self._duration_name + "_sum", labels, sum_ns / 1e9)

    # --- OTLP export --------------------------------------------------------------------------------

    def build_metrics_request(self) -> ExportMetricsServiceRequest:
        """The cumulative state as OTLP: a sum of calls and a duration histogram per service resource."""
        now_ns = int(self._wall() * 1e9)
        ns = self._cfg.namespace
        req = ExportMetricsServiceRequest()
        by_service: dict[str, tuple] = {}
        for key, (count, sum_ns, buckets, slow, err) in sorted(self.snapshot().items(), key=lambda kv: str(kv[0])):
            service = "" if key == self._overflow_key else key[0]
            group = by_service.get(service)
            if group is None:
                rm = req.resource_metrics.add()
                if service:
                    a = rm.resource.attributes.add()
                    a.key, a.value.string_value = SERVICE_NAME, service
                sm = rm.scope_metrics.add()
                sm.scope.name = "sidecar/span_metrics"
                calls = sm.metrics.add()
                calls.name, calls.unit = ns + ".calls", "{call}"
                calls.description = "Spans counted before sampling."
                calls.sum.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
                calls.sum.is_monotonic = True
                dur = sm.metrics.add()
                dur.name, dur.unit = ns + ".duration", "s"
                dur.description = "Span duration before sampling."
                dur.histogram.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
                group = by_service[service] = (calls.sum.data_points, dur.histogram.data_points)
            attrs = self._otlp_attributes(key)
            dp = group[0].add()
            dp.attributes.extend(attrs)
            dp.start_time_unix_nano, dp.time_unix_nano, dp.as_int = self._start_ns, now_ns, count
            hp = group[1].add()
            hp.attributes.extend(attrs)
            hp.start_time_unix_nano, hp.time_unix_nano = self._start_ns, now_ns
            hp.count, hp.sum = count, sum_ns / 1e9
            hp.explicit_bounds.extend(self._bounds_s)
            hp.bucket_counts.extend(buckets)
            for ex in (slow, err):
                if ex is not None and ex[1]:
                    e = hp.exemplars.add()
                    e.trace_id, e.span_id, e.as_double = ex[1], ex[2], _duration_ns(ex) / 1e9
                    e.time_unix_nano = ex[3]
        return req

    def _otlp_attributes(self, key: tuple) -> list:
        if key == self._overflow_key:
            kv = KeyValue(key="otel.metric.overflow")
            kv.value.bool_value = True
            return [kv]
        pairs = [("span.name", key[1]), ("span.kind", enum_label(Span.SpanKind, key[2])),
                 ("status.code", enum_label(Status.StatusCode, key[3])), (MODEL_ID, key[4]), (MODEL_VERSION, key[5])]
        pairs += list(zip(self._dim_attrs, key[6:]))
        out = []
        for k, v in pairs:
            if v:
                kv = KeyValue(key=k)
                kv.value.string_value = v
                out.append(kv)
        return out

    def flush_metrics(self) -> None:
        """Send the cumulative metrics into the metrics pipeline (cumulative: a refused flush loses nothing)."""
        env = Envelope(Signal.METRICS, self.build_metrics_request())
        if not env.items:
            return
        try:
            self._next.consume(env)
        except Refused as e:
            log.debug("span_metrics flush refused (%s); the next flush carries the same totals", e.reason)


def _duration_ns(ex: tuple) -> int:
    """An exemplar's span duration: (ns, trace, span, end), or once aged (-1, trace, span, end, ns)."""
    return ex[4] if len(ex) > 4 else max(ex[0], 0)


def _le(bound_s: float) -> str:
    return repr(float(bound_s))


FACTORY = Factory(
    type="span_metrics",
    kind=Kind.PROCESSOR,
    config_model=SpanMetricsConfig,
    create=lambda settings, cfg, next_consumer: SpanMetricsProcessor(settings, cfg, next_consumer),
    signals=frozenset({Signal.TRACES, Signal.METRICS}),
    telemetry=frozenset({"sidecar_span_metrics_overflow_spans", "sidecar_span_metrics_exemplar_candidates",
                         "sidecar_span_metrics_labels_masked",
                         "traces_span_metrics_calls", "traces_span_metrics_duration_seconds"}),
)
