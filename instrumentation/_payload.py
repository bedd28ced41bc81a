"""Replayable payloads: a forward call's tensor inputs and outputs as JSON span attributes (opt-in).

Off by default: encoding tensors costs time on the inference thread and puts data into
telemetry. Turn it on with :func:`enable_payload_capture`: every model instrumented with
``instrument_model`` then adds ``ml.input.payload`` (positional and keyword arguments) and
``ml.output.payload`` to its ``ml.forward`` span, through the torch instrumentation's
forward-observer hook (no change to the forward path when off). The sidecar's audit
exporter stores them and ``python -m instrumentation.replay`` re-runs them. Only
successful forward calls are captured, after they return (a model that changes its input
tensors in place records the changed values).

Format ``ml.tensors/v1``: ``{"format": "ml.tensors/v1", "value": V}`` where V is
``{"tensor": {"dtype", "shape", "b64"}}`` (the raw little-endian bytes, row-major, in
base64: exact, compact, and free of the digit runs that decimal floats would offer the
card-number and other redaction detectors),
``{"list": [V...]}``, ``{"tuple": [V...]}``, ``{"dict": {key: V}}`` or ``{"py": scalar}``.
A payload larger than the limit is replaced by ``{"format": ..., "omitted": "..."}`` so
the record says why it cannot be replayed. Redaction (in-process and in the sidecar) still
applies to these strings; a rule that rewrites part of one makes it unreplayable, and
replay reports that rather than guessing.

Replayable: tensors of real, integer and bool dtypes (any device; decoded on CPU), Python
scalars, strings and None, nested in lists, tuples and dicts with string keys. Not
replayable: complex and quantized tensors, sparse tensors, other objects (they are encoded
as ``{"unsupported": type name}``), and any payload over the size limit.
"""

from __future__ import annotations

import base64
import ctypes
import json
import math
import sys
import threading
from typing import Any, Callable

from contract import attributes as attr

TENSOR_FORMAT = "ml.tensors/v1"
INPUT_ATTRIBUTE = attr.ML_INPUT_PAYLOAD
OUTPUT_ATTRIBUTE = attr.ML_OUTPUT_PAYLOAD


class _Capture:
    """The size limit and the observer's remover while capture is on."""

    def __init__(self) -> None:
        self.max_bytes = 64 * 1024
        self.remove: Callable[[], None] | None = None
        self.lock = threading.Lock()


CAPTURE = _Capture()


def enable_payload_capture(max_bytes: int = 64 * 1024) -> None:
    """Record each instrumented forward call's inputs and outputs (up to ``max_bytes`` of JSON each) for replay."""
    from instrumentation.torch import add_forward_observer

    if max_bytes <= 0:
        raise ValueError("max_bytes must be > 0")
    with CAPTURE.lock:
        CAPTURE.max_bytes = max_bytes
        if CAPTURE.remove is None:
            CAPTURE.remove = add_forward_observer(_observe)


def disable_payload_capture() -> None:
    with CAPTURE.lock:
        remove, CAPTURE.remove = CAPTURE.remove, None
    if remove is not None:
        remove()


def _observe(_model_id: str, _model_version: str | None, args: tuple, kwargs: dict, output: Any) -> None:
    """Forward observer: runs inside the ``ml.forward`` span, which is the current span."""
    from opentelemetry import trace

    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({INPUT_ATTRIBUTE: encode_call(args, kwargs),
                             OUTPUT_ATTRIBUTE: encode(output, CAPTURE.max_bytes)})


class PayloadError(ValueError):
    """A payload cannot be decoded (not this format, omitted, redacted, unsupported)."""


def _encode_value(v: Any) -> Any:
    import torch

    if isinstance(v, torch.Tensor):
        if v.is_complex() or v.is_quantized or v.layout != torch.strided:
            return {"unsupported": f"tensor {v.dtype} {v.layout}"}
        t = v.detach().cpu().contiguous().reshape(-1)
        # the tensor's bytes without numpy (torch does not need it; tensor.numpy() fails without it)
        raw = ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()) if t.numel() else b""
        return {"tensor": {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape),
                           "b64": base64.b64encode(raw).decode("ascii")}}
    if v is None or isinstance(v, (bool, int, float, str)):
        return {"py": v}
    if isinstance(v, tuple):
        return {"tuple": [_encode_value(x) for x in v]}
    if isinstance(v, list):
        return {"list": [_encode_value(x) for x in v]}
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {"dict": {k: _encode_value(x) for k, x in v.items()}}
    return {"unsupported": type(v).__qualname__}


def encode(value: Any, max_bytes: int | None = None) -> str:
    """``value`` as an ``ml.tensors/v1`` JSON string, or an ``omitted`` marker when over ``max_bytes``."""
    text = json.dumps({"format": TENSOR_FORMAT, "value": _encode_value(value)}, separators=(",", ":"))
    if max_bytes is not None and len(text) > max_bytes:
        return json.dumps({"format": TENSOR_FORMAT, "omitted": f"{len(text)} bytes over the {max_bytes}-byte limit"})
    return text


def encode_call(args: tuple, kwargs: dict) -> str:
    return encode({"args": list(args), "kwargs": dict(kwargs)}, CAPTURE.max_bytes)


def _decode_value(v: Any) -> Any:
    import torch

    if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
        raise PayloadError("tensor payloads are little-endian; this host is not")
    if not isinstance(v, dict) or len(v) != 1:
        raise PayloadError(f"not an encoded value: {str(v)[:80]}")
    (kind, body), = v.items()
    if kind == "tensor":
        dtype = getattr(torch, body["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise PayloadError(f"unknown dtype {body['dtype']!r}")
        try:
            raw = base64.b64decode(body["b64"], validate=True)
        except (ValueError, TypeError):
            raise PayloadError("tensor bytes are not valid base64 (redacted?)") from None
        shape = [int(x) for x in body["shape"]]
        if len(raw) != math.prod(shape) * dtype.itemsize:
            raise PayloadError(f"tensor bytes do not fill shape {shape} of {body['dtype']} (redacted?)")
        if not raw:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
    if kind == "py":
        return body
    if kind in ("list", "tuple"):
        items = [_decode_value(x) for x in body]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        return {k: _decode_value(x) for k, x in body.items()}
    if kind == "unsupported":
        raise PayloadError(f"holds a value that cannot be recorded ({body})")
    raise PayloadError(f"unknown value kind {kind!r}")


def decode(text: str | None) -> Any:
    """The value an ``ml.tensors/v1`` payload holds (tensors on CPU); :class:`PayloadError` says why not."""
    if text is None:
        raise PayloadError("no payload recorded (capture was off)")
    try:
        doc = json.loads(text)
    except ValueError:
        raise PayloadError("payload is not valid JSON (redacted or truncated?)") from None
    if not isinstance(doc, dict) or doc.get("format") != TENSOR_FORMAT:
        raise PayloadError(f"payload is not in the {TENSOR_FORMAT} format (an HTTP body or prompt is not replayable)")
    if "omitted" in doc:
        raise PayloadError(f"payload was not recorded: {doc['omitted']}")
    try:
        return _decode_value(doc["value"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise PayloadError(f"payload is damaged: {e}") from None


def decode_call(text: str | None) -> tuple[tuple, dict]:
    value = decode(text)
    if not isinstance(value, dict) or set(value) != {"args", "kwargs"}:
        raise PayloadError("input payload does not hold call arguments")
    return tuple(value["args"]), dict(value["kwargs"])
