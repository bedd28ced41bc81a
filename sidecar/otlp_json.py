"""OTLP/JSON as the OTLP specification defines it.

Differences from protobuf's canonical JSON mapping: trace and span ids are hex
strings (not base64), enums are integers, keys are lowerCamelCase (snake_case is
accepted on input). Used by the HTTP receiver (``application/json``) and the file
exporter (JSON lines).
"""

from __future__ import annotations

import base64
import binascii
import json

from google.protobuf import json_format

from sidecar.signals import Request, Signal

_ID_LENGTHS = {"traceId": 16, "trace_id": 16, "spanId": 8, "span_id": 8, "parentSpanId": 8, "parent_span_id": 8}
_METRIC_KINDS = ("gauge", "sum", "histogram", "exponentialHistogram", "exponential_histogram", "summary")


class OTLPJSONError(ValueError):
    """The body is not valid OTLP/JSON; the message names the offending field."""


def to_dict(signal: Signal, request: Request) -> dict:
    d = json_format.MessageToDict(request, use_integers_for_enums=True)
    _walk(signal, d, _b64_to_hex, "")
    return d


def to_json(signal: Signal, request: Request) -> str:
    return json.dumps(to_dict(signal, request), separators=(",", ":"))


def from_json(signal: Signal, body: bytes | str) -> Request:
    try:
        d = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise OTLPJSONError(f"invalid JSON: {e}") from None
    return from_dict(signal, d)


def from_dict(signal: Signal, d: dict) -> Request:
    if not isinstance(d, dict):
        raise OTLPJSONError("the body must be a JSON object")
    _walk(signal, d, _hex_to_b64, "")
    msg = signal.request_type()
    try:
        json_format.ParseDict(d, msg)
    except json_format.ParseError as e:
        raise OTLPJSONError(str(e)) from None
    return msg


def _hex_to_b64(obj: dict, key: str, path: str) -> None:
    value = obj[key]
    if value == "" or value is None:
        obj[key] = ""
        return
    if not isinstance(value, str):
        raise OTLPJSONError(f"{path}.{key}: expected a hex string")
    want = _ID_LENGTHS[key]
    if len(value) != want * 2:
        raise OTLPJSONError(f"{path}.{key}: must be {want * 2} hex characters ({want} bytes), got {len(value)}")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise OTLPJSONError(f"{path}.{key}: not a hex string: {value!r}") from None
    obj[key] = base64.b64encode(raw).decode()


def _b64_to_hex(obj: dict, key: str, path: str) -> None:
    try:
        obj[key] = base64.b64decode(obj[key]).hex()
    except (binascii.Error, TypeError):  # pragma: no cover - protobuf always emits valid base64
        pass


def _fix_ids(obj: dict, fix, path: str) -> None:
    for key in _ID_LENGTHS:
        if key in obj:
            fix(obj, key, path)


def _items(obj: dict, *keys: str) -> list:
    for key in keys:
        if key in obj:
            value = obj[key]
            if not isinstance(value, list):
                raise OTLPJSONError(f"{key}: expected an array")
            return value
    return []


def _walk(signal: Signal, d: dict, fix, _path: str) -> None:
    if signal is Signal.TRACES:
        for i, rs in enumerate(_items(d, "resourceSpans", "resource_spans")):
            for j, ss in enumerate(_items(rs, "scopeSpans", "scope_spans")):
                for k, span in enumerate(_items(ss, "spans")):
                    p = f"resourceSpans[{i}].scopeSpans[{j}].spans[{k}]"
                    _fix_ids(span, fix, p)
                    for n, link in enumerate(_items(span, "links")):
                        _fix_ids(link, fix, f"{p}.links[{n}]")
    elif signal is Signal.LOGS:
        for i, rl in enumerate(_items(d, "resourceLogs", "resource_logs")):
            for j, sl in enumerate(_items(rl, "scopeLogs", "scope_logs")):
                for k, rec in enumerate(_items(sl, "logRecords", "log_records")):
                    _fix_ids(rec, fix, f"resourceLogs[{i}].scopeLogs[{j}].logRecords[{k}]")
    else:
        for i, rm in enumerate(_items(d, "resourceMetrics", "resource_metrics")):
            for j, sm in enumerate(_items(rm, "scopeMetrics", "scope_metrics")):
                for k, metric in enumerate(_items(sm, "metrics")):
                    for kind in _METRIC_KINDS:
                        data = metric.get(kind)
                        if isinstance(data, dict):
                            for n, dp in enumerate(_items(data, "dataPoints", "data_points")):
                                for e, ex in enumerate(_items(dp, "exemplars")):
                                    _fix_ids(ex, fix, f"resourceMetrics[{i}].scopeMetrics[{j}].metrics[{k}]"
                                                      f".{kind}.dataPoints[{n}].exemplars[{e}]")
