"""In-process OpenTelemetry for PyTorch inference services.

::

    import instrumentation as otel

    otel.configure(service_name="classifier")           # OTLP to the sidecar on 127.0.0.1:4317
    otel.instrument_model(model, model_id="resnet50", model_version="3")  # hooks; same object
    otel.enable_drift()                                  # optional: input/output drift summaries as metrics
    app.add_middleware(otel.ASGIMiddleware)              # FastAPI; Flask: otel.instrument_flask(app)

Every request becomes one trace (server span, ``ml.forward`` spans, generation spans)
with its log records attached by trace id. torch is imported only by
:mod:`instrumentation.torch` (and by :func:`instrument_model` on first use), TorchServe
only by :mod:`instrumentation.torchserve`.
"""

from __future__ import annotations

from typing import Any

from instrumentation._context import (
    FORCE_KEEP,
    REQUEST_ID,
    USER_ID,
    RequestContext,
    RequestContextSpanProcessor,
    current_request,
    inject,
    request_context,
    set_tags,
)
from instrumentation._setup import (
    ForceKeepSampler,
    Telemetry,
    configure,
    get_telemetry,
    k8s_resource_attributes,
    shutdown,
)
from instrumentation.asgi import ASGIMiddleware
from instrumentation.genai import Generation, current_generation, trace_generation
from instrumentation.logs import JSONFormatter, LoggingBridge, bridge_logging
from instrumentation.wsgi import WSGIMiddleware, instrument_flask

__all__ = [
    "ASGIMiddleware",
    "FORCE_KEEP",
    "ForceKeepSampler",
    "Generation",
    "JSONFormatter",
    "LoggingBridge",
    "REQUEST_ID",
    "RequestContext",
    "RequestContextSpanProcessor",
    "Telemetry",
    "TracingHandler",
    "USER_ID",
    "WSGIMiddleware",
    "bridge_logging",
    "configure",
    "current_generation",
    "enable_drift",
    "current_request",
    "get_telemetry",
    "inject",
    "instrument_flask",
    "instrument_model",
    "k8s_resource_attributes",
    "request_context",
    "set_tags",
    "shutdown",
    "trace_generation",
    "uninstrument_model",
]


def instrument_model(model: Any, model_id: str | None = None, model_version: str | None = None,
                     **options: Any) -> Any:
    """Trace each forward call of a torch model with hooks on that same object; returns it.

    See :func:`instrumentation.torch.instrument_model`.
    """
    from instrumentation.torch import instrument_model as _instrument

    return _instrument(model, model_id, model_version, **options)


def uninstrument_model(model: Any) -> Any:
    """Remove what :func:`instrument_model` added; returns the model."""
    from instrumentation.torch import uninstrument_model as _uninstrument

    return _uninstrument(model)


def enable_drift(meter_provider: Any = None, **options: Any) -> Any:
    """Per-model-version drift and cost summaries of every instrumented forward and generation, as metrics.

    See :func:`instrumentation.drift.enable_drift` and docs/drift.md.
    """
    from instrumentation.drift import enable_drift as _enable

    return _enable(meter_provider, **options)


def __getattr__(name: str) -> Any:
    """Names whose import pulls in an optional dependency (torch, TorchServe) load on first use."""
    if name == "TracingHandler":
        from instrumentation.torchserve import TracingHandler

        return TracingHandler
    raise AttributeError(f"module 'instrumentation' has no attribute {name!r}")
