"""``audit_fields``: the audit branch reduces each request to what a record reads before its redaction.

The bar: the records are exactly those of the whole request redacted, and the fragments carry the same
facts (a repeated span, e.g. a generate loop's forward spans, is left out: its facts are kept once), on random
requests full of PII and secrets in every place a record reads (ids, tags, payloads, prompt events,
span names, status messages) and in places it does not, under several rule sets (masking, dropping,
hashing, key rules on record fields, allowlist mode), on both scanner paths (the redaction processor
takes its object path under SIDECAR_PURE_PYTHON=1).
"""

from __future__ import annotations

import random
import urllib.request

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidecar import wire
from sidecar.audit.records import _EVENT_KEYS, _KEYS, _TAG_PREFIX, extract, reduce
from sidecar.audit.store import Query
from sidecar.audit.urls import open_store
from sidecar.component import Kind
from sidecar.config import ComponentId, ConfigError, parse_config
from sidecar.envelope import Envelope
from sidecar.pipeline import Service
from sidecar.processors.redaction import FACTORY as REDACTION
from sidecar.registry import CreateSettings
from sidecar.signals import Signal
from sidecar.telemetry import SelfTelemetry
from sidecar.testing import CollectingConsumer, free_port
from tests.redaction.corpus import LOOKALIKES, PII, sentence

from .spans import App

RULE_SETS = {
    "shipped": {"allow_all_keys": True},
    "key and value rules": {
        "allow_all_keys": True,
        "blocked_values": [{"pattern": "patient-[0-9]{6}", "action": "drop"}, "ticket-[0-9]+"],
        "blocked_key_patterns": ["^tag\\.secret", {"pattern": "^user\\.id$", "action": "hash"}],
        "detectors": {"email": {"action": "hash"}, "phone": {"action": "replace"}, "payment_card": {"action": "drop"}},
    },
    "allowlist": {
        "allow_all_keys": False,
        "allowed_keys": ["service.name", "request.id", "ml.model.id", "ml.model.version", "tag.intent",
                         "gen_ai.prompt", "http.response.status_code", "ml.input.payload"],
    },
}
HMAC_ENV = {"REDACTION_HMAC_KEY": "k" * 32}

RECORD_KEYS = ["request.id", "user.id", "tag.intent", "tag.tenant", "tag.secret", "ml.model.id", "ml.model.version",
               "gen_ai.request.model", "gen_ai.request.temperature", "gen_ai.usage.output_tokens",
               "gen_ai.response.finish_reasons", "ml.input.payload", "ml.output.payload", "http.request.body",
               "http.response.body", "gen_ai.prompt", "gen_ai.completion", "http.response.status_code", "error.type",
               "ml.input.shapes", "ml.device"]
OTHER_KEYS = ["prompt", "http.request.header.authorization", "db.statement", "note", "client.address"]


def _text(rng: random.Random) -> str:
    pick = rng.random()
    if pick < 0.45:
        return sentence(rng.choice(PII)[1])
    if pick < 0.55:
        return rng.choice(["patient-123456 seen", "ticket-42 open", "Bearer abc123def456ghi789"])
    if pick < 0.75:
        return rng.choice(LOOKALIKES)
    return rng.choice(["resnet", "v3", "classify", "cuda:0", "é 推理", ""])


def _value(rng: random.Random, kv) -> None:
    pick = rng.random()
    if pick < 0.6:
        kv.value.string_value = _text(rng)
    elif pick < 0.7:
        kv.value.int_value = rng.choice([200, 404, 503, -1, 2**40])
    elif pick < 0.75:
        kv.value.double_value = 0.7
    elif pick < 0.8:
        kv.value.bool_value = True
    elif pick < 0.9:
        for _ in range(rng.randrange(0, 3)):
            kv.value.array_value.values.add().string_value = _text(rng)
    else:
        inner = kv.value.kvlist_value.values.add(key=rng.choice(["email", "text"]))
        inner.value.string_value = _text(rng)


