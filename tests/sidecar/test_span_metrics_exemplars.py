"""span_metrics exemplars lead to stored traces: with tail_sampling behind it, only kept traces become exemplars.

A real span_metrics in front of a real tail_sampling, one Host between them (its decision
channel), a fake clock for both; exemplars read from the OpenMetrics exposition and the OTLP export.
"""

from __future__ import annotations

import re
import time

import pytest
import yaml
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from sidecar.component import Kind
from sidecar.config import ComponentId, ConfigError, parse_config
from sidecar.envelope import Envelope
from sidecar.host import Host
from sidecar.pipeline import Service, SignalRouter
from sidecar.processors.span_metrics import SpanMetricsConfig, SpanMetricsProcessor
from sidecar.registry import CreateSettings
from sidecar.signals import Signal
from sidecar.telemetry import SelfTelemetry
from sidecar.testing import Counted
from tests.sidecar.tail_sampling.helpers import FakeClock, kept_trace_ids, make, span, tid, traces_request
from tests.sidecar.tail_sampling.test_durable import crash, host_with_storage

KEEP = [{"name": "flagged", "type": "boolean_attribute", "boolean_attribute": {"key": "keep", "value": True}}]
BUCKETS = {"explicit": {"buckets": ["10ms", "100ms", "1s", "10s"]}}


class Chain:
    """span_metrics -> tail_sampling -> sink, started on one host (back to front, as the graph starts them)."""

    def __init__(self, policies=KEEP, *, host: Host | None = None, sampler: bool = True, exemplars=None,
                 clock: FakeClock | None = None, **ts_overrides):
        self.clock = clock or FakeClock()
        self.ts, self.sink, _, self.ts_tel = make(policies, clock=self.clock, **ts_overrides)
        cfg = SpanMetricsConfig.model_validate(
            yaml.safe_load(yaml.safe_dump({"histogram": BUCKETS, "exemplars": exemplars or {}})))
        root = SelfTelemetry()
        self.tel = root.component("processor", "span_metrics")
        settings = CreateSettings(id=ComponentId("span_metrics"), kind=Kind.PROCESSOR, telemetry=self.tel)
        router = SignalRouter("processor span_metrics")
        router.routes[Signal.TRACES] = self.ts if sampler else self.sink
        self.sm = Counted(SpanMetricsProcessor(settings, cfg, router, wall_clock=lambda: 1_700_000_000.0,
                                               clock=self.clock), self.tel)
        self.host = host or Host(root)
        if sampler:
            self.ts.start(self.host)
        self.sm.start(self.host)

    def send(self, *spans) -> None:
        self.sm.consume(Envelope(Signal.TRACES, traces_request(*spans)))

    def decide(self, seconds: float = 1.5) -> None:
        self.ts.tick(self.clock.advance(seconds))

    def exemplar_ids(self) -> set[str]:
        text = generate_openmetrics(self.tel.root.registry).decode()
        return set(re.findall(r'trace_id="([0-9a-f]{32})"', text))

    def otlp_exemplar_ids(self) -> set[str]:
        req = self.sm.build_metrics_request()
        return {e.trace_id.hex() for rm in req.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
                if m.HasField("histogram") for dp in m.histogram.data_points for e in dp.exemplars}

    def candidates(self, outcome: str) -> float:
        return self.tel.root.registry.get_sample_value(
            "sidecar_span_metrics_exemplar_candidates_total", {"component": "span_metrics", "outcome": outcome}) or 0

    def stop(self) -> None:
        deadline = time.monotonic() + 5
        self.sm.shutdown(deadline)
        self.ts.shutdown(deadline)


def test_only_kept_traces_become_exemplars_after_their_decision():
    c = Chain()
    slow_dropped, kept, err_dropped, err_kept = (tid() for _ in range(4))
    # one candidate per series and request: the slowest span, the latest error
    c.send(span(slow_dropped, root=True, duration_ms=900))
    c.send(span(kept, root=True, duration_ms=50, attrs={"keep": True}))
    c.send(span(err_kept, root=True, duration_ms=3, error=True, attrs={"keep": True}))
    c.send(span(err_dropped, root=True, duration_ms=5, error=True))
    assert c.exemplar_ids() == set() and c.sm.pending_exemplars == 4
    c.decide()
    assert kept_trace_ids(c.sink) == {kept, err_kept}
    assert c.exemplar_ids() == {kept.hex(), err_kept.hex()}
    assert c.otlp_exemplar_ids() == {kept.hex(), err_kept.hex()}
    assert (c.candidates("kept"), c.candidates("not_sampled"), c.sm.pending_exemplars) == (2, 2, 0)
    c.stop()


