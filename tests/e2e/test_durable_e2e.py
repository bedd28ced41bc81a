"""Issue 10, "durable until decided", shown with real processes: kill -9 under load loses nothing acknowledged.

The shipped default config (collector-config/sidecar.yaml, unchanged: only its ${env:...}
ports and directories are set) runs as a real ``python -m sidecar``. Raw OTLP/gRPC clients
send traces and their logs from several threads and count exactly what the sidecar
acknowledged. The sidecar is killed with SIGKILL mid-load, while traces wait in tail
sampling, started again on the same storage directory and killed again while it recovers,
then started a third time. Afterwards the file exporter's
output (the backend) must hold every acknowledged span and log record that the policy
keeps (computed here from the trace ids: W3C consistent sampling at 10%), plus every ERROR
log and every log without a trace; the audit store must hold one record per acknowledged
request, none twice, each marked kept exactly when its trace is kept.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
from collections import Counter
from fractions import Fraction
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from prometheus_client.parser import text_string_to_metric_families

from sidecar import otlp_json
from sidecar.audit import Query, open_store
from sidecar.signals import Signal
from sidecar.testing import SidecarProcess, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "collector-config" / "sidecar.yaml"
THRESHOLD = round((1 - Fraction(10, 100)) * 2**56)  # the shipped baseline policy: 10%
TRACES_PER_REQUEST = 8
CLIENTS = 4
KILL_AFTER_ACKED_TRACES = 3000
ERROR = 17


def kept(trace_id: bytes) -> bool:
    """The W3C consistent rule: keep iff R (the trace id's last 56 bits) >= T."""
    return int.from_bytes(trace_id[-7:], "big") >= THRESHOLD


class Load:
    """Client threads sending traces (root SERVER span + 2 children) and their logs; counts what was acked."""

    def __init__(self, port: int):
        self.port = port
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.acked_spans: set[tuple[bytes, bytes]] = set()
        self.acked_roots: set[tuple[bytes, bytes]] = set()
        self.acked_logs: set[str] = set()
        self.must_logs: set[str] = set()  # acknowledged logs that must reach the backend
        self.refused = 0
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(CLIENTS)]

    def start(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def acked_traces(self) -> int:
        with self.lock:
            return len(self.acked_roots)

    def _run(self, client: int) -> None:
        channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        traces = trace_service_pb2_grpc.TraceServiceStub(channel)
        logs = logs_service_pb2_grpc.LogsServiceStub(channel)
        n = 0
        while not self.stop.is_set():
            n += 1
            treq, lreq, spans, roots, bodies, must = _requests(client, n)
            if _send(traces, treq):
                with self.lock:
                    self.acked_spans |= spans
                    self.acked_roots |= roots
            else:
                self.refused += 1
            if _send(logs, lreq):
                with self.lock:
                    self.acked_logs |= bodies
                    self.must_logs |= must
        channel.close()


def _send(stub, request) -> bool:
    try:
        stub.Export(request, timeout=10)
        return True
    except grpc.RpcError:
        return False


def _requests(client: int, n: int):
    treq, lreq = ExportTraceServiceRequest(), ExportLogsServiceRequest()
    rs = treq.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "durable-e2e"
    ss = rs.scope_spans.add()
    rl = lreq.resource_logs.add()
    rl.resource.attributes.add(key="service.name").value.string_value = "durable-e2e"
    sl = rl.scope_logs.add()
    spans, roots, bodies, must = set(), set(), set(), set()
    now = time.time_ns()
    for i in range(TRACES_PER_REQUEST):
        trace_id = os.urandom(16)
        root_id = os.urandom(8)
        for j, name in enumerate(("GET /predict", "preprocess", "ml.forward")):
            s = ss.spans.add(trace_id=trace_id, span_id=root_id if j == 0 else os.urandom(8), name=name)
            if j == 0:
                s.kind = Span.SPAN_KIND_SERVER
                s.attributes.add(key="request.id").value.string_value = f"req-{client}-{n}-{i}"
            else:
                s.parent_span_id = root_id
                s.kind = Span.SPAN_KIND_INTERNAL
            s.start_time_unix_nano = now + j * 1000
            s.end_time_unix_nano = now + 5_000_000 - j * 1000
            spans.add((trace_id, s.span_id))
        roots.add((trace_id, root_id))
        severity = ERROR if i == 0 else 9
        body = f"log {client}-{n}-{i}"
        sl.log_records.add(trace_id=trace_id, span_id=root_id, severity_number=severity).body.string_value = body
        bodies.add(body)
        if kept(trace_id) or severity >= ERROR:
            must.add(body)
    body = f"traceless {client}-{n}"
    sl.log_records.add(severity_number=9).body.string_value = body
    bodies.add(body)
    must.add(body)
    return treq, lreq, spans, roots, bodies, must


def read_backend(directory: Path) -> tuple[Counter, Counter, int]:
    """(span key -> times received, log body -> times received, torn lines) from the file exporter's output."""
    spans: Counter = Counter()
    logs: Counter = Counter()
    torn = 0
    for signal, name in ((Signal.TRACES, "traces.jsonl"), (Signal.LOGS, "logs.jsonl")):
        for path in sorted(directory.glob(name + "*")):
            for line in path.read_bytes().splitlines():
                try:
                    request = otlp_json.from_json(signal, line.decode())
                except Exception:  # noqa: BLE001 - a line cut by the kill; counted and reported
                    torn += 1
                    continue
                if signal is Signal.TRACES:
                    for rs in request.resource_spans:
                        for ss in rs.scope_spans:
                            for s in ss.spans:
                                spans[(s.trace_id, s.span_id)] += 1
                else:
                    for rl in request.resource_logs:
                        for sl in rl.scope_logs:
                            for r in sl.log_records:
                                logs[r.body.string_value] += 1
    return spans, logs, torn


def metric(port: int, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def sidecar_env(tmp_path: Path, grpc_port: int, metrics_port: int) -> dict[str, str]:
    """The shipped config's ${env:...} settings: these ports, storage and exporter output under ``tmp_path``
    (the same across restarts)."""
    return {"SIDECAR_OTLP_GRPC_ENDPOINT": f"127.0.0.1:{grpc_port}",
            "SIDECAR_OTLP_HTTP_ENDPOINT": f"127.0.0.1:{free_port()}",
            "SIDECAR_HEALTH_ENDPOINT": f"127.0.0.1:{free_port()}",
            "SIDECAR_METRICS_ENDPOINT": f"127.0.0.1:{metrics_port}",
            "SIDECAR_STORAGE_DIR": str(tmp_path / "storage"),
            "SIDECAR_FILE_EXPORT_DIR": str(tmp_path / "telemetry")}


def test_kill_9_under_load_loses_no_acknowledged_span_log_or_audit_record(tmp_path):
    grpc_port, metrics_port = free_port(), free_port()
    env = sidecar_env(tmp_path, grpc_port, metrics_port)
    config = SHIPPED.read_text()

    first = SidecarProcess(config, workdir=tmp_path / "run1", env=env).start()
    try:
        load = Load(grpc_port).start()
        # kill once some traces were decided and handed on (their log segments deleted) and more wait
        wait_for(lambda: load.acked_traces() >= KILL_AFTER_ACKED_TRACES
                 and metric(metrics_port, "sidecar_tail_sampling_traces_total") >= KILL_AFTER_ACKED_TRACES / 2,
                 120, "acknowledged load, partly decided")
        first.kill()  # SIGKILL while clients are sending and traces wait in tail sampling
    finally:
        load.stop.set()
        first.kill()
    load.join()
    assert load.acked_traces() >= KILL_AFTER_ACKED_TRACES

    must_spans = {k for k in load.acked_spans if kept(k[0])}
    # a crash during recovery: the replayed traces wait for their decision again, and are killed again
    second = SidecarProcess(config, workdir=tmp_path / "run2", env=env).start()
    try:
        recovered = metric(metrics_port, "sidecar_tail_sampling_recovered_items_total", signal="traces")
        assert recovered > 0, "the kill found no trace waiting in tail sampling: the test proved nothing"
    finally:
        second.kill()
    third = SidecarProcess(config, workdir=tmp_path / "run3", env=env).start()
    try:
        assert metric(metrics_port, "sidecar_tail_sampling_recovered_items_total", signal="traces") > 0

        def delivered() -> bool:
            spans, logs, _ = read_backend(tmp_path / "telemetry")
            return must_spans <= spans.keys() and load.must_logs <= logs.keys()

        wait_for(delivered, 90, "every acknowledged kept span and log in the backend")
        assert third.terminate(60) == 0, third.log()
    finally:
        third.kill()

    spans, logs, torn = read_backend(tmp_path / "telemetry")
    lost_spans = must_spans - spans.keys()
    lost_logs = load.must_logs - logs.keys()
    assert not lost_spans and not lost_logs, f"lost {len(lost_spans)} spans and {len(lost_logs)} logs"
    # nothing that the policy drops was kept (acknowledged or not, every span sent had R < T or R >= T)
    assert all(kept(trace_id) for trace_id, _ in spans)

    # through the store: the raw audit_records view may hold duplicates of its active partition until sealed
    store = open_store(str(tmp_path / "storage" / "audit.db")).open()
    rows = [(r.trace_id, r.span_id, r.trace_kept) for r in store.query(Query())]
    store.close()
    records = Counter((t, s) for t, s, _ in rows)
    duplicated = [k for k, n in records.items() if n > 1]
    acked_roots = {(t.hex(), s.hex()) for t, s in load.acked_roots}
    lost_records = acked_roots - records.keys()
    assert not duplicated, f"{len(duplicated)} audit records written twice"
    assert not lost_records, f"{len(lost_records)} acknowledged requests have no audit record"
    marks = {(t, s): k for t, s, k in rows}
    wrong = [k for k in acked_roots if bool(marks[k]) != kept(bytes.fromhex(k[0]))]
    assert not wrong, f"{len(wrong)} audit records whose trace_kept disagrees with the backend"

    twice = sum(1 for n in spans.values() if n > 1)
    print(json.dumps({"acked_traces": len(load.acked_roots), "acked_spans": len(load.acked_spans),
                      "acked_logs": len(load.acked_logs), "kept_spans_required": len(must_spans),
                      "recovered_spans": recovered, "spans_delivered_twice": twice,
                      "audit_records": len(rows), "torn_lines": torn, "refused_requests": load.refused}))


def _waiting_request(n: int) -> tuple[ExportTraceServiceRequest, set[tuple[bytes, bytes]]]:
    """TRACES_PER_REQUEST traces of three spans without their root: each waits the whole decision_wait (10 s)."""
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "durable-e2e"
    ss = rs.scope_spans.add()
    spans = set()
    now = time.time_ns()
    for _ in range(TRACES_PER_REQUEST):
        trace_id, parent = os.urandom(16), os.urandom(8)
        for name in ("preprocess", "ml.forward", "postprocess"):
            s = ss.spans.add(trace_id=trace_id, span_id=os.urandom(8), parent_span_id=parent, name=name,
                             kind=Span.SPAN_KIND_INTERNAL, start_time_unix_nano=now, end_time_unix_nano=now + 5_000_000)
            spans.add((trace_id, s.span_id))
    return req, spans


def test_a_full_buffer_and_a_replay_bigger_than_it_lose_no_acknowledged_kept_span(tmp_path):
    """The shipped config with num_traces 400, and 1 200 traces that wait for their decision: the full buffer
    decides its oldest early, the sidecar is killed, and the replay of its log holds more traces than the buffer
    again. Every acknowledged span of a trace the policy keeps reaches the backend. (Evicting instead, as before
    2026-12-04, lost kept spans in a CI run of the test above, whose first sidecar had logged 52 000 traces.)"""
    grpc_port, metrics_port = free_port(), free_port()
    env = sidecar_env(tmp_path, grpc_port, metrics_port)
    config = SHIPPED.read_text()
    assert "num_traces: 50000" in config
    config = config.replace("num_traces: 50000", "num_traces: 400")

    acked: set[tuple[bytes, bytes]] = set()
    first = SidecarProcess(config, workdir=tmp_path / "run1", env=env).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = trace_service_pb2_grpc.TraceServiceStub(channel)
            for n in range(1200 // TRACES_PER_REQUEST):
                req, spans = _waiting_request(n)
                stub.Export(req, timeout=10)  # every request is accepted: an error fails the test
                acked |= spans
        assert metric(metrics_port, "sidecar_tail_sampling_early_decisions_total") >= 800 - 1
    finally:
        first.kill()  # 400 traces wait; the log holds them, and the decided ones its segment still carries

    must = {k for k in acked if kept(k[0])}
    assert must, "no trace of the 1 200 is kept by the policy: the test would prove nothing"
    second = SidecarProcess(config, workdir=tmp_path / "run2", env=env).start()
    try:
        assert metric(metrics_port, "sidecar_tail_sampling_early_decisions_total") > 0, \
            "the replay fitted in the buffer: the test would prove nothing"
        wait_for(lambda: must <= read_backend(tmp_path / "telemetry")[0].keys(), 60,
                 "every acknowledged kept span in the backend")
    finally:
        second.kill()
