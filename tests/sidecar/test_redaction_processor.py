"""The ``redaction`` processor: PII sent by the real OTel SDK through a running sidecar never reaches the backend."""

from __future__ import annotations

import pytest
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry._logs import SeverityNumber
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Link, Status, StatusCode
from prometheus_client import generate_latest

from redaction import RedactionConfigError
from sidecar.envelope import Envelope
from sidecar.component import Kind, Refused
from sidecar.config import ComponentId, ConfigError, parse_config
from sidecar.pipeline import Service
from sidecar.processors.redaction import FACTORY, RedactionProcessor
from sidecar.registry import CreateSettings
from sidecar.signals import Signal
from sidecar.telemetry import SelfTelemetry
from sidecar.testing import CollectingConsumer, Counted, OTLPBackend, free_port
from tests.redaction.corpus import LOOKALIKES, PII, PREFIX, SUFFIX, secret_core, sentence
from tests.redaction.test_otlp import metrics, traces

CONFIG = """
receivers:
  otlp:
    protocols:
      grpc: {{endpoint: "127.0.0.1:{port}"}}
processors:
  redaction:
    summary: debug
    blocked_values: ["patient-[0-9]{{6}}"]
exporters:
  otlp:
    endpoint: "{backend}"
    tls: {{insecure: true}}
    sending_queue: {{enabled: false}}
service:
  telemetry: {{metrics: {{address: null}}}}
  pipelines:
    traces: {{receivers: [otlp], processors: [redaction], exporters: [otlp]}}
    logs: {{receivers: [otlp], processors: [redaction], exporters: [otlp]}}
    metrics: {{receivers: [otlp], processors: [redaction], exporters: [otlp]}}
"""


@pytest.fixture(autouse=True, params=["wire", "object"])
def redaction_path(request, monkeypatch):
    """Every test runs on the wire path (with whichever half of ``sidecar.wire_redaction`` is in use:
    C, or pure Python under SIDECAR_PURE_PYTHON=1) and on the object path."""
    from sidecar.processors import redaction as processor

    monkeypatch.setattr(processor, "WIRE", request.param == "wire")
    return request.param


@pytest.fixture
def sidecar():
    with OTLPBackend() as backend:
        port = free_port()
        service = Service(parse_config(CONFIG.format(port=port, backend=backend.endpoint)))
        service.start()
        try:
            yield f"127.0.0.1:{port}", backend, service
        finally:
            service.shutdown(timeout=5)


def test_sdk_spans_and_logs_through_the_sidecar_carry_no_pii(sidecar):
    endpoint, backend, service = sidecar
    corpus = [sentence(s) for _, s in PII] + [sentence("patient-123456")]
    resource = Resource.create({"service.name": "classifier", "deployment.owner": sentence("ops@example.com")})

    tp = TracerProvider(resource=resource)
    tp.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
    tracer = tp.get_tracer("test.redaction", attributes={"scope.note": sentence("ops@example.com")})
    with tracer.start_as_current_span("linked") as other:
        pass
    for i, text in enumerate(corpus):
        with tracer.start_as_current_span("POST /predict",
                                          links=[Link(other.get_span_context(), {"link.note": text})]) as span:
            span.set_attribute("gen_ai.prompt", text)
            span.set_attribute("prompts", [text, "clean"])
            span.set_attribute("ml.model.id", "resnet50")
            span.add_event("exception", {"exception.message": text,
                                         "exception.stacktrace": f"Traceback ...\nValueError: {text}"})
            span.set_status(Status(StatusCode.ERROR, text))
    tp.shutdown()

    lp = LoggerProvider(resource=resource)
    lp.add_log_record_processor(SimpleLogRecordProcessor(OTLPLogExporter(endpoint=endpoint, insecure=True)))
    logger = lp.get_logger("test.redaction")
    for text in corpus:
        logger.emit(body=text, attributes={"user.note": text}, severity_number=SeverityNumber.ERROR)
    lp.shutdown()

    assert backend.wait_for_items(Signal.TRACES, len(corpus) + 1, timeout=20)
    assert backend.wait_for_items(Signal.LOGS, len(corpus), timeout=20)
    received = b"".join(r.SerializeToString() for s in (Signal.TRACES, Signal.LOGS) for r in backend.requests[s])
    for _, secret in PII:
        assert secret_core(secret).encode() not in received, secret
    assert b"patient-123456" not in received and b"ops@example.com" not in received
    # the surrounding text survives everywhere: per span gen_ai.prompt, prompts[0], exception.message,
    # exception.stacktrace, link.note, status; per log record body and user.note
    items = b"".join([s.SerializeToString() for _, _, s in backend.spans()]
                     + [r.SerializeToString() for _, _, r in backend.log_records()])
    assert items.count(PREFIX.encode()) == items.count(SUFFIX.encode()) == len(corpus) * (6 + 2)
    resource, scope, _ = backend.spans()[0]
    assert {kv.key: kv.value.string_value for kv in resource.attributes}["deployment.owner"] == \
        f"{PREFIX} [EMAIL] {SUFFIX}"
    assert scope.attributes[0].value.string_value == f"{PREFIX} [EMAIL] {SUFFIX}"
    spans = [s for _, _, s in backend.spans() if s.name == "POST /predict"]
    first = {kv.key: kv.value for kv in spans[0].attributes}
    assert first["gen_ai.prompt"].string_value == f"{PREFIX} [EMAIL] {SUFFIX}"
    assert first["ml.model.id"].string_value == "resnet50"
    assert first["redaction.masked.count"].int_value >= 5

    metrics_text = generate_latest(service.telemetry.registry).decode()
    assert 'sidecar_redaction_values_total{action="mask",component="redaction",rule="email"}' in metrics_text
    assert 'rule="blocked_values[0]"' in metrics_text
    tel = service.telemetry.component("processor", "redaction")
    assert tel.value("received", Signal.TRACES) == tel.value("accepted", Signal.TRACES) == len(corpus) + 1


