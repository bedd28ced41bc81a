"""In-process redaction: the real OTel SDK with the redacting exporters; PII never reaches the exporter."""

from __future__ import annotations

import threading
import time

import pytest
from opentelemetry._logs import SeverityNumber
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor, InMemoryLogRecordExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, Status, StatusCode

from instrumentation.redaction import (
    RedactingLogExporter,
    RedactingSpanExporter,
    RedactionConfig,
    RedactionEngine,
    load_redaction_config,
)
from tests.redaction.corpus import LOOKALIKES, PII, PREFIX, SUFFIX, secret_core, sentence

CORPUS = [sentence(s) for _, s in PII]
MASKED_EMAIL = f"{PREFIX} [EMAIL] {SUFFIX}"


class ThreadRecordingExporter(InMemorySpanExporter):
    def export(self, spans):
        self.thread = threading.current_thread()
        return super().export(spans)


def _dump_spans(spans) -> str:
    parts = []
    for s in spans:
        parts.append(repr(dict(s.attributes)))
        parts.extend(repr(dict(e.attributes)) for e in s.events)
        parts.extend(repr(dict(link.attributes)) for link in s.links)
        parts.append(str(s.status.description))
        parts.append(repr(dict(s.resource.attributes)))
        parts.append(repr(dict(s.instrumentation_scope.attributes or {})))
    return "\n".join(parts)


def test_spans_reach_the_exporter_redacted_from_the_worker_thread():
    sink = ThreadRecordingExporter()
    resource = Resource.create({"service.name": "classifier", "deployment.owner": sentence("ops@example.com")})
    tp = TracerProvider(resource=resource)
    tp.add_span_processor(BatchSpanProcessor(RedactingSpanExporter(sink, RedactionConfig(summary="debug")),
                                             schedule_delay_millis=10))
    tracer = tp.get_tracer("app", attributes={"scope.note": sentence("ops@example.com")})
    with tracer.start_as_current_span("other") as other:
        pass
    originals = []
    for text in CORPUS:
        with tracer.start_as_current_span("POST /predict",
                                          links=[Link(other.get_span_context(), {"link.note": text})]) as span:
            span.set_attribute("gen_ai.prompt", text)
            span.set_attribute("prompts", [text, "clean"])
            span.set_attribute("ml.model.id", "resnet50")
            span.set_attribute("gen_ai.usage.input_tokens", 512)
            span.set_attribute("http.request.header.authorization", "Basic dXNlcjpwYXNzd29yZA==")
            span.add_event("exception", {"exception.message": text, "exception.stacktrace": f"Traceback\n{text}"})
            span.set_status(Status(StatusCode.ERROR, text))
            originals.append(span)
    # no force_flush: that would export on this thread; the batch worker must do it on its own
    deadline = time.monotonic() + 20
    while len(sink.get_finished_spans()) < len(CORPUS) + 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sink.thread is not threading.main_thread()  # redaction ran on the batch worker
    spans = [s for s in sink.get_finished_spans() if s.name == "POST /predict"]
    assert len(spans) == len(CORPUS)
    dump = _dump_spans(spans)
    for _, secret in PII:
        assert secret_core(secret) not in dump, secret
    assert "ops@example.com" not in dump and "dXNlcjpwYXNzd29yZA" not in dump
    assert dump.count(PREFIX) == dump.count(SUFFIX) == len(CORPUS) * 6 + 2 * len(spans)  # + resource, scope
    first = spans[0]
    assert first.attributes["gen_ai.prompt"] == MASKED_EMAIL
    assert first.attributes["prompts"] == (MASKED_EMAIL, "clean")
    assert first.attributes["ml.model.id"] == "resnet50" and first.attributes["gen_ai.usage.input_tokens"] == 512
    assert first.attributes["http.request.header.authorization"] == "[REDACTED]"
    assert first.attributes["redaction.masked.count"] == 7
    assert first.status.status_code is StatusCode.ERROR and first.status.description == MASKED_EMAIL
    assert first.context == originals[0].get_span_context() and first.kind is originals[0].kind
    # the app's own span objects are untouched: redaction works on copies
    assert originals[0].attributes["gen_ai.prompt"] == CORPUS[0]
    tp.shutdown()


