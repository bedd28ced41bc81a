"""The three OTLP signals and the one unit of data: the Export*ServiceRequest message.

Nothing on the hot path converts spans to dicts; components read and write these
protobuf messages directly.
"""

from __future__ import annotations

import contextlib
import enum
from typing import Iterator, Union

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

Request = Union[ExportTraceServiceRequest, ExportLogsServiceRequest, ExportMetricsServiceRequest]


class Signal(str, enum.Enum):
    TRACES = "traces"
    LOGS = "logs"
    METRICS = "metrics"

    @property
    def request_type(self) -> type:
        return _REQUEST_TYPES[self]

    @property
    def response_type(self) -> type:
        return _RESPONSE_TYPES[self]

    @property
    def item_name(self) -> str:
        """What one item of this signal is called in counters: spans, log records, data points."""
        return _ITEM_NAMES[self]


_REQUEST_TYPES = {
    Signal.TRACES: ExportTraceServiceRequest,
    Signal.LOGS: ExportLogsServiceRequest,
    Signal.METRICS: ExportMetricsServiceRequest,
}
_RESPONSE_TYPES = {
    Signal.TRACES: ExportTraceServiceResponse,
    Signal.LOGS: ExportLogsServiceResponse,
    Signal.METRICS: ExportMetricsServiceResponse,
}
_ITEM_NAMES = {Signal.TRACES: "spans", Signal.LOGS: "log_records", Signal.METRICS: "data_points"}


def new_request(signal: Signal) -> Request:
    return _REQUEST_TYPES[signal]()


def count_items(signal: Signal, request: Request) -> int:
    """Spans, log records or metric data points in one request (what every counter counts)."""
    if signal is Signal.TRACES:
        return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
    if signal is Signal.LOGS:
        return sum(len(sl.log_records) for rl in request.resource_logs for sl in rl.scope_logs)
    n = 0
    for rm in request.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                if kind is not None:
                    n += len(getattr(m, kind).data_points)
    return n


def resource_list(signal: Signal, request: Request):
    """The top-level repeated field of a request (resource_spans / resource_logs / resource_metrics)."""
    if signal is Signal.TRACES:
        return request.resource_spans
    if signal is Signal.LOGS:
        return request.resource_logs
    return request.resource_metrics


# --- the request's wire encoding, known while the receiver hands it down ------------------------
#
# The receiver parsed the request from bytes; stages that work on the encoding (span_metrics,
# tail_sampling, the persistent queue) reuse those bytes instead of serializing again. An entry
# lives exactly as long as the receiver's synchronous consume call (the receiver holds the
# request, so its id cannot be reused), and the pipeline forgets it before handing a request on
# from any stage that mutates data, so a stale encoding is never read.

_ENCODINGS: dict[int, bytes] = {}


def encoded(request: Request) -> bytes:
    """The request's wire encoding: the bytes it was received as when still valid, else serialized now."""
    raw = _ENCODINGS.get(id(request))
    return raw if raw is not None else request.SerializeToString()


def received_encoding(request: Request) -> bytes | None:
    """The bytes ``request`` was received as, if they still describe it; None otherwise (never serializes)."""
    return _ENCODINGS.get(id(request))


@contextlib.contextmanager
def known_encoding(request: Request, raw: bytes) -> Iterator[None]:
    """While the block runs, :func:`encoded` returns ``raw`` for ``request`` (which was parsed from it)."""
    key = id(request)
    _ENCODINGS[key] = raw
    try:
        yield
    finally:
        _ENCODINGS.pop(key, None)


def forget_encoding(request: Request) -> None:
    """The request is about to change (or has): its received bytes no longer describe it."""
    _ENCODINGS.pop(id(request), None)
