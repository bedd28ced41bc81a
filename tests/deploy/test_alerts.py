"""Every alert is unit-tested by promtool, links a runbook section that exists, and the compose stack
points Jaeger and Grafana at names the sidecar really produces."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"


def _alerts() -> list[dict]:
    rules = yaml.safe_load((PROM / "alerts.yaml").read_text())
    return [r for g in rules["groups"] for r in g["rules"] if "alert" in r]


def test_every_alert_has_a_promtool_test_that_expects_it_to_fire():
    tests = yaml.safe_load((PROM / "alerts_test.yaml").read_text())
    firing = {t["alertname"] for case in tests["tests"] for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert {a["alert"] for a in _alerts()} <= firing


def test_every_alert_links_an_existing_runbook_section():
    headings = re.findall(r"^## (\S+)", (ROOT / "docs" / "runbooks.md").read_text(), re.M)
    anchors = {h.lower() for h in headings}
    for a in _alerts():
        url = a["annotations"]["runbook_url"]
        assert url.split("#")[0].endswith("docs/runbooks.md"), a["alert"]
        assert url.split("#")[1] == a["alert"].lower() in anchors, a["alert"]


def test_refusals_are_alerted_once_at_the_receiver():
    exprs = " ".join(a["expr"] for a in _alerts())
    assert "sidecar_receiver_requests_refused_total" in exprs
    assert "sidecar_items_refused_total" not in exprs  # counted at every stage: one refusal, many alerts


def test_jaeger_reads_the_duration_unit_the_sidecar_exposes():
    compose = yaml.safe_load((ROOT / "deploy" / "compose" / "docker-compose.yaml").read_text())
    env = compose["services"]["jaeger"]["environment"]
    # Jaeger queries <namespace>_duration_<unit>_bucket when normalizing; the sidecar's histogram is in seconds
    assert env["PROMETHEUS_QUERY_NORMALIZE_DURATION"] == "true" and env["PROMETHEUS_QUERY_DURATION_UNIT"] == "s"
    from sidecar.processors.span_metrics import SpanMetricsConfig
    assert f"{env['PROMETHEUS_QUERY_NAMESPACE']}_duration_seconds" == \
        SpanMetricsConfig().namespace.replace(".", "_") + "_duration_seconds"
    for name, svc in compose["services"].items():
        if name in ("sidecar", "app", "prometheus", "grafana"):
            assert "healthcheck" in svc, name


def test_loki_links_otlp_logs_to_traces_by_structured_metadata():
    ds = yaml.safe_load((ROOT / "deploy" / "grafana" / "provisioning" / "datasources.yaml").read_text())
    (loki,) = [d for d in ds["datasources"] if d["type"] == "loki"]
    fields = loki["jsonData"]["derivedFields"]
    assert any(f.get("matcherType") == "label" and f["matcherRegex"] == "trace_id" for f in fields)
    line = '{"timestamp": "x", "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "span_id": "00f067aa0ba902b7"}'
    regexes = [f["matcherRegex"] for f in fields if f.get("matcherType", "regex") == "regex"]
    assert any(re.search(r, line).group(1) == "4bf92f3577b34da6a3ce929d0e0e4736" for r in regexes)


def test_the_demo_image_installs_the_cpu_torch_wheel():
    text = (ROOT / "deploy" / "container" / "Dockerfile.demo-app").read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu torch==" in text


def test_dashboard_panels_are_placed_once_and_use_provisioned_datasources():
    import json

    dash_dir = ROOT / "deploy" / "grafana" / "dashboards"
    ds = yaml.safe_load((ROOT / "deploy" / "grafana" / "provisioning" / "datasources.yaml").read_text())
    uids = {d["uid"] for d in ds["datasources"]}
    for path in dash_dir.glob("*.json"):
        dash = json.loads(path.read_text())
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        cells = set()
        for p in dash["panels"]:
            g = p["gridPos"]
            mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not cells & mine, f"{path.name}: panel {p['title']!r} overlaps another"
            cells |= mine
            uid = (p.get("datasource") or {}).get("uid", "${datasource}")
            assert uid == "${datasource}" or uid in uids, f"{path.name}: {p['title']!r} uses datasource {uid!r}"
