"""Replay: record real instrumented forward calls, store them as the sidecar would, re-run them against the
same model (100% exact) and a perturbed one (drift per record and in aggregate); replay spans link back."""

import json
import math
import subprocess
import sys

import pytest
import torch
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from instrumentation._payload import PayloadError, decode, decode_call, encode, encode_call
from instrumentation.replay import load_records, replay
from instrumentation.torch import instrument_model, uninstrument_model
from sidecar.audit import Query, extract, open_store
from sidecar.signals import Signal
from tests.instrumentation import replay_models

N = 12


@pytest.fixture
def recorded(tmp_path):
    """N requests served by an instrumented classifier with payload capture on, stored in an audit store."""
    from instrumentation.replay import disable_payload_capture, enable_payload_capture

    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "classifier"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("app")
    model = instrument_model(replay_models.same(), "clf", "1.0", tracer_provider=provider)
    enable_payload_capture()
    try:
        gen = torch.Generator().manual_seed(7)
        for i in range(N):
            with tracer.start_as_current_span("POST /predict", kind=SpanKind.SERVER,
                                              attributes={"request.id": f"req-{i}"}):
                model(torch.randn(4, 8, generator=gen))
    finally:
        disable_payload_capture()
        uninstrument_model(model)
    url = f"sqlite:///{tmp_path}/audit.db"
    store = open_store(url).open()
    store.write(extract(encode_spans(exporter.get_finished_spans())))
    store.close()
    return url


