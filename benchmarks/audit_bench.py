"""The audit branch's cost per request: the same sidecar pipeline with and without it, one run.

    .venv/bin/python benchmarks/audit_bench.py [--requests-per-export 64] [--exports 150] [--store sqlite|postgres]
    .venv/bin/python benchmarks/audit_bench.py --default 100 [--pii 1.0]   # fsyncs / commits per request
    .venv/bin/python benchmarks/audit_bench.py --exports 80 --stages-only --prefill 1000000  # a full store

Two real ``python -m sidecar`` processes run one after the other, each fed the same
pre-encoded OTLP exports (the workload of benchmarks/workload.py: server span + 3 model
spans per request) by 4 gRPC client threads, forwarding to a counting backend:

- baseline: traces -> memory_limiter, span_metrics, tail_sampling (10%), redaction -> otlp
- audit:    the same, plus ``audit/kept`` (kept_marker) next to otlp, plus a second traces
            pipeline memory_limiter/audit, audit_fields, redaction/audit -> audit (SQLite WAL, synchronous=FULL)

The audit exporter journals each request (its bytes, one row) before the acknowledgement and
makes the records in the background (``index_interval``, 1 s): the audit run's CPU is taken once
the journal is empty, so it includes making every record; its wall time is the clients' alone.

Printed: wall time per request as the client sees it (export acknowledged), the sidecar's
CPU time per request, and the ratios audit / baseline, then the CPU of each step of the branch in
one process. Audit writes arriving together share one fsynced transaction (group commit).
``--prefill N`` writes N records (older, distinct) into the store before the store-write step is
measured, in writes of 10 000: the cost of a record as the store grows; with it, the SQLite store's
seals (each holding the write lock) and two reads are timed too. ``--stages-only`` skips the two
sidecar processes.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import psutil  # noqa: E402

from counting_backend import CountingBackend  # noqa: E402
from sidecar.testing import SidecarProcess, free_port  # noqa: E402
from workload import trace_request  # noqa: E402

CLIENTS = 4


def config(port: int, backend: int, store: str | None) -> str:
    audit_exporters = ", audit/kept" if store else ""
    audit = f"""
    traces/audit:
      receivers: [otlp]
      processors: [memory_limiter/audit, audit_fields, redaction/audit]
      exporters: [audit]""" if store else ""
    audit_defs = f"""
  audit: {{store: "{store}"}}
  audit/kept: {{store: "{store}", mode: kept_marker}}""" if store else ""
    return f"""
receivers:
  otlp: {{protocols: {{grpc: {{endpoint: 127.0.0.1:{port}, max_recv_msg_size_mib: 64}}}}}}
processors:
  memory_limiter: {{check_interval: 1s, limit_mib: 4000}}
  memory_limiter/audit: {{check_interval: 1s, limit_mib: 4000}}
  span_metrics: {{}}
  tail_sampling:
    decision_wait: 1s
    num_traces: 200000
    policies:
      - {{name: errors, type: status_code, status_code: {{status_codes: [ERROR]}}}}
      - {{name: baseline, type: probabilistic, probabilistic: {{sampling_percentage: 10}}}}
  redaction: {{allow_all_keys: true}}
  audit_fields: {{}}
  redaction/audit: {{allow_all_keys: true}}
exporters:
  otlp/backend: {{endpoint: 127.0.0.1:{backend}, tls: {{insecure: true}}}}{audit_defs}
service:
  telemetry: {{metrics: {{address: null}}}}
  pipelines:
    traces:
      receivers: [otlp]
      processors: [memory_limiter, span_metrics, tail_sampling, redaction]
      exporters: [otlp/backend{audit_exporters}]{audit}
