"""The demo's inference service: FastAPI + a small torch classifier + a toy generate loop.

Instrumented the way the README tells users to: ``configure()``, ``instrument_model()``,
``ASGIMiddleware``, ``trace_generation`` and plain ``logging`` calls. Run by run_demo.py:
``python examples/demo_app.py PORT``.

Two versions of the classifier serve ``/classify``: the stable ``v1`` and a canary ``v2``
that gets every fourth request (or the version named in ``X-Model-Version``). The canary
is slower (about 25 ms more per forward) and fails one forward in twelve, so the per-version
span metrics have something to tell. ``GET /debug/redactions`` answers the in-process
redaction counts per detector, for the demo's report.

Drift summaries are on (``enable_drift``: every forward, each of the 64 input columns its own
feature). Each version draws its inputs from its own seeded generator, so a run is repeatable.
``POST /debug/flush`` exports the app's metrics now (the demo calls it at its phase boundaries);
``POST /debug/shift-canary`` shifts column 7 of the canary's inputs by +1.0 (one standard
deviation) from then on: the drift the demo's report finds. v1's inputs never change.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import itertools

import torch
import uvicorn
from fastapi import FastAPI, Header, HTTPException
from pydantic import BaseModel

import instrumentation as otel
from instrumentation.drift import enable_drift

PORT = int(sys.argv[1])
log = logging.getLogger("demo.inference")
stdout = logging.StreamHandler(sys.stdout)
stdout.setFormatter(otel.JSONFormatter())  # the structured JSON lines `kubectl logs` shows
logging.basicConfig(level=logging.INFO, handlers=[stdout])

telemetry = otel.configure(service_name="resnet-demo", resource_attributes={"service.version": "1.4.2"})
# every forward summarized (the demo's traffic is small), every one of the 64 input columns a feature
drift = enable_drift(max_columns=64, budget=None, sample_every=1)
SHIFT_COLUMN, SHIFT_BY = 7, 1.0


class Canary(torch.nn.Module):
    """The v2 candidate: the same network, slower, and one forward in ``fail_every`` blows up."""

    def __init__(self, net: torch.nn.Module, fail_every: int = 12, extra_s: float = 0.025):
        super().__init__()
        self.net, self.fail_every, self.extra_s = net, fail_every, extra_s
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(self.extra_s)  # a heavier backbone
        if self.calls % self.fail_every == 0:
            raise FloatingPointError("canary v2: non-finite logits after layer 2")
        return self.net(x)


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)).eval()


torch.manual_seed(0)
classifiers = {
    "v1": otel.instrument_model(_net(), model_id="resnet-demo", model_version="v1"),
    "v2": otel.instrument_model(Canary(_net()).eval(), model_id="resnet-demo", model_version="v2"),
}
_route = itertools.count()
_inputs = {v: torch.Generator().manual_seed(seed) for seed, v in enumerate(classifiers, 1)}
shifted: set[str] = set()  # versions whose inputs have column SHIFT_COLUMN shifted
lm_head = torch.nn.Linear(32, 100).eval()


class Classify(BaseModel):
    prompt: str
    batch: int = 4
    slow: bool = False
    fail: bool = False


class Generate(BaseModel):
    prompt: str
    max_tokens: int = 16
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 42


app = FastAPI()


@app.post("/classify")
def classify(body: Classify, x_model_version: str | None = Header(None)) -> dict:
    version = x_model_version if x_model_version in classifiers else ("v2" if next(_route) % 4 == 3 else "v1")
    otel.set_tags(intent="classify")
    log.info("classifying request: %s", body.prompt, extra={"model_id": "resnet-demo", "model_version": version})
    if body.slow:
        otel.set_tags(load="slow")  # so the demo's report finds its slow requests among the kept traces
        time.sleep(1.2)  # a slow request: the sidecar keeps every one
    # a bad request sends features of the wrong width: the model's forward raises (a 500 with its stack)
    features = torch.randn(body.batch, 63 if body.fail else 64, generator=_inputs[version])
    if version in shifted:
        features[:, SHIFT_COLUMN] += SHIFT_BY
    t0 = time.perf_counter()
    with torch.inference_mode():
        labels = classifiers[version](features).argmax(dim=1).tolist()
    log.info("classified", extra={"execution_time_ms": round((time.perf_counter() - t0) * 1000, 3)})
    return {"labels": labels}


@app.post("/generate")
def generate(body: Generate) -> dict:
    if not body.prompt:
        raise HTTPException(400, "empty prompt")
    torch.manual_seed(body.seed)
    with otel.trace_generation("toy-lm", temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                               max_tokens=body.max_tokens, input_tokens=len(body.prompt.split())) as gen:
        tokens = []
        with torch.inference_mode():
            for _ in range(body.max_tokens):
                logits = lm_head(torch.randn(1, 32)) / body.temperature
                tokens.append(int(torch.multinomial(torch.softmax(logits, -1), 1)))
                gen.token()
        gen.finish("length")
    log.info("generated %d tokens", len(tokens))
    return {"tokens": tokens}


@app.post("/debug/flush")
def flush() -> dict:
    """Export the app's metrics (with the drift summaries) now; answers once the sidecar has them."""
    return {"flushed": telemetry.meter_provider.force_flush(30_000)}


@app.post("/debug/shift-canary")
def shift_canary() -> dict:
    """From now on the canary's inputs have column SHIFT_COLUMN shifted by SHIFT_BY (v1's never change)."""
    shifted.add("v2")
    return {"version": "v2", "column": SHIFT_COLUMN, "by": SHIFT_BY}


@app.get("/debug/redactions")
def redactions() -> dict:
    """What in-process redaction changed so far, per detector and action (``email:mask`` -> 12)."""
    engine = telemetry.redaction_engine
    return {f"{rule}:{action}": n for (rule, action), n in (engine.stats.snapshot() if engine else {}).items()}


uvicorn.run(otel.ASGIMiddleware(app), host=os.environ.get("DEMO_HOST", "127.0.0.1"), port=PORT, log_level="warning", access_log=False)
