"""How the OTLP receivers take a request's protobuf bytes (gRPC and HTTP alike)."""

from __future__ import annotations

from typing import Callable

from sidecar import wire
from sidecar.signals import Request, Signal


def received_parser(signal: Signal) -> Callable[[bytes], Request | None]:
    """The receivers' parse of ``signal``'s requests: ValueError or DecodeError on bytes the protobuf
    parser refuses, else the message, or None when nothing needed parsing.

    Traces and logs are checked on the wire exactly where the parser would refuse them
    (:func:`sidecar.wire.check_encoding`): with the C scanner nothing is parsed and None comes back (a
    third of the parse's CPU, ``benchmarks/stage_costs.py``; every hot stage works on the bytes, and the
    envelope parses them only if a stage reads the message). Metrics are parsed: their stages read it.
    """
    request_type = signal.request_type
    if signal is Signal.METRICS:
        return request_type.FromString
    schema = wire.schema_of(request_type)
    check = wire.check_encoding
    return lambda raw: check(raw, schema, request_type)
