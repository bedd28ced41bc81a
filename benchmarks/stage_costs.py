"""CPU per item of each stage of the recommended pipeline, in one process (no gRPC): where the time goes.

    .venv/bin/python benchmarks/stage_costs.py [--pii 0.05] [--pii 1.0] [--requests 60] [--repeat 3]

Stages get what the receiver hands them: envelopes of the received bytes (no message), so the
figures hold no parse or serialization the pipeline does not do. Tail sampling runs with the
shipped config on an injected clock that advances as traffic would (``--rate``), so traces are
decided ``decision_wait_after_root_received`` after their root, in the loop, as in production;
"durable" adds its write-ahead log (``storage``, fsync on) in a temporary directory. Each
repetition sends fresh traces (a repeated trace id would take the cheap late-span path); a
stage's figure is its least CPU per item over the repetitions. Items: spans + log records.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from workload import logs_request, trace_ids_of, trace_request  # noqa: E402

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest  # noqa: E402
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest  # noqa: E402

from sidecar import wire  # noqa: E402
from sidecar.component import Kind  # noqa: E402
from sidecar.config import ComponentId, parse_config  # noqa: E402
from sidecar.envelope import Envelope  # noqa: E402
from sidecar.extensions.file_storage import FileStorage, FileStorageConfig  # noqa: E402
from sidecar.host import Host  # noqa: E402
from sidecar.pipeline import SignalRouter  # noqa: E402
from sidecar.processors.tail_sampling import TailSamplingProcessor  # noqa: E402
from sidecar.registry import CreateSettings, factory_for  # noqa: E402
from sidecar.signals import Signal  # noqa: E402
from sidecar.telemetry import SelfTelemetry  # noqa: E402

TRACES_PER_REQUEST = 128


def load(seed: int, requests: int, pii: float) -> list[tuple[bytes, int, bytes, int]]:
    """(trace request bytes, spans, logs request bytes, log records) per request; fresh trace ids per seed."""
    out = []
    for i in range(requests):
        tr, _ = trace_request(random.Random(seed + i), TRACES_PER_REQUEST, pii)
        lr = logs_request(random.Random(seed + 500_000 + i), trace_ids_of(tr), pii)
        out.append((tr.SerializeToString(), len(tr.resource_spans[0].scope_spans[0].spans),
                    lr.SerializeToString(), len(lr.resource_logs[0].scope_logs[0].log_records)))
    return out


class Null:
    def consume(self, envelope: Envelope) -> None:
        envelope.encoded  # an exporter would send the bytes: make them, as it would


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Stages:
    """The shipped config's span_metrics and tail_sampling, built fresh per measurement."""

    def __init__(self) -> None:
        self.cfg = parse_config((ROOT / "collector-config" / "sidecar.yaml").read_text(), environ={})
        self.tel = SelfTelemetry()
        self.router = SignalRouter("null")
        self.router.routes = {Signal.TRACES: Null(), Signal.LOGS: Null(), Signal.METRICS: Null()}
        self._n = 0

    def _settings(self, name: str) -> CreateSettings:
        cc = self.cfg.processors[name]
        self._n += 1  # a fresh telemetry component per instance
        return CreateSettings(cc.id, Kind.PROCESSOR, self.tel.component("processor", f"{name}#{self._n}"))

    def span_metrics(self, nxt, sampler=None):
        """span_metrics in front of ``nxt``; with the ``sampler`` behind it, exemplars wait for its decisions."""
        cc = self.cfg.processors["span_metrics"]
        sm = factory_for(Kind.PROCESSOR, "span_metrics").create(self._settings("span_metrics"), cc.config, nxt)
        sm.start(sampler.host if sampler is not None else Host(self.tel))
        sm._ticker.stop(time.monotonic() + 5)  # no periodic flush while measured
        return sm

    def tail_sampling(self, clock: Clock, durable_dir: str | None):
        cc = self.cfg.processors["tail_sampling"]
        cfg = cc.config if durable_dir else cc.config.model_copy(update={"storage": None})
        ts = TailSamplingProcessor(self._settings("tail_sampling"), cfg, self.router, clock=clock)
        host = Host(self.tel)
        if durable_dir:
            fs = FileStorage(CreateSettings(ComponentId("file_storage"), Kind.EXTENSION,
                                            self.tel.component("extension", f"file_storage#{self._n}")),
                             FileStorageConfig(directory=durable_dir))
            fs.start(None)
            host.extensions["file_storage"] = fs
        ts.start(host)
        ts._ticker.stop(time.monotonic() + 5)  # decided by the loop, on the injected clock
        ts.host = host
        return ts


