"""Sampling policies. Each answers, for one buffered trace: keep (with a threshold) or not (None).

A keep carries the rejection threshold T of consistent sampling so kept spans can
record it in tracestate: ``ALWAYS`` (0) for deterministic keeps (errors, latency,
attributes), T for probabilistic and adaptive keeps, ``UNKNOWN`` for rate limits.

Policies read what the processor folded into the trace as its spans arrived
(:class:`~sidecar.processors.tail_sampling.buffer.Trace`): status bits, start and
end, randomness, and one bit per attribute check. ``needs`` says which of those a
policy reads, so the processor extracts only what its configured policies use.
Attribute policies match a span attribute, else the resource's (as the
OpenTelemetry Collector does); an ``invert_match`` policy keeps traces in which no
span matches.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Iterator, NamedTuple, Optional

from sidecar.processors.tail_sampling.buffer import Trace
from sidecar.processors.tail_sampling.config import PolicyConfig
from sidecar.processors.tail_sampling.decisions import ALWAYS, UNKNOWN, threshold_for

_STATUS = {"UNSET": 0, "OK": 1, "ERROR": 2}

#: What a policy can need extracted from each span.
STATUS, TIMES, RANDOMNESS = "status", "times", "randomness"

#: How the decision loop (``_trace.decide``) runs a policy: what :meth:`Policy.plan` names. CALL calls its
#: ``evaluate``; the others are the tests of the policies below on the trace's fields, done in C (the
#: pure-Python twin calls ``evaluate`` for every kind: the same answers, tests/sidecar/tail_sampling/test_trace_parity.py).
PLAN_CALL, PLAN_ALWAYS, PLAN_STATUS, PLAN_LATENCY, PLAN_ATTRIBUTE, PLAN_PROBABILISTIC = range(6)


class Policy(ABC):
    name: str
    needs: frozenset[str] = frozenset()

    @abstractmethod
    def evaluate(self, trace: Trace, now: float) -> Optional[int]:
        """The threshold to record if this policy keeps ``trace``, else None."""

    def leaves(self) -> Iterator["Policy"]:
        """This policy and every sub-policy under it."""
        yield self

    def plan(self) -> tuple:
        """(kind, name, evaluate, a, b): how the decision loop runs this policy (see PLAN_CALL); the default
        calls ``evaluate``. Made once the attribute checks have their bits."""
        return (PLAN_CALL, self.name, self.evaluate, None, None)


class AttributeCheck(NamedTuple):
    """One attribute policy's test, run on every span as it arrives; a match sets ``bit`` on the trace."""

    key_bytes: bytes  # absent from a span's encoding => the span lacks the attribute (C-speed prefilter)
    key: str
    bit: int
    matches: Callable[[object], bool]


def attribute_checks(policies: list[Policy]) -> list[AttributeCheck]:
    """Assign each attribute policy (at any depth) its bit; the checks the processor runs per span."""
    checks = []
    for top in policies:
        for p in top.leaves():
            if isinstance(p, _Attribute):
                p.bit = 1 << len(checks)
                checks.append(AttributeCheck(p.key.encode(), p.key, p.bit, p._matches))
    return checks


def needs_of(policies: list[Policy]) -> frozenset[str]:
    return frozenset().union(*(p.needs for top in policies for p in top.leaves()))


class AlwaysSample(Policy):
    def __init__(self, name: str):
        self.name = name

    def evaluate(self, trace: Trace, now: float) -> Optional[int]:
        return ALWAYS

    def plan(self) -> tuple:
        return (PLAN_ALWAYS, self.name, self.evaluate, None, None)


class StatusCode(Policy):
    needs = frozenset({STATUS})

    def __init__(self, name: str, codes: list[str]):
        self.name = name
        self.mask = sum(1 << _STATUS[c] for c in set(codes))

    def evaluate(self, trace: Trace, now: float) -> Optional[int]:
        return ALWAYS if trace.status_mask & self.mask else None

    def plan(self) -> tuple:
        return (PLAN_STATUS, self.name, self.evaluate, self.mask, None)


class Latency(Policy):
    needs = frozenset({TIMES})

    def __init__(self, name: str, threshold_ms: int, upper_threshold_ms: int):
        self.name = name
        self.lower = threshold_ms * 1_000_000
        self.upper = upper_threshold_ms * 1_000_000 if upper_threshold_ms else None

    def evaluate(self, trace: Trace, now: float) -> Optional[int]:
        start = trace.start  # Trace.duration_ns, inlined
        d = max(0, trace.end - start) if start else 0
        if d >= self.lower and (self.upper is None or d <= self.upper) and trace.n_spans:
            return ALWAYS
        return None

    def plan(self) -> tuple:
        if not all(0 <= b < 1 << 64 for b in (self.lower, self.upper or 0)):  # C compares unsigned 64-bit ns
            return super().plan()
        return (PLAN_LATENCY, self.name, self.evaluate, self.lower, self.upper)


