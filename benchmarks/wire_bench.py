"""CPU per item of the wire scanner, each function on each half, and of the processors that call it.

    .venv/bin/python benchmarks/wire_bench.py [--requests 40] [--old-c PATH/TO/_wire.so]

Functions are timed on the received bytes of the benchmark workload (128 traces x 4 spans + 256 logs per
request). The processors (span_metrics, tail_sampling intake) are timed twice: with envelopes holding
the received bytes (as the receiver hands them on) and with envelopes holding only the message (a stage
that gets a parsed request serializes it once). ``--old-c`` also times another build of
the C module (e.g. one compiled from an older commit) on the same functions.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]

from workload import logs_request, trace_ids_of, trace_request  # noqa: E402

from sidecar import _wire_py, wire  # noqa: E402
from sidecar.component import Kind  # noqa: E402
from sidecar.config import ComponentId, parse_config  # noqa: E402
from sidecar.envelope import Envelope  # noqa: E402
from sidecar.pipeline import SignalRouter  # noqa: E402
from sidecar.registry import CreateSettings, factory_for  # noqa: E402
from sidecar.signals import Signal  # noqa: E402
from sidecar.telemetry import SelfTelemetry  # noqa: E402

KEYS = (b"ml.model.id", b"gen_ai.request.model", b"ml.model.version")


REPEAT = 3


def timed(label: str, items: int, f) -> None:
    """The best of REPEAT runs (the machine is shared: the minimum is the least disturbed)."""
    best = float("inf")
    for _ in range(REPEAT):
        t0 = time.process_time()
        f()
        best = min(best, time.process_time() - t0)
    print(f"  {label:44s} {best / items * 1e6:6.2f} us/item")


def use(impl) -> None:
    for name in ("check_ids", "span_metric_rows", "span_metric_groups", "span_runs", "log_runs", "MAX_KEYS"):
        setattr(wire, name, getattr(impl, name))


class Null:
    def consume(self, envelope) -> None:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--old-c", help="path of another build of sidecar/_wire.c to time as well")
    p.add_argument("--repeat", type=int, default=3, help="runs per figure; the best is printed")
    args = p.parse_args()
    global REPEAT
    REPEAT = args.repeat

    reqs = []
    for i in range(args.requests):
        tr, _ = trace_request(random.Random(i), 128)
        lr = logs_request(random.Random(1000 + i), trace_ids_of(tr))
        reqs.append((tr, lr, tr.SerializeToString(), lr.SerializeToString()))
    counts = [(Envelope(Signal.TRACES, tr).items, Envelope(Signal.LOGS, lr).items) for tr, lr, _, _ in reqs]
    spans = sum(len(s.spans) for tr, *_ in reqs for rs in tr.resource_spans for s in rs.scope_spans)
    logs = sum(len(s.log_records) for _, lr, *_ in reqs for rl in lr.resource_logs for s in rl.scope_logs)

    impls = [("python", _wire_py)]
    try:
        from sidecar import _wire
        impls.append(("c", _wire))
    except ImportError:
        print("(the C extension is not built)")
    if args.old_c:
        spec = importlib.util.spec_from_file_location("_wire", args.old_c)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        impls.append(("old c", old))

    cfg = parse_config((ROOT / "collector-config" / "sidecar.yaml").read_text(), environ={})
    tel = SelfTelemetry()
    router = SignalRouter("bench")
    router.routes = {Signal.TRACES: Null(), Signal.LOGS: Null(), Signal.METRICS: Null()}

    def make(name: str):
        cc = cfg.processors[name]
        f = factory_for(Kind.PROCESSOR, cc.id.type)
        return f.create(CreateSettings(ComponentId(name), Kind.PROCESSOR, tel.component("processor", name)),
                        cc.config, router)

    print(f"{args.requests} requests: {spans} spans, {logs} log records")
    for name, impl in impls:
        print(f"[{name}]")
        timed("check_ids (spans)", spans, lambda: [impl.check_ids(t, False) for _, _, t, _ in reqs])
        if name == "old c":  # its signature then: (request, keys, per-resource bases)
            bases = [("svc",) + ("",) * len(KEYS)] * 8
            timed("span_metric_rows", spans, lambda: [impl.span_metric_rows(t, KEYS, bases) for _, _, t, _ in reqs])
        else:
            timed("span_metric_rows", spans,
                  lambda: [impl.span_metric_rows(t, b"service.name", KEYS) for _, _, t, _ in reqs])
            if hasattr(impl, "span_metric_groups"):  # what span_metrics calls (counted per key in the scanner)
                bounds = tuple(range(10**6, 16 * 10**6, 10**6))
                timed("span_metric_groups", spans,
                      lambda: [impl.span_metric_groups(t, b"service.name", KEYS, bounds, 10_000) for _, _, t, _ in reqs])
        timed("span_runs (1 key)", spans, lambda: [impl.span_runs(t, KEYS[:1]) for _, _, t, _ in reqs])
        timed("log_runs", logs, lambda: [impl.log_runs(lg, 17) for _, _, _, lg in reqs])
        if name == "old c":
            continue
        use(impl)
        sm = make("span_metrics")
        timed("span_metrics, received bytes (per span)", spans,
              lambda: [sm.consume(Envelope(Signal.TRACES, encoded=t, items=c[0])) for (_, _, t, _), c in zip(reqs, counts)])
        timed("span_metrics, message only (per span)", spans,
              lambda: [sm.consume(Envelope(Signal.TRACES, tr)) for tr, *_ in reqs])

        def intake(received: bool) -> None:
            """Sorting into the buffer only (as stage_costs.py's "tail_sampling intake"); deciding is not timed."""
            procs = []

            def run() -> None:
                ts = make("tail_sampling")
                procs.append(ts)
                for (tr, lr, t, lg), (n_spans, n_logs) in zip(reqs, counts):
                    if received:
                        ts.consume(Envelope(Signal.TRACES, encoded=t, items=n_spans))
                        ts.consume(Envelope(Signal.LOGS, encoded=lg, items=n_logs))
                    else:
                        ts.consume(Envelope(Signal.TRACES, tr))
                        ts.consume(Envelope(Signal.LOGS, lr))

            how = "received bytes" if received else "message only"
            timed(f"tail_sampling intake, {how} (per item)", spans + logs, run)
            for ts in procs:
                ts.shutdown(time.monotonic() + 1)

        intake(True)
        intake(False)


if __name__ == "__main__":
    main()
