"""The protobuf adapter: PII in every covered field of traces, logs and metrics is redacted in place."""

from __future__ import annotations

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from redaction import RedactionConfig, RedactionEngine
from redaction.otlp import OtlpRedactor
from tests.redaction.corpus import LOOKALIKES, PII, PREFIX, SUFFIX, secret_core, sentence


def _set(attrs, key: str, value) -> None:
    kv = attrs.add()
    kv.key = key
    if isinstance(value, str):
        kv.value.string_value = value
    else:
        kv.value.int_value = value


def traces(text: str) -> ExportTraceServiceRequest:
    """``text`` in every field the adapter covers."""
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    _set(rs.resource.attributes, "service.name", "classifier")
    _set(rs.resource.attributes, "deployment.note", text)
    ss = rs.scope_spans.add()
    ss.scope.name = "instrumentation.torch"
    _set(ss.scope.attributes, "scope.note", text)
    span = ss.spans.add(name="POST /predict", trace_id=b"\x01" * 16, span_id=b"\x02" * 8)
    _set(span.attributes, "gen_ai.prompt", text)
    _set(span.attributes, "gen_ai.usage.input_tokens", 512)
    arr = span.attributes.add(key="prompts").value.array_value
    arr.values.add().string_value = text
    arr.values.add().string_value = "clean"
    ev = span.events.add(name="exception")
    _set(ev.attributes, "exception.message", text)
    _set(ev.attributes, "exception.stacktrace", f'Traceback:\n  File "app.py", line 3\nValueError: {text}')
    link = span.links.add(trace_id=b"\x03" * 16, span_id=b"\x04" * 8)
    _set(link.attributes, "link.note", text)
    span.status.code = 2
    span.status.message = text
    return req


def logs(text: str) -> ExportLogsServiceRequest:
    req = ExportLogsServiceRequest()
    rl = req.resource_logs.add()
    _set(rl.resource.attributes, "deployment.note", text)
    sl = rl.scope_logs.add()
    _set(sl.scope.attributes, "scope.note", text)
    plain = sl.log_records.add(severity_number=17)
    plain.body.string_value = text
    _set(plain.attributes, "exception.message", text)
    structured = sl.log_records.add(severity_number=9)
    kvs = structured.body.kvlist_value.values
    _set(kvs, "message", text)
    nested = kvs.add(key="request").value.kvlist_value.values
    _set(nested, "input", text)
    lst = kvs.add(key="history").value.array_value.values
    lst.add().string_value = text
    lst.add().kvlist_value.values.add(key="turn").value.string_value = text
    raw = sl.log_records.add()
    raw.body.bytes_value = b"\x00\x01 left alone"
    return req


def metrics(text: str) -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    _set(rm.resource.attributes, "deployment.note", text)
    sm = rm.scope_metrics.add()
    _set(sm.scope.attributes, "scope.note", text)
    for kind in ("gauge", "sum", "histogram", "exponential_histogram", "summary"):
        m = sm.metrics.add(name=f"m.{kind}")
        dp = getattr(m, kind).data_points.add()
        _set(dp.attributes, "label", text)
        if kind != "summary":
            _set(dp.exemplars.add().filtered_attributes, "user.note", text)
    return req


BUILDERS = {"traces": traces, "logs": logs, "metrics": metrics}
PLACES = {"traces": 8, "logs": 8, "metrics": 11}  # how many copies of the text each builder writes


@pytest.fixture(scope="module")
def redactor() -> OtlpRedactor:
    return OtlpRedactor(RedactionEngine(RedactionConfig(summary="debug")))


@pytest.mark.parametrize("signal", BUILDERS)
@pytest.mark.parametrize(("detector", "secret"), PII, ids=[f"{d}:{s[:18]}" for d, s in PII])
def test_pii_is_gone_from_every_field(redactor, signal, detector, secret):
    req = BUILDERS[signal](sentence(secret))
    assert list(redactor.engine.wire_candidates([req], type(req).SerializeToString))  # never hides a secret
    redactor.redact(signal, req)
    data = req.SerializeToString()
    assert secret_core(secret).encode() not in data
    # the text around the secret survives in every place
    assert data.count(f"{PREFIX} ".encode()) == PLACES[signal]
    assert data.count(f" {SUFFIX}".encode()) == PLACES[signal]


@pytest.mark.parametrize("signal", BUILDERS)
def test_lookalikes_pass_unchanged(redactor, signal):
    text = " | ".join(LOOKALIKES)
    req = BUILDERS[signal](text)
    before = req.SerializeToString()
    assert redactor.redact(signal, req) == {}
    assert req.SerializeToString() == before


def test_span_summary_and_structure(redactor):
    req = traces(sentence("jane@example.com"))
    redactor.redact_traces(req)
    span = req.resource_spans[0].scope_spans[0].spans[0]
    attrs = {kv.key: kv.value for kv in span.attributes}
    assert attrs["gen_ai.prompt"].string_value == f"{PREFIX} [EMAIL] {SUFFIX}"
    assert attrs["gen_ai.usage.input_tokens"].int_value == 512
    assert [v.string_value for v in attrs["prompts"].array_value.values] == [f"{PREFIX} [EMAIL] {SUFFIX}", "clean"]
    assert span.status.message == f"{PREFIX} [EMAIL] {SUFFIX}"
    assert span.name == "POST /predict"
    # prompt, prompts[0], 2 event attributes, 1 link attribute, status message
    assert attrs["redaction.masked.count"].int_value == 6
    assert attrs["redaction.masked.keys"].string_value == \
        "exception.message,exception.stacktrace,gen_ai.prompt,link.note,prompts,status.message"


