"""Drift statistics between a reference and a current window of binned counts (pure Python, no numpy).

Numeric features arrive as counts over fixed signed bins (:func:`signed_edges`); categorical ones
as counts per category. Definitions (the e2e test recomputes them independently):

- **PSI** on ``groups`` reference-quantile groups of the fine bins (fine bin ``i`` goes to group
  ``min(groups-1, floor(cum_ref_before_i * groups / total_ref))``), shares floored at ``1e-4``:
  ``sum((q - p) * ln(q / p))``. Grouping keeps sampling noise low: same-distribution windows of a
  few hundred values stay well under the usual 0.2 threshold.
- **Jensen–Shannon divergence**, base 2 (0..1), on the same groups (numeric) or the categories.
- **Normalised Wasserstein-1** on the fine bins, each bin's mass at its midpoint (the finite edge
  for the two open-ended bins), divided by the reference's spread: ``max(std, modal bin width / 2)``.
- **Chi-squared** statistic of the 2 x k contingency table (categorical).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

EPS = 1e-4


def signed_edges(bounds: Sequence[float]) -> list[tuple[float, float]]:
    """(low, high) of each signed bin for OTel bounds ``(0, b1, ..., bK-1)`` of magnitudes.

    Layout: the negative series mirrored (its buckets K..1), then the positive series (0..K);
    the negative series' bucket 0 (magnitude <= 0) is always empty and is dropped.
    """
    b = list(bounds)
    k = len(b)  # bucket i of a series covers (b[i-1], b[i]]; bucket k is (b[k-1], inf)
    neg = [(-math.inf, -b[k - 1])] + [(-b[i], -b[i - 1]) for i in range(k - 1, 0, -1)]
    pos = [(b[0], b[0])] + [(b[i - 1], b[i]) for i in range(1, k)] + [(b[k - 1], math.inf)]
    return neg + pos


def signed_counts(pos: Sequence[int], neg: Sequence[int] | None) -> list[int]:
    """The signed bin counts from a positive and an optional negative (magnitude) series."""
    k = len(pos) - 1
    mirrored = list(reversed(neg[1:])) if neg is not None else [0] * k
    return mirrored + list(pos)


def midpoints(edges: Sequence[tuple[float, float]]) -> list[float]:
    out = []
    for lo, hi in edges:
        if math.isinf(lo):
            out.append(hi)
        elif math.isinf(hi):
            out.append(lo)
        else:
            out.append((lo + hi) / 2)
    return out


def quantile_groups(ref: Sequence[int], groups: int) -> list[int]:
    """Group index of each fine bin, cutting where the reference's cumulative mass crosses k/groups."""
    total = sum(ref)
    out = []
    before = 0
    for c in ref:
        out.append(min(groups - 1, (before * groups) // total) if total else 0)
        before += c
    return out


def regroup(counts: Sequence[int], group_of: Sequence[int], groups: int) -> list[int]:
    out = [0] * groups
    for c, g in zip(counts, group_of):
        out[g] += c
    return out


def shares(counts: Sequence[float]) -> list[float]:
    total = sum(counts)
    return [c / total for c in counts] if total else [0.0] * len(counts)


def psi(ref: Sequence[float], cur: Sequence[float]) -> float:
    p, q = shares(ref), shares(cur)
    out = 0.0
    for a, b in zip(p, q):
        a, b = max(a, EPS), max(b, EPS)
        out += (b - a) * math.log(b / a)
    return out


def js_divergence(ref: Sequence[float], cur: Sequence[float]) -> float:
    p, q = shares(ref), shares(cur)
    out = 0.0
    for a, b in zip(p, q):
        m = (a + b) / 2
        if a:
            out += 0.5 * a * math.log2(a / m)
        if b:
            out += 0.5 * b * math.log2(b / m)
    return max(0.0, out)


def wasserstein(ref: Sequence[float], cur: Sequence[float], points: Sequence[float],
                widths: Sequence[float]) -> float:
    """W1 between the two binned distributions (mass at ``points``), over the reference's spread."""
    p, q = shares(ref), shares(cur)
    dist = 0.0
    cp = cq = 0.0
    for i in range(len(points) - 1):
        cp += p[i]
        cq += q[i]
        dist += abs(cp - cq) * (points[i + 1] - points[i])
    mean = sum(a * x for a, x in zip(p, points))
    std = math.sqrt(max(0.0, sum(a * (x - mean) ** 2 for a, x in zip(p, points))))
    modal = max(range(len(p)), key=p.__getitem__) if p else 0
    spread = max(std, widths[modal] / 2 if widths else 0.0, 1e-12)
    return dist / spread


def bin_widths(edges: Sequence[tuple[float, float]]) -> list[float]:
    """Widths for the spread floor; the open-ended bins count as wide as their finite neighbour."""
    w = [hi - lo for lo, hi in edges]
    if len(w) > 1:
        if math.isinf(w[0]):
            w[0] = w[1]
        if math.isinf(w[-1]):
            w[-1] = w[-2]
    return w


def chi_squared(ref: Mapping[str, int], cur: Mapping[str, int]) -> float:
    """Two-sample chi-squared statistic over the union of categories."""
    n_ref, n_cur = sum(ref.values()), sum(cur.values())
    n = n_ref + n_cur
    if not n_ref or not n_cur:
        return 0.0
    out = 0.0
    for cat in set(ref) | set(cur):
        col = ref.get(cat, 0) + cur.get(cat, 0)
        for observed, row in ((ref.get(cat, 0), n_ref), (cur.get(cat, 0), n_cur)):
            expected = row * col / n
            out += (observed - expected) ** 2 / expected
    return out


def categorical_vectors(ref: Mapping[str, int], cur: Mapping[str, int]) -> tuple[list[int], list[int]]:
    cats = sorted(set(ref) | set(cur))
    return [ref.get(c, 0) for c in cats], [cur.get(c, 0) for c in cats]


class NumericScores:
    """PSI, JS and normalised Wasserstein of one numeric feature; built per scoring pass."""

    __slots__ = ("psi", "js", "wasserstein")

    def __init__(self, ref: Sequence[int], cur: Sequence[int], edges: Sequence[tuple[float, float]],
                 groups: int) -> None:
        group_of = quantile_groups(ref, groups)
        r, c = regroup(ref, group_of, groups), regroup(cur, group_of, groups)
        self.psi = psi(r, c)
        self.js = js_divergence(r, c)
        self.wasserstein = wasserstein(ref, cur, midpoints(edges), bin_widths(edges))
