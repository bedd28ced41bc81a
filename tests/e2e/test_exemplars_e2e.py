"""Issue 12 through a real sidecar: every exemplar on /metrics leads to a trace the backend received.

The OTel SDK sends traces (a server span and a child, some errors, varied latency) to a
sidecar process running span_metrics -> tail_sampling (errors + 10%) -> OTLP backend. Once
every trace is decided and every kept one is in the backend, /metrics is scraped as
OpenMetrics and each exemplar's trace id is looked up in the backend. Prints the share
found (run with ``-s``); before exemplars waited for the decision it was about 0.1 for
non-error series (figures in docs/exemplars.md).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from sidecar.testing import OTLPBackend, SidecarProcess, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

TRACES = 400
PROMETHEUS = shutil.which("prometheus")


def config(backend: str, grpc_port: int, metrics_port: int) -> str:
    return f"""
receivers:
  otlp:
    protocols:
      grpc: {{endpoint: 127.0.0.1:{grpc_port}}}
processors:
  span_metrics: {{}}
  tail_sampling:
    decision_wait: 2s
    decision_wait_after_root_received: 200ms
    policies:
      - {{name: errors, type: status_code, status_code: {{status_codes: [ERROR]}}}}
      - {{name: rest, type: probabilistic, probabilistic: {{sampling_percentage: 10}}}}
exporters:
  otlp/backend:
    endpoint: {backend}
    tls: {{insecure: true}}
service:
  telemetry:
    metrics: {{address: 127.0.0.1:{metrics_port}}}
  pipelines:
    traces: {{receivers: [otlp], processors: [span_metrics, tail_sampling], exporters: [otlp/backend]}}