class Probabilistic(Policy):
    """Keep iff R >= T: the same answer on every sidecar for the same trace."""

    needs = frozenset({RANDOMNESS})

    def __init__(self, name: str, percentage: float):
        self.name = name
        self.threshold = threshold_for(percentage)

    def evaluate(self, trace: Trace, now: float) -> Optional[int]:
        t = self.threshold
        rv = trace.rv  # Trace.randomness, inlined: rv, else the trace id's rightmost 56 bits
        r = rv if rv is not None else int.from_bytes(trace.trace_id[9:16], "big")
        return t if r >= t else None

    def plan(self) -> tuple:
        return (PLAN_PROBABILISTIC, self.name, self.evaluate, self.threshold, None)


class _Attribute(Policy):
    key: str
    invert: bool
    bit: int = 0  # set by attribute_checks()

    @abstractmethod
    def _matches(self, value) -> bool:
        """Whether one attribute value passes this policy's test (the policy may invert the result)."""

    def evaluate(self, trace: Trace, now: float) -> Optional[int]:
        found = bool(trace.matched & self.bit)
        return ALWAYS if found != self.invert else None

    def plan(self) -> tuple:
        return (PLAN_ATTRIBUTE, self.name, self.evaluate, self.bit, bool(self.invert))


class StringAttribute(_Attribute):
    def __init__(self, name: str, key: str, values: list[str], regex: bool, invert: bool):
        self.name, self.key, self.invert = name, key, invert
        if regex:
            from redaction import linear_regex

            searches = [linear_regex(v).search for v in values]
            self._match_str = lambda s: any(search(s) for search in searches)
        else:
            exact = frozenset(values)
            self._match_str = exact.__contains__

    def _matches(self, value) -> bool:
        return value.WhichOneof("value") == "string_value" and self._match_str(value.string_value)


class NumericAttribute(_Attribute):
    def __init__(self, name: str, key: str, lo: float | None, hi: float | None, invert: bool):
        self.name, self.key, self.invert = name, key, invert
        self.lo = float("-inf") if lo is None else lo
        self.hi = float("inf") if hi is None else hi

    def _matches(self, value) -> bool:
        kind = value.WhichOneof("value")
        if kind == "int_value":
            return self.lo <= value.int_value <= self.hi
        if kind == "double_value":
            return self.lo <= value.double_value <= self.hi
        return False


class BooleanAttribute(_Attribute):
    def __init__(self, name: str, key: str, value: bool, invert: bool):
        self.name, self.key, self.invert, self.value = name, key, invert, value

    def _matches(self, value) -> bool:
        return value.WhichOneof("value") == "bool_value" and value.bool_value == self.value


class _PerSecond:
    """A spans-per-second budget over whole-second windows of the processor's clock."""

    __slots__ = ("limit", "second", "spent")

    def __init__(self, limit: float):
        self.limit = limit
        self.second = None
        self.spent = 0

    def fits(self, n: int, now: float) -> bool:
        sec = int(now)
        if sec != self.second:
            self.second, self.spent = sec, 0
        return self.spent + n <= self.limit

    def spend(self, n: int) -> None:
        self.spent += n


class RateLimiting(Policy):
    def __init__(self, name: str, spans_per_second: int):
        self.name = name
        self.budget = _PerSecond(spans_per_second)

    def evaluate(self, trace: Trace, now: float) -> Optional[int]:
        n = max(trace.n_spans, 1)
        if self.budget.fits(n, now):
            self.budget.spend(n)
            return UNKNOWN
        return None


class SpanCount(Policy):
    def __init__(self, name: str, min_spans: int, max_spans: int):
        self.name, self.min, self.max = name, min_spans, max_spans

    def evaluate(self, trace: Trace, now: float) -> Optional[int]:
        n = trace.n_spans
        return ALWAYS if n >= self.min and (not self.max or n <= self.max) else None


class And(Policy):
    """Keep when every sub-policy keeps; the recorded threshold is the largest (the trace passed them all)."""

    def __init__(self, name: str, subs: list[Policy]):
        self.name, self.subs = name, subs

    def leaves(self) -> Iterator[Policy]:
        yield self
        for sub in self.subs:
            yield from sub.leaves()

    def evaluate(self, trace: Trace, now: float) -> Optional[int]:
        worst = ALWAYS
        for sub in self.subs:
            t = sub.evaluate(trace, now)
            if t is None:
                return None
            worst = UNKNOWN if UNKNOWN in (t, worst) else max(worst, t)
        return worst


