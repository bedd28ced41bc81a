"""A small inference service, instrumented as a user would: ``web_app.py fastapi|flask PORT``.

The OTLP endpoint comes from ``OTEL_EXPORTER_OTLP_ENDPOINT`` (set by the test);
``TELEMETRY=off`` serves the same app without instrumentation (for the benchmark).
"""

from __future__ import annotations

import logging
import os
import sys

import torch

import instrumentation as otel

FRAMEWORK, PORT = sys.argv[1], int(sys.argv[2])
TELEMETRY = os.environ.get("TELEMETRY", "on") == "on"
log = logging.getLogger("inference")
logging.basicConfig(level=logging.INFO, stream=sys.stderr)

if TELEMETRY:
    otel.configure(service_name=f"{FRAMEWORK}-classifier", resource_attributes={"deployment.environment": "test"}, redaction=os.environ.get("REDACTION", "on") == "on")

torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
model = otel.instrument_model(net, model_id="tiny-classifier", model_version="1") if TELEMETRY else net


def predict(batch: int) -> list[int]:
    with torch.inference_mode():
        out = model(torch.randn(batch, 16))
    labels = out.argmax(dim=1).tolist()
    log.info("predicted %d rows", batch, extra={"execution_time_ms": 1.0})
    return labels


class BadInput(Exception):
    pass


def fail() -> None:
    log.info("about to fail")
    raise BadInput("feature vector has NaN")


if FRAMEWORK == "fastapi":
    import uvicorn
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/predict")
    def predict_route(batch: int = 2, intent: str | None = None) -> dict:
        if intent:
            otel.set_tags(intent=intent)
        return {"labels": predict(batch)}

    @app.get("/fail")
    def fail_route() -> dict:
        fail()
        return {}

    # outermost, so the 500 that Starlette's error middleware writes also carries X-Request-ID
    served = otel.ASGIMiddleware(app) if TELEMETRY else app
    uvicorn.run(served, host="127.0.0.1", port=PORT, log_level="warning", access_log=False)

elif FRAMEWORK == "flask":
    import waitress
    from flask import Flask, jsonify, request

    app = Flask(__name__)

    @app.get("/predict")
    def predict_route():
        if request.args.get("intent"):
            otel.set_tags(intent=request.args["intent"])
        return jsonify(labels=predict(int(request.args.get("batch", 2))))

    @app.get("/fail")
    def fail_route():
        fail()

    if TELEMETRY:
        otel.instrument_flask(app)
    waitress.serve(app, host="127.0.0.1", port=PORT, threads=4, _quiet=True)
else:
    raise SystemExit(f"unknown framework {FRAMEWORK}")
