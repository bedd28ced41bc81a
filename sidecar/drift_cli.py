"""``python -m sidecar drift``: export and inspect drift references.

::

    # a known-good period, recorded by the sidecar's `file` exporter, becomes the reference
    python -m sidecar drift export-reference --from var/telemetry/metrics.jsonl --out ref.json \\
        --model-id fraud --model-version 3 --since 2026-12-01T08:00:00Z --until 2026-12-01T20:00:00Z \\
        --as-version '*'
    python -m sidecar drift show ref.json

Pin it by naming it in the config (``processors.drift.reference.file: ref.json``) and restarting
the sidecar; entries for version ``*`` apply to every version without its own entry.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import sys

from sidecar.processors.drift.state import (
    DeltaTracker,
    Key,
    ReferenceError,
    Window,
    dump_reference,
    iter_otlp_json_metrics,
    load_reference,
)


def _time(value: str) -> int:
    """ISO-8601 (``2026-12-01T08:00:00Z``) -> Unix nanoseconds."""
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an ISO-8601 time such as 2026-12-01T08:00:00Z, "
                                         f"got {value!r}") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return int(t.timestamp() * 1e9)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="otel-sidecar drift", description="Export and inspect drift references.")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export-reference", help="write a reference file from recorded OTLP metrics")
    e.add_argument("--from", dest="sources", action="append", required=True,
                   help="a file exporter's metrics.jsonl (or its directory); repeatable")
    e.add_argument("--out", required=True, help="the reference file to write (JSON)")
    e.add_argument("--model-id", help="only this model")
    e.add_argument("--model-version", help="only this version")
    e.add_argument("--as-version", help="write every entry under this version ('*': applies to all versions)")
    e.add_argument("--since", type=_time, help="only data points at or after this time (ISO-8601)")
    e.add_argument("--until", type=_time, help="only data points before this time (ISO-8601)")
    s = sub.add_parser("show", help="list a reference file's features and their sample counts")
    s.add_argument("reference")
    return p


def _paths(sources: list[str]) -> list[str]:
    out = []
    for src in sources:
        if os.path.isdir(src):
            found = sorted(glob.glob(os.path.join(src, "metrics.jsonl*")), reverse=True)  # .N oldest first
            if not found:
                raise ReferenceError(f"{src}: no metrics.jsonl in this directory")
            out.extend(found)
        elif os.path.isfile(src):
            out.append(src)
        else:
            raise ReferenceError(f"{src}: no such file or directory")
    return out


def _in_period(request, since: int | None, until: int | None) -> None:
    """Drop the data points outside [since, until) in place."""
    for rm in request.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                if kind is None:
                    continue
                points = getattr(m, kind).data_points
                keep = [dp for dp in points if (since is None or dp.time_unix_nano >= since) and
                        (until is None or dp.time_unix_nano < until)]
                if len(keep) != len(points):
                    copies = [type(dp)() for dp in keep]
                    for c, dp in zip(copies, keep):
                        c.CopyFrom(dp)
                    del points[:]
                    points.extend(copies)


def export_reference(sources: list[str], *, model_id: str | None = None, model_version: str | None = None,
                     as_version: str | None = None, since: int | None = None,
                     until: int | None = None) -> dict[Key, Window]:
    """Sum the drift deltas of the recorded period per (model id, version, feature).

    Cumulative series contribute what they gained inside the period, measured from their last
    point before ``since`` (a series first seen inside the period counts from its start).
    """
    tracker = DeltaTracker()
    total: dict[Key, Window] = {}
    for path in _paths(sources):
        for request in iter_otlp_json_metrics(path):
            if since is not None:  # points before the period only set the baseline of their series
                early = type(request)()
                early.CopyFrom(request)
                _in_period(early, None, since)
                tracker.commit(tracker.deltas(early)[2], 0.0)
            _in_period(request, since, until)
            deltas, _, baselines = tracker.deltas(request)
            tracker.commit(baselines, 0.0)
            for key, w in deltas.items():
                if model_id is not None and key[0] != model_id or model_version is not None and key[1] != model_version:
                    continue
                if as_version is not None:
                    key = (key[0], as_version, key[2])
                have = total.get(key)
                if have is None:
                    total[key] = w
                elif have.numeric == w.numeric and have.bounds == w.bounds:
                    have.add(w)
    return total


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "show":
            ref = load_reference(args.reference)
            for (model_id, version, feature), w in sorted(ref.items()):
                kind = "numeric" if w.numeric else f"categorical ({len(w.categories)} categories)"
                print(f"{model_id}\t{version}\t{feature}\t{w.total}\t{kind}")
            return 0
        windows = export_reference(args.sources, model_id=args.model_id, model_version=args.model_version,
                                   as_version=args.as_version, since=args.since, until=args.until)
    except ReferenceError as e:
        print(f"drift: {e}", file=sys.stderr)
        return 2
    if not windows:
        print("drift: no ml.drift.* data points matched (is drift enabled in the app, and the period right?)",
              file=sys.stderr)
        return 1
    doc = dump_reference(windows, created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                         source=", ".join(args.sources))
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, args.out)
    print(f"drift: wrote {len(windows)} features to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
