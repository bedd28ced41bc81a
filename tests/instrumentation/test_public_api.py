"""The public surface is small and pinned; torch and TorchServe stay optional."""

from __future__ import annotations

import subprocess
import sys

import instrumentation

from .conftest import ROOT

PUBLIC = {
    "ASGIMiddleware", "FORCE_KEEP", "ForceKeepSampler", "Generation", "JSONFormatter",
    "LoggingBridge", "REQUEST_ID", "RequestContext", "RequestContextSpanProcessor", "Telemetry", "TracingHandler",
    "USER_ID", "WSGIMiddleware", "bridge_logging", "configure", "current_generation", "enable_drift", "current_request",
    "get_telemetry", "inject", "instrument_flask", "instrument_model", "k8s_resource_attributes",
    "request_context", "set_tags", "shutdown", "trace_generation", "uninstrument_model",
}


def test_all_is_pinned():
    assert set(instrumentation.__all__) == PUBLIC
    assert instrumentation.TracingHandler.__name__ == "TracingHandler"  # lazy names resolve


def test_import_does_not_pull_in_torch_or_torchserve():
    code = ("import sys, instrumentation; "
            "assert 'torch' not in sys.modules, 'torch imported'; assert 'ts' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_inject_writes_traceparent_and_request_tags_as_baggage(spans):
    from instrumentation import RequestContext, inject, request_context, set_tags

    with request_context(RequestContext(request_id="r")), \
            spans.provider.get_tracer("t").start_as_current_span("call") as span:
        set_tags(intent="search")
        headers = inject({})
    assert headers["traceparent"].split("-")[1] == format(span.get_span_context().trace_id, "032x")
    assert headers["baggage"] == "tag.intent=search"
