"""The figures of the demo's report, computed from what a user could look at themselves.

Per-version latency and error rate come from the sidecar's span metrics (Prometheus
``/metrics``), quantiles interpolated in the histogram buckets the way PromQL's
``histogram_quantile`` does; what was kept comes from the file exporter's lines; what was
dropped from the tail sampler's counters; drift per version and feature from the sidecar's
``sidecar_drift_*`` gauges, against the thresholds of the shipped alerts. No rich here: run_demo.py draws the tables.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

ERROR_RATE_ALERT = 0.02  # deploy/prometheus/alerts.yaml: ModelVersionErrorRateHigh
MIN_RATE_ALERT = 1.0  # ... and its minimum-traffic guard, requests per second
PSI_ALERT = 0.25  # ModelVersionInputDrift: sidecar_drift_psi > 0.25 (numeric features)
JS_ALERT = 0.1  # ModelVersionCategoryDrift: sidecar_drift_js > 0.1 (categorical features, those without a PSI)

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


@dataclass
class DriftFeature:
    feature: str
    psi: float | None  # numeric features
    js: float
    samples_reference: int
    samples_current: int

    @property
    def drifted(self) -> bool:
        return self.psi > PSI_ALERT if self.psi is not None else self.js > JS_ALERT


@dataclass
class DriftVersion:
    version: str
    numeric: list[DriftFeature]  # highest PSI first
    categorical: list[DriftFeature]  # highest JS first

    @property
    def drifted(self) -> list[DriftFeature]:
        return [f for f in self.numeric + self.categorical if f.drifted]

    def verdict(self, model_id: str) -> str:
        """One line: which features passed the alerts' thresholds, and how high the others went."""
        drifted = self.drifted
        calm = [f for f in self.numeric if not f.drifted]
        calm_cat = [f for f in self.categorical if not f.drifted]
        head = f"{model_id} {self.version}: "
        if drifted:
            head += "DRIFTED " + ", ".join(
                f"{f.feature} (PSI {f.psi:.2f} > {PSI_ALERT})" if f.psi is not None else
                f"{f.feature} (JS {f.js:.2f} > {JS_ALERT})" for f in drifted) + "; its other"
        else:
            head += "no drift: all"
        out = f"{head} {len(calm)} numeric features stayed under PSI {PSI_ALERT}"
        if calm:
            out += f" (highest {calm[0].feature} {calm[0].psi:.2f})"
        out += f" and {len(calm_cat)} categorical under JS {JS_ALERT}"
        if calm_cat:
            out += f" (highest {calm_cat[0].feature} {calm_cat[0].js:.2f})"
        return out


def drift(m: Samples, model_id: str) -> list[DriftVersion]:
    """Per version of ``model_id``, every feature the sidecar scored (both windows full enough)."""
    rows: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for (name, ls), v in m.items():
        d = dict(ls)
        if d.get("model_id") != model_id or not name.startswith("sidecar_drift_"):
            continue
        stat = name.removeprefix("sidecar_drift_")
        if stat == "samples":
            stat += "_" + d.get("window", "")
        rows[(d.get("model_version", ""), d.get("feature", ""))][stat] = v
    out: dict[str, DriftVersion] = {}
    for (ver, feature), r in sorted(rows.items()):
        if "js" not in r:  # not scored: a window holds fewer than min_samples values
            continue
        f = DriftFeature(feature, r.get("psi"), r["js"], int(r.get("samples_reference", 0)),
                         int(r.get("samples_current", 0)))
        dv = out.setdefault(ver, DriftVersion(ver, [], []))
        (dv.numeric if f.psi is not None else dv.categorical).append(f)
    for dv in out.values():
        dv.numeric.sort(key=lambda f: -f.psi)
        dv.categorical.sort(key=lambda f: -f.js)
    return [out[v] for v in sorted(out)]
