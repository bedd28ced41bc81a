"""The two helpers stages share: the bounded, ordered outbox and the ticker."""

from __future__ import annotations

import threading
import time

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidecar.component import Refused
from sidecar.envelope import Envelope
from sidecar.outbox import Outbox
from sidecar.signals import Signal
from sidecar.telemetry import SelfTelemetry
from sidecar.testing import CollectingConsumer
from sidecar.ticker import Ticker


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def env(name: str, spans: int = 1) -> Envelope:
    req = ExportTraceServiceRequest()
    ss = req.resource_spans.add().scope_spans.add()
    for i in range(spans):
        ss.spans.add(name=f"{name}.{i}")
    return Envelope(Signal.TRACES, req)


def names(sink: CollectingConsumer) -> list[str]:
    return [s.name for r in sink.of(Signal.TRACES) for rs in r.resource_spans for ss in rs.scope_spans
            for s in ss.spans]


def make(**kw):
    sink, clock = CollectingConsumer(), Clock()
    tel = SelfTelemetry().component("processor", "p")
    return Outbox(sink, tel, clock=clock, name="p", **kw), sink, clock, tel


def test_delivers_in_order_and_honours_retry_after():
    box, sink, clock, _ = make(max_items=100)
    sink.refuse = Refused("queue_full", retry_after=5.0)
    sink.refuse_times = 1
    box.put(env("a"))
    box.put(env("b"))
    assert not box.flush() and box.items == 2
    calls = sink.calls
    clock.now += 4.9
    assert not box.flush() and sink.calls == calls  # the refusing stage is not hammered
    clock.now += 0.2
    assert box.flush() and names(sink) == ["a.0", "b.0"] and box.items == 0


def test_over_the_limit_the_oldest_is_dropped_and_counted_as_loss():
    box, sink, _, tel = make(max_items=4)
    sink.refuse = Refused("queue_full")
    for name in "abc":
        box.put(env(name, spans=2))
    assert box.items == 4
    assert tel.value("dropped", Signal.TRACES, "downstream_refused", "false") == 2
    sink.refuse = None
    box.retry_at = float("-inf")
    assert box.flush() and names(sink) == ["b.0", "b.1", "c.0", "c.1"]


def test_a_permanent_refusal_drops_with_its_reason_and_moves_on():
    box, sink, _, tel = make(max_items=10)
    sink.refuse = Refused("unsupported_signal", retryable=False)
    sink.refuse_times = 1
    box.put(env("a", spans=3))
    box.put(env("b"))
    assert box.flush() and names(sink) == ["b.0"]
    assert tel.value("dropped", Signal.TRACES, "unsupported_signal", "false") == 3


def test_drain_counts_what_is_left_at_the_deadline():
    box, sink, _, tel = make(max_items=10)
    sink.refuse = Refused("queue_full")
    box.put(env("a", spans=3))
    box.drain(time.monotonic())
    assert box.items == 0 and tel.value("dropped", Signal.TRACES, "shutdown", "false") == 3


def log_env(body: str) -> Envelope:
    req = ExportLogsServiceRequest()
    req.resource_logs.add().scope_logs.add().log_records.add().body.string_value = body
    return Envelope(Signal.LOGS, req)


def test_what_waits_together_goes_on_as_one_request_per_signal_in_order():
    box, sink, _, _ = make(max_items=100, coalesce=Envelope.merge, coalesce_items=5)
    for e in (env("a", 2), log_env("x"), env("b"), env("c", 2), log_env("y"), env("d", 2)):
        box.put(e)
    assert box.items == 9
    assert box.flush() and box.items == 0
    # a, b and c fit in 5 spans; d waits for the next request (it would exceed it), after them
    assert [r.items for r in sink.envelopes] == [5, 2, 2]
    assert [e.signal for e in sink.envelopes] == [Signal.TRACES, Signal.LOGS, Signal.TRACES]
    assert names(sink) == ["a.0", "a.1", "b.0", "c.0", "c.1", "d.0", "d.1"]
    assert [lr.body.string_value for r in sink.of(Signal.LOGS) for rl in r.resource_logs for sl in rl.scope_logs
            for lr in sl.log_records] == ["x", "y"]


def test_while_the_next_stage_refuses_nothing_merges_so_overflow_drops_the_oldest_as_they_came():
    box, sink, clock, tel = make(max_items=4, coalesce=Envelope.merge, coalesce_items=100)
    sink.refuse = Refused("queue_full")
    box.put(env("a"))
    assert not box.flush()  # refused: it waits at the head
    for name in "bcde":
        box.put(env(name))
        assert not box.flush()
    # a was the oldest: dropped alone when e came (a merge of a, b, c, d would have gone whole)
    assert box.items == 4 and tel.value("dropped", Signal.TRACES, "downstream_refused", "false") == 1
    sink.refuse = None
    assert box.flush()
    # the first delivery after the refusal is the head alone; then what waits goes on merged
    assert names(sink) == ["b.0", "c.0", "d.0", "e.0"] and [r.items for r in sink.envelopes] == [1, 3]


def test_ticker_runs_its_work_survives_errors_and_stops():
    ran = threading.Semaphore(0)
    calls = []

    def work():
        calls.append(1)
        ran.release()
        if len(calls) == 1:
            raise RuntimeError("first run fails")

    ticker = Ticker(work, lambda: None, name="t")  # no interval: runs only when woken
    ticker.stop()  # stop before start is fine
    ticker.start()
    for _ in range(2):
        ticker.wake()
        assert ran.acquire(timeout=5)
    ticker.stop(time.monotonic() + 5)
    ticker.stop()
    assert not ticker.running and len(calls) == 2
