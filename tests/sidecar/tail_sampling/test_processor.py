"""tail_sampling buffering and delivery, driven by a fake clock and explicit tick() calls."""

from __future__ import annotations

import os
import time

from sidecar.envelope import Envelope
from sidecar.component import Refused
from sidecar.signals import Signal

from .helpers import (attr, kept_logs, kept_spans, kept_trace_ids, logs_request, make, span, tid, traces_metric,
                      traces_request)

ERRORS_ONLY = [{"name": "errors", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}}]


def test_decides_early_after_the_local_root_plus_grace():
    proc, sink, clock, _ = make()
    t = tid()
    proc.consume(Envelope(Signal.TRACES, traces_request(span(t), span(t))))
    clock.advance(2)
    proc.consume(Envelope(Signal.TRACES, traces_request(span(t, root=True))))
    clock.advance(0.9)
    proc.tick()
    assert kept_spans(sink) == []
    clock.advance(0.1)
    proc.tick()
    assert len(kept_spans(sink)) == 3 and proc.buffered_traces == 0


def test_a_parent_flagged_remote_makes_a_local_root():
    proc, sink, clock, _ = make()
    t = tid()
    proc.consume(Envelope(Signal.TRACES, traces_request(span(t, remote_parent=True))))
    proc.tick(clock.advance(1))
    assert kept_trace_ids(sink) == {t}


def test_without_a_root_the_decision_waits_decision_wait():
    proc, sink, clock, _ = make()
    t = tid()
    proc.consume(Envelope(Signal.TRACES, traces_request(span(t))))
    proc.tick(clock.advance(9.99))
    assert kept_spans(sink) == []
    proc.tick(clock.advance(0.01))
    assert kept_trace_ids(sink) == {t}


def test_kept_spans_name_the_policy_carry_the_threshold_and_keep_resource_and_scope():
    proc, sink, clock, _ = make(ERRORS_ONLY)
    t = tid()
    req = traces_request(span(t, root=True, error=True), span(t, trace_state="vendor=x"),
                         resource={"service.name": "ranker", "k8s.pod.name": "p-1"}, scope="torch")
    original = req.SerializeToString()
    proc.consume(Envelope(Signal.TRACES, req))
    proc.tick(clock.advance(1))
    (out,) = sink.of(Signal.TRACES)
    (rs,) = out.resource_spans
    assert [a.key for a in rs.resource.attributes] == ["service.name", "k8s.pod.name"]
    (ss,) = rs.scope_spans
    assert ss.scope.name == "torch"
    assert [attr(s, "sampling.policy") for s in ss.spans] == ["errors", "errors"]
    assert [s.trace_state for s in ss.spans] == ["ot=th:0", "ot=th:0,vendor=x"]
    assert req.SerializeToString() == original, "the received request must not be mutated"


def test_spans_of_one_trace_from_several_requests_are_emitted_together():
    proc, sink, clock, _ = make()
    a, b = tid(), tid()
    for _ in range(3):
        proc.consume(Envelope(Signal.TRACES, traces_request(span(a), span(b))))
    proc.tick(clock.advance(10))
    (out,) = sink.of(Signal.TRACES)
    # one resource entry per distinct resource and scope, not one per request or per span
    assert len(out.resource_spans) == 1 and len(out.resource_spans[0].scope_spans) == 1
    assert sorted(s.trace_id for s in kept_spans(sink)) == sorted([a] * 3 + [b] * 3)


def test_drop_policy_vetoes_keep():
    proc, sink, clock, tel = make([
        {"name": "all", "type": "always_sample"},
        {"name": "no-health", "type": "drop", "drop": {"drop_sub_policy": [
            {"name": "health", "type": "string_attribute",
             "string_attribute": {"key": "http.route", "values": ["/healthz"]}}]}},
    ])
    health, other = tid(), tid()
    proc.consume(Envelope(Signal.TRACES, traces_request(span(health, root=True, attrs={"http.route": "/healthz"}),
                                               span(other, root=True, attrs={"http.route": "/predict"}))))
    proc.tick(clock.advance(1))
    assert kept_trace_ids(sink) == {other}
    assert traces_metric(tel, "dropped", "no-health") == 1
    assert traces_metric(tel, "sampled", "all") == 1
    assert tel.value("dropped", Signal.TRACES, "policy_drop", "true") == 1


