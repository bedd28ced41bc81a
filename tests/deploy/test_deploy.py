"""What ships in deploy/ and collector-config/ is valid and agrees with what the sidecar exposes."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from sidecar.envelope import Envelope
from sidecar.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SIDECAR_CONFIGS = sorted((ROOT / "collector-config").glob("sidecar*.yaml")) + [DEPLOY / "compose" / "sidecar.yaml"]


@pytest.mark.parametrize("path", SIDECAR_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_sidecar_configs_validate(path):
    parse_config(path.read_text(), source=str(path), environ={})


def test_alert_rules_pass_promtool_unit_tests():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (scripts/setup.sh installs Debian's prometheus package)")
    check = subprocess.run([promtool, "check", "rules", "alerts.yaml"], cwd=DEPLOY / "prometheus",
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([promtool, "test", "rules", "alerts_test.yaml"], cwd=DEPLOY / "prometheus",
                          capture_output=True, text=True)
    assert test.returncode == 0, test.stdout + test.stderr


def _queried_metrics() -> set[str]:
    exprs = []
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "inference-overview.json").read_text())
    for panel in dash["panels"]:
        exprs += [t["expr"] for t in panel.get("targets", [])]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    names = set()
    for e in exprs:
        names |= set(re.findall(r"\b((?:traces_span_metrics|sidecar)_[a-z_]+)", e))
    return names


def test_dashboard_and_alerts_query_metrics_the_sidecar_exposes():
    """Every metric the dashboard and alerts use is produced by a running pipeline."""
    from sidecar.pipeline import Service
    from sidecar.signals import Signal

    cfg = parse_config((ROOT / "collector-config" / "sidecar.yaml").read_text(), environ={
        "SIDECAR_STORAGE_DIR": "/tmp/sidecar-deploy-test", "SIDECAR_FILE_EXPORT_DIR": "/tmp/sidecar-deploy-test/out",
        "SIDECAR_OTLP_GRPC_ENDPOINT": "127.0.0.1:0", "SIDECAR_OTLP_HTTP_ENDPOINT": "127.0.0.1:0",
        "SIDECAR_METRICS_ENDPOINT": "127.0.0.1:0", "SIDECAR_HEALTH_ENDPOINT": "127.0.0.1:0",
        # the pipeline runs inside pytest, whose RSS (torch and all) is not the sidecar's
        "SIDECAR_MEMORY_LIMIT_MIB": "100000"})
    service = Service(cfg)
    service.start()
    try:
        import sys
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import random

        from workload import trace_request

        req, _ = trace_request(random.Random(1), 200, pii=1.0)
        service.graph.processors["memory_limiter"].consume(Envelope(Signal.TRACES, req))  # the head of the traces pipeline
    finally:
        service.shutdown(5)  # tail sampling decides everything pending, redaction and export follow
    from prometheus_client import generate_latest

    exposed = generate_latest(service.telemetry.registry).decode()
    families = set(re.findall(r"^# TYPE (\S+) ", exposed, re.M))
    series = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", exposed, re.M))
    wanted = _queried_metrics()
    assert wanted, "no metric names found in the dashboard"
    missing = {m for m in wanted if m not in series and m not in families and
               not any(m == f + s for f in families for s in ("_total", "_bucket", "_count", "_sum"))}
    assert not missing, f"dashboard/alerts query metrics nothing exposes: {sorted(missing)}"
