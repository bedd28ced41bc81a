"""The drift dashboard and alerts query what the drift processor and the app's drift instruments produce."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.exposition import generate_latest

from instrumentation.drift import DriftObserver
from tests.sidecar.test_drift import Clock, make

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "drift-and-cost.json"


def exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    out = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    out += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    drift = [g for g in rules["groups"] if g["name"] == "inference-drift"]
    assert drift, "alerts.yaml lost the inference-drift group"
    return out + [r["expr"] for r in drift[0]["rules"]]


def test_sidecar_drift_families_exist():
    wanted = {n for e in exprs() for n in re.findall(r"\b(sidecar_drift_[a-z0-9_]+)", e)}
    assert {"sidecar_drift_psi", "sidecar_drift_js", "sidecar_drift_wasserstein", "sidecar_drift_samples"} <= wanted
    _, _, root = make(Clock())
    families = set(re.findall(r"^# TYPE (\S+) ", generate_latest(root.registry).decode(), re.M))
    assert wanted <= families, wanted - families


def test_cost_series_match_the_app_instruments_as_prometheus_names_them():
    """Prometheus' OTLP receiver: dots -> underscores, unit ``s`` -> ``_seconds``, counters -> ``_total``."""
    observer = DriftObserver()
    observer.observe_generation("llama", None, 10, 5, 0.1)
    names = set()
    for rm in observer.metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                base = m.name.replace(".", "_") + ("_seconds" if m.unit == "s" else "")
                kind = type(m.data).__name__
                names |= {base + "_total"} if kind == "Sum" else {base + s for s in ("_bucket", "_sum", "_count")}
    wanted = {n for e in exprs() for n in re.findall(r"\b(ml_cost_[a-z_]+)\{", e)}  # names, not labels
    assert wanted and wanted <= names, wanted - names


def test_drift_alerts_pass_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (scripts/setup.sh installs Debian's prometheus package)")
    run = subprocess.run([promtool, "test", "rules", "alerts_test.yaml"], cwd=DEPLOY / "prometheus",
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ModelVersionInputDrift" in (DEPLOY / "prometheus" / "alerts_test.yaml").read_text()
