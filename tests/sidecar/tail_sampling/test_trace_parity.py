"""The sort of a request's runs into the buffer: the C functions (``_trace.c``) against their pure-Python twin
(``_trace_py``), on random traffic that takes every branch: new traces, later runs of buffered ones, late spans
and records of decided traces, spans and records without a trace id, tracestates with and without ``rv``,
attribute checks, roots, records at the always-keep severity, a buffer full enough to take traces out, and
requests whose data is in an older log segment than the traces they join."""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest

from sidecar import wire
from sidecar.processors.tail_sampling import _trace_py, buffer
from sidecar.processors.tail_sampling.buffer import TraceBuffer
from tests.sidecar.tail_sampling.helpers import logs_request, span, traces_request

try:
    from sidecar.processors.tail_sampling import _trace as _c
except ImportError:
    _c = None

pytestmark = pytest.mark.skipif(_c is None, reason="the C extension is not built (pip install -e .)")

FIELDS = ("trace_id", "first_seen", "root_deadline", "spans_key", "spans", "more_spans", "logs_key", "logs",
          "more_logs", "n_spans", "n_logs", "nbytes", "status_mask", "start", "end", "matched", "rv", "segment")
KEY = b"sampling.force_keep"


def _trace_class(base):
    methods = {k: v for k, v in vars(buffer.Trace).items() if k not in ("__slots__", "__dict__", "__weakref__")}
    return type("Trace", (base,), {**methods, "__slots__": ()})


class Buffer(TraceBuffer):
    """A buffer whose sorts have a segment, as the durable one's do, counting the traces it was told of."""

    def __init__(self, trace_type, **kwargs):
        super().__init__(**kwargs)
        self.trace_type = trace_type
        self.segment = -1
        self.created = 0

    def note_created(self, n):
        super().note_created(n)
        self.created += n


class Side:
    def __init__(self, impl, base, num_traces):
        self.impl = impl
        self.buf = Buffer(_trace_class(base), decision_wait=10.0, root_wait=1.0, num_traces=num_traces,
                          max_bytes=1 << 30)
        self.sampled: OrderedDict = OrderedDict()
        self.not_sampled: OrderedDict = OrderedDict()

    def state(self):
        traces = [tuple(getattr(t, f) for f in FIELDS) for t in self.buf.traces.values()]
        return (traces, [t.trace_id for t in self.buf.roots], list(self.sampled), list(self.not_sampled),
                self.buf.nbytes, self.buf.created)


def _ids(traces):
    return [t.trace_id for t in traces]


def _traffic(rng: random.Random, ids: list[bytes]):
    """A random traces or logs request over a pool of trace ids (some decided, some buffered, some new)."""
    def tid():
        return rng.choice(ids) if rng.random() < 0.9 else b""

    if rng.random() < 0.6:
        spans = []
        for _ in range(rng.randint(1, 12)):
            attrs = {}
            if rng.random() < 0.2:
                attrs["sampling.force_keep"] = rng.random() < 0.5
            ts = rng.choice(["", "", "ot=th:8", "ot=rv:00000000000123;th:4", "vendor=x"])
            s = span(tid(), root=rng.random() < 0.3, error=rng.random() < 0.1, attrs=attrs, trace_state=ts,
                     start_ms=rng.randint(0, 50), duration_ms=rng.randint(0, 30))
            for _ in range(rng.randint(1, 3)):
                spans.append(s)
        resource = {"service.name": "svc"} if rng.random() < 0.8 else {"sampling.force_keep": True}
        return "traces", traces_request(*spans, resource=resource).SerializeToString()
    records = [(tid(), rng.choice([0, 9, 17, 21]), "body") for _ in range(rng.randint(1, 10))]
    return "logs", logs_request(*records).SerializeToString()


@pytest.mark.parametrize("seed", range(12))
def test_c_and_python_sort_every_request_into_the_same_buffer(seed):
    rng = random.Random(seed)
    num_traces = rng.choice([4, 16, 1000])
    ids = [rng.randbytes(16) for _ in range(40)]
    c = Side(_c, _c.TraceBase, num_traces)
    py = Side(_trace_py, _trace_py.TraceBase, num_traces)
    for side in (c, py):  # decisions made before: late data of these follows them
        for t in ids[:6]:
            side.sampled[t] = ("baseline", 7)
        for t in ids[6:12]:
            side.not_sampled[t] = True
    needs = (True, True, True)
    checks = (3, (None,), lambda values: 2 if values[0] is not None else 0,
              lambda hits, res: res | (1 if hits[0] is not None and hits[0].values else 0))
    for step in range(60):
        signal, data = _traffic(rng, ids)
        now = 100.0 + step
        segment = rng.randint(0, 5)  # the request's log segment: older data moves a trace's pin back
        results = []
        for side in (c, py):
            side.buf.segment = segment
            late_kept, passthrough, older, evicted, immediate = [], [], [], [], []
            if signal == "traces":
                runs = wire.span_runs(data, (KEY,))
                out = side.impl.sort_spans(runs, side.buf, now, side.sampled, side.not_sampled, needs, checks,
                                           late_kept, passthrough, older, evicted)
            else:
                draws = random.Random(step)
                runs = wire.log_runs(data, 17)
                out = side.impl.sort_logs(runs, side.buf, now, side.sampled, side.not_sampled, 0.5, draws.random,
                                          immediate, older, evicted)
            side.buf.over_budget(evicted)
            results.append((out, late_kept, passthrough, immediate, _ids(older), _ids(evicted), side.state()))
        assert results[0] == results[1], f"step {step} ({signal})"
        if rng.random() < 0.2:  # some traces are decided meanwhile
            later = now + rng.choice([0.5, 2.0, 20.0])
            assert _ids(c.buf.due(later)) == _ids(py.buf.due(later))


