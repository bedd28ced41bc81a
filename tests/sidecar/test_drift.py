"""drift processor: the real OTel SDK's drift histograms in, windows, scores and /metrics families out."""

from __future__ import annotations

import json
import math
import random

import pytest
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
from prometheus_client.exposition import generate_latest
from pydantic import ValidationError

from instrumentation.drift import BOUNDS, DriftObserver
from sidecar.component import Kind, Refused
from sidecar.config import ComponentId
from sidecar.envelope import Envelope
from sidecar.processors.drift import DriftConfig, DriftProcessor
from sidecar.processors.drift import scores as S
from sidecar.processors.drift.state import DeltaTracker, ReferenceError, dump_reference, load_reference
from sidecar.registry import CreateSettings
from sidecar.signals import Signal, new_request
from sidecar.telemetry import SelfTelemetry


class Sink:
    """The next stage: keeps what it is given; refuses the next ``refuse`` requests."""

    def __init__(self):
        self.got: list[Envelope] = []
        self.refuse = 0

    def consume(self, envelope: Envelope) -> None:
        if self.refuse:
            self.refuse -= 1
            raise Refused("queue_full")
        self.got.append(envelope)


def accepted(tracker: DeltaTracker, request, now: float = 0.0):
    """Deltas of a request the pipeline accepted (its baselines committed)."""
    deltas, drops, baselines = tracker.deltas(request)
    tracker.commit(baselines, now)
    return deltas, drops


class App:
    """An app's drift summaries; ``export()`` is what its OTLP exporter sends (``delta``: as a delta exporter would)."""

    def __init__(self, delta: bool = False):
        self.delta = delta
        self.observer = DriftObserver()
        self._last: dict[tuple, object] = {}

    def observe(self, model: str, version: str, values: dict, categories: dict | None = None) -> None:
        self.observer.observe_values(model, version, values, categories)

    def export(self):
        req = encode_metrics(self.observer.metrics_data())
        if self.delta:  # what changed since the last export, marked DELTA
            for m in req.resource_metrics[0].scope_metrics[0].metrics:
                data = getattr(m, m.WhichOneof("data"))
                data.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
                for dp in data.data_points:
                    key = (m.name, tuple(
                        (kv.key, kv.value.string_value) for kv in dp.attributes))
                    now = list(dp.bucket_counts) if m.name == "ml.drift.value" else dp.as_int
                    last = self._last.get(key)
                    self._last[key] = now
                    if last is not None:
                        if m.name == "ml.drift.value":
                            del dp.bucket_counts[:]
                            dp.bucket_counts.extend(a - b for a, b in zip(now, last))
                        else:
                            dp.as_int = now - last
        return req


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(clock: Clock, **cfg) -> tuple[DriftProcessor, Sink, SelfTelemetry]:
    root = SelfTelemetry()
    settings = CreateSettings(id=ComponentId("drift"), kind=Kind.PROCESSOR, telemetry=root.component("processor", "drift"))
    sink = Sink()
    return DriftProcessor(settings, DriftConfig.model_validate(cfg), sink, clock=clock), sink, root


def feed(p: DriftProcessor, app: App) -> None:
    p.consume(Envelope(Signal.METRICS, app.export()))


# --- scores ------------------------------------------------------------------------------------


def test_scores_on_hand_computed_cases():
    assert S.psi([10, 20, 30], [10, 20, 30]) == 0
    assert S.js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)
    p, q = [0.5, 0.5], [0.9, 0.1]
    expected = (0.9 - 0.5) * math.log(0.9 / 0.5) + (0.1 - 0.5) * math.log(0.1 / 0.5)
    assert S.psi([50, 50], [90, 10]) == pytest.approx(expected)
    # all mass moves one bin (width 1) to the right: W1 = 1, spread of a point mass = half its bin
    assert S.wasserstein([1, 0, 0], [0, 1, 0], [0.5, 1.5, 2.5], [1, 1, 1]) == pytest.approx(1 / 0.5)
    # 2x2 table [[30, 10], [10, 30]]: chi2 = 20
    assert S.chi_squared({"a": 30, "b": 10}, {"a": 10, "b": 30}) == pytest.approx(20.0)


def test_signed_bins_mirror_the_negative_series():
    edges = S.signed_edges((0.0, 1.0, 2.0))
    assert edges == [(-math.inf, -2.0), (-2.0, -1.0), (-1.0, -0.0), (0.0, 0.0), (0.0, 1.0), (1.0, 2.0),
                     (2.0, math.inf)]
    # positive buckets {0}, (0,1], (1,2], (2,inf); negative magnitudes likewise (bucket {0} always empty)
    assert S.signed_counts([1, 2, 3, 4], [0, 5, 6, 7]) == [7, 6, 5, 1, 2, 3, 4]


