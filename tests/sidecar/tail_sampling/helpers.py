"""Builders for tail sampling tests: OTLP requests, a fake clock and a processor wired to a collector."""

from __future__ import annotations

import os

import yaml
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from sidecar.component import Kind
from sidecar.config import ComponentId
from sidecar.processors.tail_sampling import TailSamplingConfig, TailSamplingProcessor
from sidecar.registry import CreateSettings
from sidecar.signals import Signal
from sidecar.telemetry import SelfTelemetry
from sidecar.testing import CollectingConsumer, Counted

MS = 1_000_000


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> float:
        self.t += seconds
        return self.t


def kv(key: str, value) -> KeyValue:
    k = KeyValue(key=key)
    if isinstance(value, bool):
        k.value.bool_value = value
    elif isinstance(value, int):
        k.value.int_value = value
    elif isinstance(value, float):
        k.value.double_value = value
    else:
        k.value.string_value = value
    return k


def tid(n: int | None = None) -> bytes:
    return os.urandom(16) if n is None else n.to_bytes(16, "big")


def span(trace_id: bytes, *, root: bool = False, name: str = "op", duration_ms: float = 10, start_ms: float = 0,
         error: bool = False, attrs: dict | None = None, trace_state: str = "", remote_parent: bool = False) -> Span:
    s = Span(trace_id=trace_id, span_id=os.urandom(8), name=name, trace_state=trace_state)
    if not root:
        s.parent_span_id = os.urandom(8)
    if remote_parent:
        s.flags = 0x300
    s.start_time_unix_nano = 1_700_000_000_000_000_000 + int(start_ms * MS)
    s.end_time_unix_nano = s.start_time_unix_nano + int(duration_ms * MS)
    if error:
        s.status.code = Status.STATUS_CODE_ERROR
    for k, v in (attrs or {}).items():
        s.attributes.append(kv(k, v))
    return s


def traces_request(*spans: Span, resource: dict | None = None, scope: str = "test") -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    for k, v in (resource or {"service.name": "svc"}).items():
        rs.resource.attributes.append(kv(k, v))
    ss = rs.scope_spans.add()
    ss.scope.name = scope
    ss.spans.extend(spans)
    return req


def logs_request(*records: tuple[bytes, int, str], resource: dict | None = None) -> ExportLogsServiceRequest:
    """records: (trace_id or b"", severity_number, body)."""
    req = ExportLogsServiceRequest()
    rl = req.resource_logs.add()
    for k, v in (resource or {"service.name": "svc"}).items():
        rl.resource.attributes.append(kv(k, v))
    sl = rl.scope_logs.add()
    sl.scope.name = "logger"
    for trace_id, severity, body in records:
        r = sl.log_records.add()
        r.trace_id = trace_id
        if trace_id:
            r.span_id = os.urandom(8)
        r.severity_number = severity
        r.body.string_value = body
    return req


def make(policies: list[dict] | None = None, *, clock: FakeClock | None = None, rng=None, **overrides):
    """(processor, downstream collector, clock, telemetry) for a config given as plain data."""
    raw = {"decision_wait": "10s", "decision_wait_after_root_received": "1s",
           "policies": policies or [{"name": "all", "type": "always_sample"}]}
    raw.update(overrides)
    cfg = TailSamplingConfig.model_validate(yaml.safe_load(yaml.safe_dump(raw)))
    clock = clock or FakeClock()
    tel = SelfTelemetry().component("processor", "tail_sampling")
    settings = CreateSettings(id=ComponentId("tail_sampling"), kind=Kind.PROCESSOR, telemetry=tel)
    sink = CollectingConsumer()
    kwargs = {"clock": clock}
    if rng is not None:
        kwargs["rng"] = rng
    proc = TailSamplingProcessor(settings, cfg, sink, **kwargs)
    return Counted(proc, tel), sink, clock, tel  # behind the pipeline's counting edge, as the graph runs it


def kept_spans(sink: CollectingConsumer) -> list[Span]:
    return [s for r in sink.of(Signal.TRACES) for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans]


def kept_trace_ids(sink: CollectingConsumer) -> set[bytes]:
    return {s.trace_id for s in kept_spans(sink)}


def kept_logs(sink: CollectingConsumer) -> list:
    return [lr for r in sink.of(Signal.LOGS) for rl in r.resource_logs for sl in rl.scope_logs
            for lr in sl.log_records]


def attr(span_: Span, key: str):
    for k in span_.attributes:
        if k.key == key:
            return getattr(k.value, k.value.WhichOneof("value"))
    return None


def traces_metric(tel, decision: str, policy: str) -> float:
    return tel.registry.get_sample_value("sidecar_tail_sampling_traces_total",
                                         {"component": "tail_sampling", "decision": decision, "policy": policy}) or 0.0