def _request(rng: random.Random) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    for _ in range(rng.randrange(1, 3)):
        rs = req.resource_spans.add()
        rs.resource.attributes.add(key="service.name").value.string_value = rng.choice(["classifier", _text(rng)])
        rs.resource.attributes.add(key="owner").value.string_value = _text(rng)
        for _ in range(rng.randrange(1, 3)):
            ss = rs.scope_spans.add()
            ss.scope.name = "torch"
            ss.scope.attributes.add(key="note").value.string_value = _text(rng)
            for _ in range(rng.randrange(1, 5)):  # traces
                tid, root = rng.randbytes(16), rng.randbytes(8)
                for i in range(rng.randrange(1, 5)):
                    sp = ss.spans.add(trace_id=tid, span_id=root if i == 0 else rng.randbytes(8),
                                      kind=rng.choice([1, 2, 3, 5]) if i == 0 else rng.choice([1, 3]),
                                      name=rng.choice(["POST /predict", "ml.forward resnet", _text(rng)]),
                                      start_time_unix_nano=1_750_000_000_000_000_000 + i,
                                      end_time_unix_nano=1_750_000_000_050_000_000)
                    if i or rng.random() < 0.2:
                        sp.parent_span_id = root if i else rng.randbytes(8)
                    for key in rng.sample(RECORD_KEYS, rng.randrange(0, 8)) + rng.sample(OTHER_KEYS, 2):
                        _value(rng, sp.attributes.add(key=key))
                    if rng.random() < 0.3:
                        sp.status.code = 2
                        sp.status.message = _text(rng)
                    for _ in range(rng.randrange(0, 3)):
                        ev = sp.events.add(name=rng.choice(["gen_ai.content.prompt", _text(rng)]))
                        for key in rng.sample(["gen_ai.prompt", "gen_ai.completion", "note"], 2):
                            _value(rng, ev.attributes.add(key=key))
                    if rng.random() < 0.2:
                        _value(rng, sp.links.add(trace_id=rng.randbytes(16), span_id=rng.randbytes(8))
                               .attributes.add(key="note"))
                    if i and rng.random() < 0.3:  # a repeat (a generate loop's next forward span): same facts
                        again = ss.spans.add()
                        again.CopyFrom(sp)
                        again.span_id, again.name = rng.randbytes(8), _text(rng)
                        if rng.random() < 0.3:
                            _value(rng, again.attributes.add(key=rng.choice(OTHER_KEYS)))  # not what records read
                        if rng.random() < 0.2:  # the same facts in another trace: no repeat
                            again.trace_id = rng.randbytes(16)
    return req


def _fragments(extraction) -> set:
    """The fragments' facts per trace and service: what the store merges into a record. A repeat left out by the
    reduction is a second fragment with the same facts, so the records come out the same."""
    return {(f.trace_id, f.service, repr(sorted(f.fields.items()))) for f in extraction.fragments}


def _redacted(config: dict, body: bytes) -> bytes:
    """``body`` through a real redaction processor (its wire path, or its object path in the pure-Python run)."""
    cfg = REDACTION.config_model.model_validate(config)
    nxt = CollectingConsumer()
    settings = CreateSettings(ComponentId("redaction", "audit"), Kind.PROCESSOR,
                              SelfTelemetry().component("processor", "redaction/audit"))
    REDACTION.create(settings, cfg, nxt).consume(Envelope(Signal.TRACES, encoded=body, items=1))
    (envelope,) = nxt.envelopes
    return envelope.encoded


@pytest.mark.parametrize("rules", list(RULE_SETS), ids=list(RULE_SETS))
def test_records_from_the_reduced_request_equal_records_from_the_whole_one(rules, monkeypatch):
    for name, value in HMAC_ENV.items():
        monkeypatch.setenv(name, value)
    rng = random.Random(f"audit_fields {rules}")
    records = fragments = changed = repeats = 0
    for _ in range(120):
        body = _request(rng).SerializeToString()
        reduced, kept = reduce(body)
        whole = extract(_redacted(RULE_SETS[rules], body))
        part = extract(_redacted(RULE_SETS[rules], reduced))
        assert part.records == whole.records
        assert _fragments(part) == _fragments(whole)
        repeats += sum(len(g.spans) for g in wire.audit_spans(body, _KEYS, _TAG_PREFIX, _EVENT_KEYS)) - kept
        assert kept == sum(len(ss.spans) for rs in ExportTraceServiceRequest.FromString(reduced).resource_spans
                           for ss in rs.scope_spans)
        records += len(whole.records)
        fragments += len(whole.fragments)
        changed += whole != extract(body)
    assert records > 200 and fragments > 10 and changed > 50 and repeats > 50  # the samples did exercise it