def test_quantile_groups_cut_the_reference_into_equal_mass():
    groups = S.quantile_groups([0, 10, 10, 10, 10, 0], 4)
    assert groups == [0, 0, 1, 2, 3, 3]


# --- deltas from the SDK's cumulative and delta exports -------------------------------------------


@pytest.mark.parametrize("delta", [False, True])
def test_tracker_turns_exports_into_deltas_with_signs(delta):
    app = App(delta=delta)
    tracker = DeltaTracker()
    app.observe("m", "1", {"x": 0.5}, {"shape": "*x4"})
    app.observe("m", "1", {"x": -0.5}, {"shape": "*x4"})
    first, drops = accepted(tracker, app.export())
    assert not drops
    app.observe("m", "1", {"x": -3.0}, {"shape": "*x8"})
    second, _ = accepted(tracker, app.export())
    edges = S.signed_edges(BOUNDS)

    def values(w):
        return sorted(edges[i][0] for i, c in enumerate(w.counts) for _ in range(c))

    x1, x2 = first[("m", "1", "x")], second[("m", "1", "x")]
    assert x1.total == 2 and x2.total == 1  # the second export counts only what is new
    lows = values(x1)
    assert lows[0] < -0.4 and -0.5 >= lows[0] and lows[1] < 0.5 < lows[1] * 1.3
    assert values(x2)[0] <= -3.0 <= values(x2)[0] * 0.7
    assert first[("m", "1", "shape")].categories == {"*x4": 2}
    assert second[("m", "1", "shape")].categories == {"*x8": 1}


def test_two_processes_with_the_same_resource_do_not_mix():
    tracker = DeltaTracker()
    a, b = App(), App()
    a.observe("m", "1", {"x": 1.0})
    b.observe("m", "1", {"x": 1.0})
    b.observe("m", "1", {"x": 1.0})
    accepted(tracker, a.export())
    got, _ = accepted(tracker, b.export())
    assert got[("m", "1", "x")].total == 2


# --- the processor -------------------------------------------------------------------------------


def test_pinned_window_then_current_window_scores_drift_per_feature():
    clock = Clock()
    p, sink, root = make(clock, reference={"window": "10m"}, window="5m", min_samples=100)
    app = App()
    rng = random.Random(1)
    for _ in range(400):  # the version's first 10 minutes: the reference
        app.observe("fraud", "3", {"amount": rng.gauss(50, 10), "age": rng.gauss(0, 1)}, {"country": rng.choice("ab")})
    feed(p, app)
    clock.t += 601
    for _ in range(400):  # later: `amount` shifts by two standard deviations, `age` and country do not
        app.observe("fraud", "3", {"amount": rng.gauss(70, 10), "age": rng.gauss(0, 1)}, {"country": rng.choice("ab")})
    feed(p, app)
    s = p.scores()
    amount, age, country = s[("fraud", "3", "amount")], s[("fraud", "3", "age")], s[("fraud", "3", "country")]
    assert amount["samples_reference"] == 400 and amount["samples_current"] == 400
    assert amount["psi"] > 1.0 and amount["js"] > 0.2 and amount["wasserstein"] > 1.5
    assert age["psi"] < 0.2 and age["js"] < 0.05 and age["wasserstein"] < 0.3
    assert country["js"] < 0.05 and country["chi2"] < 10 and "psi" not in country
    assert len(sink.got) == 2 and all(e.signal is Signal.METRICS for e in sink.got)  # passed through untouched

    text = generate_latest(root.registry).decode()
    assert 'sidecar_drift_psi{feature="amount",model_id="fraud",model_version="3"}' in text
    assert 'sidecar_drift_chi2{feature="country",model_id="fraud",model_version="3"}' in text
    assert 'sidecar_drift_samples{feature="age",model_id="fraud",model_version="3",window="current"} 400.0' in text

    clock.t += 301  # the current window slides past everything: no scores until new data arrives
    assert "psi" not in p.scores()[("fraud", "3", "amount")]


def test_no_scores_below_min_samples():
    clock = Clock()
    p, _, _ = make(clock, reference={"window": "1m"}, min_samples=50)
    app = App()
    for i in range(60):
        app.observe("m", "1", {"x": float(i)})
    feed(p, app)
    clock.t += 61
    for i in range(49):
        app.observe("m", "1", {"x": float(i)})
    feed(p, app)
    assert p.scores()[("m", "1", "x")] == {"samples_reference": 60.0, "samples_current": 49.0}


