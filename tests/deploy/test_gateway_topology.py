"""The shipped sidecar -> gateway topology carries all three signals, with the pod's identity.

The gateway is upstream otelcol-contrib, whose binary cannot run here. It is emulated the way
it behaves: an OTLP/gRPC server that serves a signal's service only when the gateway config
has a pipeline for that signal with the ``otlp`` receiver (otelcol registers nothing else, so
a client gets UNIMPLEMENTED). The sidecar runs the shipped collector-config/sidecar-k8s.yaml
as a real process, fed by the real OTel SDK exporters.
"""

import logging
import re
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from sidecar.signals import Signal
from sidecar.testing import SidecarProcess, _Recorder, _Servicer, free_port

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "collector-config"
POD = {"K8S_POD_NAME": "resnet-server-7d9f-abcde", "K8S_POD_UID": "0b5c3c1e-6d5e-4c0f-9d1e-3f1a2b3c4d5e",
       "K8S_NAMESPACE_NAME": "inference", "K8S_NODE_NAME": "node-a", "K8S_DEPLOYMENT_NAME": "resnet-server"}


def pipelines_with_otlp(path: Path) -> dict[str, dict]:
    """signal -> pipeline, for the pipelines an otelcol config feeds from its otlp receiver."""
    cfg = yaml.safe_load(path.read_text())
    return {name.split("/")[0]: p for name, p in cfg["service"]["pipelines"].items()
            if any(r.split("/")[0] == "otlp" for r in p["receivers"])}


class EmulatedGateway(_Recorder):
    """otelcol's OTLP receiver as configured: only the signals with a pipeline are served."""

    def __init__(self, config: Path):
        super().__init__()
        self.signals = set(pipelines_with_otlp(config))
        self.port = free_port()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        add = {"traces": trace_service_pb2_grpc.add_TraceServiceServicer_to_server,
               "logs": logs_service_pb2_grpc.add_LogsServiceServicer_to_server,
               "metrics": metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server}
        for signal in self.signals:
            add[signal](_Servicer(self, Signal(signal)), self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")

    def __enter__(self):
        self.server.start()
        return self

    def __exit__(self, *exc):
        self.server.stop(None).wait()


def test_every_signal_the_sidecar_forwards_has_a_pipeline_at_each_gateway_tier():
    sidecar = yaml.safe_load((CONFIGS / "sidecar-k8s.yaml").read_text())
    sent = {name.split("/")[0] for name, p in sidecar["service"]["pipelines"].items()
            if any(e.startswith("otlp/gateway") for e in p["exporters"])}
    assert sent == {"traces", "logs", "metrics"}
    lb = pipelines_with_otlp(CONFIGS / "gateway-loadbalancer.yaml")
    assert sent <= set(lb), f"the load-balancing tier refuses {sorted(sent - set(lb))} as UNIMPLEMENTED"
    to_sampler = {s for s, p in lb.items() if "loadbalancing" in p["exporters"]}
    sampler = pipelines_with_otlp(CONFIGS / "gateway-sampler.yaml")
    assert to_sampler <= set(sampler), f"the sampler tier refuses {sorted(to_sampler - set(sampler))}"
    for path in ("gateway-loadbalancer.yaml", "gateway-sampler.yaml"):  # every referenced component is defined
        cfg = yaml.safe_load((CONFIGS / path).read_text())
        for name, p in cfg["service"]["pipelines"].items():
            for section in ("receivers", "processors", "exporters"):
                missing = set(p.get(section, [])) - set(cfg.get(section) or {})
                assert not missing, f"{path}: service.pipelines.{name}.{section} names undefined {sorted(missing)}"


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


@pytest.mark.e2e
@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:.*LoggingHandler.*:DeprecationWarning")  # the SDK's own handler is what we need
def test_traces_logs_and_metrics_reach_the_gateway_with_the_pods_identity(tmp_path):
    from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
    from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import Status, StatusCode

    grpc_port, metrics_port = free_port(), free_port()
    with EmulatedGateway(CONFIGS / "gateway-loadbalancer.yaml") as gateway:
        env = {**POD, "OTEL_GATEWAY_ENDPOINT": f"127.0.0.1:{gateway.port}", "SAMPLING_PERCENTAGE": "100",
               "SIDECAR_OTLP_GRPC_ENDPOINT": f"127.0.0.1:{grpc_port}", "SIDECAR_OTLP_HTTP_ENDPOINT": f"127.0.0.1:{free_port()}",
               "SIDECAR_HEALTH_ENDPOINT": f"127.0.0.1:{free_port()}", "SIDECAR_METRICS_ENDPOINT": f"127.0.0.1:{metrics_port}",
               "SIDECAR_STORAGE_DIR": str(tmp_path / "queue")}
        with SidecarProcess((CONFIGS / "sidecar-k8s.yaml").read_text(), workdir=tmp_path, env=env) as sidecar:
            resource = Resource.create({"service.name": "resnet-server", "k8s.container.name": "app"})
            endpoint = f"http://127.0.0.1:{grpc_port}"
            tp = TracerProvider(resource=resource)
            tp.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
            lp = LoggerProvider(resource=resource)
            lp.add_log_record_processor(SimpleLogRecordProcessor(OTLPLogExporter(endpoint=endpoint, insecure=True)))
            reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=endpoint, insecure=True),
                                                   export_interval_millis=3_600_000)
            mp = MeterProvider(resource=resource, metric_readers=[reader])
            logger = logging.getLogger("gateway-topology-test")
            logger.addHandler(LoggingHandler(logger_provider=lp))
            logger.propagate = False
            with tp.get_tracer("t").start_as_current_span("POST /classify") as span:
                logger.warning("inside the request")
                span.set_status(Status(StatusCode.ERROR))  # kept by the errors policy whatever the percentage
            mp.get_meter("m").create_counter("inference.requests").add(3)
            tp.force_flush()
            lp.force_flush()
            mp.force_flush()
            for signal in (Signal.TRACES, Signal.LOGS, Signal.METRICS):
                assert gateway.wait_for_items(signal, 1, timeout=60), f"no {signal.value} at the gateway:\n{sidecar.log()}"
            text = _scrape(metrics_port)
            tp.shutdown()
            lp.shutdown()
            mp.shutdown()
    resources = [res for view in (gateway.spans, gateway.log_records, gateway.metrics) for res, _, _ in view()]
    for res in resources:
        attrs = {kv.key: kv.value.string_value for kv in res.attributes}
        assert attrs["k8s.pod.name"] == POD["K8S_POD_NAME"]
        assert attrs["k8s.namespace.name"] == "inference" and attrs["k8s.node.name"] == "node-a"
        assert attrs["k8s.pod.uid"] == POD["K8S_POD_UID"] and attrs["k8s.deployment.name"] == "resnet-server"
    lost = [line for line in text.splitlines()
            if line.startswith("sidecar_items_dropped_total") and 'intended="false"' in line and not line.endswith(" 0.0")]
    assert not lost, lost
    refused = re.findall(r'^sidecar_items_refused_total\{.*kind="exporter".*\} ([1-9]\S*)$', text, re.M)
    assert not refused
