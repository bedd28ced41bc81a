"""Consistent probability sampling: W3C randomness, OTel thresholds in tracestate, and the 10% rate."""

from __future__ import annotations

import os
from fractions import Fraction

import pytest

from sidecar.envelope import Envelope
from sidecar.processors.tail_sampling.decisions import (MAX_THRESHOLD, UNKNOWN, parse_threshold, randomness,
                                                        threshold_for, threshold_hex, with_threshold)
from sidecar.signals import Signal

from .helpers import kept_spans, kept_trace_ids, make, span, tid, traces_request

TEN_PERCENT = [{"name": "rest", "type": "probabilistic", "probabilistic": {"sampling_percentage": 10}}]


def test_threshold_values():
    assert threshold_for(10) == round(Fraction(9, 10) * 2**56)  # exact, no float rounding
    assert threshold_hex(threshold_for(10)) == "e6666666666666"
    assert threshold_hex(threshold_for(50)) == "8"
    assert threshold_hex(threshold_for(25)) == "c"
    assert threshold_hex(threshold_for(100)) == "0"
    assert parse_threshold("ot=th:c") == threshold_for(25)


def test_randomness_is_the_rightmost_56_bits_or_rv():
    trace_id = bytes.fromhex("0123456789abcdef" "00" "11223344556677")
    assert randomness(trace_id) == 0x11223344556677
    assert randomness(trace_id, "ot=rv:fedcba98765432;th:0,other=1") == 0xfedcba98765432


def test_tracestate_rewrite_preserves_rv_and_other_entries():
    th10 = threshold_for(10)
    assert with_threshold("", th10) == "ot=th:e6666666666666"
    assert with_threshold("", 0) == "ot=th:0"
    assert with_threshold("vendor=x,ot=rv:abcdef01234567;zz:1", th10) == \
        "ot=th:e6666666666666;rv:abcdef01234567;zz:1,vendor=x"
    # a head sampler's larger threshold wins: the trace passed both
    assert with_threshold("ot=th:f", th10) == "ot=th:f"
    assert with_threshold("ot=th:8;rv:abcdef01234567", UNKNOWN) == "ot=rv:abcdef01234567"


def test_ten_percent_of_20000_traces_within_one_and_a_half_points():
    proc, sink, clock, _ = make(TEN_PERCENT)
    for _ in range(20):
        proc.consume(Envelope(Signal.TRACES, traces_request(*[span(tid(), root=True) for _ in range(1000)])))
    proc.tick(clock.advance(1))
    share = 100 * len(kept_trace_ids(sink)) / 20_000
    assert 8.5 <= share <= 11.5, share


def test_kept_spans_carry_the_ten_percent_threshold_and_keep_rv():
    proc, sink, clock, _ = make(TEN_PERCENT)
    keep_rv = "ot=rv:ffffffffffffff;x:1,vendor=a"  # rv above every threshold: always kept
    drop_rv = "ot=rv:00000000000001"
    t_keep, t_drop = tid(), bytes(9) + b"\xff" * 7  # the trace id alone would be kept
    proc.consume(Envelope(Signal.TRACES, traces_request(span(t_keep, root=True, trace_state=keep_rv),
                                               span(t_drop, root=True, trace_state=drop_rv))))
    proc.tick(clock.advance(1))
    (s,) = kept_spans(sink)
    assert s.trace_id == t_keep
    assert s.trace_state == "ot=th:e6666666666666;rv:ffffffffffffff;x:1,vendor=a"


def test_decision_agrees_with_the_threshold_rule():
    proc, sink, clock, _ = make(TEN_PERCENT)
    ids = [os.urandom(16) for _ in range(2000)]
    proc.consume(Envelope(Signal.TRACES, traces_request(*[span(t, root=True) for t in ids])))
    proc.tick(clock.advance(1))
    expected = {t for t in ids if int.from_bytes(t[9:], "big") >= threshold_for(10)}
    assert kept_trace_ids(sink) == expected


@pytest.mark.parametrize("pct", [0, 100])
def test_extremes(pct):
    proc, sink, clock, _ = make([{"name": "p", "type": "probabilistic", "probabilistic": {"sampling_percentage": pct}}])
    proc.consume(Envelope(Signal.TRACES, traces_request(*[span(tid(), root=True) for _ in range(500)])))
    proc.tick(clock.advance(1))
    assert len(kept_trace_ids(sink)) == (500 if pct else 0)
    assert MAX_THRESHOLD == 1 << 56


def test_decision_cache_put_many_is_put_of_each_in_order():
    from sidecar.processors.tail_sampling.decisions import LRU

    for size in (0, 1, 3, 5):
        one, many = LRU(size), LRU(size)
        for k in "abc":
            one.put(k, 0)
            many.put(k, 0)
        one.get("a")
        many.get("a")
        batch = [("d", 1), ("b", 2), ("e", 3), ("d", 4), ("f", 5)]
        for k, v in batch:
            one.put(k, v)
        many.put_many(batch)
        assert list(many.entries.items()) == list(one.entries.items()), size
        assert len(many) == min(size, 6)


def test_a_second_sampler_reads_the_threshold_the_first_one_recorded():
    """Kept output goes on as spliced bytes (its spans carry appended fields); a sampler behind reads
    the appended tracestate, as any protobuf reader does (the last one wins), and composes with it."""
    first, sink1, clock1, _ = make([{"name": "half", "type": "probabilistic",
                                     "probabilistic": {"sampling_percentage": 50}}])
    second, sink2, clock2, _ = make()  # always_sample: th:0 composed with the first's th:8 is th:8
    t = b"\x00" * 8 + b"\xff" * 8  # R = 2**56 - 1: kept at 50%
    first.consume(Envelope(Signal.TRACES, traces_request(span(t, root=True), span(t, trace_state="vendor=x"))))
    first.tick(clock1.advance(1))
    for env in sink1.envelopes:
        second.consume(Envelope(env.signal, encoded=env.encoded, items=env.items))
    second.tick(clock2.advance(1))
    assert [s.trace_state for s in kept_spans(sink2)] == ["ot=th:8", "ot=th:8,vendor=x"]
