"""Rank statistics for comparing two sensitivity rankings (runs, or prediction vs measurement).

Plain Python on purpose: ``aqm diff`` and the reports run without scipy or torch, and the inputs
are a few hundred recipe groups at most, so the O(n²) Kendall count costs milliseconds.

Any NaN in the inputs makes a coefficient NaN (an ordering with NaN in it means nothing); so does
fewer than two points or a side with no variation at all. Callers render NaN as "n/a".
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ascending ranks; tied values share the mean of the ranks they span.

    This is the ranking Spearman's coefficient needs for ties (scipy's ``rankdata`` "average").
    NaN is not ordered: keep it out of the input (see :func:`spearman`).
    """
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        shared = (start + end) / 2 + 1  # mean of the 1-based positions start+1 .. end+1
        for position in range(start, end + 1):
            ranks[order[position]] = shared
        start = end + 1
    return ranks


def _check_pair(x: Sequence[float], y: Sequence[float]) -> bool:
    """True when a coefficient can be computed; raises on mismatched lengths (a caller bug)."""
    if len(x) != len(y):
        raise ValueError(f"rank statistics need paired values, got {len(x)} and {len(y)}")
    return len(x) >= 2 and not any(math.isnan(v) for v in (*x, *y))


def _pearson(x: Sequence[float], y: Sequence[float]) -> float:
    mean_x = math.fsum(x) / len(x)
    mean_y = math.fsum(y) / len(y)
    dx = [v - mean_x for v in x]
    dy = [v - mean_y for v in y]
    sxx = math.fsum(d * d for d in dx)
    syy = math.fsum(d * d for d in dy)
    if sxx == 0.0 or syy == 0.0:
        return math.nan
    r = math.fsum(a * b for a, b in zip(dx, dy, strict=True)) / math.sqrt(sxx * syy)
    return max(-1.0, min(1.0, r))  # rounding can overshoot by an ulp


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson's correlation of the average ranks, so ties are handled exactly."""
    if not _check_pair(x, y):
        return math.nan
    return _pearson(average_ranks(x), average_ranks(y))


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ-b: (concordant - discordant) over the geometric mean of the untied pair counts.

    τ-b rather than τ-a because scores tie (zero-scored groups, identical formats); a pair tied on
    both sides counts in neither the numerator nor either untied count.
    """
    if not _check_pair(x, y):
        return math.nan
    n = len(x)
    concordant = discordant = tied_x = tied_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            sx = (x[i] > x[j]) - (x[i] < x[j])
            sy = (y[i] > y[j]) - (y[i] < y[j])
            if sx == 0:
                tied_x += 1
            if sy == 0:
                tied_y += 1
            if sx * sy > 0:
                concordant += 1
            elif sx * sy < 0:
                discordant += 1
    pairs = n * (n - 1) // 2
    denominator = math.sqrt((pairs - tied_x) * (pairs - tied_y))
    if denominator == 0.0:
        return math.nan
    return max(-1.0, min(1.0, (concordant - discordant) / denominator))


def top_k_shared(a: Sequence[Hashable], b: Sequence[Hashable], k: int) -> int:
    """How many items the first ``k`` of two rankings (most important first) have in common."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return len(set(a[:k]) & set(b[:k]))


def top_k_overlap(a: Sequence[Hashable], b: Sequence[Hashable], k: int) -> float:
    """Share of the top ``k`` the two rankings agree on, in [0, 1].

    When a ranking has fewer than ``k`` items the denominator is the shorter length, so two
    identical short rankings still score 1. Empty rankings (or ``k == 0``) give NaN.
    """
    size = min(k, len(a), len(b))
    if size == 0:
        return math.nan
    return top_k_shared(a, b, k) / size


def nan_reason(x: Sequence[float], y: Sequence[float], value: float, *, items: str = "groups") -> str:
    """Why a rank correlation of ``x`` (predicted) and ``y`` (measured) is NaN; ``""`` when it is not.

    The checks follow the rules in this module's docstring, in the order a reader can act on:
    too few points first, then a NaN (which hides any variation), then a side that never varies.
    ``items`` names what was measured ("groups", "points"), so the note counts the right thing.
    """
    if not math.isnan(value):
        return ""
    if len(x) < 2:
        return f"fewer than 2 measured {items} ({len(x)})"
    if any(math.isnan(v) for v in (*x, *y)):
        return "a NaN among the values"
    if len(set(x)) == 1:
        return "the predicted scores are all equal"
    if len(set(y)) == 1:
        return "the measured values are all equal"
    return "no untied pair"
