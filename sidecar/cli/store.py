"""Reading the embedded backend: the file exporter's OTLP/JSON lines, grouped into traces.

The file exporter writes one Export*ServiceRequest per line into ``traces.jsonl`` and
``logs.jsonl`` (rotated copies ``.1`` newest ... ``.N`` oldest). A CLI reads them as plain
JSON (ids are already hex there) and groups spans and log records by trace id; nothing
here is on the sidecar's hot path.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from contract.attributes import ML_MODEL_VERSION, REQUEST_ID, SAMPLING_POLICY, SERVICE_NAME

STATUS_ERROR = 2
MODEL_VERSION = ML_MODEL_VERSION
POLICY = SAMPLING_POLICY
_HEX_ID = re.compile(r"[0-9a-f]{8,32}")
_FINGERPRINT = 256


def value(v: dict) -> Any:
    """An OTLP/JSON AnyValue as a Python value (int64 arrives as a string in OTLP/JSON)."""
    if not v:
        return None
    kind, raw = next(iter(v.items()))
    if kind == "intValue":
        return int(raw)
    if kind == "arrayValue":
        return [value(x) for x in raw.get("values", [])]
    if kind == "kvlistValue":
        return {kv["key"]: value(kv.get("value", {})) for kv in raw.get("values", [])}
    return raw


def attributes(kvs: list[dict] | None) -> dict[str, Any]:
    return {kv["key"]: value(kv.get("value", {})) for kv in kvs or ()}


@dataclass
class SpanRow:
    span_id: str
    parent_id: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    status_code: int
    status_message: str
    attributes: dict[str, Any]
    events: list[dict]
    service: str

    @property
    def duration_ms(self) -> float:
        return max(self.end_ns - self.start_ns, 0) / 1e6


@dataclass
class LogRow:
    time_ns: int
    span_id: str
    severity: str
    body: Any
    attributes: dict[str, Any]


@dataclass
class Trace:
    trace_id: str
    spans: list[SpanRow] = field(default_factory=list)
    logs: list[LogRow] = field(default_factory=list)

    @property
    def root(self) -> SpanRow | None:
        ids = {s.span_id for s in self.spans}
        roots = [s for s in self.spans if not s.parent_id or s.parent_id not in ids]
        return min(roots, key=lambda s: s.start_ns) if roots else None

    @property
    def start_ns(self) -> int:
        return min((s.start_ns for s in self.spans), default=min((lg.time_ns for lg in self.logs), default=0))

    @property
    def duration_ms(self) -> float:
        root = self.root
        if root is not None and not root.parent_id:
            return root.duration_ms
        return (max((s.end_ns for s in self.spans), default=0) - self.start_ns) / 1e6 if self.spans else 0.0

    @property
    def is_error(self) -> bool:
        return any(s.status_code == STATUS_ERROR for s in self.spans)

    def first(self, key: str) -> Any:
        """The first value of a span attribute across the trace (root first), else of a log attribute."""
        root = self.root
        for s in ([root] if root else []) + self.spans:
            if key in s.attributes:
                return s.attributes[key]
        for lg in self.logs:
            if key in lg.attributes:
                return lg.attributes[key]
        return None


class StoreError(Exception):
    """The backend directory cannot be read; the message says which path and why."""


def default_directory() -> Path:
    """Where the default config's file exporter writes (its ``directory`` honours the same variable)."""
    return Path(os.environ.get("SIDECAR_FILE_EXPORT_DIR", "./var/telemetry"))


def signal_files(directory: Path, signal: str) -> list[Path]:
    """Oldest first: ``signal.jsonl.N`` ... ``.1``, then ``signal.jsonl``."""
    base = directory / f"{signal}.jsonl"
    backups = []
    for p in directory.glob(f"{signal}.jsonl.*"):
        suffix = p.name.rsplit(".", 1)[1]
        if suffix.isdigit():
            backups.append((int(suffix), p))
    return [p for _, p in sorted(backups, reverse=True)] + ([base] if base.exists() else [])


