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


#: deeper than any OTLP message needs (protobuf's own parser stops at 100 levels too)
MAX_DEPTH = 100


def from_json(signal: Signal, body: bytes | str) -> Request:
    try:
        d = json.loads(body)
    except RecursionError:
        raise OTLPJSONError(f"invalid JSON: nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise OTLPJSONError(f"invalid JSON: {e}") from None
    return from_dict(signal, d)


def from_dict(signal: Signal, d: dict) -> Request:
    """An OTLP/JSON document as a request message; any problem is an :class:`OTLPJSONError` naming the field."""
    if not isinstance(d, dict):
        raise OTLPJSONError("the body must be a JSON object")
    _walk(signal, d, _hex_to_b64, "")
    msg = signal.request_type()
    try:
        json_format.ParseDict(d, msg, max_recursion_depth=MAX_DEPTH)
    except json_format.ParseError as e:
        raise OTLPJSONError(str(e)) from None
    except RecursionError:
        raise OTLPJSONError(f"nested deeper than {MAX_DEPTH} levels") from None
    except (TypeError, ValueError, AttributeError, OverflowError) as e:  # a value of the wrong JSON type
        raise OTLPJSONError(f"invalid OTLP/JSON: {e}") from None
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


def _items(obj: dict, path: str, *keys: str) -> list:
    """The objects in the array ``obj[key]`` (the first of ``keys`` present); each must be a JSON object."""
    for key in keys:
        if key in obj:
            value = obj[key]
            if value is None:
                return []
            if not isinstance(value, list):
                raise OTLPJSONError(f"{path}{key}: expected an array")
            for i, item in enumerate(value):
                if not isinstance(item, dict):
                    raise OTLPJSONError(f"{path}{key}[{i}]: expected an object")
            return value
    return []


def _walk(signal: Signal, d: dict, fix, _path: str) -> None:
    if signal is Signal.TRACES:
        for i, rs in enumerate(_items(d, "", "resourceSpans", "resource_spans")):
            p = f"resourceSpans[{i}]."
            for j, ss in enumerate(_items(rs, p, "scopeSpans", "scope_spans")):
                p = f"resourceSpans[{i}].scopeSpans[{j}]."
                for k, span in enumerate(_items(ss, p, "spans")):
                    p = f"resourceSpans[{i}].scopeSpans[{j}].spans[{k}]"
                    _fix_ids(span, fix, p)
                    for n, link in enumerate(_items(span, p + ".", "links")):
                        _fix_ids(link, fix, f"{p}.links[{n}]")
    elif signal is Signal.LOGS:
        for i, rl in enumerate(_items(d, "", "resourceLogs", "resource_logs")):
            p = f"resourceLogs[{i}]."
            for j, sl in enumerate(_items(rl, p, "scopeLogs", "scope_logs")):
                p = f"resourceLogs[{i}].scopeLogs[{j}]."
                for k, rec in enumerate(_items(sl, p, "logRecords", "log_records")):
                    _fix_ids(rec, fix, f"{p}logRecords[{k}]")
    else:
        for i, rm in enumerate(_items(d, "", "resourceMetrics", "resource_metrics")):
            p = f"resourceMetrics[{i}]."
            for j, sm in enumerate(_items(rm, p, "scopeMetrics", "scope_metrics")):
                p = f"resourceMetrics[{i}].scopeMetrics[{j}]."
                for k, metric in enumerate(_items(sm, p, "metrics")):
                    for kind in _METRIC_KINDS:
                        data = metric.get(kind)
                        if data is not None and not isinstance(data, dict):
                            raise OTLPJSONError(f"{p}metrics[{k}].{kind}: expected an object")
                        if data:
                            mp = f"{p}metrics[{k}].{kind}."
                            for n, dp in enumerate(_items(data, mp, "dataPoints", "data_points")):
                                for e, ex in enumerate(_items(dp, f"{mp}dataPoints[{n}].", "exemplars")):
                                    _fix_ids(ex, fix, f"{mp}dataPoints[{n}].exemplars[{e}]")
