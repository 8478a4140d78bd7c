"""What validation measured: damage per group on held-out captions, and how far it can be trusted.

:class:`ValidationReport` is the artifact ValidateSensitivity produces and BuildManifest reads;
the other classes are its parts, and :class:`LastPosition` is also what a measured frontier
point (:class:`~auto_quantize_model.artifacts.MeasuredPoint`) carries. Nouns, below every layer:
core computes them (:mod:`auto_quantize_model.core.validation_report`,
:mod:`auto_quantize_model.core.noise`, :mod:`auto_quantize_model.core.proxies`), the manifest
stores them and render draws them.

Why a module of their own: a report, its intervals, proxy ratings and refinement form one tree
that no other artifact is built from, so it reads whole here and no record is cut from its parts;
:mod:`auto_quantize_model.artifacts` (the stage contract) then stays under the house limit of
600 lines, and names this module for ValidateSensitivity's product.
"""

from __future__ import annotations

import math
from typing import Literal

import attrs


@attrs.frozen
class Interval:
    """A bootstrap confidence interval (percentile method); NaN ends when it could not be computed."""

    low: float
    high: float

    def contains(self, value: float) -> bool:
        """False for a NaN interval: an interval that could not be computed says nothing."""
        return self.low <= value <= self.high


@attrs.frozen
class NoiseFloor:
    """How far validation's figures can be trusted: a bootstrap over the held-out captions.

    Each resample draws the captions with replacement and recomputes every figure from the
    per-caption sums, so all intervals come from the same resamples. Which measured differences
    lie within the noise is recorded by name, and the headline measure follows from it.
    """

    resamples: int
    confidence: float
    """Coverage of every interval, e.g. 0.95."""
    seed: int
    spearman_nll: Interval
    kendall_nll: Interval
    spearman_kl: Interval
    kendall_kl: Interval
    topk_overlap_kl: float
    """The top-k overlap with groups ordered by measured KL (``topk_overlap`` orders by ΔNLL)."""
    headline: Literal["kl", "delta_nll"]
    """The measured quantity whose agreement the report leads with."""
    headline_reason: str
    nll_within_noise: tuple[str, ...]
    """Groups whose ΔNLL interval contains 0: not distinguishable from no damage."""
    kl_within_noise: tuple[str, ...]
    """Groups whose KL interval reaches down to 0."""
    pairs: int
    """Pairs of validated groups."""
    nll_pairs_resolved: int
    """Pairs whose ΔNLL difference has an interval excluding 0: their measured order is real."""
    kl_pairs_resolved: int
    seconds: float


@attrs.frozen
class ProxyRating:
    """A free predictor of damage rated against the same measurements as AutoQuant's scores."""

    name: str
    """What the proxy computes, e.g. ``‖W - Q(W)‖ / ‖W‖ (INT8_DEFAULT_CFG)``."""
    values: tuple[float, ...]
    """One per validated group, in :attr:`ValidationReport.groups` order; NaN where undefined."""
    groups: int
    """Groups with a finite value: the ones the correlations use."""
    spearman_kl: float
    spearman_kl_ci: Interval
    spearman_nll: float
    spearman_nll_ci: Interval
    autoquant_lead_kl: Interval
    """Spearman(AutoQuant score, KL) minus Spearman(proxy, KL) on the same groups and resamples:
    above 0 throughout, AutoQuant ranks the measured damage better than this proxy."""


@attrs.frozen
class RefinedGroup:
    """One group of the refined ranking: its predicted place, its new place, its measurement."""

    name: str
    format: str
    importance: float
    predicted_rank: int
    """Rank in the manifest (over every scored group)."""
    refined_rank: int
    """Place in the refined ranking (1 = most sensitive, over the validated candidates)."""
    measured: Literal["top", "control", ""]
    """``top``: among the top-N predicted; ``control``: drawn from the rest; ``""``: not measured."""
    kl_div: float = math.nan
    kl_ci: Interval | None = None
    delta_nll: float = math.nan


