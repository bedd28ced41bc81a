"""A FastAPI app with no instrumentation code at all: run as ``opentelemetry-instrument uvicorn auto_app:app``."""

from __future__ import annotations

import logging

from fastapi import FastAPI

log = logging.getLogger("auto_app")
app = FastAPI()


@app.get("/predict")
def predict(user: str = "") -> dict:
    log.info("scoring for %s", user)  # INFO: exported by default; the email must not leave the process
    return {"label": 1}


@app.get("/fail")
def fail() -> dict:
    raise RuntimeError("model weights missing")
