"""Drift and cost summaries in the app: exact statistics per forward, sampling, on/off, classifiers, generations."""

from __future__ import annotations

import pytest
import torch

import instrumentation.torch as itorch
from instrumentation import RequestContext, request_context, trace_generation
from instrumentation.drift import BOUNDS, DriftObserver, enable_drift, size_bucket


def data_points(source, name: str) -> list:
    """Data points of one metric, as the observer exports them (aggregated outside the SDK's instruments)."""
    return [p for rm in source.metrics_data().resource_metrics for sm in rm.scope_metrics for m in sm.metrics
            if m.name == name for p in m.data.data_points]


def points(source, name: str) -> dict:
    """feature (plus sign / category) -> data point, for one metric."""
    out = {}
    for p in data_points(source, name):
        a = dict(p.attributes)
        key = a.get("ml.drift.feature") or a.get("ml.cost.size_bucket")
        if "ml.drift.sign" in a:
            key += "-"
        if "ml.drift.category" in a:
            key = (key, a["ml.drift.category"])
        if "gen_ai.token.type" in a:
            key = (key, a["gen_ai.token.type"])
        out[key] = p
    return out


@pytest.fixture
def drift(meter, spans):
    provider, reader = meter
    handles = []

    def enable(**options):
        options.setdefault("budget", None)  # exact counts: no time budget unless a test sets one
        h = enable_drift(provider, **options)
        handles.append(h)
        return h

    yield enable, reader, spans.provider
    for h in handles:
        h.disable()


def model(version: str, tracer_provider, meter_provider, n_in: int = 4, n_out: int = 3):
    torch.manual_seed(0)
    m = torch.nn.Linear(n_in, n_out)
    return itorch.instrument_model(m, "clf", version, tracer_provider=tracer_provider, meter_provider=meter_provider)


def test_every_statistic_of_one_forward_is_recorded_exactly(drift, meter):
    enable, reader, tp = drift
    h = enable()
    m = model("1", tp, meter[0])
    x = torch.randn(32, 4)
    x[0, 1] = 0.0
    x[1, 2] = float("nan")
    with torch.no_grad():
        out = m(x)
    v = points(h.observer, "ml.drift.value")
    finite = x[~x.isnan()]
    assert v["batch_size"].sum == 32
    assert v["input.0.nan_share"].sum == pytest.approx(1 / 128)
    assert v["input.0.zero_share"].sum == pytest.approx(1 / 128)
    mean = finite.double().mean().item()
    assert (v["input.0.mean"] if mean >= 0 else v["input.0.mean-"]).sum == pytest.approx(abs(mean), rel=1e-5)
    assert v["input.0.std"].sum == pytest.approx(finite.double().std(correction=0).item(), rel=1e-5)
    assert v["input.0.max"].sum == pytest.approx(finite.max().item(), rel=1e-6)
    col0 = x[:, 0].double().mean().item()
    assert (v["input.0[0].mean"] if col0 >= 0 else v["input.0[0].mean-"]).sum == pytest.approx(abs(col0), rel=1e-5)
    assert v["input.0[1].std"].sum == pytest.approx(x[:, 1].double().std(correction=0).item(), rel=1e-5)
    assert "input.0[1].zero_share" not in v  # per column: mean and std only
    top = out.softmax(1).max(1).values.mean().item()  # NaN row: its top score is NaN, so the mean is skipped
    assert "output.top_score" in v or top != top
    assert all(tuple(p.explicit_bounds) == BOUNDS for p in v.values())
    c = points(h.observer, "ml.drift.category")
    assert c[("input.0.shape", "*x4")].value == 32
    assert c[("input.0.dtype", "float32")].value == 32
    assert sum(p.value for k, p in c.items() if k[0] == "output.label") == 32
    assert itorch.observer_errors == 0


def test_classifier_labels_and_top_score(drift, meter):
    enable, reader, tp = drift
    h = enable()
    m = model("1", tp, meter[0])
    with torch.no_grad():
        m.weight.zero_()
        m.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))  # every row predicts class 1
        m(torch.randn(10, 4))
    c = points(h.observer, "ml.drift.category")
    assert c[("output.label", "1")].value == 10 and ("output.label", "0") not in c
    top = torch.tensor([0.0, 5.0, 0.0]).softmax(0).max().item()
    assert points(h.observer, "ml.drift.value")["output.top_score"].sum == pytest.approx(top, rel=1e-6)


def test_sample_every_n_and_cost_on_every_forward(drift, meter):
    enable, reader, tp = drift
    h = enable(sample_every=3)
    m = model("2", tp, meter[0])
    with torch.no_grad(), request_context(RequestContext(tags={"intent": "fraud-check"})):
        for _ in range(9):
            m(torch.randn(8, 4))
    v = points(h.observer, "ml.drift.value")
    assert v["batch_size"].count == 3
    cost = data_points(h.observer, "ml.cost.items")
    assert len(cost) == 1 and cost[0].value == 72
    assert dict(cost[0].attributes) == {"ml.model.id": "clf", "ml.model.version": "2",
                                         "ml.cost.size_bucket": "<=16", "ml.intent": "fraud-check"}
    dur = data_points(h.observer, "ml.cost.duration")
    assert dur[0].count == 9 and dur[0].sum > 0


