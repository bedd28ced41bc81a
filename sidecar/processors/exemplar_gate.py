"""Exemplars of kept traces only: span_metrics' candidates wait here for the tail sampler's decision.

span_metrics sees every span before sampling, so the slowest span or latest error of a
series usually belongs to a trace the tail sampler then drops (at 10%, nine times in ten),
and an exemplar pointing at it leads nowhere. With a sampler behind it, span_metrics
hands each candidate to a :class:`PendingExemplars`, which holds it by trace id until
the decision arrives on ``host.sampling_decisions`` and only then makes it the series'
exemplar. Bounded: a candidate older than a decision can take expires, and at most
``max_pending`` wait; both are counted. Recent decisions are remembered (at least as many
again, at most twice that: two generations of dicts, so remembering one is a dict insert and
forgetting is dropping the older generation whole), so a late span of a decided trace, or a
decision that arrives while its request is still in the stages behind, resolves at once.

Not thread-safe: span_metrics calls every method under its own lock (which also guards the
series the candidates point into).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

SLOW, ERR = 3, 4  # the exemplar slots of a span_metrics series (slowest span, latest error)


def promote(series: list, slot: int, ex: tuple) -> None:
    """Make ``ex`` (ns, trace id, span id, end ns) the series' exemplar if it is slower (slowest) or newer (error)."""
    cur = series[slot]
    if cur is None or (ex[0] > cur[0] if slot == SLOW else ex[3] >= cur[3]):
        series[slot] = ex


class PendingExemplars:
    """Exemplar candidates by trace id, until their trace is kept (published) or dropped (forgotten)."""

    def __init__(self, max_age: float, max_pending: int):
        self.max_age = max_age
        self.max_pending = max_pending
        #: trace id -> [held since, (series, slot, exemplar), ...], oldest first
        self._pending: OrderedDict[bytes, list] = OrderedDict()
        #: trace id -> kept, of recent decisions: the newer generation fills, then replaces the older
        self._decided: dict[bytes, bool] = {}
        self._decided_before: dict[bytes, bool] = {}
        self.n = 0
        #: outcomes not yet counted: kept, not_sampled, expired, overflow
        self.outcomes = {"kept": 0, "not_sampled": 0, "expired": 0, "overflow": 0}

    def hold(self, series: list, slot: int, ex: tuple, now: float) -> None:
        tid = ex[1]
        kept = self._decided.get(tid)
        if kept is None:
            kept = self._decided_before.get(tid)
        if kept is not None:  # already decided: a late span, or a decision that overtook its request
            if kept:
                promote(series, slot, ex)
            self.outcomes["kept" if kept else "not_sampled"] += 1
            return
        entry = self._pending.get(tid)
        if entry is None:
            if self.n >= self.max_pending:
                self.outcomes["overflow"] += 1
                return
            entry = self._pending[tid] = [now]
        entry.append((series, slot, ex))
        self.n += 1

    def expire(self, now: float) -> None:
        """Forget candidates held longer than a decision can take (their trace was never decided here)."""
        pending = self._pending
        n = 0
        while pending:
            tid, entry = next(iter(pending.items()))
            if now - entry[0] <= self.max_age:
                break
            del pending[tid]
            n += len(entry) - 1
        self.n -= n
        self.outcomes["expired"] += n

    def decide(self, decisions: Iterable[tuple]) -> None:
        """Apply ``(trace id, kept, policy)`` decisions: kept candidates become exemplars, the others go.

        Every trace is decided once and few have candidates waiting, so the decisions are remembered in one
        dict update and only the traces found waiting (one set intersection) are looked at one by one."""
        kept_of = {tid: kept for tid, kept, _ in decisions}
        decided = self._decided
        decided.update(kept_of)
        if len(decided) >= self.max_pending:
            self._decided_before, self._decided = decided, {}
        pending = self._pending
        if not pending or pending.keys().isdisjoint(kept_of):
            return
        kept_n = dropped_n = 0
        for tid in [t for t in kept_of if t in pending]:  # in decision order: ties between candidates as before
            entry = pending.pop(tid)
            kept = kept_of[tid]
            n = len(entry) - 1
            self.n -= n
            if kept:
                for series, slot, ex in entry[1:]:
                    promote(series, slot, ex)
                kept_n += n
            else:
                dropped_n += n
        self.outcomes["kept"] += kept_n
        self.outcomes["not_sampled"] += dropped_n

    def take_outcomes(self) -> dict[str, int]:
        """The outcome counts since the last call (to add to the counters outside the lock)."""
        out = {k: v for k, v in self.outcomes.items() if v}
        if out:
            for k in out:
                self.outcomes[k] = 0
        return out
