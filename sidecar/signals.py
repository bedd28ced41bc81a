"""The three OTLP signals and their Export*ServiceRequest messages.

Nothing on the hot path converts spans to dicts; components read and write these
protobuf messages (or their encodings) directly, carried between stages in a
:class:`sidecar.envelope.Envelope`.
"""

from __future__ import annotations

import enum
from typing import Union

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

