"""The logging bridge and the JSON formatter."""

from __future__ import annotations

import json
import logging
import re

import pytest

from instrumentation import JSONFormatter, LoggingBridge, RequestContext, request_context, set_tags


@pytest.fixture
def app_logger():
    logger = logging.getLogger("test.app")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger
    logger.handlers.clear()


def test_bridge_correlates_with_the_current_span_and_request(spans, logs, app_logger):
    provider, exporter = logs
    app_logger.addHandler(LoggingBridge(logger_provider=provider))
    tracer = spans.provider.get_tracer("t")
    ctx = RequestContext(request_id="r-9", user_id="alice")
    with request_context(ctx), tracer.start_as_current_span("req") as span:
        set_tags(intent="classify")
        app_logger.info("scored %d items", 3, extra={"execution_time_ms": 4.5, "batch": [1, 2]})
    (rec,) = [r.log_record for r in exporter.get_finished_logs()]
    assert rec.body == "scored 3 items"
    assert rec.trace_id == span.get_span_context().trace_id and rec.span_id == span.get_span_context().span_id
    assert rec.severity_text == "INFO" and rec.severity_number.value == 9
    a = rec.attributes
    assert a["execution_time_ms"] == 4.5 and a["batch"] == (1, 2)
    assert a["request.id"] == "r-9" and a["user.id"] == "alice" and a["tag.intent"] == "classify"
    assert spans.finished()[0].attributes["tag.intent"] == "classify"


def test_bridge_exports_exceptions_with_stack_trace_at_error_severity(logs, app_logger):
    provider, exporter = logs
    app_logger.addHandler(LoggingBridge(logger_provider=provider))
    try:
        raise KeyError("missing feature")
    except KeyError:
        app_logger.exception("inference failed")
    (rec,) = [r.log_record for r in exporter.get_finished_logs()]
    assert rec.severity_number.value >= 17
    assert rec.attributes["exception.type"] == "KeyError"
    assert "missing feature" in rec.attributes["exception.message"]
    assert "Traceback" in rec.attributes["exception.stacktrace"]


def test_bridge_ignores_the_sdks_own_loggers(logs):
    provider, exporter = logs
    sdk_logger = logging.getLogger("opentelemetry.exporter.otlp.test")
    handler = LoggingBridge(logger_provider=provider)
    sdk_logger.addHandler(handler)
    try:
        sdk_logger.warning("Transient error StatusCode.UNAVAILABLE")
    finally:
        sdk_logger.removeHandler(handler)
    assert exporter.get_finished_logs() == ()


def _format(record_kwargs: dict, **log) -> dict:
    logger = logging.getLogger("test.json")
    record = logger.makeRecord("test.json", log.get("level", logging.INFO), __file__, 1, log.get("msg", "hello"),
                               (), log.get("exc_info"), extra=record_kwargs)
    return json.loads(JSONFormatter().format(record))


def test_json_formatter_schema(spans):
    tracer = spans.provider.get_tracer("t")
    ctx = RequestContext(request_id="rid-1", user_id="u-2")
    ctx.model_id, ctx.model_version = "resnet", "3"
    with request_context(ctx), tracer.start_as_current_span("req") as span:
        out = _format({"execution_time_ms": 12.0, "error_code": "E42", "tenant": "acme"})
    sc = span.get_span_context()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", out["timestamp"])
    assert out["level"] == "INFO" and out["logger"] == "test.json" and out["message"] == "hello"
    assert out["trace_id"] == format(sc.trace_id, "032x") and out["span_id"] == format(sc.span_id, "016x")
    assert (out["request_id"], out["user_id"], out["model_id"], out["model_version"]) == ("rid-1", "u-2", "resnet", "3")
    assert out["execution_time_ms"] == 12.0 and out["error_code"] == "E42" and out["tenant"] == "acme"


def test_json_formatter_outside_a_request_has_stable_keys_and_exceptions():
    try:
        1 / 0
    except ZeroDivisionError:
        import sys

        out = _format({}, level=logging.ERROR, exc_info=sys.exc_info())
    for key in ("timestamp", "level", "logger", "message", "trace_id", "span_id", "request_id", "user_id",
                "model_id", "model_version", "execution_time_ms", "error_code"):
        assert key in out
    assert out["trace_id"] is None and out["level"] == "ERROR"
    assert "ZeroDivisionError" in out["exception"] and "Traceback" in out["exception"]


def test_json_formatter_applies_in_process_redaction_to_stdout(monkeypatch):
    """stdout (kubectl logs) is a way out of the pod too: the configured rules apply there."""
    import json
    import logging
    import types

    from instrumentation import _setup
    from instrumentation.logs import JSONFormatter
    from redaction import RedactionConfig, RedactionEngine

    monkeypatch.setattr(_setup, "_handle", types.SimpleNamespace(redaction_engine=RedactionEngine(RedactionConfig())))
    record = logging.LogRecord("app", logging.INFO, __file__, 1, "order for %s paid with %s", ("bob@example.com",
                               "4111 1111 1111 1111"), None)
    record.password = "hunter2"
    record.order_id = "1234567812345678"  # fails Luhn: not a card
    line = json.loads(JSONFormatter().format(record))
    assert "bob@example.com" not in json.dumps(line) and "4111 1111 1111 1111" not in json.dumps(line)
    assert line["message"].startswith("order for [EMAIL] paid with ")
    assert line["password"] != "hunter2"
    assert line["order_id"] == "1234567812345678"
    raw = json.loads(JSONFormatter(redact=False).format(record))
    assert "bob@example.com" in raw["message"]
