"""Drift end to end: an instrumented model in this process, the real OTel SDK, real sidecar processes.

1. A known-good period: version "1" serves baseline inputs; a sidecar records the metrics with its
   ``file`` exporter; ``python -m sidecar drift export-reference --as-version '*'`` turns them into
   a reference file.
2. A second sidecar pins that file. Version "1" keeps serving unchanged inputs; canary version "2"
   gets column 2 of its input shifted by two standard deviations.
3. On the sidecar's /metrics (and as OTLP gauges at a backend): every version-1 score stays under
   the threshold; the canary's column-2 mean passes it and its other columns stay under; and the
   scores equal a reference
   computation (torch float64, written independently below) on the same binned per-forward values
   within 1e-9 relative — same bins, same values, only the code differs.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client.parser import text_string_to_metric_families

import instrumentation.torch as itorch
from instrumentation.drift import BOUNDS, enable_drift
from sidecar.testing import SidecarProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
PSI_THRESHOLD = 0.25  # the usual "significant shift" line; the shipped alert uses it too
FORWARDS = 300
BATCH = 32
SCALE = torch.tensor([1.0, 2.0, 0.5, 1.0])
OFFSET = torch.tensor([0.0, 5.0, -1.0, 0.2])


def config(ports, *, processors: str, exporters: str, backend: str, extra: str = "") -> str:
    return f"""
receivers:
  otlp:
    protocols:
      grpc: {{endpoint: 127.0.0.1:{ports.grpc}}}
processors:
  batch: {{timeout: 50ms}}
{extra}
exporters:
  file: {{directory: ./telemetry}}
  otlp/backend:
    endpoint: {backend}
    tls: {{insecure: true}}
service:
  telemetry:
    metrics: {{address: 127.0.0.1:{ports.metrics}}}
  pipelines:
    metrics: {{receivers: [otlp], processors: {processors}, exporters: {exporters}}}
"""


class App:
    """The inference process: a classifier instrumented per version, drift summaries on, OTLP to the sidecar."""

    def __init__(self, endpoint: str):
        self.reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=endpoint, insecure=True),
                                                    export_interval_millis=3_600_000)
        self.meters = MeterProvider(resource=Resource.create({"service.name": "fraud"}), metric_readers=[self.reader])
        self.tracer = TracerProvider()
        self.drift = enable_drift(self.meters, budget=None)  # every forward summarized: exact expectations
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 3)
        self.models = {}
        #: every input batch each version served, for the reference computation
        self.inputs: dict[str, list[torch.Tensor]] = {}

    def serve(self, version: str, n: int, shift: torch.Tensor | None = None, seed: int = 0) -> None:
        model = self.models.get(version)
        if model is None:
            import copy

            model = self.models[version] = itorch.instrument_model(copy.deepcopy(self.net), "fraud", version,
                                                                   tracer_provider=self.tracer,
                                                                   meter_provider=self.meters)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _ in range(n):
                x = torch.randn(BATCH, 4, generator=g) * SCALE + OFFSET
                if shift is not None:
                    x = x + shift
                model(x)
                self.inputs.setdefault(version, []).append(x)

    def flush(self) -> None:
        assert self.meters.force_flush(30_000)

    def close(self) -> None:
        self.drift.disable()
        self.meters.shutdown()


def wait_for(condition, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def scrape(port: int) -> dict[tuple[str, str, str, str], float]:
    """(statistic, version, feature, window) -> value of every sidecar_drift_* sample."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("sidecar_drift_") and family.name != "sidecar_drift_dropped_points":
            for s in family.samples:
                out[(family.name.removeprefix("sidecar_drift_"), s.labels["model_version"], s.labels["feature"],
                     s.labels.get("window", ""))] = s.value
    return out


# --- the reference computation: independent of sidecar/processors/drift --------------------------


def column_values(batches: list[torch.Tensor], column: int, stat: str) -> torch.Tensor:
    """The per-forward value the app records for ``input.0[column].stat`` (same float32 ops)."""
    vals = []
    for x in batches:
        v = {"mean": lambda: x.mean(0)[column], "std": lambda: x.std(0, correction=0)[column]}[stat]()
        vals.append(float(v.to(torch.float64)))
    return torch.tensor(vals, dtype=torch.float64)


