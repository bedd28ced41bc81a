"""CPU per record row of the audit store's multi-row INSERT, by how its NULLs are bound (seventh round).

    .venv/bin/python benchmarks/sqlite_binding.py [--traces 9600] [--repeat 5]

Python 3.11's sqlite3 module adapts every bound value that is not an exact int, float, str or bytearray;
a None goes through a failed attribute lookup that formats an error message. The store binds a record's
missing texts as 0 and turns them back into NULL in the statement (``sidecar.audit.store._insert``).
Rows are the journal indexer's (``sidecar.wire.audit_rows`` of reduced benchmark traffic), written like
the store writes them: WAL, ``synchronous=FULL``, 256 rows per statement, one transaction. Least and
median of the repetitions.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from workload import trace_request  # noqa: E402

from sidecar import wire  # noqa: E402
from sidecar.audit import store  # noqa: E402
from sidecar.audit.records import ROW_LAYOUT, reduce  # noqa: E402

PER_STATEMENT = 256


def rows_of_traffic(traces: int) -> list[tuple]:
    rng = random.Random(3)
    rows: list[tuple] = []
    while len(rows) < traces:
        request = reduce(trace_request(rng, 64, pii=0.05)[0].SerializeToString())[0]
        made = wire.audit_rows(request, ROW_LAYOUT, 1)
        if made is None:
            raise SystemExit("the C wire scanner is not built (or SIDECAR_PURE_PYTHON is set): rows are made in C")
        rows += made
    return rows[:traces - traces % PER_STATEMENT]


def per_row(rows: list[tuple], nulls: tuple[int, ...], params) -> float:
    """CPU µs per row of writing ``rows`` into a fresh store-like table."""
    with tempfile.TemporaryDirectory() as tmp:
        db = sqlite3.connect(f"{tmp}/bench.db", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(f"CREATE TABLE records ({store._RECORD_COLUMNS})")
        sql = store._values_sql(f"INSERT INTO records ({store._COLUMN_LIST})", len(store.COLUMNS), PER_STATEMENT,
                                "", nulls)
        t0 = time.process_time()
        db.execute("BEGIN")
        for i in range(0, len(rows), PER_STATEMENT):
            db.execute(sql, params(chain.from_iterable(rows[i:i + PER_STATEMENT])))
        db.execute("COMMIT")
        spent = time.process_time() - t0
        db.close()
    return spent / len(rows) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--traces", type=int, default=9600)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    rows = rows_of_traffic(args.traces)
    nones = sum(v is None for row in rows for v in row) / len(rows)
    print(f"{len(rows)} rows of {len(store.COLUMNS)} columns, {nones:.1f} NULLs per row; CPU µs per row "
          f"(least, median of {args.repeat})")
    cases = (
        ("Nones bound as None", (), list),
        ("Nones bound as '' (wrong: for comparison only)", (), lambda vs: ["" if v is None else v for v in vs]),
        ("Nones bound as 0, NULLIF(?, 0) (the store)", store._NULLABLE,
         lambda vs: [0 if v is None else v for v in vs]),
    )
    figures: dict[str, list[float]] = {label: [] for label, _, _ in cases}
    for _ in range(args.repeat):  # the cases alternate, so a drift of the machine's speed touches each alike
        for label, nulls, params in cases:
            figures[label].append(per_row(rows, nulls, params))
    for label, got in figures.items():
        got.sort()
        print(f"  {label:50s} {got[0]:6.2f} {got[len(got) // 2]:6.2f}")


if __name__ == "__main__":
    main()
