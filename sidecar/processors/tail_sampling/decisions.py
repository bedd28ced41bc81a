"""Consistent probability sampling (W3C Trace Context level 2 + OTel tracestate) and the decision cache.

Randomness R is the rightmost 56 bits of the trace id, or ``rv`` from the ``ot``
tracestate entry when present. A keep probability p becomes the rejection
threshold T = round((1 - p) * 2**56) and a trace is kept iff R >= T, so every
sidecar that sees a trace makes the same decision. Kept spans carry
``ot=th:<T as 14 hex digits, trailing zeros removed>`` (``th:0`` is 100%) so a
backend can compute adjusted counts (2**56 / (2**56 - T)).
"""

from __future__ import annotations

from collections import OrderedDict
from fractions import Fraction
from typing import Generic, TypeVar

MAX_THRESHOLD = 1 << 56
#: Threshold of a deterministic keep (probability 1).
ALWAYS = 0
#: A keep whose probability is unknown (rate limits): the ``th`` sub-key is removed.
UNKNOWN = -1


def threshold_for(percentage: float) -> int:
    """Rejection threshold T for a keep probability given in percent.

    Computed exactly from the percentage as written (10 -> 1/10), so 10% is ``th:e6666666666666``
    rather than a float rounding artefact of it.
    """
    p = min(max(Fraction(repr(float(percentage))), Fraction(0)), Fraction(100)) / 100
    return round((1 - p) * MAX_THRESHOLD)


def randomness(trace_id: bytes, tracestate: str = "") -> int:
    """R: explicit ``rv`` from the ``ot`` tracestate entry, else the trace id's rightmost 56 bits."""
    if tracestate and "rv:" in tracestate:
        rv = _ot_subkeys(tracestate).get("rv")
        if rv is not None and len(rv) == 14:
            try:
                return int(rv, 16)
            except ValueError:
                pass
    return int.from_bytes(trace_id[9:16], "big")


def threshold_hex(threshold: int) -> str:
    """T as the ``th`` value: 14 hex digits with trailing zeros removed, ``0`` for 100%."""
    if threshold <= 0:
        return "0"
    return f"{threshold:014x}".rstrip("0")


def parse_threshold(tracestate: str) -> int | None:
    """T from an existing ``ot=th:...`` (e.g. set by a head sampler), or None."""
    if not tracestate or "th:" not in tracestate:
        return None
    th = _ot_subkeys(tracestate).get("th")
    if not th or len(th) > 14:
        return None
    try:
        return int(th.ljust(14, "0"), 16)
    except ValueError:
        return None


def _ot_entry(tracestate: str) -> tuple[str | None, list[str]]:
    """The ``ot`` entry's value and the other list members, in order."""
    ot = None
    others = []
    for member in tracestate.split(","):
        m = member.strip()
        if not m:
            continue
        if m.startswith("ot="):
            ot = m[3:]
        else:
            others.append(m)
    return ot, others


def _ot_subkeys(tracestate: str) -> dict[str, str]:
    ot, _ = _ot_entry(tracestate)
    if not ot:
        return {}
    out = {}
    for part in ot.split(";"):
        k, sep, v = part.partition(":")
        if sep:
            out[k] = v
    return out


def with_threshold(tracestate: str, threshold: int) -> str:
    """``tracestate`` with ``ot=th:...`` set (or removed for UNKNOWN), keeping ``rv`` and every other entry.

    A head-sampling threshold already present composes: the larger threshold wins, as
    the trace passed both samplers. The modified ``ot`` entry moves to the front (W3C).
    """
    ot, others = _ot_entry(tracestate) if tracestate else (None, [])
    parts = [p for p in (ot.split(";") if ot else []) if p and not p.startswith("th:")]
    if threshold != UNKNOWN:
        existing = parse_threshold(tracestate)
        if existing is not None:
            threshold = max(threshold, existing)
        parts.insert(0, "th:" + threshold_hex(threshold))
    if not parts:
        return ",".join(others)
    return ",".join(["ot=" + ";".join(parts)] + others)


K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
    """A bounded map that forgets the least recently used key. Size 0 remembers nothing."""

    __slots__ = ("_d", "size")

    def __init__(self, size: int):
        self._d: OrderedDict = OrderedDict()
        self.size = size

    def get(self, key: K) -> V | None:
        v = self._d.get(key)
        if v is not None:
            self._d.move_to_end(key)
        return v

    def put(self, key: K, value: V) -> None:
        if self.size <= 0:
            return
        d = self._d
        d[key] = value
        d.move_to_end(key)
        if len(d) > self.size:
            d.popitem(last=False)

    def put_many(self, items: list[tuple[K, V]]) -> None:
        """:meth:`put` of each (key, value) in order.

        Keys are nearly always new (a trace is decided once), so they go in with one ``update``; should any
        have been there already, moving every key to the end in order gives the order the puts would have."""
        if self.size <= 0 or not items:
            return
        d = self._d
        before = len(d)
        d.update(items)
        if len(d) - before != len(items):  # some were there (or came twice): refresh them as put() would
            move = d.move_to_end
            for key, _ in items:
                move(key)
        popitem = d.popitem
        for _ in range(len(d) - self.size):
            popitem(False)

    @property
    def entries(self) -> "OrderedDict[K, V]":
        """The map itself, least recently used first, for hot loops: reading it does not refresh a key."""
        return self._d

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: object) -> bool:
        return key in self._d
