"""Issue 10 shown with real processes: every request on record while tail sampling keeps 10%.

A real OTel SDK app (an instrumented torch classifier inside SERVER spans, payload capture
on) exports over OTLP/gRPC to a real ``python -m sidecar``. The sidecar's traces pipeline
tail-samples at 10% (plus every error) to a real OTLP backend, with an ``audit`` exporter in
``kept_marker`` mode next to it; a second traces pipeline from the same receiver writes every
request to the audit store. The expected kept set is computed here from the trace ids (the
W3C consistent-sampling rule) and the errors sent, never read back from the sidecar.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from fractions import Fraction

import pytest
import torch
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from instrumentation.replay import disable_payload_capture, enable_payload_capture
from instrumentation.torch import instrument_model, uninstrument_model
from sidecar.audit import Query, open_store
from sidecar.testing import OTLPBackend, SidecarProcess, free_port
from tests.instrumentation import replay_models

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

N = 200
PERCENTAGE = 10
THRESHOLD = round((1 - Fraction(PERCENTAGE, 100)) * 2**56)


def audit_config(backend: str, port: int, store: str) -> str:
    return f"""
receivers:
  otlp: {{protocols: {{grpc: {{endpoint: 127.0.0.1:{port}}}}}}}
processors:
  memory_limiter: {{check_interval: 1s, limit_mib: 2000}}
  memory_limiter/audit: {{check_interval: 1s, limit_mib: 2000}}
  tail_sampling:
    decision_wait: 500ms
    num_traces: 10000
    policies:
      - {{name: errors, type: status_code, status_code: {{status_codes: [ERROR]}}}}
      - {{name: baseline, type: probabilistic, probabilistic: {{sampling_percentage: {PERCENTAGE}}}}}
  redaction: {{allow_all_keys: true}}
  audit_fields: {{}}
  redaction/audit: {{allow_all_keys: true, blocked_values: ["secret-[0-9]+"]}}
exporters:
  otlp/backend:
    endpoint: {backend}
    tls: {{insecure: true}}
    retry_on_failure: {{initial_interval: 100ms, max_interval: 500ms}}
  audit: {{store: "{store}"}}
  audit/kept: {{store: "{store}", mode: kept_marker}}
service:
  telemetry: {{metrics: {{address: null}}}}
  pipelines:
    traces:
      receivers: [otlp]
      processors: [memory_limiter, tail_sampling, redaction]
      exporters: [otlp/backend, audit/kept]
    traces/audit:
      receivers: [otlp]
      processors: [memory_limiter/audit, audit_fields, redaction/audit]
      exporters: [audit]
