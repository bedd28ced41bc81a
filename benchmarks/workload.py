"""Realistic inference telemetry for benchmarks: OTLP requests of traces and their logs."""

from __future__ import annotations

import random

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

SPANS_PER_TRACE = 4
LOGS_PER_TRACE = 2
BASE_NS = 1_750_000_000_000_000_000

#: What a PII-carrying trace's prompt and log body hold, in turn: an email, a card number, a phone, a key.
PII_TEXTS = (
    "classify the photo sent by bob@example.com card 4111 1111 1111 1111",
    "summarize the invoice for card 5500 0000 0000 0004, due friday",
    "call me back at (415) 555-0132 about the order",
    "use key sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8t to call the upstream model",
)


def _attr(kvs, key, value):
    kv = kvs.add(key=key)
    if isinstance(value, bool):
        kv.value.bool_value = value
    elif isinstance(value, int):
        kv.value.int_value = value
    elif isinstance(value, float):
        kv.value.double_value = value
    else:
        kv.value.string_value = value


def _resource(res):
    for k, v in (("service.name", "resnet-server"), ("service.version", "1.4.2"), ("k8s.pod.name", "resnet-7d9f-abcde"),
                 ("k8s.namespace.name", "inference"), ("k8s.node.name", "gpu-node-3"), ("host.name", "resnet-7d9f-abcde"),
                 ("telemetry.sdk.language", "python"), ("telemetry.sdk.version", "1.45.2")):
        _attr(res.attributes, k, v)


def _prompt(rng: random.Random) -> str:
    """A prompt holding PII, unique per request as real prompts are (no two scans of the same text)."""
    return f"{rng.choice(PII_TEXTS)} (ticket {rng.getrandbits(32)})"


def trace_request(rng: random.Random, n_traces: int, pii: float = 0.05) -> tuple[ExportTraceServiceRequest, dict]:
    """``n_traces`` traces of SPANS_PER_TRACE spans each: server -> preprocess, forward, postprocess.

    A ``pii`` fraction of the traces carry PII the way an LLM service with payload capture does:
    an email in the user id, a prompt attribute with an email, card, phone or key
    (:data:`PII_TEXTS`), and an ``authorization`` header on the server span. ``pii=1.0`` is the
    dense traffic of issue 13, 0.05 the light traffic of the earlier benchmarks.
    """
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    _resource(rs.resource)
    ss = rs.scope_spans.add()
    ss.scope.name = "instrumentation.torch"
    ss.scope.version = "0.1.0"
    truth = {"error": 0, "slow": 0, "forced": 0, "plain": 0}
    for _ in range(n_traces):
        trace_id = rng.getrandbits(128).to_bytes(16, "big")
        start = BASE_NS + rng.getrandbits(40)
        kind = rng.random()
        has_pii = rng.random() < pii
        error, slow, forced = kind < 0.01, 0.01 <= kind < 0.03, 0.03 <= kind < 0.035
        truth["error" if error else "slow" if slow else "forced" if forced else "plain"] += 1
        duration = (1_500_000_000 if slow else 40_000_000 + rng.getrandbits(24))
        root_id = rng.getrandbits(64).to_bytes(8, "big")
        root = ss.spans.add(trace_id=trace_id, span_id=root_id, name="POST /v1/models/resnet50:predict", kind=2,
                            start_time_unix_nano=start, end_time_unix_nano=start + duration)
        for k, v in (("http.request.method", "POST"), ("http.route", "/v1/models/{model}:predict"),
                     ("http.response.status_code", 500 if error else 200), ("url.scheme", "http"),
                     ("request.id", f"{rng.getrandbits(64):016x}"),
                     ("user.id", f"user{rng.randrange(50)}@example.com" if has_pii
                      else f"user-{rng.randrange(1000)}")):
            _attr(root.attributes, k, v)
        if has_pii:
            _attr(root.attributes, "http.request.header.authorization", f"Bearer {rng.getrandbits(128):032x}")
        if forced:
            _attr(root.attributes, "sampling.force_keep", True)
        if error:
            root.status.code = 2
            root.status.message = "RuntimeError: CUDA out of memory"
        for i, name in enumerate(("preprocess", "ml.forward resnet50", "postprocess")):
            sp = ss.spans.add(trace_id=trace_id, span_id=rng.getrandbits(64).to_bytes(8, "big"), parent_span_id=root_id,
                              name=name, kind=1, start_time_unix_nano=start + i * 1000,
                              end_time_unix_nano=start + duration - (3 - i) * 1000)
            for k, v in (("ml.model.id", "resnet50"), ("ml.model.version", "v3"), ("ml.batch_size", 8),
                         ("ml.device", "cuda:0"), ("ml.input.shapes", "8x3x224x224"), ("ml.input.dtypes", "float32"),
                         ("ml.output.shapes", "8x1000"), ("ml.torch.version", "2.13.0")):
                _attr(sp.attributes, k, v)
            if has_pii and i == 0:
                _attr(sp.attributes, "prompt", _prompt(rng))
            if error and i == 1:
                sp.status.code = 2
                ev = sp.events.add(name="exception", time_unix_nano=start + 500)
                _attr(ev.attributes, "exception.type", "RuntimeError")
                _attr(ev.attributes, "exception.message", "CUDA out of memory. Tried to allocate 2.00 GiB")
                _attr(ev.attributes, "exception.stacktrace", "Traceback (most recent call last):\n  File \"model.py\", line 42, in forward\n" * 4)
    return req, truth


def logs_request(rng: random.Random, trace_ids: list[bytes], pii: float = 0.05) -> ExportLogsServiceRequest:
    req = ExportLogsServiceRequest()
    rl = req.resource_logs.add()
    _resource(rl.resource)
    sl = rl.scope_logs.add()
    sl.scope.name = "app"
    for tid in trace_ids:
        has_pii = rng.random() < pii
        for j in range(LOGS_PER_TRACE):
            rec = sl.log_records.add(time_unix_nano=BASE_NS + rng.getrandbits(40), severity_number=9, severity_text="INFO",
                                     trace_id=tid, span_id=rng.getrandbits(64).to_bytes(8, "big"))
            rec.body.string_value = (f"inference done: {_prompt(rng)}" if has_pii and j == 0 else
                                     "inference done" if j else "request received")
            for k, v in (("model_id", "resnet50"), ("model_version", "v3"), ("execution_time_ms", 41.7),
                         ("request_id", f"{rng.getrandbits(64):016x}")):
                _attr(rec.attributes, k, v)
    return req


def trace_ids_of(req: ExportTraceServiceRequest) -> list[bytes]:
    seen = []
    for sp in req.resource_spans[0].scope_spans[0].spans:
        if not sp.parent_span_id:
            seen.append(sp.trace_id)
    return seen