def measure(build, reqs, step: float, part: str = "all") -> float:
    """CPU seconds of feeding ``reqs`` to a fresh stage (and deciding everything for a sampler).

    ``part``: "all", or only a sampler's "intake" (its consume calls) or "decide" (its ticks)."""
    clock = Clock()
    intake = decide = 0.0
    cpu = time.process_time
    with tempfile.TemporaryDirectory() as tmp:
        front, sampler = build(clock, tmp)
        for k, (spans, n_spans, logs, n_logs) in enumerate(reqs):
            t0 = cpu()
            front.consume(Envelope(Signal.TRACES, encoded=spans, items=n_spans))
            if sampler is not None:
                sampler.consume(Envelope(Signal.LOGS, encoded=logs, items=n_logs))
            t1 = cpu()
            intake += t1 - t0
            if sampler is not None:
                clock.t += step
                if k % 2:
                    sampler.tick()
                decide += cpu() - t1
        if sampler is not None:
            clock.t += 60
            t1 = cpu()
            sampler.tick()
            decide += cpu() - t1
            sampler.shutdown(time.monotonic() + 10)
    return {"all": intake + decide, "intake": intake, "decide": decide}[part]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pii", type=float, action="append", help="share of traces carrying PII (repeatable)")
    p.add_argument("--requests", type=int, default=60, help="trace requests per repetition (and as many logs)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--rate", type=float, default=40.0, help="trace requests per second of the injected clock")
    args = p.parse_args()
    stages = Stages()
    step = 1.0 / args.rate

    def sm_only(clock, tmp):
        return stages.span_metrics(stages.router), None

    def ts_memory(clock, tmp):
        ts = stages.tail_sampling(clock, None)
        return ts, ts

    def ts_durable(clock, tmp):
        ts = stages.tail_sampling(clock, tmp)
        return ts, ts

    def sm_ts_durable(clock, tmp):
        ts = stages.tail_sampling(clock, tmp)
        return stages.span_metrics(ts, ts), ts

    for pii in args.pii or [0.05, 1.0]:
        loads = [load(1_000_000 * (r + 1), args.requests, pii) for r in range(args.repeat)]
        n_spans = sum(r[1] for r in loads[0])
        items = n_spans + sum(r[3] for r in loads[0])
        print(f"pii {pii:g}: {args.requests} trace + {args.requests} logs requests, {items} items, "
              f"least of {args.repeat}")
        for label, per, run in (
            ("parse (received bytes -> messages)", items, lambda reqs: _parse(reqs)),
            ("receivers' check (wire.check_encoding)", items, lambda reqs: _check(reqs)),
            ("span_metrics", items, lambda reqs: measure(sm_only, reqs, step)),
            ("tail_sampling in memory (intake + decide)", items, lambda reqs: measure(ts_memory, reqs, step)),
            ("  of which intake (sorting requests in)", items, lambda reqs: measure(ts_memory, reqs, step, "intake")),
            ("  of which deciding and handing on", items, lambda reqs: measure(ts_memory, reqs, step, "decide")),
            ("tail_sampling durable (intake + decide)", items, lambda reqs: measure(ts_durable, reqs, step)),
            ("span_metrics + tail_sampling durable", items, lambda reqs: measure(sm_ts_durable, reqs, step)),
        ):
            best = min(run(reqs) for reqs in loads)
            print(f"  {label:44s} {best / per * 1e6:6.2f} µs/item")


def _parse(reqs) -> float:
    t0 = time.process_time()
    for spans, _, logs, _ in reqs:
        ExportTraceServiceRequest.FromString(spans)
        ExportLogsServiceRequest.FromString(logs)
    return time.process_time() - t0


def _check(reqs) -> float:
    """What the receivers do instead of parsing traces and logs (the C half checks on the wire)."""
    check, traces, logs = wire.check_encoding, wire.schema_of(ExportTraceServiceRequest), wire.schema_of(
        ExportLogsServiceRequest)
    t0 = time.process_time()
    for spans, _, log_records, _ in reqs:
        check(spans, traces, ExportTraceServiceRequest)
        check(log_records, logs, ExportLogsServiceRequest)
    return time.process_time() - t0


if __name__ == "__main__":
    main()
