"""Where the redaction processor's time goes, in one process: the object path against the wire path.

    .venv/bin/python benchmarks/wire_redaction_bench.py            # light (5%) and dense (100%) PII
    .venv/bin/python benchmarks/wire_redaction_bench.py --busy     # beside a busy Python thread

Each figure is CPU µs per item (span or log record), the best of several passes over the same
requests (``benchmarks/workload.py``: 128 traces x 4 spans + 256 log records per pair). The object
path is what the processor did before issue 13: the receiver has parsed the request already, so it
costs the walk and one serialization. The wire path is split into its parts: ``locate`` (the C or
pure-Python half), the value rules on the request's texts (``RedactionEngine.scan_joined``: all
texts joined, one RE2 call per match) and the rest (key rules, summaries, splice). The row below
it scans the same texts the way the wire path did before, one by one (the prefilter over the join,
then ``scan`` per flagged text): about three RE2 calls per text.

``--busy`` runs a Python thread that never waits beside the measured one and counts the measured
thread's CPU only: what a receiver thread pays in a sidecar whose other threads are working. The
RE2 binding hands the GIL over on every call, and each hand-over costs context switches there.

    .venv/bin/python benchmarks/wire_redaction_bench.py --baseline 0a6e937   # engine before vs now, interleaved

``--baseline REV`` loads ``redaction/_engine.py`` and ``_detectors.py`` as they were at git revision
REV and times both engines' ``scan`` and both wire paths pass by pass in turn, so a machine
shared with other work slows both alike. An engine from before ``scan_joined`` scans each text
alone on the wire path.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import bisect
import contextlib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest  # noqa: E402
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest  # noqa: E402
from workload import logs_request, trace_ids_of, trace_request  # noqa: E402

from redaction import RedactionConfig, RedactionEngine  # noqa: E402
from redaction._engine import _UNANCHORED, SCAN  # noqa: E402
from redaction.otlp import OtlpRedactor  # noqa: E402
from sidecar import wire_redaction  # noqa: E402
from sidecar._wire_redact_types import LOGS, TRACES  # noqa: E402

TYPES = {"traces": (ExportTraceServiceRequest, TRACES), "logs": (ExportLogsServiceRequest, LOGS)}


def load(pii: float, pairs: int) -> tuple[list[tuple[str, bytes]], int]:
    rng = random.Random(1)
    reqs = []
    items = 0
    for _ in range(pairs):
        tr, _ = trace_request(rng, 128, pii=pii)
        lr = logs_request(rng, trace_ids_of(tr), pii=pii)
        reqs += [("traces", tr.SerializeToString()), ("logs", lr.SerializeToString())]
        items += 128 * 4 + len(lr.resource_logs[0].scope_logs[0].log_records)
    return reqs, items


#: the clock of the measured work: the process's CPU, or with --busy the measuring thread's own
CLOCK = time.process_time


def best(fn, items: int, passes: int) -> float:
    times = []
    for _ in range(passes):
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return min(times) / items * 1e6


@contextlib.contextmanager
def busy_thread():
    """A Python thread that never waits, as a sidecar's other working threads are, until the block ends."""
    stop = threading.Event()

    def spin() -> None:
        n = 0
        while not stop.is_set():
            n = (n + 1) % 1000

    t = threading.Thread(target=spin, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def scan_each(engine, text: bytes, ends) -> dict:
    """The wire path's scan before ``scan_joined``: the prefilter over the joined texts, then ``scan`` per hit."""
    pre, n = engine._prefilter, len(text)  # noqa: SLF001
    found = {}
    start = pre.Match(_UNANCHORED, text, 0, n)[0][0] if pre is not None else -1
    while start >= 0:
        i = bisect.bisect_right(ends, start)
        counts: dict = {}
        out = engine.scan(text[ends[i - 1] if i else 0:ends[i] - 1], counts)
        if out is not None:
            found[i] = (out, counts)
        if ends[i] >= n:
            break
        start = pre.Match(_UNANCHORED, text, ends[i], n)[0][0]
    return found


def measure(pii: float, pairs: int, passes: int) -> dict[str, float]:
    reqs, items = load(pii, pairs)
    engine = RedactionEngine(RedactionConfig(allow_all_keys=True))
    for signal, raw in reqs:  # warm the key cache, as a running sidecar has it
        wire_redaction.redact(engine, signal, raw)
    parsed = [(signal, TYPES[signal][0].FromString(raw)) for signal, raw in reqs]
    redactor = OtlpRedactor(engine)

    def object_path():
        for signal, msg in parsed:
            copy = type(msg)()
            copy.CopyFrom(msg)
            redactor.redact(signal, copy)
            copy.SerializeToString()

    copying = best(lambda: [type(m)().CopyFrom(m) for _, m in parsed], items, passes)
    located = [(loc.text, list(memoryview(loc.text_ends).cast("q")))
               for loc in (wire_redaction.locate(raw, TYPES[s][1], engine._key_cache, SCAN)  # noqa: SLF001
                           for s, raw in reqs)]
    for text, ends in located:
        assert engine.scan_joined(text, ends) == scan_each(engine, text, ends), "joined and one by one disagree"
    out = {
        "object path (walk + serialize)": best(object_path, items, passes) - copying,
        "wire path": best(lambda: [wire_redaction.redact(engine, s, raw) for s, raw in reqs], items, passes),
        "  locate": best(lambda: [wire_redaction.locate(raw, TYPES[s][1], engine._key_cache, SCAN)  # noqa: SLF001
                                  for s, raw in reqs], items, passes),
        "  value rules, texts joined (scan_joined)": best(
            lambda: [engine.scan_joined(text, ends) for text, ends in located], items, passes),
    }
    out["  rest (key rules, summaries, splice)"] = (out["wire path"] - out["  locate"]
                                                    - out["  value rules, texts joined (scan_joined)"])
    out["value rules, each text alone (before)"] = best(
        lambda: [scan_each(engine, text, ends) for text, ends in located], items, passes)
    return out


def baseline_engine(rev: str) -> type:
    """``RedactionEngine`` from redaction/_engine.py and _detectors.py as they were at git revision ``rev``."""
    import redaction._engine as now

    mods = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("_detectors", "_engine"):
            src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:redaction/{name}.py"], check=True,
                                 capture_output=True, text=True).stdout
            if name == "_engine":
                src = src.replace("from redaction._detectors import", "from baseline_detectors import")
            path = Path(tmp) / f"baseline{name}.py"
            path.write_text(src)
            spec = importlib.util.spec_from_file_location(f"baseline{name}", path)
            mods[name] = sys.modules[f"baseline{name}"] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mods[name])
    old = mods["_engine"]
    old.SCAN, old.IGNORE, old.DROP = now.SCAN, now.IGNORE, now.DROP  # the wire path compares by identity
    if not hasattr(old.RedactionEngine, "scan_joined"):  # before it, the wire path scanned each text alone
        old.RedactionEngine.scan_joined = lambda self, text, ends: scan_each(self, text, list(ends))
    return old.RedactionEngine


