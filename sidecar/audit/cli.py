"""``python -m sidecar audit query --store URL [filters]``: the audit trail, as a table or JSON lines.

``python -m sidecar audit index --store URL``: make records of the journaled requests now (the
sidecar does it every ``index_interval``, and every read does it first); prints what it did.

Filters combine with AND. ``--since``/``--until`` take an ISO-8601 time
(``2026-12-01T14:00:00Z``; no zone means UTC) or a duration back from now (``2h``, ``30m``).
``--format jsonl`` prints one record per line with every field (what
``python -m instrumentation.replay --audit FILE`` reads).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone

from sidecar.audit.store import Query, StoreError
from sidecar.audit.urls import open_store
from sidecar.config import parse_duration


def parse_time(text: str, now_ns: int | None = None) -> int:
    """Unix nanoseconds from an ISO-8601 time or a duration back from now."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    try:
        return now_ns - int(parse_duration(text) * 1e9)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected an ISO-8601 time such as 2026-12-01T14:00:00Z or a duration such as 2h") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * 1e9)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="otel-sidecar audit", description="The sidecar's audit trail.")
    sub = p.add_subparsers(dest="action", required=True)
    q = sub.add_parser("query", help="print audit records matching every filter given")
    q.add_argument("--store", required=True, help="sqlite:///path/audit.db, a path, or postgresql://...")
    q.add_argument("--request-id")
    q.add_argument("--trace-id")
    q.add_argument("--model-version")
    q.add_argument("--status", type=str.upper, choices=("OK", "ERROR", "UNSET"))
    q.add_argument("--since", type=parse_time, help="ISO-8601 time or a duration back from now (2h)")
    q.add_argument("--until", type=parse_time, help="ISO-8601 time or a duration back from now")
    q.add_argument("--limit", type=int)
    q.add_argument("--format", choices=("table", "jsonl"), default="table")
    i = sub.add_parser("index", help="make records of the journaled requests now")
    i.add_argument("--store", required=True, help="sqlite:///path/audit.db, a path, or postgresql://...")
    return p


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


_HEAD = ("time", "request_id", "trace_id", "service", "model", "status", "error", "latency_ms", "kept")


def table(records) -> str:
    rows = [_HEAD]
    for r in records:
        model = (r.model_id or "-") + (f"@{r.model_version}" if r.model_version else "")
        kept = f"yes ({r.kept_policy})" if r.trace_kept and r.kept_policy else "yes" if r.trace_kept else "no"
        rows.append((_iso(r.time_unix_nano), r.request_id or "-", r.trace_id, r.service or "-", model, r.status,
                     r.error_code or "-", f"{r.latency_ms:.1f}", kept))
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEAD))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def _index(store) -> int:
    try:
        done = store.index_journal()
        _waiting, unreadable = store.journal_entries()
    except StoreError as e:
        print(f"audit: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(f"indexed {done.entries} journaled request(s): {done.written} new record(s), {done.duplicates} "
          f"already stored; {unreadable} entr{'y' if unreadable == 1 else 'ies'} kept unreadable")
    return 1 if unreadable else 0  # an operator (or a CronJob) notices damaged entries


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        store = open_store(args.store).open()
    except (ValueError, StoreError) as e:
        print(f"audit: {e}", file=sys.stderr)
        return 2
    if args.action == "index":
        return _index(store)
    try:
        records = store.query(Query(request_id=args.request_id, trace_id=args.trace_id,
                                    model_version=args.model_version, status=args.status,
                                    since=args.since, until=args.until, limit=args.limit))
    except StoreError as e:
        print(f"audit: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()
    if args.format == "jsonl":
        for r in records:
            sys.stdout.write(json.dumps(r.to_json(), sort_keys=True) + "\n")
    else:
        print(table(records))
        print(f"{len(records)} record(s)", file=sys.stderr)
    return 0