def _lines(path: Path, offset: int = 0) -> Iterator[tuple[int, dict]]:
    """JSON objects of whole lines from ``offset``; yields (offset after the line, object)."""
    with open(path, "rb") as f:
        f.seek(offset)
        for raw in f:
            if not raw.endswith(b"\n"):
                return  # a line still being written: read it next time
            offset += len(raw)
            try:
                yield offset, json.loads(raw)
            except ValueError:
                continue  # not OTLP/JSON: skip rather than stop the whole listing


class TraceStore:
    """Spans and logs of one exporter directory, grouped by trace id, read incrementally."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise StoreError(f"{self.directory}: no such directory (the file exporter's `directory`; "
                             f"pass --dir or set SIDECAR_FILE_EXPORT_DIR)")
        self.traces: dict[str, Trace] = {}
        #: inode -> (the file's first bytes, bytes read). A rotated file keeps its inode and its offset; the
        #: first bytes tell a new file that reuses a deleted backup's inode from the file read before.
        self._read: dict[int, tuple[bytes, int]] = {}

    def refresh(self) -> set[str]:
        """Read what was appended since the last call; returns the trace ids that got new spans."""
        changed: set[str] = set()
        for signal, add in (("traces", self._add_spans), ("logs", self._add_logs)):
            for path in signal_files(self.directory, signal):
                try:
                    inode = path.stat().st_ino
                    with open(path, "rb") as f:
                        head = f.read(_FINGERPRINT)
                    seen_head, offset = self._read.get(inode, (b"", 0))
                    if not head.startswith(seen_head):
                        offset = 0  # another file under a recycled inode
                    for offset, obj in _lines(path, offset):
                        changed |= add(obj)
                except FileNotFoundError:  # rotated away between listing and reading
                    continue
                except OSError as e:
                    raise StoreError(f"{path}: {e.strerror or e}") from None
                self._read[inode] = (head, offset)
        return changed

    def _trace(self, trace_id: str) -> Trace:
        t = self.traces.get(trace_id)
        if t is None:
            t = self.traces[trace_id] = Trace(trace_id)
        return t

    def _add_spans(self, req: dict) -> set[str]:
        ids = set()
        for rs in req.get("resourceSpans", ()):
            service = attributes(rs.get("resource", {}).get("attributes")).get(SERVICE_NAME, "")
            for ss in rs.get("scopeSpans", ()):
                for s in ss.get("spans", ()):
                    tid = s.get("traceId", "")
                    status = s.get("status", {})
                    self._trace(tid).spans.append(SpanRow(
                        span_id=s.get("spanId", ""), parent_id=s.get("parentSpanId", ""), name=s.get("name", ""),
                        kind=int(s.get("kind", 0)), start_ns=int(s.get("startTimeUnixNano", 0)),
                        end_ns=int(s.get("endTimeUnixNano", 0)), status_code=int(status.get("code", 0)),
                        status_message=status.get("message", ""), attributes=attributes(s.get("attributes")),
                        events=s.get("events", []), service=service))
                    ids.add(tid)
        return ids

    def _add_logs(self, req: dict) -> set[str]:
        for rl in req.get("resourceLogs", ()):
            for sl in rl.get("scopeLogs", ()):
                for r in sl.get("logRecords", ()):
                    tid = r.get("traceId", "")
                    if not tid:
                        continue  # logs without a trace belong to no trace view
                    self._trace(tid).logs.append(LogRow(
                        time_ns=int(r.get("timeUnixNano") or r.get("observedTimeUnixNano") or 0),
                        span_id=r.get("spanId", ""), severity=r.get("severityText", "") or str(r.get("severityNumber", "")),
                        body=value(r.get("body", {})), attributes=attributes(r.get("attributes"))))
        return set()

    def recent(self, limit: int | None = None) -> list[Trace]:
        """Traces that have spans, newest first."""
        found = sorted((t for t in self.traces.values() if t.spans), key=lambda t: t.start_ns, reverse=True)
        return found[:limit] if limit else found

    def find(self, key: str) -> list[Trace]:
        """By trace id (whole or a prefix of 8+ hex characters), else by the ``request.id`` attribute."""
        k = key.strip().lower()
        if _HEX_ID.fullmatch(k):
            hits = [t for tid, t in self.traces.items() if tid.startswith(k) and t.spans]
            if hits:
                return hits
        return [t for t in self.traces.values() if t.spans and str(t.first(REQUEST_ID)) == key.strip()]