def test_otlp_gauges_carry_the_scores(tmp_path):
    clock = Clock()
    p, sink, _ = make(clock, reference={"window": "1m"}, min_samples=10)
    app = App()
    for i in range(20):
        app.observe("m", "1", {"x": float(i)})
    feed(p, app)
    clock.t += 61
    for i in range(20):
        app.observe("m", "1", {"x": float(i) + 100})
    feed(p, app)
    p.flush_metrics()
    req = sink.got[-1].message
    metrics = {m.name: m for m in req.resource_metrics[0].scope_metrics[0].metrics}
    assert set(metrics) == {"sidecar.drift.psi", "sidecar.drift.js", "sidecar.drift.wasserstein"}
    dp = metrics["sidecar.drift.js"].gauge.data_points[0]
    assert {kv.key: kv.value.string_value for kv in dp.attributes} == {
        "ml.model.id": "m", "ml.model.version": "1", "ml.drift.feature": "x"}
    assert dp.as_double == pytest.approx(1.0)  # disjoint supports


def test_reference_file_for_all_versions(tmp_path):
    clock = Clock()
    app = App()
    tracker = DeltaTracker()
    rng = random.Random(2)
    for _ in range(300):
        app.observe("m", "1", {"x": rng.gauss(0, 1)})
    windows, _ = accepted(tracker, app.export())
    ref = {("m", "*", k[2]): w for k, w in windows.items()}
    path = tmp_path / "ref.json"
    path.write_text(json.dumps(dump_reference(ref, created="now", source="test")))
    p, _, _ = make(clock, reference={"file": str(path)}, min_samples=100)
    canary = App()
    for _ in range(300):
        canary.observe("m", "2", {"x": rng.gauss(0, 1) + 3})
    feed(p, canary)  # version 2 was never seen before: the file's '*' entry is its reference at once
    assert p.scores()[("m", "2", "x")]["psi"] > 2.0


def test_refuses_other_signals_and_counts_malformed_points():
    clock = Clock()
    p, sink, root = make(clock)
    with pytest.raises(Refused):
        p.consume(Envelope(Signal.TRACES, new_request(Signal.TRACES)))
    req = new_request(Signal.METRICS)
    m = req.resource_metrics.add().scope_metrics.add().metrics.add()
    m.name = "ml.drift.value"
    dp = m.histogram.data_points.add()
    dp.bucket_counts.extend([1, 2])  # no feature attribute
    p.consume(Envelope(Signal.METRICS, req))
    assert len(sink.got) == 1
    assert 'sidecar_drift_dropped_points_total{component="drift",reason="missing_attributes"} 1.0' in \
        generate_latest(root.registry).decode()


def test_config_rejects_unknown_keys_and_missing_reference(tmp_path):
    with pytest.raises(ValidationError, match="windw"):
        DriftConfig.model_validate({"windw": "5m"})
    with pytest.raises(ValidationError, match="does not exist"):
        DriftConfig.model_validate({"reference": {"file": str(tmp_path / "nope.json")}})
    with pytest.raises(ValidationError):
        DriftConfig.model_validate({"window": "0s"})


def test_bad_reference_file_names_the_problem(tmp_path):
    path = tmp_path / "ref.json"
    path.write_text(json.dumps({"format": "otel-sidecar-drift-reference/1", "features": [
        {"model_id": "m", "model_version": "1", "feature": "x", "kind": "numeric", "bounds": [0, 1], "counts": [1]}]}))
    with pytest.raises(ReferenceError, match=r"features\[0\]\.counts: expected 5"):
        load_reference(str(path))
    path.write_text("{}")
    with pytest.raises(ReferenceError, match="format"):
        load_reference(str(path))


def test_a_refused_request_sent_again_counts_once():
    clock = Clock()
    p, sink, _ = make(clock, reference={"window": "1m"})
    app = App()
    for i in range(10):
        app.observe("m", "1", {"x": float(i)})
    req = app.export()
    sink.refuse = 1
    with pytest.raises(Refused):
        p.consume(Envelope(Signal.METRICS, req))
    p.consume(Envelope(Signal.METRICS, req))  # the app's exporter retries the same cumulative points
    clock.t += 61  # the reference period is over
    assert p.scores()[("m", "1", "x")]["samples_reference"] == 10


def test_series_of_ended_processes_are_forgotten():
    tracker = DeltaTracker()
    a, b = App(), App()
    a.observe("m", "1", {"x": 1.0})
    b.observe("m", "1", {"x": 1.0})
    accepted(tracker, a.export(), now=100.0)
    accepted(tracker, b.export(), now=200.0)
    assert tracker.evict(before=150.0) == 1  # a's one series
    b.observe("m", "1", {"x": 1.0})
    got, _ = accepted(tracker, b.export(), now=300.0)
    assert got[("m", "1", "x")].total == 1  # b's baseline survived