def test_logs_follow_their_trace_and_error_logs_are_always_kept():
    proc, sink, clock, tel = make(ERRORS_ONLY)
    kept, dropped = tid(), tid()
    proc.consume(Envelope(Signal.TRACES, traces_request(span(kept, root=True, error=True), span(dropped, root=True))))
    proc.consume(Envelope(Signal.LOGS, logs_request((kept, 9, "kept info"), (dropped, 9, "dropped info"),
                                           (dropped, 17, "dropped but ERROR"), (b"", 9, "no trace"))))
    # ERROR and trace-less records go out at the next tick; the others wait for their trace
    proc.tick()
    assert sorted(r.body.string_value for r in kept_logs(sink)) == ["dropped but ERROR", "no trace"]
    proc.tick(clock.advance(1))
    assert sorted(r.body.string_value for r in kept_logs(sink)) == ["dropped but ERROR", "kept info", "no trace"]
    assert tel.value("dropped", Signal.LOGS, "sampled_out", "true") == 1
    assert tel.value("accepted", Signal.LOGS) == 4


def test_logs_without_trace_are_forwarded_as_received():
    proc, sink, _, _ = make(ERRORS_ONLY)
    req = logs_request((b"", 9, "a"), (b"", 13, "b"))
    proc.consume(Envelope(Signal.LOGS, req))
    assert sink.of(Signal.LOGS) == [req]


def test_logs_without_trace_can_be_sampled():
    draws = iter([0.1, 0.9, 0.2, 0.7])
    proc, sink, _, tel = make(ERRORS_ONLY, rng=lambda: next(draws),
                              logs={"without_trace_sampling_percentage": 50})
    proc.consume(Envelope(Signal.LOGS, logs_request(*[(b"", 9, str(i)) for i in range(4)])))
    proc.tick()
    assert [r.body.string_value for r in kept_logs(sink)] == ["0", "2"]
    assert tel.value("dropped", Signal.LOGS, "sampled_out", "true") == 2


def test_error_log_exception_can_be_disabled():
    proc, sink, clock, _ = make(ERRORS_ONLY, logs={"always_keep_severity_at_least": 0})
    t = tid()
    proc.consume(Envelope(Signal.LOGS, logs_request((t, 21, "fatal"))))
    proc.tick(clock.advance(10))
    assert kept_logs(sink) == []


def test_late_spans_and_logs_follow_the_cached_decision():
    proc, sink, clock, tel = make(ERRORS_ONLY)
    kept, dropped = tid(), tid()
    proc.consume(Envelope(Signal.TRACES, traces_request(span(kept, root=True, error=True), span(dropped, root=True))))
    proc.tick(clock.advance(1))
    assert len(kept_spans(sink)) == 1
    clock.advance(30)
    proc.consume(Envelope(Signal.TRACES, traces_request(span(kept), span(dropped))))
    proc.consume(Envelope(Signal.LOGS, logs_request((kept, 9, "late kept"), (dropped, 9, "late dropped"))))
    # forwarded at the next tick, without waiting for a decision
    proc.tick()
    late = kept_spans(sink)[1:]
    assert [s.trace_id for s in late] == [kept]
    assert attr(late[0], "sampling.policy") == "errors" and late[0].trace_state == "ot=th:0"
    assert [r.body.string_value for r in kept_logs(sink)] == ["late kept"]
    assert proc.buffered_traces == 0
    reg = tel.registry
    for signal in ("traces", "logs"):
        for decision in ("sampled", "not_sampled"):
            assert reg.get_sample_value("sidecar_tail_sampling_late_items_total", {
                "component": "tail_sampling", "signal": signal, "decision": decision}) == 1


def early(tel) -> float:
    return tel.registry.get_sample_value("sidecar_tail_sampling_early_decisions_total",
                                         {"component": "tail_sampling"}) or 0.0


def test_flood_of_never_ending_traces_is_bounded_by_num_traces_and_decided_early_not_dropped():
    """The traces a full buffer pushes out are decided on what arrived: an error among them is kept."""
    proc, sink, clock, tel = make(ERRORS_ONLY, num_traces=100)
    failing = tid()
    proc.consume(Envelope(Signal.TRACES, traces_request(span(failing, error=True))))  # no root: would wait 10 s
    proc.consume(Envelope(Signal.LOGS, logs_request((failing, 9, "why it failed"))))
    for i in range(100):
        proc.consume(Envelope(Signal.TRACES, traces_request(*[span(tid()) for _ in range(50)])))
        proc.consume(Envelope(Signal.LOGS, logs_request((tid(), 9, "x"))))
        clock.advance(0.001)
        assert proc.buffered_traces <= 100
    proc.tick()
    assert kept_trace_ids(sink) == {failing}
    assert [r.body.string_value for r in kept_logs(sink)] == ["why it failed"]
    assert early(tel) == 5101 - 100
    assert traces_metric(tel, "sampled", "errors") == 1 and traces_metric(tel, "not_sampled", "none") == 5000
    sampled_out = (tel.value("dropped", Signal.TRACES, "sampled_out", "true")
                   + tel.value("dropped", Signal.LOGS, "sampled_out", "true"))
    assert sampled_out == 5100 - 100


