"""The demo's inference service: FastAPI + a small torch classifier + a toy generate loop.

Instrumented the way the README tells users to: ``configure()``, ``instrument_model()``,
``ASGIMiddleware``, ``trace_generation`` and plain ``logging`` calls. Run by run_demo.py:
``python examples/demo_app.py PORT``.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

import instrumentation as otel

PORT = int(sys.argv[1])
log = logging.getLogger("demo.inference")
stdout = logging.StreamHandler(sys.stdout)
stdout.setFormatter(otel.JSONFormatter())  # the structured JSON lines `kubectl logs` shows
logging.basicConfig(level=logging.INFO, handlers=[stdout])

otel.configure(service_name="resnet-demo", resource_attributes={"service.version": "1.4.2"})

torch.manual_seed(0)
classifier = otel.instrument_model(
    torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)).eval(),
    model_id="resnet-demo", model_version="v2")
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
def classify(body: Classify) -> dict:
    otel.set_tags(intent="classify")
    log.info("classifying request: %s", body.prompt, extra={"model_id": "resnet-demo", "model_version": "v2"})
    if body.slow:
        time.sleep(1.2)  # a slow request: the sidecar keeps every one
    # a bad request sends features of the wrong width: the model's forward raises (a 500 with its stack)
    features = torch.randn(body.batch, 63 if body.fail else 64)
    t0 = time.perf_counter()
    with torch.inference_mode():
        labels = classifier(features).argmax(dim=1).tolist()
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


uvicorn.run(otel.ASGIMiddleware(app), host=os.environ.get("DEMO_HOST", "127.0.0.1"), port=PORT, log_level="warning", access_log=False)