"""


def run(bodies: list[bytes], store: str | None, workdir: str) -> tuple[float, float]:
    """(wall seconds, sidecar CPU seconds) to have every export acknowledged."""
    backend = CountingBackend(free_port())
    port = free_port()
    try:
        with SidecarProcess(config(port, backend.port, store), workdir=workdir) as sidecar:
            proc = psutil.Process(sidecar.pid)
            channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)])
            export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                                         request_serializer=None, response_deserializer=None)
            export(bodies[0], timeout=30)  # warm up (not counted: its request ids repeat below and are duplicates)
            cpu0 = sum(proc.cpu_times()[:2])
            t0 = time.perf_counter()

            def client(k: int) -> None:
                for body in bodies[k::CLIENTS]:
                    export(body, timeout=60)

            threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            if store is not None:  # the records of everything journaled are made, too
                from sidecar.audit.urls import open_store

                s = open_store(store).open()
                while s.journal_entries()[0]:
                    time.sleep(0.05)
                s.close()
            cpu = sum(proc.cpu_times()[:2]) - cpu0
            channel.close()
            return wall, cpu
    finally:
        backend.stop()


def prefill(s, template, n: int) -> None:
    """``n`` distinct records like ``template``, older than the measured ones, in writes of 10 000 records."""
    from sidecar.audit.records import AuditRecord, Extraction

    fields = template.to_json()
    t = template.time_unix_nano - 86400 * 10**9 - n * 1000
    rng = random.Random(7)
    seals = []
    t0 = time.perf_counter()
    for start in range(0, n, 10_000):
        records = []
        for i in range(start, min(n, start + 10_000)):
            fields.update(trace_id=f"{rng.getrandbits(128):032x}", span_id=f"{rng.getrandbits(64):016x}",
                          time_unix_nano=t + i * 1000, request_id=f"prefill-{i}")
            records.append(AuditRecord(**fields))
        before = getattr(s, "last_seal_seconds", None)
        s.write(Extraction(records, []))
        if getattr(s, "last_seal_seconds", None) != before:
            seals.append(s.last_seal_seconds)
    print(f"  prefilled {n} records in {time.perf_counter() - t0:.0f} s")
    if seals:
        print(f"  {len(seals)} seals of {s.seal_rows} rows: write lock held {min(seals):.2f} s min, "
              f"{sorted(seals)[len(seals) // 2]:.2f} s median, {max(seals):.2f} s max")


def reads(s, request_id: str) -> None:
    """Wall time of two reads an operator or the exporter makes."""
    from sidecar.audit.store import Query

    for label, fn in (("count()", s.count), ("query(request_id)", lambda: s.query(Query(request_id=request_id)))):
        t0 = time.perf_counter()
        fn()
        print(f"  {'read: ' + label:34s} {(time.perf_counter() - t0) * 1e3:7.1f} ms")


def stages(bodies: list[bytes], per_export: int, store: str, prefilled: int = 0, journal_store: str = "") -> None:
    """In one process, no gRPC: CPU per request of each step of the audit branch (where the time goes)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from sidecar.audit.records import extract, reduce
    from sidecar.audit.urls import open_store
    from sidecar.component import Kind
    from sidecar.config import parse_config
    from sidecar.envelope import Envelope
    from sidecar.registry import CreateSettings, factory_for
    from sidecar.signals import Signal
    from sidecar.telemetry import SelfTelemetry

    class Null:
        def consume(self, envelope) -> None:
            pass

    cc = parse_config("""
receivers: {otlp: {protocols: {grpc: {endpoint: 127.0.0.1:4317}}}}
processors: {redaction/audit: {allow_all_keys: true}}
exporters: {debug: {}}
service: {pipelines: {traces: {receivers: [otlp], processors: [redaction/audit], exporters: [debug]}}}
""", environ={}).processors["redaction/audit"]
    redaction = factory_for(Kind.PROCESSOR, "redaction").create(
        CreateSettings(cc.id, Kind.PROCESSOR, SelfTelemetry().component("processor", "redaction/audit")),
        cc.config, Null())
    n = len(bodies) * per_export

    def cpu(label: str, fn):
        t0 = time.process_time()
        out = fn()
        print(f"  {label:34s} {(time.process_time() - t0) / n * 1e6:7.1f} us/request")
        return out

    print("audit branch steps, CPU in one process:")
    envelopes = cpu("envelopes of the received bytes", lambda: [Envelope(Signal.TRACES, encoded=b, items=1)
                                                                   for b in bodies])
    reduced = cpu("audit_fields (reduce the bytes)", lambda: [Envelope(Signal.TRACES, encoded=reduce(e.encoded)[0],
                                                                        items=1) for e in envelopes])
    cpu("redaction/audit, whole request", lambda: [redaction.consume(e.share()) for e in envelopes])
    envelopes = reduced
    cpu("redaction/audit, reduced request", lambda: [redaction.consume(e) for e in envelopes])
    extractions = cpu("extract records (sidecar.audit.records)", lambda: [extract(e.encoded) for e in envelopes])
    s = open_store(store).open()
    if prefilled:
        prefill(s, extractions[0].records[0], prefilled)
    half = len(extractions) // 2
    t0 = time.process_time()
    for e in extractions[:half]:
        s.write(e)
    print(f"  {'store write, 1 writer':34s} {(time.process_time() - t0) / (half * per_export) * 1e6:7.1f} us/request")
    rest = extractions[half:]
    commits = s.group_commit.commits

    def writers():
        ts = [threading.Thread(target=lambda k=k: [s.write(e) for e in rest[k::CLIENTS]]) for k in range(CLIENTS)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    t0 = time.process_time()
    writers()
    print(f"  {'store write, %d writers (group commit)' % CLIENTS:34s} "
          f"{(time.process_time() - t0) / (len(rest) * per_export) * 1e6:7.1f} us/request, "
          f"{len(rest) / max(1, s.group_commit.commits - commits):.1f} writes per commit")
    reads(s, extractions[-1].records[-1].request_id)
    s.close()

    # the shipped exporter's path: the request path journals the redacted bytes; records are made later, in bulk
    j = open_store(journal_store).open()
    t0 = time.process_time()
    for e in envelopes[:half]:
        j.append(e.encoded)
    print(f"  {'journal append, 1 writer':34s} {(time.process_time() - t0) / (half * per_export) * 1e6:7.1f} us/request")
    commits = j.group_commit.commits
    t0 = time.process_time()
    ts = [threading.Thread(target=lambda k=k: [j.append(e.encoded) for e in envelopes[half:][k::CLIENTS]])
          for k in range(CLIENTS)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    print(f"  {'journal append, %d writers' % CLIENTS:34s} "
          f"{(time.process_time() - t0) / (len(rest) * per_export) * 1e6:7.1f} us/request, "
          f"{len(rest) / max(1, j.group_commit.commits - commits):.1f} appends per commit")
    t0 = time.process_time()
    done = j.index_journal()
    print(f"  {'index the journal (later, bulk)':34s} {(time.process_time() - t0) / n * 1e6:7.1f} us/request "
          f"({done.written} records from {done.entries} entries)")
    j.close()


def commits_in_default(n_requests: int, pii: float) -> None:
    """The shipped default config on benchmarks/throughput.py's load: fsyncs of the tail-sampling log and
    audit commits per request, from the sidecar's own counters (is group commit grouping there?)."""
    import throughput

    bodies, _, _ = throughput.build_load(n_requests, pii=pii)
    backend = CountingBackend(free_port())
    port, metrics_port = free_port(), free_port()
    cfg = (throughput.default_config("2s").replace("BACKEND_PORT", str(backend.port))
           .replace("LISTEN_PORT", str(port)).replace("METRICS_PORT", str(metrics_port))
           .replace("HEALTH_PORT", str(free_port())))

    def counter(text: str, name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    try:
        with tempfile.TemporaryDirectory() as tmp, SidecarProcess(cfg, workdir=tmp):
            before = throughput.scrape(metrics_port)
            throughput.send_all(port, bodies, threads=CLIENTS)
            after = throughput.scrape(metrics_port)
    finally:
        backend.stop()
    syncs = counter(after, "sidecar_tail_sampling_log_syncs_total") - \
        counter(before, "sidecar_tail_sampling_log_syncs_total")
    commits = counter(after, 'sidecar_audit_store_commits_total{component="audit"}') - \
        counter(before, 'sidecar_audit_store_commits_total{component="audit"}')
    traces = sum(1 for kind, _ in bodies if kind == "traces")
    print(f"default config, pii {pii:g}: {len(bodies)} requests ({traces} traces, {len(bodies) - traces} logs), "
          f"{CLIENTS} clients")
    print(f"  tail-sampling log fsyncs {syncs:6.0f}  ({len(bodies) / max(syncs, 1):.2f} requests per fsync)")
    print(f"  audit store commits      {commits:6.0f}  ({traces / max(commits, 1):.2f} trace requests per commit)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests-per-export", type=int, default=64)
    ap.add_argument("--exports", type=int, default=150)
    ap.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument("--default", type=int, metavar="N", help="instead: the shipped default config on N requests of "
                    "benchmarks/throughput.py's load, printing fsyncs and audit commits per request")
    ap.add_argument("--pii", type=float, default=0.05, help="with --default: share of traces with PII")
    ap.add_argument("--prefill", type=int, default=0, metavar="N",
                    help="records already in the store before its write step is measured")
    ap.add_argument("--stages-only", action="store_true", help="only the in-process steps (no sidecar processes)")
    args = ap.parse_args()
    if args.default:
        commits_in_default(args.default, args.pii)
        return 0
    rng = random.Random(10)
    bodies = [trace_request(rng, args.requests_per_export, pii=0.0)[0].SerializeToString()
              for _ in range(args.exports + 1)]
    n = args.requests_per_export * args.exports
    if args.stages_only:
        with tempfile.TemporaryDirectory() as tmp:
            stages(bodies, args.requests_per_export, f"sqlite:///{tmp}/stages.db", args.prefill,
                   f"sqlite:///{tmp}/journal.db")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        store, pg = f"sqlite:///{tmp}/audit.db", None
        if args.store == "postgres":
            sys.path.insert(0, str(ROOT))
            from tests.sidecar.audit.conftest import PostgresServer, _bindir

            pg = PostgresServer(_bindir()).start()
            store = pg.new_database()
        try:
            base_wall, base_cpu = run(bodies, None, f"{tmp}/baseline")
            audit_wall, audit_cpu = run(bodies, store, f"{tmp}/audit")
        finally:
            if pg is not None:
                pg.stop()
    print(f"{n} requests ({args.exports} exports of {args.requests_per_export}, {CLIENTS} clients), "
          f"audit store {args.store}")
    print(f"{'':22s} {'wall us/request':>16s} {'sidecar CPU us/request':>23s}")
    print(f"{'without audit branch':22s} {base_wall / n * 1e6:16.1f} {base_cpu / n * 1e6:23.1f}")
    print(f"{'with audit branch':22s} {audit_wall / n * 1e6:16.1f} {audit_cpu / n * 1e6:23.1f}")
    print(f"{'ratio':22s} {audit_wall / base_wall:16.2f} {audit_cpu / base_cpu:23.2f}")
    if args.store == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            stages(bodies, args.requests_per_export, f"sqlite:///{tmp}/stages.db", args.prefill,
                   f"sqlite:///{tmp}/journal.db")
    return 0


if __name__ == "__main__":
    sys.exit(main())