def test_a_full_buffer_hands_on_what_it_decided_early_as_one_request_per_tick():
    """Every request of a flood pushes traces out of a full buffer, decided on arrival: the receiver leaves
    their output for the ticker, which hands it on merged (one downstream request, not one per request)."""
    proc, sink, clock, tel = make(num_traces=10)
    sent = []
    for _ in range(20):
        ids = [tid() for _ in range(10)]
        sent += ids
        proc.consume(Envelope(Signal.TRACES, traces_request(*[span(t) for t in ids])))
        proc.consume(Envelope(Signal.LOGS, logs_request(*[(t, 9, "x") for t in ids])))
    assert early(tel) == 190 and sink.envelopes == []  # nothing delivered from the receivers' threads
    proc.tick()
    assert [(e.signal, e.items) for e in sink.envelopes] == [(Signal.TRACES, 190), (Signal.LOGS, 190)]
    assert kept_trace_ids(sink) == set(sent[:190])
    proc.tick(clock.advance(10))
    assert kept_trace_ids(sink) == set(sent) and len(sink.envelopes) == 4


def test_flood_is_bounded_by_bytes():
    budget = 200_000
    proc, _, clock, tel = make(ERRORS_ONLY, max_buffered_bytes=budget)
    t = tid()
    for i in range(300):  # one never-ending trace plus fresh ones, ~100 KB per request
        proc.consume(Envelope(Signal.TRACES, traces_request(span(t), *[span(tid(), attrs={"blob": "x" * 1000})
                                                              for _ in range(100)])))
        clock.advance(0.001)
        assert proc.buffered_bytes <= budget
    assert proc.buffered_traces < 300
    assert early(tel) > 29_000
    assert tel.value("dropped", Signal.TRACES, "sampled_out", "true") > 29_000


def test_next_stage_refusal_is_retried_not_lost():
    proc, sink, clock, tel = make()
    t = tid()
    proc.consume(Envelope(Signal.TRACES, traces_request(span(t, root=True), span(t))))
    sink.refuse = Refused("queue_full")
    proc.tick(clock.advance(1))
    proc.tick(clock.advance(1))
    assert kept_spans(sink) == [] and proc.pending_output_items == 2
    sink.refuse = None
    proc.tick(clock.advance(0.1))
    assert len(kept_spans(sink)) == 2 and proc.pending_output_items == 0
    assert tel.value("dropped", Signal.TRACES, "downstream_refused", "false") == 0


def test_backed_up_output_refuses_new_data():
    proc, sink, clock, tel = make(output={"backpressure_items": 5})
    proc.consume(Envelope(Signal.TRACES, traces_request(*[span(tid(), root=True) for _ in range(10)])))
    sink.refuse = Refused("queue_full")
    proc.tick(clock.advance(1))
    try:
        proc.consume(Envelope(Signal.TRACES, traces_request(span(tid()))))
    except Refused as e:
        assert e.retryable
    else:
        raise AssertionError("expected a refusal while output is backed up")
    assert tel.value("refused", Signal.TRACES, "downstream_backpressure") == 1


def test_shutdown_decides_everything_pending():
    proc, sink, clock, _ = make()
    ids = {tid() for _ in range(5)}
    proc.consume(Envelope(Signal.TRACES, traces_request(*[span(t) for t in ids])))
    proc.consume(Envelope(Signal.LOGS, logs_request(*[(t, 9, "x") for t in ids])))
    proc.shutdown(deadline=time.monotonic() + 5)
    assert kept_trace_ids(sink) == ids
    assert len(kept_logs(sink)) == 5


def test_ticker_thread_decides_in_production():
    # the real clock: this one test exercises the ticker thread (bounded wait, no fixed sleep)
    proc, sink, _, _ = make(clock=time.monotonic, decision_wait_after_root_received="10ms")
    proc.start(None)
    try:
        proc.consume(Envelope(Signal.TRACES, traces_request(span(tid(), root=True))))
        assert sink.wait_for_items(Signal.TRACES, 1, timeout=5)
    finally:
        proc.shutdown(time.monotonic() + 5)


def test_span_without_trace_id_passes_through():
    proc, sink, _, _ = make(ERRORS_ONLY)
    proc.consume(Envelope(Signal.TRACES, traces_request(span(b""))))
    proc.tick()
    assert len(kept_spans(sink)) == 1


