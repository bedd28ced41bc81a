"""CPU cost of redaction per span through the protobuf adapter (``redaction.otlp``).

Reports CPU microseconds per span for a realistic inference span (16 attributes, a
prompt with an email and a phone number) and for the same span without PII: with no
rules (the floor: one serialization), with the default rules (each span's serialized
bytes are scanned once for hints; only flagged spans are walked), with the default rules
when that prefilter is off (every attribute walked), and with PII (walk + scan + rewrite).

    .venv/bin/python benchmarks/redaction_bench.py [--spans 512] [--rounds 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from redaction import DETECTOR_NAMES, RedactionConfig, RedactionEngine
from redaction.otlp import OtlpRedactor

PROMPT_PII = ("Summarize the support ticket from jane.doe@example.com (call back on +1 415-555-0132): "
              "the customer says the image classifier mislabels photos of golden retrievers as "
              "labradors since version 2.13.0; request id 7f9c2ba4-e88f-11ee-9d1b-0242ac120002.")
PROMPT_CLEAN = ("Summarize the support ticket from the customer: the image classifier mislabels photos "
                "of golden retrievers as labradors since version 2.13.0; request id "
                "7f9c2ba4-e88f-11ee-9d1b-0242ac120002, please reply within one business day.")


def make_request(n_spans: int, prompt: str) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    for k, v in (("service.name", "classifier"), ("service.version", "2.13.0"), ("host.name", "pod-7d9f")):
        kv = rs.resource.attributes.add()
        kv.key, kv.value.string_value = k, v
    ss = rs.scope_spans.add()
    ss.scope.name = "instrumentation.torch"
    for i in range(n_spans):
        span = ss.spans.add()
        span.name = "POST /predict"
        span.trace_id = os.urandom(16)
        span.span_id = os.urandom(8)
        span.start_time_unix_nano = 1_700_000_000_000_000_000 + i
        span.end_time_unix_nano = span.start_time_unix_nano + 12_345_678
        attrs = (
            ("ml.model.id", "resnet50"), ("ml.model.version", "2.13.0"), ("request.id", "req-0001-abcd"),
            ("user.id", "u-42"), ("http.request.method", "POST"), ("http.route", "/predict"),
            ("http.response.status_code", 200), ("server.address", "classifier.default.svc"),
            ("gen_ai.request.model", "resnet50"), ("gen_ai.usage.input_tokens", 512),
            ("gen_ai.usage.output_tokens", 64), ("ml.batch_size", 8), ("ml.device", "cuda:0"),
            ("ml.latency_ms", 12.3), ("sampling.force_keep", False), ("gen_ai.prompt", prompt),
        )
        for k, v in attrs:
            kv = span.attributes.add()
            kv.key = k
            if isinstance(v, bool):
                kv.value.bool_value = v
            elif isinstance(v, int):
                kv.value.int_value = v
            elif isinstance(v, float):
                kv.value.double_value = v
            else:
                kv.value.string_value = v
    return req


def cpu_us_per_span(redactor: OtlpRedactor, template: ExportTraceServiceRequest, n_spans: int, rounds: int) -> float:
    copies = []
    for _ in range(rounds):
        r = ExportTraceServiceRequest()
        r.CopyFrom(template)
        copies.append(r)
    redactor.redact_traces(copies[0])  # warm the key cache
    t0 = time.process_time()
    for r in copies[1:]:
        redactor.redact_traces(r)
    return (time.process_time() - t0) / ((rounds - 1) * n_spans) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spans", type=int, default=512, help="spans per request")
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    no_rules = OtlpRedactor(RedactionEngine(RedactionConfig(
        builtin_blocked_key_patterns=False, detectors={name: False for name in DETECTOR_NAMES})))
    full = OtlpRedactor(RedactionEngine(RedactionConfig()))
    # an anchored user rule turns the serialized-bytes prefilter off: every request is walked
    walked = OtlpRedactor(RedactionEngine(RedactionConfig(blocked_values=["^never-[0-9]+$"])))
    pii = make_request(args.spans, PROMPT_PII)
    clean = make_request(args.spans, PROMPT_CLEAN)
    rows = (
        ("no rules (serialize + nothing)", no_rules, clean),
        ("default rules, clean span", full, clean),
        ("default rules, clean span, walked", walked, clean),
        ("default rules, prompt with PII", full, pii),
    )
    print(f"redaction, {args.spans} spans/request x {args.rounds} requests, 16 attributes per span")
    for label, redactor, request in rows:
        print(f"  {label:36s} {cpu_us_per_span(redactor, request, args.spans, args.rounds):7.2f} CPU us/span")
    copy = ExportTraceServiceRequest()
    copy.CopyFrom(pii)
    full.redact_traces(copy)
    prompt = next(kv.value.string_value for kv in copy.resource_spans[0].scope_spans[0].spans[0].attributes
                  if kv.key == "gen_ai.prompt")
    print(f"  redacted prompt: {prompt}")


if __name__ == "__main__":
    main()
