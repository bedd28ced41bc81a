"""The attribute contract across the process boundary: what the app writes is what the sidecar acts on.

A real instrumented torch model serves two requests inside the app's request context; the
SDK exports to a real sidecar running span metrics and tail sampling. The request marked
force-keep must be kept by the ``debug`` policy (``sampling.force_keep``) while a 0% baseline
drops the other, and the span metrics, computed before sampling, must label both forwards
with the model id and version the app wrote (``ml.model.id``/``ml.model.version``).
"""

from __future__ import annotations

import time
import urllib.request

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HTTPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from contract import attributes as attr
from sidecar.signals import Signal
from sidecar.testing import OTLPHTTPBackend, SidecarProcess, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

CONFIG = """\
receivers:
  otlp:
    protocols:
      http: {{endpoint: "127.0.0.1:{http}"}}
processors:
  span_metrics: {{}}
  tail_sampling:
    decision_wait: 1s
    policies:
      - {{name: debug, type: boolean_attribute, boolean_attribute: {{key: sampling.force_keep, value: true}}}}
      - {{name: baseline, type: probabilistic, probabilistic: {{sampling_percentage: 0}}}}
exporters:
  otlphttp: {{endpoint: "{backend}"}}
service:
  telemetry:
    metrics: {{address: "127.0.0.1:{metrics}"}}
  pipelines:
    traces: {{receivers: [otlp], processors: [span_metrics, tail_sampling], exporters: [otlphttp]}}
"""


def _wait_for(condition, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_what_the_app_writes_is_what_the_sidecar_reads(tmp_path):
    torch = pytest.importorskip("torch")
    from instrumentation import RequestContext, RequestContextSpanProcessor, instrument_model, request_context

    http, metrics = free_port(), free_port()
    with OTLPHTTPBackend() as backend, \
            SidecarProcess(CONFIG.format(http=http, metrics=metrics, backend=backend.endpoint), workdir=tmp_path):
        provider = TracerProvider(resource=Resource.create({attr.SERVICE_NAME: "classifier"}))
        provider.add_span_processor(RequestContextSpanProcessor())
        provider.add_span_processor(SimpleSpanProcessor(HTTPSpanExporter(endpoint=f"http://127.0.0.1:{http}/v1/traces")))
        model = instrument_model(torch.nn.Linear(4, 2), "resnet", "v3", tracer_provider=provider)
        tracer = provider.get_tracer("tests.contract")
        for request_id, keep in (("req-kept", True), ("req-dropped", False)):
            with request_context(RequestContext(request_id=request_id, force_keep=keep)):
                with tracer.start_as_current_span("POST /predict"):
                    model(torch.ones(3, 4))
        provider.shutdown()

        def forward_calls() -> list[str]:
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5).read().decode()
            return [line for line in text.splitlines() if line.startswith("traces_span_metrics_calls_total{")
                    and 'span_name="ml.forward resnet"' in line]

        # both forwards, before sampling dropped one, labelled from the attributes the app wrote
        (line,) = _wait_for(lambda: [x for x in forward_calls() if x.endswith(" 2.0")], "both forwards counted")
        assert 'model_id="resnet"' in line and 'model_version="v3"' in line and 'service_name="classifier"' in line
        assert backend.wait_for_items(Signal.TRACES, 2, timeout=60)

    spans = {span.name: span for _, _, span in backend.spans()}
    assert set(spans) == {"POST /predict", "ml.forward resnet"}, "only the force-kept request's trace"
    for span in spans.values():
        got = {kv.key: kv.value for kv in span.attributes}
        assert got[attr.REQUEST_ID].string_value == "req-kept"
        assert got[attr.SAMPLING_FORCE_KEEP].bool_value is True
        assert got[attr.SAMPLING_POLICY].string_value == "debug"
    forward = {kv.key: kv.value.string_value for kv in spans["ml.forward resnet"].attributes}
    assert (forward[attr.ML_MODEL_ID], forward[attr.ML_MODEL_VERSION]) == ("resnet", "v3")