def test_a_late_span_of_a_decided_trace_resolves_at_once():
    c = Chain()
    kept, dropped = tid(), tid()
    c.send(span(kept, root=True, duration_ms=20, attrs={"keep": True}))
    c.send(span(dropped, root=True, duration_ms=30))
    c.decide()
    assert c.exemplar_ids() == {kept.hex()}
    late_kept, late_dropped = span(kept, duration_ms=2000), span(dropped, duration_ms=5000)
    c.send(late_dropped)  # the slowest yet: it would be the exemplar if published at once
    c.send(late_kept)
    assert c.sm.pending_exemplars == 0
    text = generate_openmetrics(c.tel.root.registry).decode()
    assert f'span_id="{late_kept.span_id.hex()}"' in text and dropped.hex() not in text
    c.stop()


def test_a_decision_that_overtakes_its_request_is_remembered():
    """The sampler can decide between span_metrics reading a request and merging it (here: in that order)."""
    c = Chain()
    kept = tid()
    c.host.sampling_decisions.publish([(kept, True, "flagged")])
    c.send(span(kept, root=True, duration_ms=20, attrs={"keep": True}))
    assert c.exemplar_ids() == {kept.hex()} and c.sm.pending_exemplars == 0
    c.stop()


def test_recent_decisions_are_remembered_between_max_pending_and_twice_that():
    from sidecar.processors.exemplar_gate import PendingExemplars

    gate = PendingExemplars(max_age=5.0, max_pending=100)
    ids = [i.to_bytes(16, "big") for i in range(350)]
    for start in range(0, 350, 25):
        gate.decide([(t, t[-1] % 2 == 0, "p") for t in ids[start:start + 25]])
    remembered = [t for t in ids if t in gate._decided or t in gate._decided_before]
    assert 100 <= len(remembered) <= 200 and remembered == ids[-len(remembered):], "the newest, up to a bound"
    series = [0, 0, 0, None, None]
    gate.hold(series, 3, (7, ids[-2], b"s" * 8, 9), now=1.0)  # a late span of the newest kept trace
    gate.hold(series, 3, (8, ids[-1], b"t" * 8, 9), now=1.0)  # and of the newest dropped one
    gate.hold(series, 3, (9, ids[0], b"u" * 8, 9), now=1.0)  # forgotten: it waits for a decision
    assert series[3] == (7, ids[-2], b"s" * 8, 9) and gate.n == 1


def test_without_a_tail_sampler_exemplars_publish_at_once():
    c = Chain(sampler=False)
    t = tid()
    c.send(span(t, root=True, duration_ms=20))
    assert c.exemplar_ids() == {t.hex()} and c.candidates("kept") == 0
    c.stop()


def test_only_sampled_false_publishes_at_once_as_before():
    c = Chain(exemplars={"only_sampled": False})
    t = tid()
    c.send(span(t, root=True, duration_ms=20))
    assert c.exemplar_ids() == {t.hex()}  # a trace the sampler will drop: the old behaviour, on request
    c.stop()


def test_undecided_candidates_expire_after_the_decision_wait_and_are_counted():
    host = Host(SelfTelemetry())
    host.sampling_decisions.register("tail_sampling/elsewhere", 2.0)  # a sampler these spans never reach
    c = Chain(sampler=False, host=host)
    c.send(span(tid(), root=True, duration_ms=20), span(tid(), root=True, duration_ms=1, error=True))
    assert c.sm.pending_exemplars == 2
    c.clock.advance(2.9)  # decision wait 2 s, plus a grace of max(1 s, half of it)
    c.send(span(tid(), root=True, duration_ms=5))
    assert c.sm.pending_exemplars == 3 and c.candidates("expired") == 0
    c.clock.advance(0.2)
    c.send(span(tid(), root=True, duration_ms=5))
    assert c.sm.pending_exemplars == 2 and c.candidates("expired") == 2
    assert c.exemplar_ids() == set()
    c.stop()


def test_candidates_beyond_max_pending_are_dropped_and_counted():
    c = Chain(exemplars={"max_pending": 2})
    ids = [tid() for _ in range(5)]
    c.send(*[span(t, root=True, name=f"op{i}", attrs={"keep": True}) for i, t in enumerate(ids)])
    assert c.sm.pending_exemplars == 2 and c.candidates("overflow") == 3
    c.decide()
    assert c.exemplar_ids() == {ids[0].hex(), ids[1].hex()}  # the first two series; all five traces kept
    assert kept_trace_ids(c.sink) == set(ids)
    c.stop()