def test_nothing_a_record_does_not_read_is_left_for_redaction_to_scan():
    """What the reduction leaves out never reaches the audit branch's redaction or store: spans of no
    record, attributes a record does not read, links, scopes, event names."""
    req = _request(random.Random(5))
    reduced = ExportTraceServiceRequest.FromString(reduce(req.SerializeToString())[0])
    spans = [sp for rs in reduced.resource_spans for ss in rs.scope_spans for sp in ss.spans]
    assert spans and all(not ss.HasField("scope") for rs in reduced.resource_spans for ss in rs.scope_spans)
    for sp in spans:
        assert not sp.links
        assert {kv.key for kv in sp.attributes} <= set(RECORD_KEYS)
        assert all(not ev.name and {kv.key for kv in ev.attributes} <= {"gen_ai.prompt", "gen_ai.completion"}
                   for ev in sp.events)
    assert len(spans) < sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)


def test_the_branch_stores_the_same_records_and_counts_what_it_left_out(tmp_path):
    port, mport = free_port(), free_port()
    store = f"sqlite:///{tmp_path}/audit.db"
    service = Service(parse_config(f"""
receivers:
  otlp: {{protocols: {{grpc: {{endpoint: 127.0.0.1:{port}}}}}}}
processors:
  audit_fields: {{}}
  redaction/audit: {{allow_all_keys: true}}
exporters:
  audit: {{store: "{store}"}}
service:
  telemetry: {{metrics: {{address: 127.0.0.1:{mport}}}}}
  pipelines:
    traces/audit: {{receivers: [otlp], processors: [audit_fields, redaction/audit], exporters: [audit]}}
""", environ={}))
    service.start()
    try:
        app = App()
        for i in range(5):
            app.request(f"req-{i}", user="jane.doe@example.com", payload_in="call me at (555) 123-4567")
        spans = app.exporter.get_finished_spans()
        expected = extract(_redacted({"allow_all_keys": True}, app.take().SerializeToString())).records
        for sp in spans:
            app.exporter.export([sp])  # put them back for the SDK client below
        client = OTLPSpanExporter(endpoint=f"127.0.0.1:{port}", insecure=True)
        assert client.export(app.exporter.get_finished_spans()) is SpanExportResult.SUCCESS
        client.shutdown()
        got = open_store(store).open().query(Query())
        assert [r.to_json() for r in got] == [r.to_json() for r in sorted(expected, key=lambda r: r.time_unix_nano)]
        assert len(got) == 5 and not any("@" in r.user_id or "555" in r.input_payload for r in got)
        text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
        # the postprocess spans carry no record field: left out, and counted
        assert ('sidecar_items_dropped_total{component="audit_fields",intended="true",kind="processor",'
                'reason="filtered",signal="traces"} 5.0') in text, text
    finally:
        service.shutdown(5)


def test_it_cannot_feed_an_exporter_that_reads_more_than_a_record():
    with pytest.raises(ConfigError) as e:
        parse_config("""
receivers: {otlp: {protocols: {grpc: {endpoint: 127.0.0.1:4317}}}}
processors: {audit_fields: {}}
exporters: {audit: {store: "sqlite:///tmp/a.db"}, debug: {}}
service:
  pipelines:
    traces: {receivers: [otlp], processors: [audit_fields], exporters: [audit, debug]}
""", environ={})
    assert ("service.pipelines.traces.processors[0]: processor 'audit_fields' keeps only what audit exporters "
            "read, so it cannot feed exporter 'debug' (service.pipelines.traces.exporters[1])") in str(e.value)
