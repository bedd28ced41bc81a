"""Plain-text views of traces: one line per trace for listings, a tree with logs in place for one trace.

No colour library: the sidecar image carries only what the collector needs, and the
output must stay greppable when piped.
"""

from __future__ import annotations

import json
import time
from typing import Any

from sidecar.cli.store import MODEL_VERSION, POLICY, REQUEST_ID, STATUS_ERROR, LogRow, SpanRow, Trace, value

_KINDS = {1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}
LIST_HEADER = f"{'TIME (UTC)':23}  {'TRACE ID':32}  {'ROOT':28}  {'DURATION':>10}  {'STATUS':6}  {'MODEL VER':9}  {'KEPT BY':8}  REQUEST ID"


def clock(ns: int) -> str:
    """UTC wall time with milliseconds."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ns / 1e9)) + f".{ns // 1_000_000 % 1000:03d}"


def ms(value: float) -> str:
    return f"{value / 1000:.2f}s" if abs(value) >= 1000 else f"{value:.1f}ms"


def offset(value_ms: float) -> str:
    """An offset from the trace's start; negative when a log precedes the first span kept."""
    return ("+" if value_ms >= 0 else "") + ms(value_ms)


def _short(v: Any, width: int) -> str:
    s = "-" if v is None or v == "" else str(v)
    return s if len(s) <= width else s[: width - 1] + "…"


def list_line(t: Trace) -> str:
    root = t.root
    name = root.name if root else "?"
    status = "ERROR" if t.is_error else "ok"
    return (f"{clock(t.start_ns):23}  {t.trace_id:32}  {_short(name, 28):28}  {ms(t.duration_ms):>10}  {status:6}  "
            f"{_short(t.first(MODEL_VERSION), 9):9}  {_short(t.first(POLICY), 8):8}  {_short(t.first(REQUEST_ID), 36)}")


def _fmt_value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))


def _log_line(lg: LogRow, t0: int) -> str:
    body = lg.body if isinstance(lg.body, str) else json.dumps(lg.body, separators=(",", ":"))
    return f"{offset((lg.time_ns - t0) / 1e6)} {lg.severity or 'LOG'} {body}"


def tree(t: Trace, show_attributes: bool = False, show_logs: bool = True) -> list[str]:
    """The trace as an indented tree: span name, offset from the trace's start, duration, status,
    its attributes and events (on demand) and the log records emitted inside it, in time order."""
    t0 = t.start_ns
    root = t.root
    head = [f"trace {t.trace_id}  {clock(t0)}  {ms(t.duration_ms)}  {'ERROR' if t.is_error else 'ok'}"
            f"  {len(t.spans)} spans, {len(t.logs)} logs"]
    for label, key in (("request id", REQUEST_ID), ("model version", MODEL_VERSION), ("kept by policy", POLICY)):
        v = t.first(key)
        if v is not None:
            head.append(f"{label}: {v}")
    children: dict[str, list[SpanRow]] = {}
    ids = {s.span_id for s in t.spans}
    tops = []
    for s in t.spans:
        if s.parent_id and s.parent_id in ids:
            children.setdefault(s.parent_id, []).append(s)
        else:
            tops.append(s)
    logs_by_span: dict[str, list[LogRow]] = {}
    for lg in sorted(t.logs, key=lambda x: x.time_ns):
        key = lg.span_id if lg.span_id in ids else (root.span_id if root else "")
        logs_by_span.setdefault(key, []).append(lg)
    out = head
    if tops and tops[0] is not root:
        tops.sort(key=lambda s: s.start_ns)
    if any(s.parent_id for s in tops):
        out.append("(parent span not kept or not received: shown at the top level)")

    def emit(prefix: str, text: str) -> None:
        """Multi-line values (stack traces) stay inside their span's indentation."""
        first, *rest = text.split("\n")
        out.append(prefix + first)
        out.extend(prefix + "    " + line for line in rest)

    def walk(span: SpanRow, prefix: str, last: bool) -> None:
        branch = "└─ " if last else "├─ "
        status = ""
        if span.status_code == STATUS_ERROR:
            status = "  ERROR" + (f": {span.status_message}" if span.status_message else "")
        kind = _KINDS.get(span.kind, "")
        kind = f"  [{kind}]" if kind else ""
        out.append(f"{prefix}{branch}{span.name}{kind} {offset((span.start_ns - t0) / 1e6)} {ms(span.duration_ms)}{status}")
        inner = prefix + ("   " if last else "│  ")
        kids = sorted(children.get(span.span_id, []), key=lambda s: s.start_ns)
        bar = "│  " if kids else "   "
        if show_attributes:
            for k in sorted(span.attributes):
                emit(f"{inner}{bar}  ", f"{k} = {_fmt_value(span.attributes[k])}")
            for ev in span.events:
                out.append(f"{inner}{bar}  event {offset((int(ev.get('timeUnixNano', t0)) - t0) / 1e6)} {ev.get('name', '')}")
                for kv in ev.get("attributes", []):
                    emit(f"{inner}{bar}    ", f"{kv['key']} = {_fmt_value(value(kv.get('value', {})))}")
        if show_logs:
            for lg in logs_by_span.get(span.span_id, []):
                emit(f"{inner}{bar}  ", f"≡ {_log_line(lg, t0)}")
        for i, kid in enumerate(kids):
            walk(kid, inner, i == len(kids) - 1)

    for i, s in enumerate(tops):
        walk(s, "", i == len(tops) - 1)
    return out
