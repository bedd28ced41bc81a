"""Tail sampling's durable buffer (``storage``) next to the in-memory one: cost per item, one run.

    .venv/bin/python benchmarks/durable_buffer_bench.py [--exports 400] [--traces-per-export 16]
                                                        [--threads 4] [--dir PATH] [--repeat 3]

The same pre-encoded OTLP exports (benchmarks/workload.py: server span + 3 model spans per
trace, one log record per trace) go through one ``tail_sampling`` processor (the shipped
policies, 10% baseline) from ``--threads`` receiver-like threads, then every trace is decided
and handed to an in-memory sink. Configurations, alternated ``--repeat`` times (best kept):

- memory:         no storage (the in-memory buffer)
- durable:        ``storage: file_storage`` with fsync (group-committed fdatasync, as shipped)
- durable-nosync: ``storage`` with ``file_storage.fsync: false`` (the cost of writing without the sync)

Printed per configuration: wall and process CPU microseconds per item (spans + log records)
for the consume phase (what a receiver waits for before acknowledging) and the whole run
(consume + decide + hand on + delete the log), syncs per export, and the ratios to memory.
``--dir`` puts the log on a given filesystem (default: a temporary directory).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from sidecar.component import Kind  # noqa: E402
from sidecar.config import ComponentId  # noqa: E402
from sidecar.envelope import Envelope  # noqa: E402
from sidecar.extensions.file_storage import FileStorage, FileStorageConfig  # noqa: E402
from sidecar.host import Host  # noqa: E402
from sidecar.processors.tail_sampling import TailSamplingConfig, TailSamplingProcessor  # noqa: E402
from sidecar.registry import CreateSettings  # noqa: E402
from sidecar.signals import Signal  # noqa: E402
from sidecar.telemetry import SelfTelemetry  # noqa: E402
from workload import logs_request, trace_ids_of, trace_request  # noqa: E402

POLICIES = [
    {"name": "errors", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}},
    {"name": "slow", "type": "latency", "latency": {"threshold_ms": 1000}},
    {"name": "debug", "type": "boolean_attribute", "boolean_attribute": {"key": "sampling.force_keep", "value": True}},
    {"name": "baseline", "type": "probabilistic", "probabilistic": {"sampling_percentage": 10}},
]


class Sink:
    """The next stage: takes everything (the durable part downstream is the exporter's own queue)."""

    def __init__(self):
        self.items = 0
        self.lock = threading.Lock()

    def consume(self, envelope: Envelope) -> None:
        with self.lock:
            self.items += envelope.items


def workload(n_exports: int, traces_per_export: int) -> list[Envelope]:
    rng = random.Random(7)
    out = []
    for _ in range(n_exports):
        treq, _ = trace_request(rng, traces_per_export)
        lreq = logs_request(rng, trace_ids_of(treq))
        tb, lb = treq.SerializeToString(), lreq.SerializeToString()
        out.append(Envelope(Signal.TRACES, encoded=tb, items=sum(
            len(ss.spans) for rs in treq.resource_spans for ss in rs.scope_spans)))
        out.append(Envelope(Signal.LOGS, encoded=lb, items=sum(
            len(sl.log_records) for rl in lreq.resource_logs for sl in rl.scope_logs)))
    return out


def run(name: str, envelopes: list[Envelope], threads: int, directory: Path | None, fsync: bool) -> dict:
    tel = SelfTelemetry()
    raw = {"decision_wait": "30s", "decision_wait_after_root_received": "30s", "num_traces": 1_000_000,
           "max_buffered_bytes": 1 << 34, "policies": POLICIES}
    host = Host(tel)
    if directory is not None:
        raw["storage"] = "file_storage"
        raw["wal"] = {"max_bytes": 1 << 34}
        fs = FileStorage(CreateSettings(ComponentId("file_storage"), Kind.EXTENSION,
                                        tel.component("extension", "file_storage")),
                         FileStorageConfig(directory=str(directory), fsync=fsync))
        fs.start(host)
        host.extensions["file_storage"] = fs
    cfg = TailSamplingConfig.model_validate(raw)
    sink = Sink()
    proc = TailSamplingProcessor(CreateSettings(ComponentId("tail_sampling"), Kind.PROCESSOR,
                                                tel.component("processor", "tail_sampling")), cfg, sink)
    proc.start(host)
    share = [envelopes[i::threads] for i in range(threads)]
    go = threading.Barrier(threads + 1)

    def feed(mine: list[Envelope]) -> None:
        go.wait()
        for env in mine:
            proc.consume(Envelope(env.signal, encoded=env.encoded, items=env.items))

    workers = [threading.Thread(target=feed, args=(s,)) for s in share]
    for w in workers:
        w.start()
    go.wait()
    t0, c0 = time.perf_counter(), time.process_time()
    for w in workers:
        w.join()
    t1, c1 = time.perf_counter(), time.process_time()
    proc.shutdown(time.monotonic() + 120)  # decide everything now, hand it on, delete the log
    t2, c2 = time.perf_counter(), time.process_time()
    items = sum(e.items for e in envelopes)
    syncs = tel.registry.get_sample_value("sidecar_tail_sampling_log_syncs_total",
                                          {"component": "tail_sampling"}) or 0.0
    left = sum(1 for _ in directory.rglob("*.wal")) if directory is not None else 0
    return {"name": name, "items": items, "consume_wall": (t1 - t0) / items * 1e6,
            "consume_cpu": (c1 - c0) / items * 1e6, "total_wall": (t2 - t0) / items * 1e6,
            "total_cpu": (c2 - c0) / items * 1e6, "syncs_per_export": syncs / len(envelopes),
            "kept": sink.items, "segments_left": left}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exports", type=int, default=400, help="traces exports (each with its logs export)")
    ap.add_argument("--traces-per-export", type=int, default=16)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--dir", type=Path, default=None, help="where the log goes (default: a temporary directory)")
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs per configuration; the best is kept")
    args = ap.parse_args()

    envelopes = workload(args.exports, args.traces_per_export)
    base = args.dir or Path(tempfile.mkdtemp(prefix="durable-bench-"))
    best: dict[str, dict] = {}
    for r in range(args.repeat):
        for name, directory, fsync in (("memory", None, True), ("durable", base / f"fsync-{r}", True),
                                       ("durable-nosync", base / f"nosync-{r}", False)):
            res = run(name, envelopes, args.threads, directory, fsync)
            if name not in best or res["total_wall"] < best[name]["total_wall"]:
                best[name] = res
    mem = best["memory"]
    print(f"{mem['items']} items ({args.exports} trace exports of {args.traces_per_export} traces x 4 spans, "
          f"each with its logs export), {args.threads} threads, log under {base}, best of {args.repeat}")
    print(f"{'':16}{'consume us/item':>17}{'cpu':>8}{'total us/item':>15}{'cpu':>8}"
          f"{'syncs/export':>14}{'x consume':>11}{'x total':>9}")
    for name in ("memory", "durable", "durable-nosync"):
        r = best[name]
        print(f"{name:16}{r['consume_wall']:17.2f}{r['consume_cpu']:8.2f}{r['total_wall']:15.2f}{r['total_cpu']:8.2f}"
              f"{r['syncs_per_export']:14.2f}{r['consume_wall'] / mem['consume_wall']:11.2f}"
              f"{r['total_wall'] / mem['total_wall']:9.2f}")
        assert r["kept"] == mem["kept"], f"{name} kept {r['kept']} items, memory {mem['kept']}"
        assert r["segments_left"] == 0, f"{name} left {r['segments_left']} log segments after shutdown"
    if args.dir is None:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