def test_disable_stops_recording(drift, meter):
    enable, reader, tp = drift
    h = enable()
    m = model("1", tp, meter[0])
    with torch.no_grad():
        m(torch.randn(4, 4))
        h.disable()
        m(torch.randn(4, 4))
    assert points(h.observer, "ml.drift.value")["batch_size"].count == 1


def test_large_and_low_precision_inputs_reduce_on_a_sample_of_rows(drift, meter):
    enable, reader, tp = drift
    h = enable(sample_rows=16)
    m = itorch.instrument_model(torch.nn.Flatten(), "img", "1", tracer_provider=tp, meter_provider=meter[0])
    x = torch.zeros(64, 3, 8, 8, dtype=torch.float16)
    x[16:] = 1.0  # rows past the sample do not count
    with torch.no_grad():
        m(x)
    v = points(h.observer, "ml.drift.value")
    assert v["input.0.zero_share"].sum == 1.0
    c = points(h.observer, "ml.drift.category")
    assert c[("input.0.shape", "*x3x8x8")].value == 64 and c[("input.0.dtype", "float16")].value == 64
    assert points(h.observer, "ml.cost.items")["<=256"].value == 64


def test_generation_token_counts(drift, meter):
    enable, reader, _ = drift
    h = enable()
    with trace_generation(model="llama", input_tokens=300, meter_provider=meter[0]) as gen:
        gen.token(40)
    v = points(h.observer, "ml.drift.value")
    assert v["prompt_tokens"].sum == 300 and v["output_tokens"].sum == 40
    tokens = points(h.observer, "ml.cost.tokens")
    assert tokens[("<=1Ki", "input")].sum == 300 and tokens[("<=1Ki", "output")].sum == 40


def test_options_are_checked():
    with pytest.raises(ValueError, match="sample_every"):
        DriftObserver(sample_every=0)


def test_size_buckets():
    assert [size_bucket(n) for n in (0, 16, 17, 1024, 1025, 150528)] == ["<=16", "<=16", "<=64", "<=1Ki", "<=4Ki",
                                                                          "<=256Ki"]


def test_device_tensors_are_summarized_without_waiting(drift, meter):
    """Off the host the masked statistics run and the copy is reaped later (here: CPU posing as a device)."""
    enable, reader, tp = drift
    h = enable()
    h.observer._host_types = frozenset()  # every tensor takes the device path
    m = model("1", tp, meter[0])
    x = torch.randn(16, 4)
    x[3, 0] = float("inf")
    with torch.no_grad():
        m(x)
    assert len(h.observer._pending) == 1  # not counted yet: the copy might still be in flight
    v = points(h.observer, "ml.drift.value")  # collecting reaps completed copies
    assert not h.observer._pending
    finite = x[x.isfinite()].double()
    mean = finite.mean().item()
    assert (v["input.0.mean"] if mean >= 0 else v["input.0.mean-"]).sum == pytest.approx(abs(mean), rel=1e-5)
    assert v["input.0.inf_share"].sum == pytest.approx(1 / 64)
    assert v["input.0.max"].sum == pytest.approx(finite.max().item(), rel=1e-6)
    assert sum(p.value for k, p in points(h.observer, "ml.drift.category").items() if k[0] == "output.label") == 16


def test_time_budget_bounds_the_share_of_forward_time_spent_on_statistics(drift, meter):
    """Each summary 'costs' 1 s on a fake clock; forwards earn 5% of their (real, sub-second) duration."""
    enable, _, tp = drift
    ticks = iter(range(10**6))
    h = enable(budget=0.05, clock=lambda: float(next(ticks)))
    m = model("1", tp, meter[0])
    with torch.no_grad():
        for _ in range(50):
            m(torch.randn(4, 4))
    v = points(h.observer, "ml.drift.value")
    assert v["batch_size"].count == 1  # the first is free; the next needs 20 s of forwards
    assert data_points(h.observer, "ml.cost.items")[0].value == 200  # cost metrics count every forward
    with pytest.raises(ValueError, match="budget"):
        DriftObserver(budget=0)


def test_a_forked_child_starts_its_own_series():
    """Parent and child must not export the same cumulative series (the sidecar keys them by start time)."""
    import json
    import os

    obs = DriftObserver()
    obs.observe_values("m", "1", {"x": 1.0, "y": 2.0})
    parent_start = data_points(obs, "ml.drift.value")[0].start_time_unix_nano
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it would export, then leave without running pytest's teardown
        try:
            obs.observe_values("m", "1", {"x": 3.0})
            pts = data_points(obs, "ml.drift.value")
            os.write(write, json.dumps([[dict(p.attributes)["ml.drift.feature"], p.count, p.start_time_unix_nano]
                                        for p in pts]).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        child = json.loads(f.read())
    os.waitpid(pid, 0)
    assert [c[:2] for c in child] == [["x", 1]]  # only its own value, not the parent's x and y
    assert child[0][2] != parent_start
    assert {dict(p.attributes)["ml.drift.feature"]: p.count for p in data_points(obs, "ml.drift.value")} == \
        {"x": 1, "y": 1}