def test_metrics_data_points_are_redacted(sidecar):
    endpoint, backend, service = sidecar
    consumer = service.graph.processors["redaction"]
    req = metrics(sentence("jane@example.com"))
    consumer.consume(Envelope(Signal.METRICS, req))
    assert backend.wait_for_items(Signal.METRICS, 5, timeout=20)
    data = b"".join(r.SerializeToString() for r in backend.requests[Signal.METRICS])
    assert b"jane@example.com" not in data and data.count(PREFIX.encode()) == 11


def make(config: dict) -> tuple[RedactionProcessor, CollectingConsumer, SelfTelemetry]:
    """The processor alone, with a collecting next stage."""
    tel = SelfTelemetry()
    cfg = FACTORY.config_model.model_validate(config)
    nxt = CollectingConsumer()
    settings = CreateSettings(ComponentId("redaction"), Kind.PROCESSOR, tel.component("processor", "redaction"))
    return FACTORY.create(settings, cfg, nxt), nxt, tel


def test_lookalikes_pass_through_untouched():
    proc, nxt, _ = make({})
    req = traces(" | ".join(LOOKALIKES))
    before = req.SerializeToString()
    proc.consume(Envelope(Signal.TRACES, req))
    assert nxt.of(Signal.TRACES)[0].SerializeToString() == before


def test_concurrent_requests_through_chained_redaction_processors_are_redacted_as_one_by_one():
    """Requests are scanned one at a time (redaction._engine.SCAN_LOCK) but never while the next stage
    runs: four threads meet inside the last stage at once (a barrier, which a held lock would break by
    timing out), through two redaction processors in a row (which a held lock would deadlock)."""
    import threading

    first, _, _ = make({})
    second, nxt, _ = make({"blocked_values": ["patient-[0-9]{6}"]})
    first._next = second
    barrier = threading.Barrier(4, timeout=60)
    inner = nxt.consume

    def meet_then_collect(envelope):
        barrier.wait()
        inner(envelope)

    nxt.consume = meet_then_collect
    bodies = [f"user{i}@example.com paid with 4111 1111 1111 1111, record patient-00012{i}" for i in range(4)]
    errors = []

    def send(body):
        try:
            first.consume(Envelope(Signal.TRACES, traces(body)))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=send, args=(b,), daemon=True) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors and all(not t.is_alive() for t in threads)
    out = sorted(str(m) for m in nxt.of(Signal.TRACES))
    alone, alone_next, _ = make({})
    alone_second, alone_nxt, _ = make({"blocked_values": ["patient-[0-9]{6}"]})
    alone._next = alone_second
    for b in bodies:
        alone.consume(Envelope(Signal.TRACES, traces(b)))
    assert out == sorted(str(m) for m in alone_nxt.of(Signal.TRACES))
    assert len(out) == 4 and not any("@example.com" in m or "patient-0" in m or "4111" in m for m in out)


