"""From a mix's predicted score to its predicted held-out damage, and the cheapest mix under a bound.

Users think "I accept this much loss", not "give me 9.25 effective bits". The frontier predicts a
score per mix (the sum of its groups' search scores) and ``aqm frontier --measure`` measures a few
mixes' KL to the unquantized model on held-out captions; this module turns those pairs into a
damage model and answers "the fewest bits whose predicted KL stays within K".

**The model: KL proportional to the score, with a multiplicative error.** For each measured mix,
``r = KL / score``; the fit is the mean and spread of ``ln r`` over the points, so a prediction is
``KL(s) = s * exp(mean ln r)`` with a Student-t prediction interval
``s * exp(mean ln r +- t(n-1) * sd(ln r) * sqrt(1 + 1/n))``. Why this shape:

* both sides measure the same thing to second order. The gradient score is a Fisher-diagonal
  estimate of the loss change a format's weight error causes, and the KL of a small perturbation
  is half its Fisher quadratic form; kl_div scores are KL sums outright. The leading term is
  therefore proportional, through the origin: a mix that quantizes nothing (score 0) has KL 0;
* it is monotone for any fit (a positive factor), so ranking mixes by predicted KL never
  contradicts ranking them by score, which the frontier solver already optimises;
* it has one parameter, so two measured mixes already give an interval (with ``--measure 3``,
  two degrees of freedom are left for the spread), where a free log-log slope would spend one
  of the few points on the exponent. The slope is still computed as a check
  (:attr:`DamageModel.slope`): a value well above 1 means KL grows faster than the summed score
  (the validation's additivity gap, see :class:`Additivity`), and the ratios' spread, hence the
  interval, widens with it;
* errors are multiplicative: KL spans orders of magnitude along a frontier, and a fixed
  relative error is what a proportional law with noise in the factor gives.

ΔNLL uses the same ratio model in linear space (its points can be zero or negative within the
noise, so no logarithm): ``s * (mean r +- t * sd(r) * sqrt(1 + 1/n))``.

Predictions above the largest measured score are extrapolation: the interval is not trusted
there, so :func:`choose_under_bound` never certifies such a mix, and refuses a bound that only
such a mix would meet. Plain data in and out: no torch, no model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs

from auto_quantize_model.artifacts import MeasuredFrontier, MeasuredPoint
from auto_quantize_model.core.frontier_points import measured_frontier
from auto_quantize_model.core.scores import NO_QUANT
from auto_quantize_model.errors import ConfigError, InputError
from auto_quantize_model.frontier_records import FrontierPoint
from auto_quantize_model.validation_records import ValidationReport

LEVEL = 0.95
"""Two-sided level of the prediction intervals."""

MIN_POINTS = 2
"""Measured mixes the fit needs: one for the factor, one more for its spread."""

_SAME = 1e-9
"""Relative tolerance for "the same score" (the solver's sums of the same scores)."""


# --------------------------------------------------------------------------------------------------
# Student's t
# --------------------------------------------------------------------------------------------------


def _central_mass(t: float, dof: int) -> float:
    """P(|T| < t) for Student's t with an integer ``dof``, in closed form.

    The finite series in sin and cos of ``atan(t / sqrt(dof))`` (Abramowitz & Stegun 26.7.3
    and 26.7.4), exact for whole degrees of freedom, which is all a count of points gives.
    """
    theta = math.atan(t / math.sqrt(dof))
    sin, cos = math.sin(theta), math.cos(theta)
    if dof % 2 == 0:
        term = total = 1.0
        for k in range(1, dof // 2):
            term *= cos * cos * (2 * k - 1) / (2 * k)
            total += term
        return sin * total
    if dof == 1:
        return 2.0 * theta / math.pi
    term = total = cos
    for k in range(1, (dof - 1) // 2):
        term *= cos * cos * (2 * k) / (2 * k + 1)
        total += term
    return 2.0 / math.pi * (theta + sin * total)


def t_quantile(dof: int, level: float = LEVEL) -> float:
    """The ``t`` with P(|T| < t) = ``level`` for ``dof`` degrees of freedom (12.706 for 1 at 95%).

    Bisection on the closed-form mass to 1e-12: no scipy in the pure core.
    """
    if dof < 1:
        raise ValueError(f"Student's t needs at least one degree of freedom, got {dof}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    low, high = 0.0, 1.0
    while _central_mass(high, dof) < level:
        low, high = high, high * 2.0
    while high - low > 1e-12 * max(1.0, high):
        middle = (low + high) / 2.0
        if _central_mass(middle, dof) < level:
            low = middle
        else:
            high = middle
    return (low + high) / 2.0


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


@attrs.frozen
class Prediction:
    """A predicted damage and its prediction interval (:data:`LEVEL`)."""

    central: float
    low: float
    high: float

    def text(self) -> str:
        return f"{self.central:.3g} [{self.low:.3g}, {self.high:.3g}]"


@attrs.frozen
class Additivity:
    """The validation's check: the top ``k`` groups quantized together vs the sum of their singles.

    A mix's predicted score is a sum of single-group scores, so a joint damage above the summed
    singles is what a summed prediction misses. The damage model is fitted on whole mixes and so
    carries the gap in its factor; this says how large the gap was where it was measured.
    """

    k: int
    joint_delta_nll: float
    sum_delta_nll: float

    @property
    def gap(self) -> float:
        """Joint over summed, minus 1 (0.09: 9% above additive); NaN when the sum is not positive."""
        if not self.sum_delta_nll > 0.0 or not math.isfinite(self.joint_delta_nll):
            return math.nan
        return self.joint_delta_nll / self.sum_delta_nll - 1.0

    def text(self) -> str:
        gap = self.gap
        share = f" ({gap:+.0%} against additive)" if math.isfinite(gap) else ""
        return (
            f"the validation quantized its top {self.k} groups together: joint ΔNLL "
            f"{self.joint_delta_nll:.4g} vs {self.sum_delta_nll:.4g} summed over the singles{share}"
        )


def additivity_of(report: ValidationReport | None) -> Additivity | None:
    """The validation's joint-vs-summed check, when it ran (``validate.additivity``) and is finite."""
    if report is None or not math.isfinite(report.joint_delta_nll) or not math.isfinite(report.sum_delta_nll):
        return None
    return Additivity(report.k, report.joint_delta_nll, report.sum_delta_nll)


@attrs.frozen
class DamageModel:
    """Predicted held-out KL and ΔNLL of a mix from its predicted score (see the module docstring)."""

    points: tuple[MeasuredPoint, ...]
    """The measured mixes fitted, budgets ascending."""
    log_ratio: float
    """Mean of ln(KL / score) over :attr:`points`."""
    log_ratio_sd: float
    """Sample standard deviation of ln(KL / score)."""
    nll_ratio: float
    """Mean of ΔNLL / score."""
    nll_ratio_sd: float
    t: float
    """Student's t at :attr:`level` with ``len(points) - 1`` degrees of freedom."""
    level: float
    max_score: float
    """The largest measured score: above it a prediction is extrapolation."""
    slope: float
    """Least-squares slope of ln KL on ln score (1 for an exactly proportional law); NaN when the
    measured scores do not differ."""
    additivity: Additivity | None = None
    left_out: tuple[str, ...] = ()
    """Measured points not fitted and why (a score or KL that is not positive), one sentence each."""

    @property
    def factor(self) -> float:
        """KL per unit of score at the centre of the fit."""
        return math.exp(self.log_ratio)

    @property
    def _spread(self) -> float:
        return self.t * math.sqrt(1.0 + 1.0 / len(self.points))

    def kl(self, score: float) -> Prediction:
        """Predicted KL of a mix whose predicted score is ``score`` (0 for a score of 0)."""
        if score <= 0.0:
            return Prediction(0.0, 0.0, 0.0)
        half = self._spread * self.log_ratio_sd
        return Prediction(
            score * math.exp(self.log_ratio),
            score * math.exp(self.log_ratio - half),
            score * math.exp(self.log_ratio + half),
        )

    def delta_nll(self, score: float) -> Prediction:
        """Predicted ΔNLL (nats per held-out token) of a mix whose predicted score is ``score``."""
        if score <= 0.0:
            return Prediction(0.0, 0.0, 0.0)
        half = self._spread * self.nll_ratio_sd
        return Prediction(
            score * self.nll_ratio, score * (self.nll_ratio - half), score * (self.nll_ratio + half)
        )

    def within_data(self, score: float) -> bool:
        """Whether ``score`` is at most the largest measured one (no extrapolation)."""
        return score <= self.max_score * (1.0 + _SAME)

    def lines(self) -> tuple[str, ...]:
        """The model in words, for reports and logs."""
        n = len(self.points)
        lines = [
            f"KL = score x {self.factor:.4g} (geometric mean of KL/score over {n} measured mix(es)); "
            f"{self.level:.0%} prediction interval x/÷ {math.exp(self._spread * self.log_ratio_sd):.3g} "
            f"(t = {self.t:.3f}, {n - 1} degree(s) of freedom, sd of ln(KL/score) "
            f"{self.log_ratio_sd:.3g})",
            f"ΔNLL = score x {self.nll_ratio:.4g} ± {self._spread * self.nll_ratio_sd:.3g} "
            "(mean and spread of ΔNLL/score)",
            f"predictions above the largest measured score ({self.max_score:.4g}) are extrapolation "
            "and never certify a bound",
        ]
        if math.isfinite(self.slope):
            lines.append(
                f"check: ln KL against ln score has slope {self.slope:.3f} over the points (1 is "
                "exactly proportional; above 1, damage grows faster than the summed score)"
            )
        if self.additivity is not None:
            lines.append(f"additivity: {self.additivity.text()}")
        return (*lines, *self.left_out)


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    mean = math.fsum(values) / len(values)
    variance = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance)


def _slope(x: Sequence[float], y: Sequence[float]) -> float:
    mean_x, mean_y = math.fsum(x) / len(x), math.fsum(y) / len(y)
    sxx = math.fsum((v - mean_x) ** 2 for v in x)
    if sxx <= 0.0:
        return math.nan
    return math.fsum((a - mean_x) * (b - mean_y) for a, b in zip(x, y, strict=True)) / sxx


def fit_damage(
    points: Sequence[MeasuredPoint], *, additivity: Additivity | None = None, level: float = LEVEL
) -> DamageModel:
    """The damage model of measured mixes; InputError when fewer than :data:`MIN_POINTS` can be fitted.

    A point is fitted when its predicted score and measured KL are finite and positive (a mix
    with no damage measured says nothing about the factor); the others are listed in
    :attr:`DamageModel.left_out`. Points of the same mix (equal score and bits) count once.
    """
    used: list[MeasuredPoint] = []
    left_out: list[str] = []
    seen: set[tuple[float, float]] = set()
    for point in sorted(points, key=lambda p: p.budget):
        key = (point.effective_bits_lm, point.predicted_score)
        if key in seen:
            continue
        seen.add(key)
        usable = (
            math.isfinite(point.predicted_score)
            and point.predicted_score > 0.0
            and math.isfinite(point.kl_div)
            and point.kl_div > 0.0
            and math.isfinite(point.delta_nll)
        )
        if usable:
            used.append(point)
        else:
            left_out.append(
                f"the point at {point.budget:g} bits is not fitted: predicted score "
                f"{point.predicted_score:.4g}, KL {point.kl_div:.4g}, ΔNLL {point.delta_nll:.4g} "
                "(the fit needs a positive score and KL)"
            )
    if len(used) < MIN_POINTS:
        raise InputError(
            f"{len(used)} measured mix(es) with a positive score and KL; the damage model needs at "
            f"least {MIN_POINTS}"
        )
    log_score = [math.log(p.predicted_score) for p in used]
    log_kl = [math.log(p.kl_div) for p in used]
    log_ratio, log_sd = _mean_sd([k - s for k, s in zip(log_kl, log_score, strict=True)])
    nll_ratio, nll_sd = _mean_sd([p.delta_nll / p.predicted_score for p in used])
    return DamageModel(
        points=tuple(used),
        log_ratio=log_ratio,
        log_ratio_sd=log_sd,
        nll_ratio=nll_ratio,
        nll_ratio_sd=nll_sd,
        t=t_quantile(len(used) - 1, level),
        level=level,
        max_score=max(p.predicted_score for p in used),
        slope=_slope(log_score, log_kl),
        additivity=additivity,
        left_out=tuple(left_out),
    )


def fit_or_why(
    measured: MeasuredFrontier | None, additivity: Additivity | None = None
) -> tuple[DamageModel | None, tuple[str, ...]]:
    """:func:`fit_damage` for reports: the model, or None and the reason (none when nothing was measured)."""
    if measured is None or not measured.points:
        return None, ()
    try:
        return fit_damage(measured.points, additivity=additivity), ()
    except InputError as err:
        return None, (f"no damage model: {err}",)


# --------------------------------------------------------------------------------------------------
# The cheapest mix under a bound
# --------------------------------------------------------------------------------------------------


def quantizes(point: FrontierPoint) -> bool:
    """The point's mix quantizes at least one group (the all-``NONE`` mix is no answer)."""
    return any(fmt != NO_QUANT for fmt in point.formats)


@attrs.frozen
class BoundChoice:
    """The cheapest frontier mix whose predicted KL (upper end of the interval) is within the bound."""

    bound: float
    point: FrontierPoint
    kl: Prediction
    delta_nll: Prediction
    cheaper: FrontierPoint | None
    """The next cheaper candidate mix (fewer LM bits), which the bound excludes; None at the cheapest."""
    cheaper_kl: Prediction | None
    measured_kl: float | None = None
    """The chosen mix's KL measured after the choice (``--measure``); None when not measured."""
    measured_delta_nll: float | None = None

    @property
    def held(self) -> bool | None:
        """The measured KL is within the bound; None when not measured."""
        return None if self.measured_kl is None else self.measured_kl <= self.bound

    @property
    def in_interval(self) -> bool | None:
        """The measured KL lies in the prediction interval; None when not measured."""
        if self.measured_kl is None:
            return None
        return self.kl.low <= self.measured_kl <= self.kl.high

    def lines(self) -> tuple[str, ...]:
        """The answer in words: the mix, its prediction, what excluded the next cheaper mix, the check."""
        point = self.point
        lines = [
            f"max KL {self.bound:.4g}: the mix at the {point.budget:g}-bit budget "
            f"({point.effective_bits_lm:.3f} LM bits, predicted score {point.total_score:.4g}) "
            f"predicts KL {self.kl.text()}, "
            f"ΔNLL {self.delta_nll.text()}; the upper end {self.kl.high:.4g} is within the bound"
        ]
        if self.cheaper is not None and self.cheaper_kl is not None:
            lines.append(
                f"the next cheaper mix ({self.cheaper.effective_bits_lm:.3f} LM bits) predicts KL "
                f"{self.cheaper_kl.text()}: its upper end is above the bound"
            )
        else:
            lines.append("it is the cheapest mix among the budgets solved")
        if self.measured_kl is not None:
            verdict = "the bound held" if self.held else "the bound did NOT hold"
            inside = "inside" if self.in_interval else "OUTSIDE"
            nll = f", ΔNLL {self.measured_delta_nll:.4g}" if self.measured_delta_nll is not None else ""
            lines.append(
                f"measured: KL {self.measured_kl:.4g}{nll}: {verdict} ({inside} the predicted interval)"
            )
        return tuple(lines)


def choose_under_bound(points: Sequence[FrontierPoint], model: DamageModel, bound: float) -> BoundChoice:
    """The cheapest mix of ``points`` (fewest LM effective bits) whose predicted KL's upper end is
    at most ``bound``.

    The upper end, not the centre: the user states the damage they accept, and the centre
    would exceed it for about half of the mixes chosen; with the upper end of the
    :data:`LEVEL` interval, under the model, a chosen mix exceeds it 2.5% of the time. Only
    reachable points that quantize something are candidates. Refused with a ConfigError of one
    line: a bound not above zero; a bound below the prediction of even the least-quantized
    candidate; a bound met by a cheaper mix beyond the measured scores only (extrapolation:
    measure cheaper mixes first). An InputError when no point is a candidate.
    """
    if not math.isfinite(bound) or bound <= 0.0:
        raise ConfigError(f"the KL bound must be a positive number, got {bound:g}")
    candidates = sorted(
        (p for p in points if p.reachable and quantizes(p) and math.isfinite(p.total_score)),
        key=lambda p: (p.effective_bits_lm, p.total_score),
    )
    if not candidates:
        raise InputError("no solved budget gives a reachable mix that quantizes anything")
    least = min(candidates, key=lambda p: (model.kl(p.total_score).high, -p.effective_bits_lm))
    least_kl = model.kl(least.total_score)
    if least_kl.high > bound:
        raise ConfigError(
            f"KL bound {bound:.4g} is below what even the least-quantized mix predicts "
            f"({least.effective_bits_lm:.3f} LM bits: KL {least_kl.text()}); raise the bound or solve "
            "budgets closer to 16"
        )
    admitted = [
        p for p in candidates if model.within_data(p.total_score) and model.kl(p.total_score).high <= bound
    ]
    chosen = admitted[0] if admitted else None
    beyond = [
        p
        for p in candidates
        if not model.within_data(p.total_score)
        and model.kl(p.total_score).high <= bound
        and (chosen is None or p.effective_bits_lm < chosen.effective_bits_lm)
    ]
    if beyond:
        top = model.kl(model.max_score).high
        lower = f" or lower the bound to {top:.4g}" if chosen is not None else ""
        raise ConfigError(
            f"KL bound {bound:.4g} reaches beyond the measured data: the mix at "
            f"{beyond[0].effective_bits_lm:.3f} LM bits has predicted score {beyond[0].total_score:.4g}, "
            f"above the largest measured one ({model.max_score:.4g}, KL upper end {top:.4g}); measure "
            f"cheaper mixes first{lower}"
        )
    assert chosen is not None  # the least-quantized mix meets the bound, within the data or beyond
    index = candidates.index(chosen)
    cheaper = candidates[index - 1] if index > 0 else None
    return BoundChoice(
        bound=bound,
        point=chosen,
        kl=model.kl(chosen.total_score),
        delta_nll=model.delta_nll(chosen.total_score),
        cheaper=cheaper,
        cheaper_kl=model.kl(cheaper.total_score) if cheaper is not None else None,
    )


def same_mix(point: MeasuredPoint, chosen: FrontierPoint) -> bool:
    """A measured point is the chosen mix: the same LM bits and predicted score (to summation noise)."""
    return math.isclose(point.effective_bits_lm, chosen.effective_bits_lm, rel_tol=_SAME) and math.isclose(
        point.predicted_score, chosen.total_score, rel_tol=_SAME
    )


def with_measurement(choice: BoundChoice, measured: Sequence[MeasuredPoint]) -> BoundChoice:
    """``choice`` with the measured KL and ΔNLL of its mix, when ``measured`` holds it."""
    for point in measured:
        if same_mix(point, choice.point):
            return attrs.evolve(choice, measured_kl=point.kl_div, measured_delta_nll=point.delta_nll)
    return choice


# --------------------------------------------------------------------------------------------------
# Measured points kept from earlier measurements
# --------------------------------------------------------------------------------------------------


def same_held_out(a: MeasuredFrontier, b: MeasuredFrontier) -> bool:
    """Two measurements used the same held-out text, so their points can be fitted together.

    The same captions source, caption and token counts, and the unquantized model's NLL on them
    equal to 1e-6 relative (the same model measured twice; CPU and GPU runs differ beyond that).
    """
    return (
        a.holdout_source == b.holdout_source
        and a.holdout_samples == b.holdout_samples
        and a.holdout_tokens == b.holdout_tokens
        and math.isclose(a.baseline_nll, b.baseline_nll, rel_tol=1e-6)
    )


def merge_measured(earlier: MeasuredFrontier, later: MeasuredFrontier) -> MeasuredFrontier:
    """``later``'s points plus those of ``earlier`` whose mix ``later`` did not measure again.

    Only when both used the same held-out text (:func:`same_held_out`); otherwise ``later``
    alone, with a note saying what was left out. Rank correlations and flags are recomputed
    over the merged points; the figures of the measurement itself (baseline, held-out counts,
    time) stay ``later``'s.
    """
    if not same_held_out(earlier, later):
        return attrs.evolve(
            later,
            notes=(
                *later.notes,
                f"{len(earlier.points)} earlier measured point(s) were left out: they used other held-out "
                f"text or model (baseline NLL {earlier.baseline_nll:.6f} on {earlier.holdout_tokens} tokens)",
            ),
        )
    kept = [
        p
        for p in earlier.points
        if not any(
            math.isclose(p.effective_bits_lm, q.effective_bits_lm, rel_tol=_SAME)
            and math.isclose(p.predicted_score, q.predicted_score, rel_tol=_SAME)
            for q in later.points
        )
    ]
    if not kept:
        return later
    notes = [n for n in later.notes if not n.startswith("Spearman(")]
    notes.append(f"{len(kept)} point(s) measured earlier on the same held-out text are kept beside these")
    return measured_frontier(
        (*later.points, *kept),
        baseline_nll=later.baseline_nll,
        chosen_delta_nll=later.chosen_delta_nll,
        holdout_samples=later.holdout_samples,
        holdout_tokens=later.holdout_tokens,
        holdout_source=later.holdout_source,
        restored_exactly=later.restored_exactly and earlier.restored_exactly,
        seconds=later.seconds,
        notes=notes,
    )
