"""The figures of the demo's report, computed from what a user could look at themselves.

Per-version latency and error rate come from the sidecar's span metrics (Prometheus
``/metrics``), quantiles interpolated in the histogram buckets the way PromQL's
``histogram_quantile`` does; what was kept comes from the file exporter's lines; what was
dropped from the tail sampler's counters. No rich here: run_demo.py draws the tables.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

ERROR_RATE_ALERT = 0.02  # deploy/prometheus/alerts.yaml: ModelVersionErrorRateHigh
MIN_RATE_ALERT = 1.0  # ... and its minimum-traffic guard, requests per second

Samples = dict[tuple[str, tuple], float]


def parse_metrics(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(m: Samples, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in m.items() if n == name and all(dict(ls).get(k) == w for k, w in labels.items()))


def by_label(m: Samples, name: str, label: str, **labels: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for (n, ls), v in m.items():
        d = dict(ls)
        if n == name and all(d.get(k) == w for k, w in labels.items()):
            out[d.get(label, "")] += v
    return dict(out)


def histogram_quantile(q: float, buckets: dict[float, float]) -> float:
    """PromQL's histogram_quantile over cumulative buckets {upper bound: count}; NaN when empty."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] == 0:
        return math.nan
    rank = q * buckets[bounds[-1]]
    prev_bound, prev_count = 0.0, 0.0
    for b in bounds:
        c = buckets[b]
        if c >= rank:
            if math.isinf(b):
                return prev_bound  # the highest finite bound, as Prometheus answers
            if c == prev_count:
                return b
            return prev_bound + (b - prev_bound) * (rank - prev_count) / (c - prev_count)
        prev_bound, prev_count = b, c
    return bounds[-1]


@dataclass
class VersionFigures:
    version: str
    calls: int
    errors: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    rate_per_s: float

    @property
    def error_rate(self) -> float:
        return self.errors / self.calls if self.calls else 0.0

    @property
    def would_alert(self) -> bool:
        return self.error_rate > ERROR_RATE_ALERT and self.rate_per_s > MIN_RATE_ALERT


def per_version(m: Samples, model_id: str, seconds: float) -> list[VersionFigures]:
    """Forward-span figures per model version of ``model_id``: calls, errors, latency quantiles."""
    calls: Counter = Counter()
    errors: Counter = Counter()
    buckets: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for (name, ls), v in m.items():
        d = dict(ls)
        if d.get("model_id") != model_id or not d.get("model_version"):
            continue
        ver = d["model_version"]
        if name == "traces_span_metrics_calls_total":
            calls[ver] += v
            if d.get("status_code") == "STATUS_CODE_ERROR":
                errors[ver] += v
        elif name == "traces_span_metrics_duration_seconds_bucket":
            buckets[ver][float(d["le"])] += v
    out = []
    for ver in sorted(calls):
        q = {p: histogram_quantile(p, buckets[ver]) * 1000 for p in (0.5, 0.95, 0.99)}
        out.append(VersionFigures(ver, int(calls[ver]), int(errors[ver]), q[0.5], q[0.95], q[0.99],
                                  calls[ver] / seconds if seconds > 0 else 0.0))
    return out


@dataclass
class SamplingRow:
    outcome: str  # "kept" or "dropped"
    policy: str  # the deciding policy, or the drop reason
    traces: int
    spans: int
    logs: int


def sampling_table(m: Samples, kept_spans: Counter, kept_logs: Counter) -> list[SamplingRow]:
    """Traces decided per policy (the tail sampler's counter), with the spans and log records that went
    with them: kept ones counted in the exported files, dropped ones from the drop counters."""
    rows = []
    decided = [(dict(ls), v) for (n, ls), v in m.items() if n == "sidecar_tail_sampling_traces_total"]
    for d, v in sorted(decided, key=lambda x: (x[0].get("decision") != "sampled", -x[1])):
        if d.get("decision") == "sampled":
            p = d.get("policy", "?")
            rows.append(SamplingRow("kept", p, int(v), kept_spans.get(p, 0), kept_logs.get(p, 0)))
    dropped_traces = sum(v for d, v in decided if d.get("decision") != "sampled")
    dropped_reasons = by_label(m, "sidecar_items_dropped_total", "reason", component="tail_sampling")
    for reason in sorted(dropped_reasons):
        rows.append(SamplingRow("dropped", reason,
                                int(dropped_traces) if reason == "sampled_out" else 0,
                                int(total(m, "sidecar_items_dropped_total", component="tail_sampling",
                                          reason=reason, signal="traces")),
                                int(total(m, "sidecar_items_dropped_total", component="tail_sampling",
                                          reason=reason, signal="logs"))))
    return rows


def redactions(app: dict[str, int], m: Samples) -> list[tuple[str, int, int]]:
    """(detector:action, in the app, in the sidecar) — both integers, every detector that fired anywhere."""
    sidecar: Counter = Counter()
    for (name, ls), v in m.items():
        if name == "sidecar_redaction_values_total":
            d = dict(ls)
            sidecar[f"{d.get('rule')}:{d.get('action')}"] += int(v)
    keys = sorted(set(app) | set(sidecar))
    return [(k, int(app.get(k, 0)), sidecar.get(k, 0)) for k in keys]