def test_traces_a_full_buffer_decides_early_publish_their_decisions_for_exemplars_too():
    c = Chain(num_traces=1)
    first, second, third = tid(), tid(), tid()
    c.send(span(first, root=True, duration_ms=900, attrs={"keep": True}))
    c.send(span(second, root=True, duration_ms=10, name="other"))  # decides the first early: kept
    assert c.sm.pending_exemplars == 1 and c.candidates("kept") == 1
    c.send(span(third, root=True, duration_ms=10, attrs={"keep": True}, name="third"))  # the second: not sampled
    assert c.sm.pending_exemplars == 1 and c.candidates("not_sampled") == 1
    c.decide()
    assert c.exemplar_ids() == {first.hex(), third.hex()}
    c.stop()


def test_with_the_durable_buffer_kept_traces_publish_and_recovery_redecides(tmp_path):
    c = Chain(host=host_with_storage(tmp_path), storage="file_storage")
    kept, dropped, pending = tid(), tid(), tid()
    c.send(span(kept, root=True, duration_ms=20, attrs={"keep": True}))
    c.send(span(dropped, root=True, duration_ms=90))
    c.decide()
    assert c.exemplar_ids() == {kept.hex()}
    c.send(span(pending, root=True, duration_ms=40, attrs={"keep": True}))
    crash(c.ts)

    c2 = Chain(host=host_with_storage(tmp_path), storage="file_storage")
    c2.send(span(tid(), root=True, duration_ms=30))  # new traffic after the restart, dropped
    c2.decide()
    assert pending in kept_trace_ids(c2.sink)  # replayed and decided after the restart
    assert c2.exemplar_ids() == set() and c2.sm.pending_exemplars == 0
    c2.stop()


def test_exemplar_config_errors_name_the_path():
    text = """
receivers: {otlp: {protocols: {grpc: {endpoint: 127.0.0.1:4317}}}}
processors:
  span_metrics: {exemplars: {max_pending: 0, only_sampeld: false}}
exporters: {debug: {}}
service:
  pipelines:
    traces: {receivers: [otlp], processors: [span_metrics], exporters: [debug]}
"""
    with pytest.raises(ConfigError) as e:
        parse_config(text, environ={})
    problems = "\n".join(e.value.problems)
    assert "processors.span_metrics.exemplars.max_pending: must be >= 1" in problems
    assert "processors.span_metrics.exemplars.only_sampeld" in problems


def test_the_graph_gates_exemplars_only_with_a_sampler_behind_span_metrics():
    """Service wiring: samplers start first and register; a span_metrics without one publishes at once."""
    base = """
receivers: {otlp: {protocols: {grpc: {endpoint: 127.0.0.1:0}}}}
processors:
  span_metrics: {}
  tail_sampling: {policies: [{name: all, type: always_sample}]}
exporters: {debug: {verbosity: basic}}
service:
  telemetry: {metrics: {address: null}}
  pipelines:
    traces: {receivers: [otlp], processors: [PROCESSORS], exporters: [debug]}
"""
    for processors, gated in (("span_metrics, tail_sampling", True), ("span_metrics", False)):
        service = Service(parse_config(base.replace("PROCESSORS", processors), environ={}))
        service.start()
        try:
            assert (service.graph.processors["span_metrics"]._pending is not None) is gated
        finally:
            service.shutdown(5)


def test_an_aged_slowest_exemplar_keeps_its_value_until_a_kept_span_replaces_it():
    """Each flush interval the slowest is reset so newer spans can take the slot; until one of a kept trace
    does, the old exemplar is shown with its own duration (it used to drop to 0 s in the first bucket)."""
    c = Chain()
    first, second = tid(), tid()
    c.send(span(first, root=True, duration_ms=500, attrs={"keep": True}))
    c.decide()
    c.sm._age_slowest()  # what the flush ticker does every metrics_flush_interval
    text = generate_openmetrics(c.tel.root.registry).decode()
    assert re.search(r'le="1\.0",[^}]*\} 1\.0 # \{span_id="[0-9a-f]+",trace_id="%s"\} 0\.5 ' % first.hex(), text), text
    assert [e.as_double for e in c.sm.build_metrics_request().resource_metrics[0].scope_metrics[0].metrics[1]
            .histogram.data_points[0].exemplars] == [0.5]
    c.send(span(second, root=True, duration_ms=20, attrs={"keep": True}))
    assert c.exemplar_ids() == {first.hex()}  # not decided yet
    c.decide()
    assert c.exemplar_ids() == {second.hex()}  # faster, but the newest kept after the reset
    c.stop()
