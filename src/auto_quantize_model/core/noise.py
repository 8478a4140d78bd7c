"""How far a measured figure can be trusted: bootstrap intervals over the held-out captions.

Validation measures ΔNLL and KL on a few dozen held-out captions, a few hundred tokens. On a
trained model a single layer's ΔNLL is often smaller than the spread that another draw of
captions would give, and low-ranked groups even come out below 0: sampling noise, not an
improvement. This module puts a number on that spread.

The resampled unit is the caption, not the token: the tokens of one caption share a subject
and a model state, so they are not independent. Every resample draws the captions with
replacement (as multiplicities, :class:`Resamples`), and each figure is recomputed from
per-caption sums as a ratio, Σ w·sum / Σ w·tokens, the same token-weighted mean as the point
value. All figures of one validation use the same resamples, so differences between them (two
groups, AutoQuant against a proxy) are paired. Intervals are percentile intervals.

numpy is imported inside the functions: the module is imported by the validation stage, never
by ``aqm --help`` or the report readers, but it stays light to import all the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import attrs

from auto_quantize_model.validation_records import Interval

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    Floats = npt.NDArray[np.float64]

DEFAULT_RESAMPLES = 1000
CONFIDENCE = 0.95
NAN_INTERVAL = Interval(math.nan, math.nan)
MAX_NAN_SHARE = 0.1
"""Resamples that leave a figure undefined (a correlation of equal values) count against it:
past this share the interval is NaN rather than drawn from the lucky resamples alone."""
_CHUNK_CELLS = 4_000_000
"""Resample x pair cells computed at once by the rank statistics (~32 MB of float64)."""

RANDOM_WEIGHT_PREFIXES = ("builtin:", "config:")
"""Model sources whose weights are drawn at random (:mod:`auto_quantize_model.backend.models`)."""

Headline = Literal["kl", "delta_nll"]


def random_weights_notice(source: str) -> str:
    """The sentence a report leads with when its model has random weights; ``""`` otherwise."""
    if not source.startswith(RANDOM_WEIGHT_PREFIXES):
        return ""
    return (
        f"Random weights: the model {source} is built with random weights, so its scores, ranking and "
        "validation figures carry no information about any real checkpoint; they only show that the "
        "pipeline runs."
    )


def random_weights_banner(source: str) -> str:
    """The short form of :func:`random_weights_notice` that every plot of such a run carries
    (a picture travels without its report); ``""`` for a trained model."""
    if not random_weights_notice(source):
        return ""
    return f"RANDOM WEIGHTS ({source}): these figures carry no information about any real checkpoint"


@attrs.frozen(eq=False)
class Resamples:
    """Caption multiplicities of every bootstrap resample, shared by all figures of a validation."""

    counts: Any
    """``[resamples, captions]`` int64: how often each caption is drawn in each resample."""
    tokens: Any
    """``[captions]`` float64: scored tokens per caption (the ratio's denominator)."""
    confidence: float = CONFIDENCE

    @classmethod
    def draw(
        cls, tokens: Sequence[int], resamples: int, seed: int, confidence: float = CONFIDENCE
    ) -> Resamples:
        """``resamples`` draws of ``len(tokens)`` captions with replacement; same seed, same draws."""
        import numpy as np

        if resamples <= 0 or len(tokens) == 0:
            raise ValueError(f"need resamples > 0 and captions, got {resamples} and {len(tokens)}")
        captions = len(tokens)
        rng = np.random.default_rng(seed)
        counts = rng.multinomial(captions, np.full(captions, 1.0 / captions), size=resamples)
        return cls(counts.astype(np.int64), np.asarray(tokens, dtype=np.float64), confidence)

    @property
    def size(self) -> int:
        return int(self.counts.shape[0])

    def means(self, sums: Sequence[Sequence[float]]) -> Floats:
        """``[resamples, groups]``: each group's token-weighted mean in each resample.

        ``sums[g][c]`` is group ``g``'s sum over caption ``c``'s tokens (of ΔNLL or KL).
        """
        import numpy as np

        matrix = np.asarray(sums, dtype=np.float64).reshape(len(sums), -1)
        weights = self.counts.astype(np.float64)
        result: Floats = (weights @ matrix.T) / (weights @ self.tokens)[:, None]
        return result

    def interval(self, draws: Sequence[float] | Floats) -> Interval:
        """The central ``confidence`` interval of ``draws``; NaN when too many are undefined."""
        import numpy as np

        values = np.asarray(draws, dtype=np.float64)
        finite = values[~np.isnan(values)]
        if finite.size == 0 or finite.size < (1.0 - MAX_NAN_SHARE) * values.size:
            return NAN_INTERVAL
        tail = (1.0 - self.confidence) / 2
        low, high = np.quantile(finite, [tail, 1.0 - tail])
        return Interval(float(low), float(high))

    def intervals(self, draws: Floats) -> tuple[Interval, ...]:
        """One interval per column of ``[resamples, groups]`` draws."""
        return tuple(self.interval(draws[:, g]) for g in range(draws.shape[1]))


# --------------------------------------------------------------------------------------------
# Rank statistics of many resamples at once (the same definitions as core.stats)


def _rows(predicted: Sequence[float], draws: Floats) -> tuple[Floats, Floats]:
    import numpy as np

    x = np.asarray(predicted, dtype=np.float64)
    y = np.asarray(draws, dtype=np.float64)
    if y.ndim != 2 or y.shape[1] != x.size:
        raise ValueError(f"draws must be [resamples, {x.size}], got {list(y.shape)}")
    return x, y


def _chunks(resamples: int, cells_per_resample: int) -> list[slice]:
    step = max(1, _CHUNK_CELLS // max(1, cells_per_resample))
    return [slice(start, start + step) for start in range(0, resamples, step)]


def _average_ranks(values: Floats) -> Floats:
    """Average ranks along the last axis: ``smaller + (equal + 1) / 2`` (1-based, ties share)."""

    below = (values[..., None, :] < values[..., :, None]).sum(-1)
    equal = (values[..., None, :] == values[..., :, None]).sum(-1)
    ranks: Floats = below + (equal + 1) / 2.0
    return ranks


def spearman_draws(predicted: Sequence[float], draws: Floats) -> Floats:
    """Spearman's rho of ``predicted`` against each row of ``draws`` (``[resamples, groups]``).

    Rows with a NaN, fewer than two groups or no variation on either side give NaN, as
    :func:`auto_quantize_model.core.stats.spearman` does.
    """
    import numpy as np

    x, y = _rows(predicted, draws)
    out = np.full(y.shape[0], np.nan)
    if x.size < 2 or np.isnan(x).any():
        return out
    rx = _average_ranks(x)
    dx = rx - rx.mean()
    sxx = float(dx @ dx)
    if sxx == 0.0:
        return out
    for part in _chunks(y.shape[0], x.size * x.size):
        rows = y[part]
        ry = _average_ranks(rows)
        dy = ry - ry.mean(axis=1, keepdims=True)
        syy = (dy * dy).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            rho = (dy @ dx) / np.sqrt(sxx * syy)
        rho[(syy == 0.0) | np.isnan(rows).any(axis=1)] = np.nan
        out[part] = np.clip(rho, -1.0, 1.0)
    return out


def kendall_draws(predicted: Sequence[float], draws: Floats) -> Floats:
    """Kendall's τ-b of ``predicted`` against each row of ``draws``; NaN as :func:`spearman_draws`."""
    import numpy as np

    x, y = _rows(predicted, draws)
    out = np.full(y.shape[0], np.nan)
    if x.size < 2 or np.isnan(x).any():
        return out
    first, second = np.triu_indices(x.size, 1)
    pairs = first.size
    sx = np.sign(x[first] - x[second])
    untied_x = pairs - int((sx == 0).sum())
    if untied_x == 0:
        return out
    for part in _chunks(y.shape[0], pairs):
        rows = y[part]
        sy = np.sign(rows[:, first] - rows[:, second])
        untied_y = pairs - (sy == 0).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            tau = (sy @ sx) / np.sqrt(float(untied_x) * untied_y)
        tau[(untied_y == 0) | np.isnan(rows).any(axis=1)] = np.nan
        out[part] = np.clip(tau, -1.0, 1.0)
    return out


def resolved_pairs(draws: Floats, resamples: Resamples) -> tuple[int, int]:
    """``(resolved, pairs)``: pairs of groups whose difference has an interval that excludes 0.

    A resolved pair's measured order would survive another draw of captions; an unresolved
    one's is within the noise.
    """
    import numpy as np

    groups = draws.shape[1]
    first, second = np.triu_indices(groups, 1)
    resolved = 0
    for part in _chunks(groups * (groups - 1) // 2, draws.shape[0]):
        gaps = draws[:, first[part]] - draws[:, second[part]]  # [resamples, pairs of this chunk]
        if np.isnan(gaps).any():  # rare: the per-pair rule for undefined draws
            columns = [resamples.interval(gaps[:, c]) for c in range(gaps.shape[1])]
            resolved += sum(not math.isnan(i.low) and not i.contains(0.0) for i in columns)
            continue
        tail = (1.0 - resamples.confidence) / 2
        low, high = np.quantile(gaps, [tail, 1.0 - tail], axis=0)
        resolved += int(((low > 0) | (high < 0)).sum())
    return resolved, int(first.size)


# --------------------------------------------------------------------------------------------
# What the intervals say


def within_noise(names: Sequence[str], intervals: Sequence[Interval | None]) -> tuple[str, ...]:
    """Names whose interval contains 0: measured damage not distinguishable from none."""
    return tuple(
        name
        for name, interval in zip(names, intervals, strict=True)
        if interval is not None and interval.contains(0.0)
    )


UNRESOLVED_SHARE = 0.25
"""Share of pairs whose ΔNLL order is within the noise from which ΔNLL's rank agreement counts as
diluted: each such pair is a coin flip in Kendall's count (and moves Spearman's likewise)."""
_KL_REASON = (
    "KL compares the whole next-token distribution with the unquantized model's at the same "
    "positions, without the noise of the sampled targets"
)


def choose_headline(
    nll_within: int,
    groups: int,
    nll_pairs_resolved: int = 0,
    kl_pairs_resolved: int = 0,
    pairs: int = 0,
    confidence: float = CONFIDENCE,
) -> tuple[Headline, str]:
    """Which measured quantity the agreement leads with, and why, in a clause for the report.

    ΔNLL is the loss itself, so it leads unless it is below the noise floor: when most measured
    groups' ΔNLL is not distinguishable from no damage, or when at least :data:`UNRESOLVED_SHARE`
    of the pairs of groups have a ΔNLL order within the noise while KL resolves more of them.
    ΔNLL scores one sampled next token per position, so its noise comes from the text; KL
    compares the whole next-token distribution with the unquantized one at the same positions,
    so it has no target-sampling noise and no sign to get wrong.
    """
    if groups > 0 and 2 * nll_within > groups:
        return "kl", (
            f"the ΔNLL of {nll_within} of {groups} measured groups is not distinguishable from no damage "
            f"(its {confidence:.0%} interval contains 0), while {_KL_REASON}"
        )
    unresolved = pairs - nll_pairs_resolved
    if pairs > 0 and unresolved >= UNRESOLVED_SHARE * pairs and kl_pairs_resolved > nll_pairs_resolved:
        return "kl", (
            f"the ΔNLL order of {unresolved} of {pairs} pairs of measured groups is within the noise "
            f"(KL: {pairs - kl_pairs_resolved}), so ΔNLL's rank agreement is diluted by noise, while "
            f"{_KL_REASON}"
        )
    return "delta_nll", (
        f"ΔNLL is the loss itself, and it is above the noise floor: the ΔNLL of {groups - nll_within} of "
        f"{groups} measured groups is distinguishable from no damage at {confidence:.0%}"
        + (f", and the order of {nll_pairs_resolved} of {pairs} pairs is beyond the noise" if pairs else "")
    )


def listed(names: Sequence[str], limit: int = 8) -> str:
    """``a, b, c`` with at most ``limit`` names, then how many more."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def noise_sentences(
    names: Sequence[str],
    delta_nll: Sequence[float],
    nll_intervals: Sequence[Interval],
    kl_intervals: Sequence[Interval],
    confidence: float = CONFIDENCE,
) -> tuple[str, ...]:
    """What a reader must not read into the measurements (and what it may), one sentence each."""
    nll_within = within_noise(names, nll_intervals)
    sentences: list[str] = []
    if nll_within:
        sentences.append(
            f"ΔNLL of {len(nll_within)} of {len(names)} measured groups is not distinguishable from no "
            f"damage (its {confidence:.0%} interval contains 0): {listed(nll_within)}"
        )
    negative = [
        name for name, value in zip(names, delta_nll, strict=True) if value < 0 and name in nll_within
    ]
    if negative:
        sentences.append(
            f"the negative ΔNLL of {listed(negative)} is measurement noise, not an improvement: "
            "its interval reaches above 0"
        )
    improved = [name for name, interval in zip(names, nll_intervals, strict=True) if interval.high < 0]
    if improved:
        chance = (1.0 - confidence) * len(names)
        sentences.append(
            f"the ΔNLL of {listed(improved)} is below 0 beyond its interval; with {len(names)} intervals at "
            f"{confidence:.0%}, about {chance:.1f} fall outside by chance, so take it for noise unless it "
            "repeats on other text"
        )
    kl_within = within_noise(names, kl_intervals)
    if kl_within:
        sentences.append(f"the KL of {listed(kl_within)} is not distinguishable from 0")
    return tuple(sentences)