def test_the_c_sort_refuses_what_is_not_a_scanners_output():
    buf = Buffer(buffer.Trace, decision_wait=10.0, root_wait=1.0, num_traces=10, max_bytes=1 << 20)
    args = (buf, 1.0, {}, {}, (False, False, False), None, [], [], [], [])
    for runs in ([(b"head", [(b"scope", [("not", "a", "run")])], ())], [("short",)], "not a list"):
        with pytest.raises(TypeError):
            _c.sort_spans(runs, *args)
    assert len(buf) == 0


POLICIES = [
    {"name": "no-health", "type": "drop", "drop": {"drop_sub_policy": [
        {"name": "health", "type": "string_attribute", "string_attribute": {"key": "http.route", "values": ["/health"]}},
    ]}},
    {"name": "errors", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}},
    {"name": "band", "type": "latency", "latency": {"threshold_ms": 100, "upper_threshold_ms": 500}},
    {"name": "slow", "type": "latency", "latency": {"threshold_ms": 2000}},
    {"name": "forced", "type": "boolean_attribute", "boolean_attribute": {"key": "sampling.force_keep", "value": True}},
    {"name": "not-bert", "type": "string_attribute",
     "string_attribute": {"key": "ml.model.id", "values": ["bert"], "invert_match": True}},
    {"name": "big", "type": "span_count", "span_count": {"min_spans": 5}},
    {"name": "baseline", "type": "probabilistic", "probabilistic": {"sampling_percentage": 10}},
    {"name": "all", "type": "always_sample"},
]


def _plans(policies: list[dict]):
    import yaml

    from sidecar.processors.tail_sampling import TailSamplingConfig
    from sidecar.processors.tail_sampling import policies as _policies

    cfg = TailSamplingConfig.model_validate(yaml.safe_load(yaml.safe_dump({"policies": policies})))
    built = [_policies.build(p) for p in cfg.policies]
    _policies.attribute_checks(built)
    drops = [p.plan() for p in built if isinstance(p, _policies.Drop)]
    keeps = [p.plan() for p in built if not isinstance(p, _policies.Drop)]
    assert {k for k, *_ in keeps} == set(range(_c.PLAN_KINDS)), "every kind of plan is run"
    return drops, keeps


def test_a_latency_bound_beyond_64_bits_of_nanoseconds_is_left_to_python():
    from sidecar.processors.tail_sampling import policies as _policies

    huge = _policies.Latency("forever", 1, 10 ** 14)  # ms: 10^20 ns
    assert huge.plan()[0] == _policies.PLAN_CALL
    assert _policies.Latency("band", 100, 500).plan()[0] == _policies.PLAN_LATENCY


@pytest.mark.parametrize("seed", range(6))
def test_c_and_python_decide_every_trace_alike(seed):
    from sidecar.processors.tail_sampling.processor import _LABELS

    rng = random.Random(seed)
    drops, keeps = _plans(POLICIES[:1] + rng.sample(POLICIES[1:-1], k=len(POLICIES) - 2) + POLICIES[-1:])
    c_type, py_type = _trace_class(_c.TraceBase), _trace_class(_trace_py.TraceBase)
    c_traces, py_traces = [], []
    for _ in range(400):
        tid = rng.randbytes(16)
        fields = {"status_mask": rng.choice([0, 1, 2, 4, 5]), "n_spans": rng.choice([0, 1, 3, 6]),
                  "start": rng.choice([0, 10 ** 18]), "matched": rng.randrange(16),
                  "rv": rng.choice([None, None, rng.randrange(1 << 56)])}
        fields["end"] = rng.choice([0, fields["start"] + rng.choice([0, 5 * 10 ** 7, 10 ** 8, 3 * 10 ** 8, 5 * 10 ** 8, 9 * 10 ** 8, 2 * 10 ** 9, 3 * 10 ** 9])])
        for cls, out in ((c_type, c_traces), (py_type, py_traces)):
            t = cls(tid, 1.0)
            for k, v in fields.items():
                setattr(t, k, v)
            out.append(t)
    got_c = _c.decide(c_traces, drops, keeps, 5.0, _LABELS)
    got_py = _trace_py.decide(py_traces, drops, keeps, 5.0, _LABELS)
    for got in (got_c, got_py):
        got[0][:] = [(t.trace_id, decision, policy, threshold) for t, decision, policy, threshold in got[0]]
    assert got_c == got_py
    assert len({policy for _, _, policy, _ in got_c[0]}) >= 5, "the traces take many policies' paths"
    assert all(any(d is label for label in _LABELS[:3]) for _, d, _, _ in got_c[0]), "the processor compares with `is`"