def test_drop_and_replace_actions_on_protobuf():
    r = OtlpRedactor(RedactionEngine(RedactionConfig(
        detectors={"email": {"action": "drop"}, "us_ssn": {"action": "replace"}},
        blocked_key_patterns=[{"pattern": "^internal\\.", "action": "drop"}])))
    req = logs(sentence("jane@example.com"))
    lr = req.resource_logs[0].scope_logs[0].log_records[0]
    _set(lr.attributes, "internal.debug", "x")
    _set(lr.attributes, "ssn", "ssn 123-45-6789 here")
    _set(lr.attributes, "keep", "fine")
    r.redact_logs(req)
    lr = req.resource_logs[0].scope_logs[0].log_records[0]
    attrs = {kv.key: kv.value for kv in lr.attributes}
    assert set(attrs) == {"ssn", "keep", "redaction.masked.count", "redaction.redacted.count"}
    assert attrs["ssn"].string_value == "[SSN]"
    assert attrs["redaction.redacted.count"].int_value == 3  # exception.message and body (email), internal.debug
    assert lr.body.WhichOneof("value") is None  # the string body held an email: dropped
    structured = req.resource_logs[0].scope_logs[0].log_records[1].body.kvlist_value.values
    assert [kv.key for kv in structured] == ["request", "history"]  # 'message' dropped
    assert list(structured[1].value.array_value.values)[0].WhichOneof("value") == "kvlist_value"


def test_blocked_keys_on_protobuf_keep_value_types_sane():
    r = OtlpRedactor(RedactionEngine(RedactionConfig(summary="silent")))
    req = traces("clean")
    span = req.resource_spans[0].scope_spans[0].spans[0]
    _set(span.attributes, "http.request.header.authorization", "Bearer abcdefgh12345678")
    _set(span.attributes, "db.password", 1234)
    r.redact_traces(req)
    attrs = {kv.key: kv.value for kv in span.attributes}
    assert attrs["http.request.header.authorization"].string_value == "[REDACTED]"
    assert attrs["db.password"].string_value == "[REDACTED]"
    assert "redaction.masked.count" not in attrs
    assert r.engine.stats.get("password", "replace") == 1


def test_second_redaction_stage_updates_the_summary_instead_of_duplicating_it(redactor):
    req = traces(sentence("jane@example.com"))
    redactor.redact_traces(req)  # the app's stage
    span = req.resource_spans[0].scope_spans[0].spans[0]
    _set(span.attributes, "late.note", "ssn 123-45-6789")
    redactor.redact_traces(req)  # the sidecar's stage
    keys = [kv.key for kv in span.attributes]
    assert keys.count("redaction.masked.count") == 1 and keys.count("redaction.masked.keys") == 1
    attrs = {kv.key: kv.value for kv in span.attributes}
    assert attrs["redaction.masked.count"].int_value == 7
    assert "late.note" in attrs["redaction.masked.keys"].string_value.split(",")


# --- names: masked in place, never dropped, so they stay groupable ------------------------------

def _named(span_name: str, event_name: str) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    span = req.resource_spans.add().scope_spans.add().spans.add(
        name=span_name, trace_id=b"\x01" * 16, span_id=b"\x02" * 8)
    span.events.add(name=event_name)
    return req


def test_pii_in_span_and_event_names_is_masked_in_place():
    req = _named("GET /users/jane.doe@example.com/card/4111111111111111", "retry for bob@example.org")
    tally = OtlpRedactor(RedactionEngine()).redact_traces(req)
    span = req.resource_spans[0].scope_spans[0].spans[0]
    assert span.name == "GET /users/[EMAIL]/card/[CARD]"
    assert span.events[0].name == "retry for [EMAIL]"
    assert sum(tally.values()) == 3
    counts = {kv.key: kv.value.int_value for kv in span.attributes}
    assert counts.get("redaction.masked.count") == 2


def test_a_name_is_masked_even_when_the_rule_drops_or_hashes_values():
    """A drop or hash rule would empty the name or make it unique per user: both break grouping."""
    engine = RedactionEngine(RedactionConfig.model_validate(
        {"hash_key_env": "K", "detectors": {"email": {"action": "drop"}, "payment_card": {"action": "hash"}}}),
        environ={"K": "k"})
    req = _named("GET /users/jane.doe@example.com/card/4111111111111111", "ok")
    OtlpRedactor(engine).redact_traces(req)
    name = req.resource_spans[0].scope_spans[0].spans[0].name
    assert name.startswith("GET /users/[") and "example.com" not in name and "4111" not in name
    assert name == "GET /users/[EMAIL]/card/[PAYMENT_CARD]"


@pytest.mark.parametrize("name", ["POST /predict", "GET /v1/models/resnet50:predict", "db.query orders 2024-01-02"])
def test_clean_names_are_left_alone(name):
    req = _named(name, name)
    OtlpRedactor(RedactionEngine()).redact_traces(req)
    span = req.resource_spans[0].scope_spans[0].spans[0]
    assert (span.name, span.events[0].name) == (name, name)
