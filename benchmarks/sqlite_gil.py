"""The audit store's insert beside a busy Python thread: one step per row (executemany) or a few
multi-row statements (``sidecar.audit.store._insert``).

The sqlite3 module releases the GIL around every step of a statement. With another thread waiting
for the GIL, each release hands it over and the writer waits to get it back; in the sidecar the
receivers, tail sampling and the exporters are those threads. Printed: the writer thread's CPU and
wall time per record, for 128-record commits like the audit exporter's, uncontended and contended.

    .venv/bin/python benchmarks/sqlite_gil.py [--requests 60]
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from workload import trace_request  # noqa: E402

from sidecar.audit import store as S  # noqa: E402
from sidecar.audit.records import extract, reduce  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=60, help="requests of 128 traces (one record each)")
    args = ap.parse_args()
    rng = random.Random(1)
    now = time.time_ns()
    groups = [[S._row(r, now) for r in extract(reduce(trace_request(rng, 128, 0.05)[0].SerializeToString())[0]).records]
              for _ in range(args.requests)]
    n = sum(map(len, groups))
    head = f"INSERT INTO audit_part_1 ({S._COLUMN_LIST})"
    one = "(" + ", ".join("?" * len(S.COLUMNS)) + ")"
    ways = {"executemany (a step per row)": lambda cur, rows: cur.executemany(f"{head} VALUES {one}", rows),
            "multi-row statements (_insert)": lambda cur, rows: S._insert(cur, head, rows)}
    stop = threading.Event()

    def busy() -> None:
        x = 0
        while not stop.is_set():
            x += 1

    print(f"{n} records in {len(groups)} commits of 128, SQLite WAL synchronous=FULL")
    try:
        for contended in (False, True):
            if contended:
                threading.Thread(target=busy, daemon=True).start()
            for name, insert in ways.items():
                with tempfile.TemporaryDirectory() as d:
                    conn = sqlite3.connect(f"{d}/a.db", isolation_level=None)
                    conn.execute("PRAGMA journal_mode=WAL")
                    conn.execute("PRAGMA synchronous=FULL")
                    conn.execute(f"CREATE TABLE audit_part_1 ({S._RECORD_COLUMNS})")
                    conn.execute("CREATE INDEX audit_part_1_time ON audit_part_1 (time_unix_nano)")
                    cur = conn.cursor()
                    cpu, wall = time.thread_time(), time.perf_counter()
                    for rows in groups:
                        cur.execute("BEGIN IMMEDIATE")
                        insert(cur, rows)
                        cur.execute("COMMIT")
                    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
                    conn.close()
                print(f"  {'one busy thread beside it' if contended else 'alone':26s} {name:32s} "
                      f"{cpu / n * 1e6:7.1f} µs CPU/record {wall / n * 1e6:9.1f} µs wall/record")
    finally:
        stop.set()


if __name__ == "__main__":
    main()
