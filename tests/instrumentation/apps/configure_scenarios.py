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
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    mine = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(mine))
    trace.set_tracer_provider(provider)
    handle = instrumentation.configure(endpoint=os.environ["ENDPOINT"])
    assert handle.tracer_provider is provider and trace.get_tracer_provider() is provider
    emit("shared")
    instrumentation.shutdown()
    assert [s.name for s in mine.get_finished_spans()] == ["shared"], "the app's own exporter lost its spans"


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


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)
    {"basic": basic, "env": env_only, "fork": fork, "existing": existing_provider, "dropping": dropping,
     "redaction": redacted}[sys.argv[1]]()
