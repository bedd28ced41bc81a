"""``configure()`` scenarios, one per process (global providers are set once): ``configure_scenarios.py NAME``."""

from __future__ import annotations

import logging
import os
import sys

from opentelemetry import metrics, trace

import instrumentation


def emit(name: str) -> None:
    with trace.get_tracer("scenario").start_as_current_span(name):
        logging.getLogger("scenario").warning("log from %s", name)
    metrics.get_meter("scenario").create_counter("scenario.calls").add(1)


def basic() -> None:
    handle = instrumentation.configure(service_name="svc-explicit", endpoint=os.environ["ENDPOINT"],
                                       protocol=os.environ.get("PROTOCOL", "grpc"),
                                       resource_attributes={"team": "ml"})
    assert instrumentation.configure() is handle  # idempotent: same handle, nothing added twice
    emit("basic")
    instrumentation.shutdown()


def env_only() -> None:
    instrumentation.configure()  # endpoint, service name, resource attributes all from OTEL_* variables
    emit("env")
    instrumentation.shutdown()


def fork() -> None:
    instrumentation.configure(service_name="forker", endpoint=os.environ["ENDPOINT"])
    emit("before-fork")
    pid = os.fork()
    if pid == 0:
        try:
            emit("in-child")
            instrumentation.shutdown()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    emit("parent-after-fork")
    instrumentation.shutdown()


def existing_provider() -> None:
    """An app (or a distro) that already exports: configure() must not export a second time."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    mine = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(mine))
    trace.set_tracer_provider(provider)
    handle = instrumentation.configure(endpoint=os.environ["ENDPOINT"])
    assert handle.tracer_provider is provider and trace.get_tracer_provider() is provider
    with instrumentation.request_context(instrumentation.RequestContext(request_id="req-7")):
        with trace.get_tracer("scenario").start_as_current_span("shared") as span:
            span.set_attribute("note", "call jane.doe@example.com")
    instrumentation.shutdown()
    (got,) = mine.get_finished_spans()  # exactly once, through the app's own exporter
    assert got.attributes["request.id"] == "req-7", dict(got.attributes)
    assert "jane.doe@example.com" not in got.attributes["note"], "redaction skipped on the app's exporter"


def existing_bare_provider() -> None:
    """An app provider with no exporter: configure() adds the OTLP one."""
    from opentelemetry.sdk.trace import TracerProvider

    trace.set_tracer_provider(TracerProvider())
    instrumentation.configure(endpoint=os.environ["ENDPOINT"])
    emit("bare")
    instrumentation.shutdown()


def under_sdk_configurator() -> None:
    """What opentelemetry-distro's configurator sets up (the SDK's own), then the app's configure()."""
    from opentelemetry.sdk._configuration import _OTelSDKConfigurator

    _OTelSDKConfigurator().configure()  # providers + OTLP exporters + a LoggingHandler on the root logger
    instrumentation.configure()
    with instrumentation.request_context(instrumentation.RequestContext(request_id="req-9")):
        with trace.get_tracer("scenario").start_as_current_span("distro") as span:
            span.set_attribute("note", "call jane.doe@example.com")
            logging.getLogger("scenario").error("failed for jane.doe@example.com")
    instrumentation.get_telemetry().force_flush(5000)


def env_per_signal() -> None:
    instrumentation.configure()  # every choice from OTEL_* variables, per signal
    emit("per-signal")
    instrumentation.shutdown()


def unreachable() -> None:
    """The sidecar is down: flush and shutdown still return within their deadline."""
    import time

    handle = instrumentation.configure(endpoint=os.environ["ENDPOINT"], protocol=os.environ["PROTOCOL"])
    for i in range(50):
        emit(f"lost-{i}")
    t0 = time.monotonic()
    ok = handle.force_flush(1000)
    flush = time.monotonic() - t0
    t0 = time.monotonic()
    instrumentation.shutdown(1000)
    stop = time.monotonic() - t0
    print(f"flush {flush:.3f} ok {ok} shutdown {stop:.3f}")


def console() -> None:
    """No logging setup of the app's own: records still reach stderr, INFO is exported."""
    instrumentation.configure(endpoint=os.environ["ENDPOINT"])
    log = logging.getLogger("app")
    log.info("info goes to the sidecar only")
    log.error("error shown on the console too")
    with trace.get_tracer("scenario").start_as_current_span("console"):
        pass
    instrumentation.get_telemetry().force_flush(5000)
    instrumentation.shutdown()


def redaction_counts() -> None:
    handle = instrumentation.configure(endpoint=os.environ["ENDPOINT"])
    logging.getLogger("app").warning("card 4111 1111 1111 1111 for jane.doe@example.com")
    handle.force_flush(5000)  # logs first: the redaction happens on their export
    instrumentation.shutdown()


def dropping() -> None:
    handle = instrumentation.configure(endpoint=os.environ["ENDPOINT"], max_queue_size=10, logging_bridge=False)
    tracer = trace.get_tracer("scenario")
    for i in range(500):
        tracer.start_span(f"s{i}").end()
    assert handle.dropped()["spans"] > 0, handle.dropped()
    print("dropped", handle.dropped()["spans"])
    instrumentation.shutdown()


def redacted() -> None:
    instrumentation.configure(endpoint=os.environ["ENDPOINT"], redaction=True)
    with instrumentation.trace_generation("llm", capture_content=True) as gen:
        gen.prompt("mail the summary to jane.doe@example.com")
        logging.getLogger("scenario").warning("user jane.doe@example.com asked for a summary")
    instrumentation.shutdown()


SCENARIOS = {"basic": basic, "env": env_only, "fork": fork, "existing": existing_provider,
             "existing-bare": existing_bare_provider, "sdk-configurator": under_sdk_configurator,
             "per-signal": env_per_signal, "unreachable": unreachable,
             "console": console, "redaction-counts": redaction_counts, "dropping": dropping, "redaction": redacted}

if __name__ == "__main__":
    if sys.argv[1] != "console":  # that one checks what happens to an app with no logging setup at all
        logging.getLogger().setLevel(logging.INFO)
    SCENARIOS[sys.argv[1]]()
