"""Forward overhead of drift statistics, on and off (a few seconds).

For two small models — a tabular MLP (batch 32 x 16 features: per-column statistics too) and a
pooling image classifier (batch 8 x 3 x 64 x 64) — it times per forward call, interleaved over
several rounds:

- ``bare``: the model without instrumentation
- ``instrumented``: forward spans (module hooks), drift off
- ``drift every 1``: spans + drift statistics on every forward
- ``drift every 10``: spans + drift statistics on every 10th forward (cost metrics on every one)
- ``drift default``: the defaults: statistics within a 5% budget of forward time (``budget=0.05``)

Spans go to a BatchSpanProcessor whose exporter discards them and metrics to an in-memory reader
(never collected during timing), so the figures are the per-call work on the inference thread.
On CPU it measures the CPU time of the inference thread (torch limited to one thread), which a busy shared machine
disturbs far less than wall time; on CUDA, wall time.

    .venv/bin/python -W ignore benchmarks/drift_bench.py [--calls 1000] [--rounds 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult  # noqa: E402

from instrumentation.drift import DriftObserver  # noqa: E402
from instrumentation.torch import add_forward_observer, instrument_model  # noqa: E402


class _Discard(SpanExporter):
    def export(self, spans):
        return SpanExportResult.SUCCESS


def _per_call(fn, x, calls: int, sync) -> float:
    clock = time.perf_counter if x.device.type == "cuda" else time.thread_time  # CPU time: steadier on a busy box
    t0 = clock()
    for _ in range(calls):
        fn(x)
    sync()
    return (clock() - t0) / calls


def bench(name: str, model: torch.nn.Module, x: torch.Tensor, calls: int, rounds: int) -> None:
    device = x.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tracer = TracerProvider()
    tracer.add_span_processor(BatchSpanProcessor(_Discard(), max_queue_size=65536))
    meters = MeterProvider(metric_readers=[InMemoryMetricReader()])
    model = model.to(device).eval()
    # hooks live on the object: each variant gets its own copy, instrumented under its own model id
    variants = {"bare": model}
    for label in ("instrumented", "drift every 1", "drift every 10", "drift default"):
        variants[label] = instrument_model(copy.deepcopy(model), label, "1", tracer_provider=tracer,
                                           meter_provider=meters)
    # the observers see every instrumented model: each one is kept to its own variant
    removers = [add_forward_observer(_only(DriftObserver(**options).observe_forward, label))
                for options, label in (({"budget": None}, "drift every 1"),
                                       ({"budget": None, "sample_every": 10}, "drift every 10"),
                                       ({}, "drift default"))]
    results: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for fn in variants.values():
            _per_call(fn, x, max(20, calls // 10), sync)  # warm-up
        for _ in range(rounds):  # interleaved, so a busy shared machine hits every variant alike
            for label, fn in variants.items():
                results[label].append(_per_call(fn, x, calls, sync))
    for remove in removers:
        remove()
    base = statistics.median(results["instrumented"])
    print(f"\n{name}  input {tuple(x.shape)} on {device}  ({calls} calls x {rounds} rounds, median per call)")
    for label, times in results.items():
        t = statistics.median(times)
        extra = "" if label in ("bare", "instrumented") else f"  +{(t - base) * 1e6:7.1f} us over instrumented"
        print(f"  {label:<16} {t * 1e6:9.1f} us  {t / base:5.2f}x instrumented{extra}")


def _only(fn, model_id: str):
    def observe(mid, version, args, kwargs, output):
        if mid == model_id:
            fn(mid, version, args, kwargs, output)
    return observe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    device = torch.device(args.device)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    bench("tabular MLP (classifier)", mlp, torch.randn(32, 16, device=device), args.calls, args.rounds)
    # image-sized input, cheap model: shows the statistics' cost on 98k elements (strided to 16k) plainly
    pool = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 10))
    bench("pooled image classifier", pool, torch.randn(8, 3, 64, 64, device=device), args.calls, args.rounds)


if __name__ == "__main__":
    main()