def test_refusal_from_next_stage_is_propagated_and_counted_once_where_it_happened():
    proc, nxt, tel = make({})
    nxt.refuse = Refused("queue_full")
    exporter_tel = tel.component("exporter", "otlp")
    proc._next = Counted(nxt, exporter_tel)  # the graph's edges: into redaction, and into the exporter
    counted = Counted(proc, tel.component("processor", "redaction"))
    with pytest.raises(Refused) as e:
        counted.consume(Envelope(Signal.TRACES, traces("x")))
    assert e.value.reason == "queue_full"  # the sender is told why
    c = tel.component("processor", "redaction")
    assert c.value("received", Signal.TRACES) == 1 and c.value("accepted", Signal.TRACES) == 0
    assert c.value("refused", Signal.TRACES, "queue_full") == 0  # not a second alert for one event
    assert exporter_tel.value("refused", Signal.TRACES, "queue_full") == 1


def test_redaction_failure_fails_closed(monkeypatch, redaction_path):
    from sidecar import wire_redaction

    proc, nxt, _ = make({})

    def boom(*_a, **_k):
        raise RuntimeError("bug")

    if redaction_path == "wire":
        monkeypatch.setattr(wire_redaction, "splice", boom)
    else:  # the object path, also when the wire path hands a request back to it
        from sidecar.processors import redaction as processor

        monkeypatch.setattr(processor, "WIRE", True)
        monkeypatch.setattr(wire_redaction, "locate", lambda *_a: (_ for _ in ()).throw(ValueError("malformed")))
        monkeypatch.setattr(proc.redactor, "redact_traces", boom)
    with pytest.raises(Refused) as e:
        proc.consume(Envelope(Signal.TRACES, traces(sentence("jane@example.com"))))
    assert not e.value.retryable and nxt.of(Signal.TRACES) == []


def test_config_errors_name_the_yaml_path():
    bad = CONFIG.format(port=1, backend="127.0.0.1:2").replace(
        'blocked_values: ["patient-[0-9]{6}"]',
        'blocked_values: ["ok", "(foo"]\n    detectors: {phone: {action: nope}, emial: true}')
    with pytest.raises(ConfigError) as e:
        parse_config(bad)
    assert "processors.redaction.blocked_values[1]: invalid regex '(foo': missing )" in e.value.problems
    assert "processors.redaction.detectors.emial: unknown key" in e.value.problems
    assert any(p.startswith("processors.redaction.detectors.phone.action:") for p in e.value.problems)


def test_hash_without_key_stops_start_up(monkeypatch):
    monkeypatch.delenv("REDACTION_HMAC_KEY", raising=False)
    cfg = CONFIG.format(port=free_port(), backend="127.0.0.1:2").replace(
        'blocked_values: ["patient-[0-9]{6}"]', 'detectors: {email: {action: hash}}')
    with pytest.raises(RedactionConfigError) as e:
        Service(parse_config(cfg))
    assert "processors.redaction.hash_key_env: environment variable REDACTION_HMAC_KEY is not set" in str(e.value)


def test_hashing_in_the_sidecar_is_stable_across_instances(monkeypatch):
    monkeypatch.setenv("REDACTION_HMAC_KEY", "fleet-key")
    outs = []
    for _ in range(2):
        proc, nxt, _ = make({"blocked_key_patterns": [{"pattern": "^user\\.id$", "action": "hash"}]})
        req = traces("clean")
        req.resource_spans[0].scope_spans[0].spans[0].attributes.add(key="user.id").value.string_value = "u-42"
        proc.consume(Envelope(Signal.TRACES, req))
        span = nxt.of(Signal.TRACES)[0].resource_spans[0].scope_spans[0].spans[0]
        outs.append({kv.key: kv.value.string_value for kv in span.attributes}["user.id"])
    assert outs[0] == outs[1] and "u-42" not in outs[0] and len(outs[0]) == 64
