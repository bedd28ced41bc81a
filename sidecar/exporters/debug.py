"""``debug``: prints what reaches it to stderr, to see a pipeline work without a backend.

``verbosity``: ``basic`` one line per request (``traces: 2 resources, 37 spans``);
``normal`` one line per span, log record or metric; ``detailed`` adds attributes.
It pushes in the caller's thread unless a ``sending_queue`` is enabled.
"""

from __future__ import annotations

import sys
import threading
from typing import Literal

from pydantic import Field

from contract.attributes import SERVICE_NAME
from sidecar.component import Kind
from sidecar.config import ConfigModel
from sidecar.exporters.base import BaseExporter, QueueConfig
from sidecar.queue.retry import RetryConfig
from sidecar.registry import CreateSettings, Factory
from sidecar.envelope import Envelope
from sidecar.signals import Request, Signal, count_items, resource_list

Verbosity = Literal["basic", "normal", "detailed"]


class DebugExporterConfig(ConfigModel):
    verbosity: Verbosity = "basic"
    sending_queue: QueueConfig = Field(default_factory=lambda: QueueConfig(enabled=False))


_STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}


def _value(v) -> str:
    """An AnyValue as short text."""
    kind = v.WhichOneof("value")
    if kind is None:
        return "null"
    if kind == "array_value":
        return "[" + ", ".join(_value(x) for x in v.array_value.values) + "]"
    if kind == "kvlist_value":
        return "{" + _attrs(v.kvlist_value.values) + "}"
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return str(getattr(v, kind))


def _attrs(kvs) -> str:
    return ", ".join(f"{kv.key}={_value(kv.value)}" for kv in kvs)


def _service(resource) -> str:
    for kv in resource.attributes:
        if kv.key == SERVICE_NAME:
            return kv.value.string_value
    return "?"


def format_request(signal: Signal, request: Request, verbosity: Verbosity) -> list[str]:
    """The lines one request prints as (also used by tests and the demo)."""
    resources = resource_list(signal, request)
    lines = [f"{signal.value}: {len(resources)} resources, {count_items(signal, request)} "
             f"{signal.item_name.replace('_', ' ')}"]
    if verbosity == "basic":
        return lines
    detailed = verbosity == "detailed"
    for res in resources:
        svc = _service(res.resource)
        if detailed:
            lines.append(f"  resource {_attrs(res.resource.attributes)}")
        if signal is Signal.TRACES:
            for ss in res.scope_spans:
                for sp in ss.spans:
                    line = (f"  span {svc} {sp.name!r} trace={sp.trace_id.hex()} span={sp.span_id.hex()} "
                            f"{(sp.end_time_unix_nano - sp.start_time_unix_nano) / 1e6:.3f}ms "
                            f"status={_STATUS.get(sp.status.code, sp.status.code)}")
                    if detailed and sp.attributes:
                        line += f" attrs={{{_attrs(sp.attributes)}}}"
                    lines.append(line)
        elif signal is Signal.LOGS:
            for sl in res.scope_logs:
                for rec in sl.log_records:
                    severity = rec.severity_text or str(rec.severity_number)
                    line = f"  log {svc} {severity} trace={rec.trace_id.hex() or '-'} body={_value(rec.body)!r}"
                    if detailed and rec.attributes:
                        line += f" attrs={{{_attrs(rec.attributes)}}}"
                    lines.append(line)
        else:
            for sm in res.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    points = getattr(m, kind).data_points if kind else ()
                    line = f"  metric {svc} {m.name} {kind} {len(points)} points"
                    if detailed:
                        line += "".join(f"\n    {{{_attrs(p.attributes)}}}" for p in points)
                    lines.append(line)
    return lines


class DebugExporter(BaseExporter):
    def __init__(self, settings: CreateSettings, cfg: DebugExporterConfig):
        super().__init__(settings, timeout=60.0, queue=cfg.sending_queue, retry=RetryConfig(enabled=False))
        self.verbosity = cfg.verbosity
        self._lock = threading.Lock()  # whole requests, not interleaved lines

    def push(self, envelope: Envelope, timeout: float) -> int:
        lines = format_request(envelope.signal, envelope.message, self.verbosity)
        text = "\n".join(f"{self.id}: {line}" if i == 0 else line for i, line in enumerate(lines)) + "\n"
        with self._lock:
            stream = sys.stderr  # looked up per call: whoever redirected stderr last gets the output
            stream.write(text)
            stream.flush()
        return 0


FACTORY = Factory(type="debug", kind=Kind.EXPORTER, config_model=DebugExporterConfig,
                  create=lambda settings, cfg, _next: DebugExporter(settings, cfg))
