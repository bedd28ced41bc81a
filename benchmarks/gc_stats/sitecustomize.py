"""Time spent in Python's cyclic garbage collector, per generation, in every process started with it.

    GC_STATS_DIR=/tmp/gc PYTHONPATH=$PWD/benchmarks/gc_stats .venv/bin/python benchmarks/throughput.py --only default ...
    cat /tmp/gc/*.txt        # one line per process: its argv, collections and seconds per generation, CPU

Python imports ``sitecustomize`` from the path at start-up, so the sidecars the benchmark starts (which
inherit PYTHONPATH) report too; the path must be absolute, as they run in a directory of their own.
Each process rewrites its line every second while it runs.
"""

import gc
import os
import sys
import threading
import time

_DIR = os.environ.get("GC_STATS_DIR")

if _DIR:
    _started: list[float] = [0.0]
    _seconds = [0.0, 0.0, 0.0]
    _count = [0, 0, 0]

    def _timed(phase: str, info: dict) -> None:
        if phase == "start":
            _started[0] = time.perf_counter()
        else:
            g = info["generation"]
            _seconds[g] += time.perf_counter() - _started[0]
            _count[g] += 1

    def _report() -> None:
        os.makedirs(_DIR, exist_ok=True)
        path = os.path.join(_DIR, f"gc.{os.getpid()}.txt")
        while True:
            time.sleep(1)
            with open(path, "w") as f:
                f.write(f"{' '.join(sys.argv)[:120]}: collections {_count} seconds "
                        f"{[round(s, 3) for s in _seconds]} total {sum(_seconds):.3f} of CPU {time.process_time():.2f}\n")

    gc.callbacks.append(_timed)
    threading.Thread(target=_report, daemon=True, name="gc-stats").start()
