"""The redaction processor fed by several receiver threads at once, with and without its scan lock.

    .venv/bin/python benchmarks/redaction_threads.py [--requests 48] [--pii 1.0] [--repeat 3]

The RE2 binding releases the GIL around every match. When several threads scan at once, each
release lets another thread take the GIL, and the match's caller waits to get it back: two
context switches per match, thousands per PII-dense request. ``redaction._engine.SCAN_LOCK``
makes one request scan at a time. This runs the real processor (wire path where the C extension
is built) in one process on pre-encoded requests from ``benchmarks/workload.py``, from 1, 4 and 8
threads, once as shipped and once with the lock replaced by a no-op, and prints process CPU and
wall time per span (best of ``--repeat``).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from sidecar.component import Kind  # noqa: E402
from sidecar.config import parse_config  # noqa: E402
from sidecar.envelope import Envelope  # noqa: E402
from sidecar.processors import redaction as redaction_processor  # noqa: E402
from sidecar.registry import CreateSettings, factory_for  # noqa: E402
from sidecar.signals import Signal  # noqa: E402
from sidecar.telemetry import SelfTelemetry  # noqa: E402
from workload import trace_request  # noqa: E402

SPANS_PER_REQUEST = 512


class _Null:
    def consume(self, envelope) -> None:
        pass


def processor():
    cc = parse_config("""
receivers: {otlp: {protocols: {grpc: {endpoint: 127.0.0.1:4317}}}}
processors: {redaction: {allow_all_keys: true}}
exporters: {debug: {}}
service: {pipelines: {traces: {receivers: [otlp], processors: [redaction], exporters: [debug]}}}
""", environ={}).processors["redaction"]
    return factory_for(Kind.PROCESSOR, "redaction").create(
        CreateSettings(cc.id, Kind.PROCESSOR, SelfTelemetry().component("processor", "redaction")), cc.config, _Null())


def measure(red, bodies: list[bytes], threads: int) -> tuple[float, float]:
    """(CPU µs per span, wall µs per span) of redacting every body, split over ``threads`` threads."""
    envelopes = [Envelope(Signal.TRACES, encoded=b, items=SPANS_PER_REQUEST) for b in bodies]
    spans = len(bodies) * SPANS_PER_REQUEST
    workers = [threading.Thread(target=lambda k=k: [red.consume(e) for e in envelopes[k::threads]])
               for k in range(threads)]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return (time.process_time() - cpu0) / spans * 1e6, (time.perf_counter() - wall0) / spans * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=48, help="requests of 128 traces x 4 spans")
    p.add_argument("--pii", type=float, default=1.0, help="share of traces carrying PII")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    rng = random.Random(3)
    bodies = [trace_request(rng, SPANS_PER_REQUEST // 4, pii=args.pii)[0].SerializeToString()
              for _ in range(args.requests)]
    red = processor()
    measure(red, bodies, 1)  # warm-up: caches, allocator, first compilations
    shipped = redaction_processor.SCAN_LOCK
    rows = []
    for threads in (1, 4, 8):
        for label, lock in (("scan lock (shipped)", shipped), ("no scan lock", contextlib.nullcontext())):
            redaction_processor.SCAN_LOCK = lock
            try:
                runs = [measure(red, bodies, threads) for _ in range(args.repeat)]
            finally:
                redaction_processor.SCAN_LOCK = shipped
            rows.append((threads, label, min(r[0] for r in runs), min(r[1] for r in runs)))
            print(f"  {threads} threads, {label}: {rows[-1][2]:.2f} µs CPU per span", flush=True)
    base = rows[0][2]
    print(f"\npii {args.pii:g}, {args.requests} requests of {SPANS_PER_REQUEST} spans, best of {args.repeat}\n")
    print("| threads | | CPU µs/span | wall µs/span | CPU × 1 thread |")
    print("|---:|---|---:|---:|---:|")
    for threads, label, cpu, wall in rows:
        print(f"| {threads} | {label} | {cpu:.2f} | {wall:.2f} | {cpu / base:.2f} |")


if __name__ == "__main__":
    main()