@attrs.frozen
class Refinement:
    """The ranking with the top-N predicted groups reordered by their measured single-group KL."""

    n: int
    """``validate.refine``: how many top predicted groups were measured (fewer when there are fewer)."""
    groups: tuple[RefinedGroup, ...]
    """Every candidate group, in refined order."""
    k: int
    """The top-k compared (``validate.k``)."""
    entered: tuple[str, ...]
    """Groups in the refined top-k that the predicted top-k lacks."""
    left: tuple[str, ...]
    """Groups of the predicted top-k that the refined top-k lacks."""
    promoted: tuple[str, ...]
    """Control groups that measured above the least damaging of the top N: the prediction missed them."""
    spearman_top_kl: float
    """How well the predicted order matches measured KL within the top N."""
    seconds: float
    """Wall time of the passes only refinement needed (groups the validation measured anyway are reused)."""
    passes: int
    """Single-group passes over the held-out captions that only refinement needed."""
    forward_batches: int
    """Forward calls of those passes (passes x held-out batches)."""
    reused: int
    """Measured groups refinement took from the validation's own passes."""
    neighbours: int = 0
    """Neighbouring pairs in the measured block at the top of :attr:`groups`."""
    neighbours_resolved: int = 0
    """Of those, pairs whose KL difference has a bootstrap interval excluding 0: their refined order
    is beyond the noise (0 without a bootstrap)."""


@attrs.frozen
class ValidatedGroup:
    """Measured damage of quantizing one recipe group alone."""

    name: str
    format: str
    score: float
    selection: Literal["top", "bottom", "random"]
    delta_nll: float
    kl_div: float
    rank: int = 0
    """Predicted rank among every scored group (1 = most sensitive); 0 when unknown."""
    delta_nll_ci: Interval | None = None
    """Bootstrap interval of :attr:`delta_nll` over the held-out captions; None when not computed."""
    kl_ci: Interval | None = None


@attrs.frozen
class LastPosition:
    """Damage where a deployed model generates: at each held-out caption's last real token.

    ΔNLL and KL average over the positions whose next token is in the caption; the last one has
    none, yet every generated token is computed from exactly there (and a static activation scale
    fitted without it clips there). Compared with the same 16-bit model on the same captions
    (:mod:`auto_quantize_model.core.last_position` defines each figure).
    """

    captions: int
    kl: float
    """Mean over the captions of KL(16-bit || quantized) of the next token after the caption."""
    top1: float
    """Share of the captions whose most likely next token is the 16-bit model's."""
    greedy_tokens: int = 0
    """Tokens generated greedily after each caption; 0: no generation check."""
    greedy_captions: int = 0
    greedy_agreement: float = math.nan
    """Mean share of the generated tokens that come before the first one differing from the 16-bit
    model's: 1.0 is the same text throughout, 0.0 a different first token."""
    greedy_identical: float = math.nan
    """Share of the captions continued exactly as the 16-bit model continues them."""


@attrs.frozen
class ValidationReport:
    """How well the predicted ranking matches measured damage on held-out captions."""

    groups: tuple[ValidatedGroup, ...]
    baseline_nll: float
    spearman_nll: float
    kendall_nll: float
    spearman_kl: float
    kendall_kl: float
    topk_overlap: float
    k: int
    joint_delta_nll: float
    sum_delta_nll: float
    holdout_samples: int
    holdout_tokens: int
    seconds: float
    restored_exactly: bool
    chosen_delta_nll: float = math.nan
    """ΔNLL of the mix AutoQuant chose (every group on its best format) vs the baseline."""
    holdout_source: str = ""
    """The captions file the held-out text came from."""
    holdout_excluded: int = 0
    """Captions of that file skipped because calibration used them."""
    notes: tuple[str, ...] = ()
    """Why a figure is NaN, groups left out, reconstructed weights: one sentence each."""
    noise: NoiseFloor | None = None
    """Intervals and the headline measure; None when the bootstrap was off (``validate.bootstrap = 0``)."""
    proxies: tuple[ProxyRating, ...] = ()
    """Free predictors rated against the same measured damage."""
    refinement: Refinement | None = None
    """The measured refinement (``validate.refine``); None when off."""
    unmet: tuple[str, ...] = ()
    """``[validate]`` settings that could not be honoured as written (``k`` beyond the groups,
    ``holdout_samples`` beyond the text), one sentence each: the report lists them with the run's
    warnings, ahead of the ranking, and not again among :attr:`notes`."""
    last_position: LastPosition | None = None
    """AutoQuant's chosen mix at the captions' last positions; None before aqm measured it."""