def compare(rev: str, pii: float, pairs: int, passes: int) -> dict[str, tuple[float, float]]:
    """(baseline, now) CPU µs/item for the engine's scan and the whole wire path, passes interleaved."""
    reqs, items = load(pii, pairs)
    engines = [baseline_engine(rev)(RedactionConfig(allow_all_keys=True)), RedactionEngine(RedactionConfig(
        allow_all_keys=True))]
    for engine in engines:
        for signal, raw in reqs:
            wire_redaction.redact(engine, signal, raw)
    outs = [[wire_redaction.redact(e, s, raw) for s, raw in reqs] for e in engines]
    assert outs[0] == outs[1], "the engines disagree"
    located = [wire_redaction.locate(raw, TYPES[s][1], engines[1]._key_cache, SCAN) for s, raw in reqs]  # noqa: SLF001
    values = []
    for loc in located:
        ends = list(memoryview(loc.text_ends).cast("q"))
        values += [loc.text[ends[i - 1] if i else 0:ends[i] - 1] for i in scan_each(engines[1], loc.text, ends)]
    parsed = [(signal, TYPES[signal][0].FromString(raw)) for signal, raw in reqs]

    def object_path(redactor: OtlpRedactor) -> None:
        for signal, msg in parsed:
            copy = type(msg)()
            copy.CopyFrom(msg)
            redactor.redact(signal, copy)
            copy.SerializeToString()

    jobs = {
        "scan (value rules on candidates)": [lambda e=e: [e.scan(v, {}) for v in values] for e in engines],
        "object path (walk + serialize + copy)": [lambda r=OtlpRedactor(e): object_path(r) for e in engines],
        "wire path": [lambda e=e: [wire_redaction.redact(e, s, raw) for s, raw in reqs] for e in engines],
    }
    out = {}
    for name, fns in jobs.items():
        times = [[], []]
        for _ in range(passes):
            for k, fn in enumerate(fns):
                t0 = CLOCK()
                fn()
                times[k].append(CLOCK() - t0)
        out[name] = (min(times[0]) / items * 1e6, min(times[1]) / items * 1e6)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=10, help="trace+log request pairs per pass")
    p.add_argument("--passes", type=int, default=7)
    p.add_argument("--baseline", metavar="REV", help="also time the engine of this git revision, interleaved")
    p.add_argument("--busy", action="store_true", help="beside a busy Python thread; the measuring thread's CPU")
    args = p.parse_args()
    global CLOCK
    if args.busy:
        CLOCK = time.thread_time
    with busy_thread() if args.busy else contextlib.nullcontext():
        report(args)


def report(args) -> None:
    if args.baseline:
        print(f"| {'CPU µs/item, ' + args.baseline + ' -> now':40} | light PII (5%) | dense PII (100%) |")
        print(f"|{'-' * 42}|---------------:|-----------------:|")
        light, dense = (compare(args.baseline, pii, args.pairs, args.passes) for pii in (0.05, 1.0))
        for name in light:
            cells = [f"{a:.2f} -> {b:.2f}" for a, b in (light[name], dense[name])]
            print(f"| {name:40} | {cells[0]:>14} | {cells[1]:>16} |")
        return
    light = measure(0.05, args.pairs, args.passes)
    dense = measure(1.0, args.pairs, args.passes)
    print(f"wire half: {wire_redaction.IMPLEMENTATION}{', beside a busy thread' if args.busy else ''}\n")
    print(f"| {'CPU µs/item':40} | light PII (5%) | dense PII (100%) |")
    print(f"|{'-' * 42}|---------------:|-----------------:|")
    for name in light:
        print(f"| {name:40} | {light[name]:14.2f} | {dense[name]:16.2f} |")


if __name__ == "__main__":
    main()