def test_two_instances_decide_identically():
    policies = [{"name": "errors", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}},
                {"name": "rest", "type": "probabilistic", "probabilistic": {"sampling_percentage": 25}}]
    a, sink_a, clock_a, _ = make(policies)
    b, sink_b, clock_b, _ = make(policies)
    batches = [[span(tid(), root=True, error=os.urandom(1)[0] < 20) for _ in range(200)] for _ in range(5)]
    for batch in batches:
        a.consume(Envelope(Signal.TRACES, traces_request(*batch)))
    for batch in reversed(batches):  # different arrival order and timing
        b.consume(Envelope(Signal.TRACES, traces_request(*batch)))
        b.tick(clock_b.advance(0.5))
    a.tick(clock_a.advance(1))
    b.tick(clock_b.advance(10))
    assert kept_trace_ids(sink_a) == kept_trace_ids(sink_b)
    assert 0 < len(kept_trace_ids(sink_a)) < 1000
    by_trace = lambda sink: {s.trace_id: (attr(s, "sampling.policy"), s.trace_state) for s in kept_spans(sink)}
    assert by_trace(sink_a) == by_trace(sink_b)


def test_output_backlog_is_bounded_and_overflow_counted():
    proc, sink, clock, tel = make(output={"backpressure_items": 10, "max_items": 10})
    sink.refuse = Refused("queue_full")
    for _ in range(5):  # 5 decided outputs of 4 spans each while the next stage refuses
        proc.consume(Envelope(Signal.TRACES, traces_request(*[span(tid(), root=True) for _ in range(4)])))
        proc.tick(clock.advance(1))
    assert proc.pending_output_items == 8
    assert tel.value("dropped", Signal.TRACES, "downstream_refused", "false") == 20 - proc.pending_output_items
    sink.refuse = None
    proc.tick(clock.advance(1))
    assert len(kept_spans(sink)) == 8 and proc.pending_output_items == 0  # the newest two outputs survive


def test_kept_spans_from_different_resources_and_scopes_stay_under_their_own():
    proc, sink, clock, _ = make()
    t = tid()
    proc.consume(Envelope(Signal.TRACES, traces_request(span(t, root=True), resource={"service.name": "a"}, scope="s1")))
    proc.consume(Envelope(Signal.TRACES, traces_request(span(t), resource={"service.name": "b"}, scope="s1")))
    proc.consume(Envelope(Signal.TRACES, traces_request(span(t), resource={"service.name": "a"}, scope="s2")))
    proc.tick(clock.advance(10))
    (out,) = sink.of(Signal.TRACES)
    layout = {(rs.resource.attributes[0].value.string_value, ss.scope.name): len(ss.spans)
              for rs in out.resource_spans for ss in rs.scope_spans}
    assert layout == {("a", "s1"): 1, ("b", "s1"): 1, ("a", "s2"): 1}
    assert len(out.resource_spans) == 2


def test_a_span_that_already_names_a_policy_or_threshold_gets_them_replaced():
    proc, sink, clock, _ = make([{"name": "rl", "type": "rate_limiting", "rate_limiting": {"spans_per_second": 100}}])
    t = tid()
    proc.consume(Envelope(Signal.TRACES, traces_request(
        span(t, root=True, attrs={"sampling.policy": "upstream", "x": 1}, trace_state="ot=th:8;rv:12345678901234"),
        span(t, trace_state="ot=th:8"))))
    proc.tick(clock.advance(10))
    first, second = kept_spans(sink)
    assert [(kv.key, getattr(kv.value, kv.value.WhichOneof("value"))) for kv in first.attributes] == [
        ("sampling.policy", "rl"), ("x", 1)]
    assert first.trace_state == "ot=rv:12345678901234"  # rate limits have no known probability: th removed
    assert second.trace_state == "" and attr(second, "sampling.policy") == "rl"


def test_buffered_bytes_cover_the_encoded_data_and_return_to_zero():
    proc, _, clock, _ = make(ERRORS_ONLY)
    req = traces_request(*[span(tid(), attrs={"blob": "x" * 500}) for _ in range(20)])
    wire = req.ByteSize()
    proc.consume(Envelope(Signal.TRACES, req))
    proc.consume(Envelope(Signal.LOGS, logs_request((req.resource_spans[0].scope_spans[0].spans[0].trace_id, 9, "y" * 300))))
    assert wire + 300 < proc.buffered_bytes < 3 * wire
    proc.tick(clock.advance(10))
    assert proc.buffered_bytes == 0 and proc.buffered_traces == 0


