"""A Flask app with no instrumentation code: ``opentelemetry-instrument python auto_flask_app.py PORT``."""

from __future__ import annotations

import logging
import os
import sys

import waitress
from flask import Flask, request

log = logging.getLogger("auto_flask_app")
app = Flask(__name__)


@app.get("/predict")
def predict() -> dict:
    log.info("scoring for %s", request.args.get("user", ""))
    return {"label": 1}


@app.get("/fail")
def fail() -> dict:
    raise RuntimeError("model weights missing")


if os.environ.get("APP_CONFIGURES_ITSELF"):
    import instrumentation

    instrumentation.configure(service_name="auto-flask-app")
    instrumentation.instrument_flask(app)

if __name__ == "__main__":
    waitress.serve(app, host="127.0.0.1", port=int(sys.argv[1]), threads=4)
