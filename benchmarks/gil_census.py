"""Why the threads of a process stopped running: a census of its context switches, from ``perf``.

    .venv/bin/python benchmarks/throughput.py --requests 160 --only "default: coll" --profile /tmp/p --profiler sched
    perf script -i /tmp/p/default__collector_config_sidecar_yaml__persistent_queue.perf > /tmp/p/default.txt
    .venv/bin/python benchmarks/gil_census.py /tmp/p/default.txt [/tmp/p/floor__decode__re_encode__forward_.txt]

Each ``sched:sched_switch`` sample (recorded with native stacks, ``--call-graph dwarf``) is put in one
class by the innermost frame that says why the thread left the CPU: waiting for the GIL
(``take_gil``), giving it up (``drop_gil``: a thread that woke a waiter and was preempted by it), a
Python lock or condition, a file sync, an SQLite commit, gRPC's own threads and calls. For the GIL
waits it also names the call that had released the GIL before (``os.fdatasync``, ``zlib.crc32``, an
SQLite step, a lock...): a thread that releases the GIL while others want it must wait to get it
back, and in a VM every such wait and wake-up costs microseconds of kernel time. Compare with the
floor's census to see which hand-overs the sidecar adds.
"""

from __future__ import annotations

import collections
import re
import sys

#: innermost native frames that say why a thread stopped, first match wins
REASONS = (
    ("take_gil", "waiting for the GIL"),
    ("drop_gil", "gave the GIL up"),
    ("lock_PyThread_acquire_lock", "Python lock or condition"),
    ("rlock_acquire", "Python lock or condition"),
    ("_queue_SimpleQueue_get_impl", "thread pool's work queue"),
    ("os_fdatasync_impl", "fdatasync"),
    ("os_fsync_impl", "fsync"),
    ("pysqlite_connection_commit_impl", "SQLite commit"),
    ("_pysqlite_query_execute", "SQLite statement"),
)
#: frames skipped when naming the call that released the GIL before a wait
_GLUE = ("[unknown]", "PyEval_RestoreThread", "PyEval_SaveThread", "PyEval_AcquireThread", "_PyEval_EvalFrameDefault")


def _frames(sample: str) -> tuple[str, list[tuple[str, str]]]:
    lines = [line.strip() for line in sample.strip().splitlines() if line.strip()]
    state = re.search(r"prev_state=(\S+)", lines[0]) if lines else None
    frames = []
    for line in lines[1:]:
        parts = line.split(None, 1)
        if len(parts) == 2:
            text = re.sub(r"\+0x[0-9a-f]+", "", parts[1])
            name, _, where = text.partition(" (")
            frames.append((name, where.rstrip(")").rsplit("/", 1)[-1]))
    return (state.group(1) if state else "?"), frames


def _call(name: str, lib: str) -> str:
    """A frame as the census names it: an extension's frames by their module (gRPC's have no symbols)."""
    if "cpython" in lib:
        module = lib.split(".")[0]
        return module if name == "[unknown]" else f"{name} ({module})"
    return "" if name in _GLUE else name


def census(path: str) -> tuple[int, collections.Counter, collections.Counter]:
    """(switches, switches by (state, reason), GIL waits by the call that had released the GIL)."""
    reasons: collections.Counter = collections.Counter()
    released_by: collections.Counter = collections.Counter()
    total = 0
    for sample in open(path).read().split("\n\n"):
        if "sched_switch" not in sample:
            continue
        total += 1
        state, frames = _frames(sample)
        names = [n for n, _ in frames]
        reason = None
        for i, name in enumerate(names):
            reason = next((r for f, r in REASONS if f == name), None)
            if reason is None and "cygrpc" in frames[i][1]:
                reason = "gRPC"
            if reason is not None:
                if name == "take_gil":
                    calls = (_call(n, lib) for n, lib in frames[i + 1:i + 12]
                             if not n.startswith("_PyObject_Vectorcall") and lib != "inlined")
                    callers = [c for c in calls if c]
                    released_by[" <- ".join(callers[:2]) or "?"] += 1
                break
        reasons[(state, reason or "other: " + " <- ".join(names[9:12]))] += 1
    return total, reasons, released_by


def main(paths: list[str]) -> None:
    for path in paths:
        total, reasons, released_by = census(path)
        print(f"== {path}: {total} context switches (S sleeping, D in I/O, R preempted)")
        for (state, reason), n in reasons.most_common(14):
            print(f"{n:7d} {100 * n / total:5.1f}%  {state:2} {reason}")
        print("-- GIL waits, by the call that had given the GIL up")
        for call, n in released_by.most_common(14):
            print(f"{n:7d} {100 * n / total:5.1f}%  {call}")


if __name__ == "__main__":
    main(sys.argv[1:])