"""


def send_traffic(grpc_port: int, seconds: float = 0.0) -> None:
    """TRACES traces from the real SDK, in many small export requests (many exemplar candidates),
    spread over ``seconds`` (so a scraper sees the exemplars change while traces are undecided)."""
    rnd = random.Random(12)
    provider = TracerProvider(resource=Resource.create({"service.name": "inference"}))
    provider.add_span_processor(BatchSpanProcessor(
        OTLPSpanExporter(endpoint=f"127.0.0.1:{grpc_port}", insecure=True),
        max_export_batch_size=32, schedule_delay_millis=50))
    tracer = provider.get_tracer("e2e")
    t0 = time.time_ns()
    pace = seconds / TRACES
    for i in range(TRACES):
        if pace:
            time.sleep(pace)  # the traffic's shape, not a wait for a condition
        start = t0 + i * 1_000_000
        duration = int(rnd.lognormvariate(3, 1) * 1_000_000)  # ms-scale, long tail
        root = tracer.start_span(rnd.choice(["POST /predict", "POST /generate"]), kind=SpanKind.SERVER,
                                 start_time=start)
        with_error = rnd.random() < 0.05
        child = tracer.start_span("forward", context=_ctx(root), start_time=start + 1000,
                                  attributes={"ml.model.id": "resnet", "ml.model.version": rnd.choice(["v1", "v2"])})
        if with_error:
            child.set_status(Status(StatusCode.ERROR))
            root.set_status(Status(StatusCode.ERROR))
        child.end(end_time=start + duration - 1000)
        root.end(end_time=start + duration)
    provider.force_flush(30_000)
    provider.shutdown()


def _ctx(span):
    from opentelemetry import trace

    return trace.set_span_in_context(span)


def scrape(port: int, openmetrics: bool = False) -> str:
    headers = {"Accept": "application/openmetrics-text; version=1.0.0"} if openmetrics else {}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read().decode()


def decided(port: int) -> dict[str, float]:
    """sidecar_tail_sampling_traces_total by decision."""
    out: dict[str, float] = {}
    for fam in parse_text(scrape(port)):
        for s in fam.samples:
            if s.name == "sidecar_tail_sampling_traces_total":
                out[s.labels["decision"]] = out.get(s.labels["decision"], 0) + s.value
    return out


def exemplars(port: int) -> list[tuple[str, str]]:
    """(status_code label, trace id) of every exemplar on the span-metrics duration histogram."""
    out = []
    for fam in parse_openmetrics(scrape(port, openmetrics=True)):
        for s in fam.samples:
            if s.name.startswith("traces_span_metrics_duration_seconds") and s.exemplar is not None:
                out.append((s.labels["status_code"], s.exemplar.labels["trace_id"]))
    return out


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def traffic_decided_and_stored(backend: OTLPBackend, grpc_port: int, metrics_port: int,
                               seconds: float = 0.0) -> tuple[float, set[str]]:
    """Send the traffic; wait until every trace is decided and every kept one is in the backend.
    Returns (traces kept, trace ids the backend holds)."""
    send_traffic(grpc_port, seconds)
    wait_for(lambda: sum(decided(metrics_port).values()) >= TRACES, 60, f"{TRACES} decisions")
    n_kept = decided(metrics_port).get("sampled", 0)
    stored = wait_for(lambda: (ids := {s.trace_id.hex() for _, _, s in backend.spans()}) and
                      len(ids) >= n_kept and ids, 60, f"{n_kept} kept traces in the backend")
    return n_kept, stored


def report_and_check(where: str, found: list[tuple[str, str]], stored: set[str], n_kept: float) -> None:
    """Print the share of exemplar trace ids the backend holds (all, non-error); require all of them."""
    non_error = [t for code, t in found if code != "STATUS_CODE_ERROR"]
    share = sum(t in stored for _, t in found) / max(len(found), 1)
    share_ok = sum(t in stored for t in non_error) / max(len(non_error), 1)
    print(f"\n{where}: {len(found)} exemplars ({len(non_error)} non-error); traces kept {n_kept:.0f}/{TRACES}; "
          f"share of exemplar trace ids in the backend: {share:.2f} (non-error {share_ok:.2f})")
    assert found and non_error, "no exemplars at all: the check would be vacuous"
    assert share == 1.0 and share_ok == 1.0


@pytest.mark.parametrize("env", [{}, {"SIDECAR_PURE_PYTHON": "1"}], ids=["c", "python"])
def test_every_exemplar_trace_id_is_a_trace_the_backend_received(env):
    grpc_port, metrics_port = free_port(), free_port()
    with OTLPBackend() as backend, SidecarProcess(config(backend.endpoint, grpc_port, metrics_port), env=env):
        n_kept, stored = traffic_decided_and_stored(backend, grpc_port, metrics_port)
        report_and_check("/metrics", exemplars(metrics_port), stored, n_kept)


def _prometheus_get(port: int, path: str, **params) -> dict:
    url = f"http://127.0.0.1:{port}{path}?" + urllib.parse.urlencode(params)
    body = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert body["status"] == "success", body
    return body["data"]


def _last_scrape(port: int) -> float:
    try:
        result = _prometheus_get(port, "/api/v1/query", query='timestamp(up{job="sidecar"})')["result"]
    except (OSError, ConnectionError):
        return 0.0  # not listening yet
    return float(result[0]["value"][1]) if result else 0.0


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (scripts/setup.sh installs it)")
def test_exemplars_stored_by_a_real_prometheus_lead_to_kept_traces(tmp_path):
    """Prometheus (exemplar storage on) scrapes the sidecar during and after the traffic; every exemplar it
    stored, also those scraped while traces were still undecided, names a trace the backend received."""
    grpc_port, metrics_port, prom_port = free_port(), free_port(), free_port()
    target = {"targets": [f"127.0.0.1:{metrics_port}"]}
    (tmp_path / "prometheus.yml").write_text(json.dumps({
        "global": {"scrape_interval": "1s"}, "scrape_configs": [{"job_name": "sidecar", "static_configs": [target]}]}))
    with OTLPBackend() as backend, \
            SidecarProcess(config(backend.endpoint, grpc_port, metrics_port), workdir=tmp_path / "sidecar"), \
            open(tmp_path / "prometheus.log", "w") as prom_log:
        prom = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}", "--enable-feature=exemplar-storage",
                                 f"--web.listen-address=127.0.0.1:{prom_port}"],
                                stdout=prom_log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: _last_scrape(prom_port), 60, "Prometheus's first scrape of the sidecar")
            n_kept, stored = traffic_decided_and_stored(backend, grpc_port, metrics_port, seconds=8)
            settled = time.time()
            wait_for(lambda: _last_scrape(prom_port) > settled, 30, "a scrape after every decision")
            now = time.time()
            data = _prometheus_get(prom_port, "/api/v1/query_exemplars", start=now - 3600, end=now + 3600,
                                   query="traces_span_metrics_duration_seconds_bucket")
        finally:
            prom.terminate()
            prom.wait(30)
    found = [(series["seriesLabels"].get("status_code"), ex["labels"]["trace_id"])
             for series in data for ex in series["exemplars"]]
    report_and_check("Prometheus", found, stored, n_kept)