def signed_histogram(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts over the signed bins and each bin's representative point.

    Bins: magnitudes of negative values in OTel's (lo, hi] buckets, mirrored; then 0; then positive values.
    """
    b = torch.tensor(BOUNDS, dtype=torch.float64)
    k = len(BOUNDS)
    pos = torch.bincount(torch.bucketize(values[values >= 0], b, right=False), minlength=k + 1)
    neg = torch.bincount(torch.bucketize(-values[values < 0], b, right=False), minlength=k + 1)
    counts = torch.cat((neg[1:].flip(0), pos)).to(torch.float64)
    hi = torch.cat((b, b[-1:]))  # bucket i of the magnitudes: (b[i-1], b[i]]; the last is open: its low edge
    lo = torch.cat((b[:1], b))
    mid_pos = torch.where(torch.arange(k + 1) == k, lo, (lo + hi) / 2)
    mid_pos[0] = 0.0
    points = torch.cat((-mid_pos[1:].flip(0), mid_pos))
    widths = torch.cat(((hi - lo)[1:].flip(0), hi - lo))
    widths[0], widths[-1] = widths[1], widths[-2]
    return counts, torch.stack((points, widths))


def reference_scores(ref_vals: torch.Tensor, cur_vals: torch.Tensor, groups: int = 10) -> dict[str, float]:
    r, geo = signed_histogram(ref_vals)
    c, _ = signed_histogram(cur_vals)
    before = torch.cumsum(r, 0) - r
    group = torch.clamp(torch.div(before * groups, r.sum(), rounding_mode="floor"), max=groups - 1).long()
    rg = torch.zeros(groups, dtype=torch.float64).index_add_(0, group, r)
    cg = torch.zeros(groups, dtype=torch.float64).index_add_(0, group, c)
    p, q = rg / rg.sum(), cg / cg.sum()
    pe, qe = p.clamp(min=1e-4), q.clamp(min=1e-4)
    psi = float(((qe - pe) * torch.log(qe / pe)).sum())
    m = (p + q) / 2
    js = float(0.5 * torch.nan_to_num(p * torch.log2(p / m)).sum() + 0.5 * torch.nan_to_num(q * torch.log2(q / m)).sum())
    points, widths = geo
    pf, qf = r / r.sum(), c / c.sum()
    w1 = float((torch.abs(torch.cumsum(pf, 0) - torch.cumsum(qf, 0))[:-1] * torch.diff(points)).sum())
    mean = float((pf * points).sum())
    std = math.sqrt(float((pf * (points - mean) ** 2).sum()))
    spread = max(std, float(widths[int(torch.argmax(pf))]) / 2, 1e-12)
    return {"psi": psi, "js": js, "wasserstein": w1 / spread}


# --- the test ----------------------------------------------------------------------------------


def otlp_scores(backend) -> dict[tuple[str, str, str], float]:
    """(statistic, version, feature) -> the latest value of every sidecar.drift.* gauge the backend received."""
    out = {}
    for _, _, m in backend.metrics():
        if m.name.startswith("sidecar.drift."):
            for dp in m.gauge.data_points:
                a = {kv.key: kv.value.string_value for kv in dp.attributes}
                out[(m.name.removeprefix("sidecar.drift."), a["ml.model.version"], a["ml.drift.feature"])] = dp.as_double
    return out


def test_drift_scores_rise_for_the_shifted_feature_only_and_match_the_reference(ports, tmp_path, backend):
    work1, work2 = tmp_path / "known-good", tmp_path / "live"
    # 1. the known-good period, recorded by the file exporter
    with SidecarProcess(config(ports, processors="[batch]", exporters="[file]", backend=backend.endpoint),
                        workdir=work1):
        app = App(f"127.0.0.1:{ports.grpc}")
        try:
            app.serve("1", FORWARDS, seed=1)
            app.flush()
        finally:
            app.close()
        wait_for(lambda: (work1 / "telemetry" / "metrics.jsonl").exists() and
                 b"ml.drift.value" in (work1 / "telemetry" / "metrics.jsonl").read_bytes(), "recorded metrics")
    baseline = app.inputs["1"]
    ref_path = tmp_path / "ref.json"
    proc = subprocess.run([sys.executable, "-m", "sidecar", "drift", "export-reference", "--from",
                           str(work1 / "telemetry"), "--out", str(ref_path), "--as-version", "*"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr

    # 2. live traffic against the pinned reference: version 1 unchanged, canary 2 shifted in column 2
    extra = f"  drift: {{reference: {{file: {ref_path}}}, window: 1h, min_samples: 100, flush_interval: 200ms}}"
    with SidecarProcess(config(ports, processors="[drift, batch]", exporters="[otlp/backend]", extra=extra,
                               backend=backend.endpoint), workdir=work2) as sidecar:
        app = App(f"127.0.0.1:{ports.grpc}")
        try:
            shift = torch.tensor([0.0, 0.0, 2 * float(SCALE[2]), 0.0])
            app.serve("1", FORWARDS, seed=2)
            app.serve("2", FORWARDS, shift=shift, seed=3)
            app.flush()
        finally:
            app.close()
        scores = wait_for(lambda: (lambda s: s if s.get(("samples", "2", "input.0[2].mean", "current")) == FORWARDS
                                   and s.get(("samples", "1", "input.0[2].mean", "current")) == FORWARDS else None)(
            scrape(ports.metrics)), "both versions scored")
        # the same scores leave as OTLP gauges through the metrics pipeline
        key = ("psi", "2", "input.0[2].mean")
        otlp = wait_for(lambda: (lambda o: o if key in o and ("psi", "1", "input.0[2].mean") in o else None)(
            otlp_scores(backend)), "scores as OTLP")
        assert sidecar.proc.poll() is None, sidecar.log()
    assert otlp[key] == pytest.approx(scores[key + ("",)], rel=1e-12)

    # unchanged inputs: every score of version 1 under the threshold (numeric PSI, categorical JS)
    v1 = {k: v for k, v in scores.items() if k[1] == "1"}
    assert any(k[0] == "psi" for k in v1) and any(k[0] == "js" and k[2] == "output.label" for k in v1)
    high = {k: v for k, v in v1.items() if (k[0] == "psi" and v >= PSI_THRESHOLD) or (k[0] == "js" and v >= 0.1)}
    assert not high, high
    # the canary: column 2 above, every feature of the other columns under
    assert scores[("psi", "2", "input.0[2].mean", "")] > PSI_THRESHOLD * 10
    others = {k: v for k, v in scores.items() if k[0] == "psi" and k[1] == "2" and k[2].startswith("input.0[")
              and not k[2].startswith("input.0[2]")}
    assert len(others) == 6 and all(v < PSI_THRESHOLD for v in others.values()), others

    # the scores equal the reference computation on the same binned per-forward values
    for version, batches in (("1", app.inputs["1"]), ("2", app.inputs["2"])):
        for column in range(4):
            for stat in ("mean", "std"):
                feature = f"input.0[{column}].{stat}"
                want = reference_scores(column_values(baseline, column, stat), column_values(batches, column, stat))
                for name, value in want.items():
                    got = scores[(name, version, feature, "")]
                    assert got == pytest.approx(value, rel=1e-9, abs=1e-12), (version, feature, name, got, value)