"""


def _wait(cond, timeout: float = 60.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_every_request_on_record_while_the_backend_gets_the_sampled_share(tmp_path):
    store_url = f"sqlite:///{tmp_path}/audit/audit.db"
    port = free_port()
    with OTLPBackend() as backend, \
            SidecarProcess(audit_config(backend.endpoint, port, store_url), workdir=tmp_path) as sidecar:
        provider = TracerProvider(resource=Resource.create({"service.name": "classifier"}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"127.0.0.1:{port}", insecure=True),
                                                       schedule_delay_millis=50))
        tracer = provider.get_tracer("app")
        model = instrument_model(replay_models.same(), "clf", "1.0", tracer_provider=provider)
        enable_payload_capture()
        errors, sent = set(), {}
        try:
            gen = torch.Generator().manual_seed(3)
            for i in range(N):
                with tracer.start_as_current_span("POST /predict", kind=SpanKind.SERVER, attributes={
                        "request.id": f"req-{i}", "user.id": f"secret-{i}", "tag.intent": "classify"}) as span:
                    model(torch.randn(2, 8, generator=gen))
                    if i % 25 == 0:
                        span.set_status(Status(StatusCode.ERROR, "upstream failed"))
                        errors.add(f"{span.get_span_context().trace_id:032x}")
                sent[f"req-{i}"] = f"{span.get_span_context().trace_id:032x}"
            assert provider.force_flush(30_000)
        finally:
            disable_payload_capture()
            uninstrument_model(model)
            provider.shutdown()

        expected_kept = errors | {t for t in sent.values() if int(t[-14:], 16) >= THRESHOLD}
        store = open_store(store_url).open()
        assert _wait(lambda: store.count() == N)  # every request, unsampled

        def backend_traces() -> set[str]:
            return {span.trace_id.hex() for _r, _s, span in backend.spans()}

        def kept_in_store() -> set[str]:
            return {r.trace_id for r in store.query(Query()) if r.trace_kept}

        assert _wait(lambda: backend_traces() == expected_kept and kept_in_store() == expected_kept), \
            (len(backend_traces()), len(kept_in_store()), len(expected_kept))
        assert 0 < len(expected_kept) < N / 3  # the sampled share, not everything

        records = store.query(Query())
        store.close()
        assert sorted(r.request_id for r in records) == sorted(sent)
        assert {r.request_id: r.trace_id for r in records} == sent
        for r in records:
            assert r.trace_kept == (r.trace_id in backend_traces())
            assert r.kept_policy == ("errors" if r.trace_id in errors else "baseline" if r.trace_kept else None)
            assert r.status == ("ERROR" if r.trace_id in errors else "UNSET")
            assert r.user_id == "[REDACTED]" and r.intent == "classify"  # the audit branch's redaction ran
            assert (r.model_id, r.model_version, r.parameters["batch_size"]) == ("clf", "1.0", 2)
        assert sidecar.terminate() == 0

    # the recorded batch replays exactly against the same model
    out = subprocess.run([sys.executable, "-m", "instrumentation.replay", "--audit", store_url, "--model",
                          "tests.instrumentation.replay_models:same", "--json"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    agg = report["aggregate"]
    assert agg["replayed"] == N, {r["reason"] for r in report["records"]}
    assert agg["replayed"] == N and agg["exact_match_rate"] == 1.0


def test_acknowledged_requests_survive_kill_9_before_their_records_are_made(tmp_path):
    """The sidecar journals each request before the acknowledgement and makes records later: killed with
    SIGKILL before it made any (``index_interval: 1h``), the operator's ``audit query`` still shows every
    acknowledged request, redacted, and a restarted sidecar adds nothing twice."""
    store_url = f"sqlite:///{tmp_path}/audit/audit.db"
    port = free_port()
    config = audit_config("127.0.0.1:1", port, store_url).replace(
        f'audit: {{store: "{store_url}"}}', f'audit: {{store: "{store_url}", index_interval: 1h}}')
    assert "index_interval: 1h" in config
    sidecar = SidecarProcess(config, workdir=tmp_path).start()
    try:
        provider = TracerProvider(resource=Resource.create({"service.name": "classifier"}))
        exporter = OTLPSpanExporter(endpoint=f"127.0.0.1:{port}", insecure=True)
        tracer = provider.get_tracer("app")
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        provider.add_span_processor(SimpleSpanProcessor(exporter))  # each span acknowledged before the next
        for i in range(20):
            with tracer.start_as_current_span("POST /predict", kind=SpanKind.SERVER, attributes={
                    "request.id": f"req-{i}", "user.id": f"secret-{i}", "ml.model.id": "clf",
                    "ml.model.version": "1.0"}):
                pass
        provider.shutdown()
    finally:
        sidecar.kill()
    import sqlite3

    db = sqlite3.connect(tmp_path / "audit" / "audit.db")
    assert db.execute("SELECT count(*) FROM audit_journal").fetchone()[0] == 20  # nothing indexed yet
    db.close()
    out = subprocess.run([sys.executable, "-m", "sidecar", "audit", "query", "--store", store_url, "--format",
                          "jsonl"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert sorted(r["request_id"] for r in records) == sorted(f"req-{i}" for i in range(20))
    assert {r["user_id"] for r in records} == {"[REDACTED]"}  # the journal held only redacted bytes
    assert not any(b"secret-" in f.read_bytes() for f in (tmp_path / "audit").iterdir())  # db, -wal, -shm
    with SidecarProcess(config, workdir=tmp_path):  # restarted: its start indexes nothing new, adds no copy
        pass
    store = open_store(store_url).open()
    assert store.count() == 20
    store.close()
