"""Replay recorded inputs against a model and report how its outputs differ from the recorded ones.

::

    python -m instrumentation.replay --audit sqlite:///var/audit/audit.db --model mypkg.models:candidate
    python -m sidecar audit query --store URL --model-version 2.4.1 --format jsonl > batch.jsonl
    python -m instrumentation.replay --audit batch.jsonl --model mypkg.models:candidate --json

``--model package.module:factory`` names a callable that returns the model (an
``nn.Module`` is put in eval mode and run under ``torch.inference_mode``). Each audit
record whose input was captured in the replayable form (:mod:`instrumentation._payload`)
is run again; per record and in aggregate the report gives exact matches, max and mean
absolute difference, cosine similarity, label changes (argmax of the last dimension, or
the values of an integer output), top-k overlap and latency. Records without a
replayable input are listed with the reason and left out of the aggregate.

Each replay is a span ``replay <model>`` with ``replay=true`` and a link to the recorded
request's span, so a trace backend shows both side by side; the sidecar's audit exporter
does not record replays as requests.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from contract.attributes import SERVICE_NAME
from instrumentation._payload import (
    PayloadError,
    decode,
    decode_call,
    disable_payload_capture,
    enable_payload_capture,
    encode,
    encode_call,
)
from sidecar.audit.records import AuditRecord, records_from_jsonl

__all__ = ["RecordResult", "Report", "disable_payload_capture", "enable_payload_capture", "encode", "encode_call",
           "load_factory", "load_records", "replay"]

#: attributes of a replay span (not part of the app-to-sidecar contract: only replay writes them)
REPLAY = "replay"
REPLAY_TRACE_ID = "replay.original_trace_id"
REPLAY_SPAN_ID = "replay.original_span_id"
REPLAY_EXACT = "replay.exact_match"


@dataclass
class RecordResult:
    request_id: str | None
    trace_id: str
    span_id: str
    replayed: bool
    reason: str | None = None  # why not replayed, or why outputs could not be compared
    exact: bool | None = None
    max_abs_diff: float | None = None
    mean_abs_diff: float | None = None
    cosine: float | None = None
    labels: int = 0  # rows (or integer outputs) compared as labels
    label_changes: int = 0
    topk_overlap: float | None = None
    recorded_latency_ms: float | None = None
    replay_latency_ms: float | None = None


@dataclass
class Report:
    model: str
    records: list[RecordResult] = field(default_factory=list)

    def aggregate(self) -> dict[str, Any]:
        done = [r for r in self.records if r.replayed]
        compared = [r for r in done if r.exact is not None]

        def values(name: str) -> list[float]:
            return [getattr(r, name) for r in compared if getattr(r, name) is not None]

        labels = sum(r.labels for r in compared)
        lat = sorted(r.replay_latency_ms for r in done)
        rec_lat = [r.recorded_latency_ms for r in done if r.recorded_latency_ms is not None]
        return {
            "records": len(self.records), "replayed": len(done), "not_replayable": len(self.records) - len(done),
            "compared": len(compared),
            "exact_match_rate": (sum(r.exact for r in compared) / len(compared)) if compared else None,
            "max_abs_diff": max(values("max_abs_diff"), default=None),
            "mean_abs_diff": _mean(values("mean_abs_diff")),
            "cosine_mean": _mean(values("cosine")), "cosine_min": min(values("cosine"), default=None),
            "label_change_rate": (sum(r.label_changes for r in compared) / labels) if labels else None,
            "label_changes": sum(r.label_changes for r in compared),
            "topk_overlap_mean": _mean(values("topk_overlap")),
            "replay_latency_ms_mean": _mean(lat), "replay_latency_ms_p95": lat[int(0.95 * (len(lat) - 1))] if lat else None,
            "recorded_latency_ms_mean": _mean(rec_lat),
        }

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "records": [asdict(r) for r in self.records], "aggregate": self.aggregate()}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


# --- inputs ------------------------------------------------------------------------------------


def load_records(source: str, *, model_version: str | None = None, limit: int | None = None) -> list[AuditRecord]:
    """Records from an audit store URL or a ``--format jsonl`` file."""
    if os.path.isfile(source) and not source.endswith((".db", ".sqlite", ".sqlite3")):
        with open(source, encoding="utf-8") as f:
            records = records_from_jsonl(f)
        if model_version is not None:
            records = [r for r in records if r.model_version == model_version]
        return records[:limit] if limit is not None else records
    from sidecar.audit.store import Query
    from sidecar.audit.urls import open_store

    store = open_store(source).open()
    try:
        return store.query(Query(model_version=model_version, limit=limit))
    finally:
        store.close()


def load_factory(spec: str) -> Callable[[], Any]:
    """``package.module:factory`` -> the callable; errors name what is missing."""
    module_name, sep, attr_name = spec.partition(":")
    if not sep or not module_name or not attr_name:
        raise ValueError(f"--model {spec!r}: expected package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--model {spec!r}: cannot import {module_name}: {e}") from None
    factory = getattr(module, attr_name, None)
    if not callable(factory):
        raise ValueError(f"--model {spec!r}: {module_name} has no callable {attr_name!r}")
    return factory


# --- comparing ---------------------------------------------------------------------------------


def _leaves(value: Any) -> list[Any]:
    """The tensors and scalars of a (nested) output, in a fixed order."""
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _leaves(v)]
    if isinstance(value, dict):
        return [x for k in sorted(value) for x in _leaves(value[k])]
    return [value]


def compare(recorded: Any, replayed: Any, result: RecordResult, top_k: int = 5) -> None:
    """Fill ``result`` with the differences between two outputs of the same structure."""
    import torch

    a_leaves, b_leaves = _leaves(recorded), _leaves(replayed)
    if len(a_leaves) != len(b_leaves):
        result.exact, result.reason = False, f"output structure changed ({len(a_leaves)} -> {len(b_leaves)} values)"
        return
    exact, diffs, dots, na, nb = True, [], 0.0, 0.0, 0.0
    for i, (a, b) in enumerate(zip(a_leaves, b_leaves)):
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            exact = exact and a == b
            continue
        b = b.detach().cpu()
        if a.shape != b.shape:
            result.exact, result.reason = False, f"output {i} shape changed {list(a.shape)} -> {list(b.shape)}"
            return
        exact = exact and a.dtype == b.dtype and torch.equal(a, b)
        af, bf = a.double().reshape(-1), b.double().reshape(-1)
        if af.numel():
            diffs.append((af - bf).abs())
            dots += float(af @ bf)
            na += float(af @ af)
            nb += float(bf @ bf)
        if i == 0:
            _labels(a, b, result, top_k)
    result.exact = bool(exact)
    if diffs:
        d = torch.cat(diffs)
        result.max_abs_diff, result.mean_abs_diff = float(d.max()), float(d.mean())
        result.cosine = dots / math.sqrt(na * nb) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)


def _labels(a, b, result: RecordResult, top_k: int) -> None:
    """Label changes and top-k overlap of a classifier-like first output."""
    import torch

    if a.is_floating_point() and a.dim() >= 1 and a.shape[-1] >= 2:
        rows_a, rows_b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]).to(a.dtype)
        result.labels = rows_a.shape[0]
        result.label_changes = int((rows_a.argmax(-1) != rows_b.argmax(-1)).sum())
        k = min(top_k, a.shape[-1])
        ta, tb = rows_a.topk(k, dim=-1).indices, rows_b.topk(k, dim=-1).indices
        overlap = [len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(ta, tb)]
        result.topk_overlap = sum(overlap) / len(overlap) if overlap else None
    elif not a.is_floating_point() and not a.is_complex():
        result.labels = a.numel()
        result.label_changes = int((a != b).sum())


# --- running -----------------------------------------------------------------------------------


def replay(records: list[AuditRecord], model: Any, *, model_name: str = "model", top_k: int = 5,
           tracer_provider: Any = None) -> Report:
    """Run every replayable record's input through ``model``; one span per replay, linked to the original."""
    import torch
    from opentelemetry import trace
    from opentelemetry.trace import Link, SpanContext, TraceFlags

    tracer = trace.get_tracer("instrumentation.replay", tracer_provider=tracer_provider)
    device = None
    if isinstance(model, torch.nn.Module):
        model.eval()
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None and first.device.type != "cpu" else None
    report = Report(model_name)
    for rec in records:
        res = RecordResult(rec.request_id, rec.trace_id, rec.span_id, replayed=False,
                           recorded_latency_ms=rec.latency_ms)
        report.records.append(res)
        try:
            args, kwargs = decode_call(rec.input_payload)
        except PayloadError as e:
            res.reason = f"input: {e}"
            continue
        if device is not None:  # payloads decode on the CPU; a GPU model gets its inputs where it lives
            args, kwargs = _to(args, device), _to(kwargs, device)
        links = []
        try:
            links = [Link(SpanContext(int(rec.trace_id, 16), int(rec.span_id, 16), is_remote=True,
                                      trace_flags=TraceFlags(TraceFlags.SAMPLED)))]
        except ValueError:
            pass
        with tracer.start_as_current_span(f"replay {model_name}", links=links, attributes={
                REPLAY: True, REPLAY_TRACE_ID: rec.trace_id, REPLAY_SPAN_ID: rec.span_id}) as span:
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = model(*args, **kwargs)
            if device is not None and device.type == "cuda":
                torch.cuda.synchronize(device)  # the latency of the work, not of queuing it
            res.replay_latency_ms = (time.perf_counter() - t0) * 1e3
            res.replayed = True
            try:
                compare(decode(rec.output_payload), out, res, top_k)
            except PayloadError as e:
                res.reason = f"recorded output: {e}"
            if res.exact is not None:
                span.set_attribute(REPLAY_EXACT, res.exact)
    return report