class Drop(And):
    """Matches when every sub-policy matches; the processor then drops the trace whatever else keeps it."""


class Composite(Policy):
    """Sub-policies in ``policy_order``, each within its share of a total spans-per-second budget.

    A sub-policy without a ``rate_allocation`` may use the whole budget. When a keeping
    sub-policy is out of budget the next one in order is asked.
    """

    def __init__(self, name: str, max_total: int, order: list[Policy], allocation: dict[str, float]):
        self.name = name
        self.total = _PerSecond(max_total)
        self.order = [(p, _PerSecond(max_total * allocation[p.name] / 100.0 if p.name in allocation else max_total))
                      for p in order]

    def leaves(self) -> Iterator[Policy]:
        yield self
        for sub, _ in self.order:
            yield from sub.leaves()

    def evaluate(self, trace: Trace, now: float) -> Optional[int]:
        n = max(trace.n_spans, 1)
        for sub, budget in self.order:
            if sub.evaluate(trace, now) is None:
                continue
            if budget.fits(n, now) and self.total.fits(n, now):
                budget.spend(n)
                self.total.spend(n)
                return UNKNOWN
        return None


class Adaptive(Policy):
    """Consistent probabilistic sampling whose percentage follows traffic to keep ~target traces/s.

    Every ``adjust_interval`` it measures how many traces per second it was asked about
    (traces not already kept by earlier policies, so errors and slow traces stay 100% on
    top of the budget), smooths that rate, and sets p = target / rate within
    [min_sampling_percentage, max_sampling_percentage].
    """

    SMOOTHING = 0.5  # weight of the newest interval's rate
    needs = frozenset({RANDOMNESS})

    def __init__(self, name: str, target: float, min_pct: float, max_pct: float, interval: float):
        self.name = name
        self.target, self.min_pct, self.max_pct, self.interval = target, min_pct, max_pct, interval
        self.percentage = max_pct
        self.threshold = threshold_for(max_pct)
        self._window_start: float | None = None
        self._offered = 0
        self._rate: float | None = None

    def _adjust(self, now: float) -> None:
        elapsed = now - self._window_start
        rate = self._offered / elapsed
        self._rate = rate if self._rate is None else self.SMOOTHING * rate + (1 - self.SMOOTHING) * self._rate
        pct = 100.0 * self.target / self._rate if self._rate > 0 else self.max_pct
        self.percentage = min(self.max_pct, max(self.min_pct, pct))
        self.threshold = threshold_for(self.percentage)
        self._window_start, self._offered = now, 0

    def evaluate(self, trace: Trace, now: float) -> Optional[int]:
        if self._window_start is None:
            self._window_start = now
        elif now - self._window_start >= self.interval:
            self._adjust(now)
        self._offered += 1
        t = self.threshold
        return t if trace.randomness() >= t else None


def build(cfg: PolicyConfig) -> Policy:
    """The policy object for one validated policy config."""
    s = cfg.section()
    name = cfg.name
    t = cfg.type
    if t == "always_sample":
        return AlwaysSample(name)
    if t == "status_code":
        return StatusCode(name, s.status_codes)
    if t == "latency":
        return Latency(name, s.threshold_ms, s.upper_threshold_ms)
    if t == "probabilistic":
        return Probabilistic(name, s.sampling_percentage)
    if t == "string_attribute":
        return StringAttribute(name, s.key, s.values, s.enabled_regex_matching, s.invert_match)
    if t == "numeric_attribute":
        return NumericAttribute(name, s.key, s.min_value, s.max_value, s.invert_match)
    if t == "boolean_attribute":
        return BooleanAttribute(name, s.key, s.value, s.invert_match)
    if t == "rate_limiting":
        return RateLimiting(name, s.spans_per_second)
    if t == "span_count":
        return SpanCount(name, s.min_spans, s.max_spans)
    if t == "and":
        return And(name, [build(p) for p in s.and_sub_policy])
    if t == "drop":
        return Drop(name, [build(p) for p in s.drop_sub_policy])
    if t == "composite":
        subs = {p.name: build(p) for p in s.composite_sub_policy}
        order = [subs[n] for n in s.policy_order] + [p for n, p in subs.items() if n not in s.policy_order]
        return Composite(name, s.max_total_spans_per_second, order, {a.policy: a.percent for a in s.rate_allocation})
    if t == "adaptive":
        return Adaptive(name, s.target_traces_per_second, s.min_sampling_percentage, s.max_sampling_percentage,
                        s.adjust_interval)
    raise ValueError(f"unknown policy type {t!r}")  # pragma: no cover - the config model rejects it
