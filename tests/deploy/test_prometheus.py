"""A real Prometheus scrapes a running sidecar: every dashboard and alert expression returns data.

Debian's prometheus (installed by scripts/setup.sh) scrapes the sidecar's /metrics and, for
the GenAI panels, the app's gen_ai.* histograms as the OTel SDK's Prometheus exporter names
them (Debian's 2.42 has no OTLP receiver; the compose stack's 2.55 ingests the same names over
OTLP). The app is the real OTel SDK plus this project's ``trace_generation``. Unintended drops
and refusals are provoked (an exporter to a closed port, one malformed request), so the loss
alerts have series to evaluate. An alert's data is its expression without the comparisons with
a number (``A > 0.02 and B > 1`` -> ``A and B``): the series it would compare.
"""

import json
import random
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from sidecar.testing import SidecarProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS = shutil.which("prometheus")

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(180),
              pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (scripts/setup.sh installs it)")]

_COMPARISON = re.compile(r"\s*(?:==|!=|>=|<=|>|<)\s*-?\d+(?:\.\d+)?(?![\w.])")


def data_query(expr: str) -> str:
    """The expression without its comparisons with numbers: what an alert would compare."""
    return _COMPARISON.sub("", expr)


def dashboard_queries() -> dict[str, str]:
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "inference-overview.json").read_text())
    out = {}
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            expr = t["expr"].replace("$service", ".*").replace("$model", ".*").replace("$__rate_interval", "30s")
            out[f"panel {panel['title']!r} {t.get('refId', '')}"] = expr
    return out


#: Rule groups whose data this test cannot make: drift scores need a pinned reference profile per model
#: version (instrumentation/drift.py); the drift tests exercise sidecar_drift_* themselves.
ELSEWHERE = {"inference-drift"}


def alert_queries() -> dict[str, str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    return {f"{'alert' if 'alert' in r else 'record'} {r.get('alert') or r.get('record')}": data_query(r["expr"])
            for g in rules["groups"] if g["name"] not in ELSEWHERE for r in g["rules"]}


def test_data_query_keeps_the_series_and_drops_the_thresholds():
    assert data_query("(a / b) > 0.02\nand b > 1") == "(a / b)\nand b"
    assert data_query('up{job="x"} == 0 or sidecar_up == 0') == 'up{job="x"} or sidecar_up'
    assert data_query('histogram_quantile(0.99, sum(rate(x{m!=""}[5m]))) > 2') == 'histogram_quantile(0.99, sum(rate(x{m!=""}[5m])))'


def _sidecar_config(dead_port: int) -> str:
    cfg = yaml.safe_load((ROOT / "collector-config" / "sidecar.yaml").read_text())
    # an exporter whose backend is gone: its retries run out quickly and the loss is counted (intended="false")
    cfg["exporters"]["otlp/unreachable"] = {"endpoint": f"127.0.0.1:{dead_port}", "tls": {"insecure": True},
                                            "timeout": "1s",
                                            "retry_on_failure": {"initial_interval": "100ms", "max_elapsed_time": "1s"}}
    cfg["service"]["pipelines"]["traces"]["exporters"].append("otlp/unreachable")
    return yaml.safe_dump(cfg)


class App:
    """The inference app's telemetry: real OTel SDK spans to the sidecar, GenAI histograms for Prometheus."""

    def __init__(self, otlp_endpoint: str, metrics_port: int):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from prometheus_client import CollectorRegistry, start_http_server

        resource = Resource.create({"service.name": "resnet-server"})
        self.tp = TracerProvider(resource=resource)
        self.tp.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True),
                                                      schedule_delay_millis=200))
        registry = CollectorRegistry()
        reader = PrometheusMetricReader()
        registry.register(reader._collector)
        self.mp = MeterProvider(resource=resource, metric_readers=[reader])
        self.server, self.thread = start_http_server(metrics_port, addr="127.0.0.1", registry=registry)
        self.stop = threading.Event()
        self.rng = random.Random(7)

    def request(self) -> None:
        from opentelemetry.trace import SpanKind, Status, StatusCode

        from instrumentation import trace_generation

        tracer = self.tp.get_tracer("app")
        version = "v2" if self.rng.random() < 0.3 else "v1"
        # a PII value the app did not redact (no in-process redaction here): the sidecar masks it
        with tracer.start_as_current_span("POST /classify", kind=SpanKind.SERVER,
                                          attributes={"enduser.email": "jane@example.com"}) as server:
            with tracer.start_as_current_span("ml.forward resnet50", attributes={
                    "ml.model.id": "resnet50", "ml.model.version": version}) as fwd:
                if self.rng.random() < 0.1:
                    fwd.set_status(Status(StatusCode.ERROR, "boom"))
                    server.set_status(Status(StatusCode.ERROR))
        with tracer.start_as_current_span("POST /generate", kind=SpanKind.SERVER):
            with trace_generation("toy-lm", input_tokens=5, tracer_provider=self.tp, meter_provider=self.mp) as gen:
                for _ in range(4):
                    gen.token()
                gen.finish("length")

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.request()

    def close(self) -> None:
        self.stop.set()
        self.tp.shutdown()
        self.mp.shutdown()
        self.server.shutdown()


