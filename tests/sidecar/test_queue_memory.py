"""The in-memory sending queue behind every exporter: bounded, refusing when full, counted at shutdown."""

from __future__ import annotations

import threading
import time

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidecar.envelope import Envelope
from sidecar.component import Kind, Refused
from sidecar.config import ComponentId
from sidecar.exporters.otlp import FACTORY
from sidecar.host import Host
from sidecar.queue.memory import MemoryQueue
from sidecar.registry import CreateSettings
from sidecar.signals import Signal
from sidecar.telemetry import SelfTelemetry
from sidecar.testing import Counted, free_port


def traces(marker: int) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    req.resource_spans.add().scope_spans.add().spans.add(name=f"s{marker}")
    return req


def exporter(**queue):
    tel = SelfTelemetry()
    cfg = FACTORY.config_model.model_validate({
        "endpoint": f"127.0.0.1:{free_port()}", "tls": {"insecure": True}, "sending_queue": queue,
        "retry_on_failure": {"initial_interval": "50ms", "max_interval": "50ms"}})
    comp = tel.component("exporter", "otlp")
    return FACTORY.create(CreateSettings(ComponentId("otlp"), Kind.EXPORTER, comp), cfg, None), comp, tel


def test_fifo_and_close_lets_consumers_drain():
    q = MemoryQueue(10)
    for i in range(3):
        q.put(Envelope(Signal.TRACES, traces(i)))
    q.close()
    with pytest.raises(Refused) as e:
        q.put(Envelope(Signal.TRACES, traces(9)))
    assert e.value.reason == "shutting_down"
    assert [q.get().message for _ in range(3)] == [traces(0), traces(1), traces(2)]
    assert q.get() is None


def test_abort_wakes_blocked_consumers_and_returns_leftovers():
    q = MemoryQueue(10)
    got = []
    t = threading.Thread(target=lambda: got.append(q.get()))
    t.start()
    time.sleep(0.05)
    assert q.abort() == []
    t.join(2)
    assert got == [None]


def test_full_queue_refuses_with_a_retryable_reason_and_counts():
    exp, tel, root = exporter(queue_size=2)  # not started: nothing drains the queue
    exp = Counted(exp, tel)  # behind the pipeline's counting edge, as the graph runs it
    exp.consume(Envelope(Signal.TRACES, traces(1)))
    exp.consume(Envelope(Signal.TRACES, traces(2)))
    with pytest.raises(Refused) as e:
        exp.consume(Envelope(Signal.TRACES, traces(3)))
    assert e.value.reason == "queue_full" and e.value.retryable
    assert tel.value("accepted", Signal.TRACES) == 2
    assert tel.value("refused", Signal.TRACES, "queue_full") == 1
    assert tel.value("received", Signal.TRACES) == 3
    exp.shutdown(time.monotonic())


def test_gauges_show_the_backlog():
    exp, _, root = exporter(queue_size=7, num_consumers=1)
    exp.start(Host(root))
    for i in range(4):
        exp.consume(Envelope(Signal.TRACES, traces(i)))
    size = root.registry.get_sample_value("sidecar_queue_size", {"component": "otlp"})
    assert root.registry.get_sample_value("sidecar_queue_capacity", {"component": "otlp"}) == 7
    assert size in (3, 4)  # one may be in the worker's hands
    assert root.registry.get_sample_value("sidecar_queue_items", {"component": "otlp"}) == size
    exp.shutdown(time.monotonic() + 0.1)


def test_shutdown_with_backend_down_stops_by_the_deadline_and_counts_the_loss():
    exp, tel, root = exporter(num_consumers=2)
    exp.start(Host(root))
    for i in range(10):
        exp.consume(Envelope(Signal.TRACES, traces(i)))
    t0 = time.monotonic()
    exp.shutdown(t0 + 0.3)
    assert time.monotonic() - t0 < 2
    assert tel.value("dropped", Signal.TRACES, "shutdown", "false") == 10
    with pytest.raises(Refused) as e:
        exp.consume(Envelope(Signal.TRACES, traces(11)))
    assert e.value.reason == "shutting_down"
