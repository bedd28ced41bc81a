"""How a receiver answers a request it does not take: classified once, rendered by each protocol."""

from __future__ import annotations

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from sidecar.component import Refused


class Rejected(Exception):
    """A request answered with an error; classified once, rendered by each protocol."""

    def __init__(self, reason: str, message: str, grpc_code: grpc.StatusCode, http_status: int,
                 retry_after: float | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.grpc_code = grpc_code
        self.http_status = http_status
        self.retry_after = retry_after


def classify(refused: Refused) -> Rejected:
    """What to tell the client when the pipeline refused: throttled, retry later, or give up."""
    if refused.reason == "memory_limit":
        return Rejected(refused.reason, str(refused), grpc.StatusCode.RESOURCE_EXHAUSTED, 429,
                         refused.retry_after or 1.0)
    if refused.retryable:
        return Rejected(refused.reason, str(refused), grpc.StatusCode.UNAVAILABLE, 503, refused.retry_after or 1.0)
    if refused.reason == "unsupported_signal":
        return Rejected(refused.reason, str(refused), grpc.StatusCode.UNIMPLEMENTED, 404)
    return Rejected(refused.reason, str(refused), grpc.StatusCode.INVALID_ARGUMENT, 400)


def retry_info_trailer(rej: Rejected) -> tuple[tuple[str, bytes], ...]:
    """``grpc-status-details-bin`` with a google.rpc.RetryInfo, which OTLP clients honour as the backoff."""
    delay = rej.retry_after or 1.0
    status = status_pb2.Status(code=rej.grpc_code.value[0], message=rej.message)
    status.details.add().Pack(error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=int(delay), nanos=int(round((delay % 1) * 1e9)))))
    return (("grpc-status-details-bin", status.SerializeToString()),)