def _query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert body["status"] == "success", body
    return [r for r in body["data"]["result"] if r["value"][1] not in ("NaN",)]


def test_every_dashboard_and_alert_expression_returns_data_from_a_real_prometheus(tmp_path):
    grpc_port, http_port, sidecar_metrics, app_metrics, prom_port = (free_port() for _ in range(5))
    env = {"SIDECAR_OTLP_GRPC_ENDPOINT": f"127.0.0.1:{grpc_port}", "SIDECAR_OTLP_HTTP_ENDPOINT": f"127.0.0.1:{http_port}",
           "SIDECAR_METRICS_ENDPOINT": f"127.0.0.1:{sidecar_metrics}", "SIDECAR_HEALTH_ENDPOINT": f"127.0.0.1:{free_port()}",
           "SIDECAR_STORAGE_DIR": str(tmp_path / "storage"), "SIDECAR_FILE_EXPORT_DIR": str(tmp_path / "telemetry")}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(DEPLOY / "prometheus" / "alerts.yaml")],
        "scrape_configs": [
            {"job_name": "otel-sidecar", "static_configs": [{"targets": [f"127.0.0.1:{sidecar_metrics}"],
                                                             "labels": {"pod": "test-pod"}}]},
            {"job_name": "app", "static_configs": [{"targets": [f"127.0.0.1:{app_metrics}"]}]}]}))
    prom_log = open(tmp_path / "prometheus.log", "w")
    with SidecarProcess(_sidecar_config(free_port()), workdir=tmp_path / "sidecar", env=env) as sidecar:
        app = App(f"http://127.0.0.1:{grpc_port}", app_metrics)
        traffic = threading.Thread(target=app.run, daemon=True)
        traffic.start()
        prom = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                                stdout=prom_log, stderr=subprocess.STDOUT)
        try:
            # one malformed request: the receiver refuses it, and counts it once
            bad = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/traces", data=b"\x0a\xff\xff",
                                         headers={"Content-Type": "application/x-protobuf"})
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(bad, timeout=5)
            wanted = {**dashboard_queries(), **alert_queries()}
            missing = dict(wanted)
            deadline = time.monotonic() + 90
            while missing and time.monotonic() < deadline:
                time.sleep(1)  # Prometheus scrapes every second; a query before the next scrape sees nothing new
                if prom.poll() is not None:
                    pytest.fail(f"prometheus exited: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")
                for name, expr in list(missing.items()):
                    try:
                        if _query(prom_port, expr):
                            del missing[name]
                    except (urllib.error.URLError, ConnectionError):
                        break  # not listening yet
            assert not missing, "no data for:\n" + "\n".join(f"  {n}: {e}" for n, e in missing.items()) + \
                f"\n--- sidecar log tail:\n{sidecar.log()[-1500:]}"
            rules = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/api/v1/rules", timeout=10).read())
            bad_rules = [(r["name"], r.get("lastError")) for g in rules["data"]["groups"] for r in g["rules"]
                         if r["health"] != "ok"]
            assert not bad_rules
        finally:
            app.close()
            prom.terminate()
            prom.wait(30)