def _cli(*args):
    out = subprocess.run([sys.executable, "-m", "instrumentation.replay", *args], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out


def test_same_model_replays_exactly(recorded):
    report = json.loads(_cli("--audit", recorded, "--model", "tests.instrumentation.replay_models:same",
                             "--json").stdout)
    agg = report["aggregate"]
    assert agg["records"] == agg["replayed"] == agg["compared"] == N
    assert agg["exact_match_rate"] == 1.0 and agg["max_abs_diff"] == 0.0 and agg["label_changes"] == 0
    assert agg["topk_overlap_mean"] == 1.0 and math.isclose(agg["cosine_min"], 1.0)
    assert all(r["exact"] and r["replay_latency_ms"] > 0 for r in report["records"])


def test_perturbed_model_drift_per_record_and_in_aggregate(recorded, tmp_path):
    # through the JSONL export of the audit trail, as an auditor would hand it over
    jsonl = tmp_path / "batch.jsonl"
    out = subprocess.run([sys.executable, "-m", "sidecar", "audit", "query", "--store", recorded,
                          "--model-version", "1.0", "--format", "jsonl"], capture_output=True, text=True, timeout=60)
    jsonl.write_text(out.stdout)
    report = json.loads(_cli("--audit", str(jsonl), "--model", "tests.instrumentation.replay_models:perturbed",
                             "--json").stdout)
    agg, rows = report["aggregate"], report["records"]
    assert agg["replayed"] == N and agg["exact_match_rate"] == 0.0
    assert all(r["max_abs_diff"] > 0 and r["cosine"] < 1 and r["labels"] == 4 for r in rows)
    assert agg["max_abs_diff"] == max(r["max_abs_diff"] for r in rows)
    assert agg["label_changes"] == sum(r["label_changes"] for r in rows) > 0
    assert math.isclose(agg["label_change_rate"], agg["label_changes"] / (4 * N))
    assert 0 < agg["topk_overlap_mean"] <= 1
    table = _cli("--audit", str(jsonl), "--model", "tests.instrumentation.replay_models:perturbed").stdout
    assert "req-0" in table and "NO" in table and "exact match 0.0%" in table


def test_replay_spans_are_marked_and_link_to_the_original(recorded):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    records = load_records(recorded, limit=3)
    report = replay(records, replay_models.same(), model_name="same", tracer_provider=provider)
    spans = exporter.get_finished_spans()
    assert len(spans) == 3 and report.aggregate()["exact_match_rate"] == 1.0
    for span, rec in zip(spans, records):
        assert span.attributes["replay"] is True and span.attributes["replay.exact_match"] is True
        (link,) = span.links
        assert (f"{link.context.trace_id:032x}", f"{link.context.span_id:016x}") == (rec.trace_id, rec.span_id)
        assert span.context.trace_id != link.context.trace_id
    # replays sent to a sidecar are not audited as requests
    assert extract(encode_spans(spans)).records == []


def test_records_without_a_replayable_input_are_reported_not_guessed(recorded):
    store = open_store(recorded).open()
    records = store.query(Query())
    store.close()
    records[0].input_payload = '{"x": [1, 2]}'  # an HTTP body
    records[1].input_payload = encode_call((torch.zeros(1000, 1000),), {}).replace("format", "f0rmat", 0)[:10]
    records[2].input_payload = json.dumps({"format": "ml.tensors/v1", "omitted": "9000 bytes over the 10-byte limit"})
    records[3].input_payload = None
    report = replay(records, replay_models.same())
    reasons = [r.reason for r in report.records[:4]]
    assert "not in the ml.tensors/v1 format" in reasons[0]
    assert "not valid JSON" in reasons[1]
    assert "not recorded: 9000 bytes" in reasons[2]
    assert "capture was off" in reasons[3]
    agg = report.aggregate()
    assert agg["not_replayable"] == 4 and agg["replayed"] == N - 4 and agg["exact_match_rate"] == 1.0


@pytest.mark.parametrize("value", [
    torch.randn(3, 4), torch.randn(2, 2).half(), torch.randn(2, 2).bfloat16(), torch.arange(6).reshape(2, 3),
    torch.tensor([True, False]), torch.tensor([float("nan"), float("inf"), -0.0]), torch.zeros(0, 3),
    {"ids": torch.tensor([[1, 2]]), "mask": [torch.ones(2), None, 3, "text"]},
])
def test_payloads_round_trip_bit_exactly(value):
    back = decode(encode(value))
    flat_a = value if isinstance(value, torch.Tensor) else value["ids"]
    flat_b = back if isinstance(back, torch.Tensor) else back["ids"]
    assert flat_a.dtype == flat_b.dtype and flat_a.shape == flat_b.shape
    assert torch.equal(torch.nan_to_num(flat_a.float(), nan=7.0), torch.nan_to_num(flat_b.float(), nan=7.0))
    if isinstance(value, dict):
        assert torch.equal(back["mask"][0], value["mask"][0]) and back["mask"][1:] == [None, 3, "text"]


def test_over_the_limit_and_unsupported_values_say_why():
    with pytest.raises(PayloadError, match="over the 100-byte limit"):
        decode(encode(torch.zeros(100), max_bytes=100))
    with pytest.raises(PayloadError, match="cannot be recorded"):
        decode_call(encode_call((object(),), {}))
    with pytest.raises(PayloadError, match="cannot be recorded"):
        decode(encode(torch.zeros(2, dtype=torch.complex64)))


def test_bad_model_spec_is_named(recorded):
    for spec, msg in (("nodots", "expected package.module:factory"), ("no.such.module:f", "cannot import"),
                      ("tests.instrumentation.replay_models:missing", "no callable 'missing'")):
        out = subprocess.run([sys.executable, "-m", "instrumentation.replay", "--audit", recorded, "--model", spec],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and msg in out.stderr, out.stderr


def test_cli_sends_replay_spans_over_otlp(recorded):
    from sidecar.testing import OTLPBackend

    with OTLPBackend() as backend:
        _cli("--audit", recorded, "--model", "tests.instrumentation.replay_models:same", "--limit", "2",
             "--otlp-endpoint", backend.endpoint, "--service-name", "replayer")
        assert backend.wait_for_items(Signal.TRACES, 2)
        spans = backend.spans()
    records = load_records(recorded, limit=2)
    assert len(spans) == 2
    for (resource, _scope, span), rec in zip(spans, records):
        attrs = {kv.key: kv.value for kv in span.attributes}
        assert attrs["replay"].bool_value is True and attrs["replay.exact_match"].bool_value is True
        assert [(link.trace_id.hex(), link.span_id.hex()) for link in span.links] == [(rec.trace_id, rec.span_id)]
        assert any(kv.key == "service.name" and kv.value.string_value == "replayer" for kv in resource.attributes)