def test_a_request_is_acknowledged_without_waiting_behind_another_threads_delivery():
    """What a request leaves for now (an ERROR record) is handed on without the receiver's thread waiting
    behind a delivery another thread is making (here stuck in the next stage, as behind a persistent
    queue's fsync); that delivery takes the record along, in order, once it is through."""
    import threading

    proc, sink, clock, _ = make(ERRORS_ONLY)
    entered, release = threading.Event(), threading.Event()
    inner = sink.consume

    def stuck_once(envelope):
        if not entered.is_set():
            entered.set()
            release.wait(60)
        inner(envelope)

    sink.consume = stuck_once
    kept, other = tid(), tid()
    proc.consume(Envelope(Signal.TRACES, traces_request(span(kept, root=True, error=True))))
    ticker = threading.Thread(target=proc.tick, args=(clock.advance(1),), daemon=True)
    ticker.start()
    assert entered.wait(30)  # the decided trace is being delivered, and stays stuck
    acked = threading.Event()
    sender = threading.Thread(target=lambda: (proc.consume(Envelope(Signal.LOGS, logs_request((other, 17, "ERROR")))),
                                              acked.set()), daemon=True)
    sender.start()
    try:
        assert acked.wait(10), "the request waited for another thread's delivery"
        assert kept_logs(sink) == []
    finally:
        release.set()
    ticker.join(30)
    sender.join(30)
    assert [r.body.string_value for r in kept_logs(sink)] == ["ERROR"]
    assert kept_trace_ids(sink) == {kept}


def test_a_traces_spans_and_logs_keep_their_order_tracestate_and_resource_over_many_requests():
    """A trace gathered from runs under several keys (tracestate, resource) re-emits each span under its own."""
    proc, sink, clock, _ = make()
    t = tid()
    proc.consume(Envelope(Signal.LOGS, logs_request((t, 9, "l1"), resource={"service.name": "a"})))
    proc.consume(Envelope(Signal.TRACES, traces_request(span(t, name="s1"), span(t, name="s2", trace_state="v=a"))))
    proc.consume(Envelope(Signal.LOGS, logs_request((t, 9, "l2"), resource={"service.name": "b"})))
    proc.consume(Envelope(Signal.TRACES, traces_request(span(t, name="s3"), span(t, name="s4", trace_state="v=a"),
                                                        span(t, name="s5", trace_state="v=a"))))
    proc.consume(Envelope(Signal.LOGS, logs_request((t, 9, "l3"), (t, 9, "l4"), resource={"service.name": "a"})))
    proc.consume(Envelope(Signal.TRACES, traces_request(span(t, name="s6", root=True))))
    proc.tick(clock.advance(1))
    assert [(s.name, s.trace_state) for s in kept_spans(sink)] == [
        ("s1", "ot=th:0"), ("s2", "ot=th:0,v=a"), ("s3", "ot=th:0"), ("s4", "ot=th:0,v=a"), ("s5", "ot=th:0,v=a"),
        ("s6", "ot=th:0")]
    (logs,) = sink.of(Signal.LOGS)
    layout = [(rl.resource.attributes[0].value.string_value,
               [r.body.string_value for r in rl.scope_logs[0].log_records]) for rl in logs.resource_logs]
    assert layout == [("a", ["l1", "l3", "l4"]), ("b", ["l2"])]
    assert proc.buffered_traces == 0 and proc.buffered_bytes == 0


def test_runs_of_a_trace_interleaved_with_another_in_one_request_stay_in_order():
    proc, sink, clock, _ = make()
    a, b = tid(), tid()
    proc.consume(Envelope(Signal.TRACES, traces_request(
        span(a, name="a1"), span(b, name="b1"), span(a, name="a2"), span(a, name="a3", trace_state="v=1"),
        span(b, name="b2"), span(a, name="a4"), span(a, name="a5"))))
    proc.consume(Envelope(Signal.LOGS, logs_request((a, 9, "la1"), (b, 9, "lb1"), (a, 9, "la2"), (a, 9, "la3"))))
    proc.tick(clock.advance(10))
    names = [s.name for s in kept_spans(sink)]
    assert [n for n in names if n[0] == "a"] == ["a1", "a2", "a3", "a4", "a5"]
    assert [n for n in names if n[0] == "b"] == ["b1", "b2"]
    assert sorted(r.body.string_value for r in kept_logs(sink)) == ["la1", "la2", "la3", "lb1"]
    assert [r.body.string_value for r in kept_logs(sink) if r.trace_id == a] == ["la1", "la2", "la3"]