def test_clean_spans_pass_through_as_the_same_objects():
    raw = InMemorySpanExporter()
    tp = TracerProvider(span_limits=SpanLimits(max_attributes=3))
    tp.add_span_processor(SimpleSpanProcessor(raw))
    tracer = tp.get_tracer("app")
    with tracer.start_as_current_span("clean") as span:
        for i, text in enumerate(LOOKALIKES[:3]):
            span.set_attribute(f"a{i}", text)
    with tracer.start_as_current_span("dirty") as dirty:
        for i in range(5):
            dirty.set_attribute(f"a{i}", "bob@example.com")
    clean_in, dirty_in = raw.get_finished_spans()
    sink = InMemorySpanExporter()
    assert RedactingSpanExporter(sink).export([clean_in, dirty_in]) is SpanExportResult.SUCCESS
    clean_out, dirty_out = sink.get_finished_spans()
    assert clean_out is clean_in  # nothing to change: no copy
    assert dirty_out is not dirty_in and dict(dirty_out.attributes) == {f"a{i}": "[EMAIL]" for i in (2, 3, 4)} | {
        "redaction.masked.count": 3}
    assert dirty_out.dropped_attributes == 2  # the limits' drop count survives the copy
    tp.shutdown()


def test_log_records_reach_the_exporter_redacted():
    sink = InMemoryLogRecordExporter()
    lp = LoggerProvider(resource=Resource.create({"service.name": "classifier"}))
    lp.add_log_record_processor(BatchLogRecordProcessor(RedactingLogExporter(sink)))
    logger = lp.get_logger("app")
    for text in CORPUS:
        logger.emit(body=text, attributes={"user.note": text, "password": "hunter2"},
                    severity_number=SeverityNumber.ERROR)
        logger.emit(body={"message": text, "request": {"input": text, "n": 3}, "history": [text, "ok"]},
                    severity_number=SeverityNumber.INFO)
    lp.force_flush()
    records = sink.get_finished_logs()
    assert len(records) == 2 * len(CORPUS)
    dump = "\n".join(f"{r.log_record.body!r} {dict(r.log_record.attributes)!r}" for r in records)
    for _, secret in PII:
        assert secret_core(secret) not in dump, secret
    assert "hunter2" not in dump
    assert dump.count(PREFIX) == dump.count(SUFFIX) == len(CORPUS) * 5
    plain, structured = records[0].log_record, records[1].log_record
    assert plain.body == MASKED_EMAIL and plain.attributes["password"] == "[REDACTED]"
    assert structured.body == {"message": MASKED_EMAIL, "request": {"input": MASKED_EMAIL, "n": 3},
                               "history": [MASKED_EMAIL, "ok"]}
    assert plain.trace_id == 0 and plain.severity_number is SeverityNumber.ERROR
    lp.shutdown()


def test_config_from_the_sidecar_yaml(tmp_path, monkeypatch):
    monkeypatch.setenv("REDACTION_HMAC_KEY", "fleet-key")
    path = tmp_path / "sidecar.yaml"
    path.write_text("processors:\n  redaction:\n    summary: silent\n"
                    "    blocked_key_patterns: [{pattern: '^user\\.id$', action: hash}]\n"
                    "    detectors: {email: false}\n")
    sink = InMemorySpanExporter()
    engine = RedactionEngine(load_redaction_config(path))
    tp = TracerProvider()
    tp.add_span_processor(BatchSpanProcessor(RedactingSpanExporter(sink, engine)))
    with tp.get_tracer("app").start_as_current_span("s") as span:
        span.set_attribute("user.id", "u-42")
        span.set_attribute("contact", "bob@example.com 123-45-6789")
    tp.force_flush()
    (out,) = sink.get_finished_spans()
    assert out.attributes["user.id"] == engine.hash(b"u-42")
    assert out.attributes["contact"] == "bob@example.com [SSN]"
    assert "redaction.masked.count" not in out.attributes
    assert engine.stats.get("us_ssn", "mask") == 1
    tp.shutdown()


def test_a_failing_redaction_exports_nothing(monkeypatch):
    sink = InMemorySpanExporter()
    exporter = RedactingSpanExporter(sink)
    tp = TracerProvider()
    tp.add_span_processor(BatchSpanProcessor(exporter))
    with tp.get_tracer("app").start_as_current_span("s") as span:
        span.set_attribute("a", "bob@example.com")

    def boom(*_a, **_k):
        raise RuntimeError("bug")

    monkeypatch.setattr("instrumentation.redaction.redact_roots", boom)
    assert exporter.export([span]) is SpanExportResult.FAILURE
    assert sink.get_finished_spans() == ()
    tp.shutdown()


def test_hash_rule_without_key_fails_at_construction(monkeypatch):
    monkeypatch.delenv("REDACTION_HMAC_KEY", raising=False)
    with pytest.raises(ValueError, match="REDACTION_HMAC_KEY"):
        RedactingSpanExporter(InMemorySpanExporter(), {"detectors": {"email": {"action": "hash"}}})
