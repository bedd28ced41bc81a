"""A FastAPI app with no instrumentation code at all: run as ``opentelemetry-instrument uvicorn auto_app:app``."""

from __future__ import annotations

import logging
import os

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


if os.environ.get("APP_CONFIGURES_ITSELF"):
    # an app written for plain configure() and then run under opentelemetry-instrument anyway:
    # its own calls must not add a second set of exporters or a second server span
    import instrumentation

    instrumentation.configure(service_name="auto-app")
    app.add_middleware(instrumentation.ASGIMiddleware)