def _to(value: Any, device: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


# --- output ------------------------------------------------------------------------------------


def _f(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def table(report: Report) -> str:
    head = ("request_id", "trace_id", "exact", "max_abs", "mean_abs", "cosine", "labels_changed", "topk",
            "latency_ms", "note")
    rows = [head]
    for r in report.records:
        rows.append((r.request_id or "-", r.trace_id[:16], "-" if r.exact is None else "yes" if r.exact else "NO",
                     _f(r.max_abs_diff), _f(r.mean_abs_diff), _f(r.cosine, ".6f"),
                     f"{r.label_changes}/{r.labels}" if r.labels else "-", _f(r.topk_overlap, ".2f"),
                     f"{_f(r.recorded_latency_ms, '.1f')} -> {_f(r.replay_latency_ms, '.1f')}", r.reason or ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    a = report.aggregate()
    lines.append("")
    lines.append(f"model {report.model}: {a['replayed']}/{a['records']} replayed, exact match "
                 f"{_f(None if a['exact_match_rate'] is None else 100 * a['exact_match_rate'], '.1f')}%, "
                 f"max abs diff {_f(a['max_abs_diff'])}, mean abs diff {_f(a['mean_abs_diff'])}, "
                 f"cosine mean {_f(a['cosine_mean'], '.6f')} min {_f(a['cosine_min'], '.6f')}, "
                 f"label changes {a['label_changes']} ({_f(None if a['label_change_rate'] is None else 100 * a['label_change_rate'], '.1f')}%), "
                 f"top-k overlap {_f(a['topk_overlap_mean'], '.2f')}, latency mean "
                 f"{_f(a['recorded_latency_ms_mean'], '.2f')} ms recorded -> {_f(a['replay_latency_ms_mean'], '.2f')} ms replayed")
    return "\n".join(lines)


def _provider(endpoint: str | None, service: str):
    if not endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
    return provider


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m instrumentation.replay", description=__doc__.split("\n\n")[0])
    p.add_argument("--audit", required=True, help="audit store URL (sqlite:///..., postgresql://...) or a JSONL file")
    p.add_argument("--model", required=True, help="package.module:factory returning the model to replay against")
    p.add_argument("--model-version", help="only records of this recorded model version")
    p.add_argument("--limit", type=int)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--otlp-endpoint", help="send the replay spans to this OTLP/gRPC endpoint (e.g. 127.0.0.1:4317)")
    p.add_argument("--service-name", default="replay")
    args = p.parse_args(argv)
    try:
        factory = load_factory(args.model)
        records = load_records(args.audit, model_version=args.model_version, limit=args.limit)
    except (ValueError, OSError) as e:
        print(f"replay: {e}", file=sys.stderr)
        return 2
    provider = _provider(args.otlp_endpoint, args.service_name)
    report = replay(records, factory(), model_name=args.model, top_k=args.top_k, tracer_provider=provider)
    if provider is not None:
        provider.shutdown()
    print(json.dumps(report.to_json(), indent=2) if args.json else table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
