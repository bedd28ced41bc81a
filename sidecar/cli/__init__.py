"""``python -m sidecar traces ls|show|tail``: look at what the embedded backend (the file exporter) kept.

The file exporter writes one OTLP request per line, which ``grep`` and ``tail -f`` cannot
read as traces; these commands group spans and logs by trace and draw them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sidecar import __version__
from sidecar.cli import render
from sidecar.cli.store import StoreError, TraceStore, default_directory

__all__ = ["main"]

_EPILOG = """examples:
  python -m sidecar traces ls --dir var/demo/telemetry
  python -m sidecar traces ls --errors -n 5
  python -m sidecar traces show 4bf92f3577b34da6a3ce929d0e0e4736
  python -m sidecar traces show 6e8260fa-eb92-482d-951b-8a198bfd13c9 --attributes
  python -m sidecar traces tail"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", "-d", type=Path, default=None,
                   help="the file exporter's directory (default: $SIDECAR_FILE_EXPORT_DIR or ./var/telemetry)")
    p.add_argument("--version", action="version", version=f"otel-sidecar {__version__}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sidecar traces", epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Read the traces the sidecar's file exporter kept, with their logs.")
    p.add_argument("--version", action="version", version=f"otel-sidecar {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{ls,show,tail}")

    ls = sub.add_parser("ls", help="recent traces, newest first",
                        description="Recent traces, newest first: start time, trace id, root span, duration, "
                                    "status, model version, the policy that kept it and the request id.")
    _common(ls)
    ls.add_argument("-n", "--limit", type=int, default=20, help="how many traces (0: all; default 20)")
    ls.add_argument("--errors", action="store_true", help="only traces with an ERROR span")
    ls.add_argument("--json", action="store_true", help="one JSON object per trace instead of a table")

    show = sub.add_parser("show", help="one trace as a tree with its logs in place",
                          description="One trace as a tree of spans with offsets and durations, and the log "
                                      "records emitted inside each span. ID is a trace id (or a prefix of 8+ hex "
                                      "characters) or a request id (the request.id attribute).")
    _common(show)
    show.add_argument("id", metavar="ID", help="trace id, trace id prefix, or request id")
    show.add_argument("-a", "--attributes", action="store_true", help="also print span attributes and events")
    show.add_argument("--no-logs", action="store_true", help="leave out the log records")

    tail = sub.add_parser("tail", help="follow new traces as the sidecar writes them",
                          description="Print a line for every trace written after start (or, with -n, the last N "
                                      "first), until interrupted.")
    _common(tail)
    tail.add_argument("-n", "--lines", type=int, default=0, help="print the last N traces first (default 0)")
    tail.add_argument("--interval", type=float, default=0.5, help="seconds between reads (default 0.5)")
    tail.add_argument("--errors", action="store_true", help="only traces with an ERROR span")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        store = TraceStore(args.dir or default_directory())
        store.refresh()
        if args.command == "ls":
            return _ls(store, args)
        if args.command == "show":
            return _show(store, args)
        return _tail(store, args)
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `| head`
        return 0
    except KeyboardInterrupt:
        return 130


def _ls(store: TraceStore, args) -> int:
    traces = [t for t in store.recent() if t.is_error or not args.errors]
    traces = traces[: args.limit] if args.limit > 0 else traces
    if args.json:
        for t in traces:
            root = t.root
            print(json.dumps({"trace_id": t.trace_id, "start": render.clock(t.start_ns), "root": root.name if root else None,
                              "duration_ms": round(t.duration_ms, 3), "status": "ERROR" if t.is_error else "OK",
                              "model_version": t.first(render.MODEL_VERSION), "policy": t.first(render.POLICY),
                              "request_id": t.first(render.REQUEST_ID), "spans": len(t.spans), "logs": len(t.logs)}))
        return 0
    if not traces:
        print(f"no traces in {store.directory}", file=sys.stderr)
        return 0
    print(render.LIST_HEADER)
    for t in traces:
        print(render.list_line(t))
    return 0


def _show(store: TraceStore, args) -> int:
    hits = store.find(args.id)
    if not hits:
        print(f"error: no trace with trace id or request id {args.id!r} in {store.directory} "
              f"(dropped by sampling, not flushed yet, or in another directory; every request, kept or not, "
              f"is in the audit store where one is configured: python -m sidecar audit query --request-id ID)",
              file=sys.stderr)
        return 1
    if len(hits) > 1 and len({t.trace_id for t in hits}) > 1 and not all(
            str(t.first(render.REQUEST_ID)) == args.id for t in hits):
        print(f"error: {args.id!r} is a prefix of {len(hits)} trace ids; give more characters:", file=sys.stderr)
        for t in hits[:10]:
            print(f"  {t.trace_id}", file=sys.stderr)
        return 1
    for i, t in enumerate(sorted(hits, key=lambda t: t.start_ns)):
        if i:
            print()
        print("\n".join(render.tree(t, show_attributes=args.attributes, show_logs=not args.no_logs)))
    return 0


def _tail(store: TraceStore, args) -> int:
    shown: set[str] = set()
    start = [t for t in store.recent() if t.is_error or not args.errors]
    shown.update(t.trace_id for t in store.recent())
    print(render.LIST_HEADER, flush=True)
    for t in reversed(start[: args.lines] if args.lines > 0 else []):
        print(render.list_line(t), flush=True)
    while True:
        time.sleep(args.interval)
        new = [store.traces[tid] for tid in store.refresh() if tid not in shown]
        for t in sorted(new, key=lambda t: t.start_ns):
            shown.add(t.trace_id)
            if t.is_error or not args.errors:
                print(render.list_line(t), flush=True)
