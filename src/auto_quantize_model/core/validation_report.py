"""What validation's measurements say: the report of ValidateSensitivity.

Reads the sums the torch passes left in a :class:`~auto_quantize_model.core.validation.Measurement`
and turns them into a :class:`~auto_quantize_model.validation_records.ValidationReport`: rank agreement
between prediction and measurement, top-k overlap, additivity, bootstrap intervals over the
held-out captions and what lies within the noise (:mod:`auto_quantize_model.core.noise`), the
free proxies rated on the same draws (:mod:`auto_quantize_model.core.proxies`) and the measured
refinement. Split from :mod:`auto_quantize_model.core.validation` by job: that module decides
what to measure before the passes, this one reads their results after. Plain numbers only.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import attrs

from auto_quantize_model.core import stats
from auto_quantize_model.core.noise import (
    CONFIDENCE,
    Resamples,
    choose_headline,
    kendall_draws,
    resolved_pairs,
    spearman_draws,
    within_noise,
)
from auto_quantize_model.core.proxies import GroupInputs, rate_proxies
from auto_quantize_model.core.scores import rank_order
from auto_quantize_model.core.validation import Candidate, HeldOut, Measurement, RefinePlan, RefineSets
from auto_quantize_model.validation_records import (
    Interval,
    NoiseFloor,
    ProxyRating,
    RefinedGroup,
    Refinement,
    ValidatedGroup,
    ValidationReport,
)

if TYPE_CHECKING:
    from auto_quantize_model.core.noise import Floats

log = logging.getLogger("auto_quantize_model")


# --------------------------------------------------------------------------------------------
# Rankings


def refined_order(
    candidates: Sequence[Candidate], sets: RefineSets, kl: Mapping[str, float]
) -> tuple[tuple[Candidate, ...], tuple[str, ...]]:
    """The refined ranking and the control groups promoted into its measured block.

    The block comes first: the top N, plus every control group whose KL exceeds the smallest KL
    measured among the top N (the prediction missed it), ordered by measured KL with the
    manifest's rule (NaN first, ties in predicted order). Every other candidate follows in
    predicted order, measured controls included: an unmeasured group is never moved by a guess,
    and a measured group is only ever compared with measured ones.
    """
    top_kl = [kl[c.name] for c in sets.top if not math.isnan(kl[c.name])]
    floor = min(top_kl) if top_kl else math.inf
    promoted = tuple(c for c in sets.control if kl[c.name] > floor)
    block = sorted((*sets.top, *promoted), key=lambda c: c.rank)
    ordered = [block[i] for i in rank_order([kl[c.name] for c in block])]
    inside = {c.name for c in ordered}
    rest = [c for c in sorted(candidates, key=lambda c: c.rank) if c.name not in inside]
    return (*ordered, *rest), tuple(c.name for c in promoted)


def rank_overlap(candidates: Sequence[Candidate], measured: Sequence[float], k: int) -> float:
    """Share of the top ``k`` by predicted importance that are also top ``k`` by measured damage.

    Both sides are ordered by the manifest's rule (:func:`~auto_quantize_model.core.scores.rank_order`):
    ``candidates`` by their rank, the measured values descending with NaN first and ties in rank order.
    """
    predicted = [c.name for c in sorted(candidates, key=lambda c: c.rank)]
    by_rank = sorted(zip(candidates, measured, strict=True), key=lambda pair: pair[0].rank)
    order = rank_order([value for _, value in by_rank])
    return stats.top_k_overlap(predicted, [by_rank[i][0].name for i in order], k)


# --------------------------------------------------------------------------------------------
# The report


@attrs.frozen(eq=False)
class Bootstrapped:
    """Bootstrap draws of every group measured alone (the selection first, then the extra ones)."""

    resamples: Resamples
    delta_nll: Floats
    """``[resamples, measured groups]``."""
    kl: Floats


def bootstrap(measurement: Measurement, resamples: int, seed: int) -> tuple[Bootstrapped | None, str]:
    """Draws for every measured group from the per-caption sums; ``(None, why)`` when there are none."""
    captions = len(measurement.baseline.caption_tokens)
    if resamples <= 0:
        return None, ""
    if captions < 2:
        return None, f"no bootstrap intervals: {captions} held-out caption(s), at least 2 are needed"
    base = measurement.baseline.caption_nll
    measured = [r for _, r in measurement.measured()]
    drawn = Resamples.draw(measurement.baseline.caption_tokens, resamples, seed, CONFIDENCE)
    if not measured:
        return None, ""
    nll_sums = [[n - b for n, b in zip(r.caption_nll, base, strict=True)] for r in measured]
    kl_sums = [list(r.caption_kl) for r in measured]
    return Bootstrapped(drawn, drawn.means(nll_sums), drawn.means(kl_sums)), ""


def noise_floor(
    candidates: Sequence[Candidate],
    kl: Sequence[float],
    boot: Bootstrapped,
    k: int,
    seed: int,
    started: float,
) -> tuple[NoiseFloor, tuple[Interval, ...], tuple[Interval, ...]]:
    """The intervals of the validated groups and of their rank agreement, and the headline.

    Returns the noise floor and the ΔNLL and KL interval of each group (in ``candidates`` order).
    """
    count = len(candidates)
    resamples = boot.resamples
    nll_draws, kl_draws = boot.delta_nll[:, :count], boot.kl[:, :count]
    nll_cis, kl_cis = resamples.intervals(nll_draws), resamples.intervals(kl_draws)
    names = [c.name for c in candidates]
    predicted = [c.importance for c in candidates]
    nll_within = within_noise(names, nll_cis)
    nll_resolved, pairs = resolved_pairs(nll_draws, resamples)
    kl_resolved, _ = resolved_pairs(kl_draws, resamples)
    headline, reason = choose_headline(
        len(nll_within), count, nll_resolved, kl_resolved, pairs, resamples.confidence
    )
    floor = NoiseFloor(
        resamples=resamples.size,
        confidence=resamples.confidence,
        seed=seed,
        spearman_nll=resamples.interval(spearman_draws(predicted, nll_draws)),
        kendall_nll=resamples.interval(kendall_draws(predicted, nll_draws)),
        spearman_kl=resamples.interval(spearman_draws(predicted, kl_draws)),
        kendall_kl=resamples.interval(kendall_draws(predicted, kl_draws)),
        topk_overlap_kl=rank_overlap(candidates, kl, k),
        headline=headline,
        headline_reason=reason,
        nll_within_noise=nll_within,
        kl_within_noise=within_noise(names, kl_cis),
        pairs=pairs,
        nll_pairs_resolved=nll_resolved,
        kl_pairs_resolved=kl_resolved,
        seconds=time.perf_counter() - started,
    )
    return floor, nll_cis, kl_cis


def proxy_ratings(
    measurement: Measurement, kl: Sequence[float], delta_nll: Sequence[float], boot: Bootstrapped | None
) -> tuple[ProxyRating, ...]:
    """The free proxies of the validated groups, rated on the same measurements and resamples."""
    candidates = [c for c, _, _ in measurement.single]
    if not candidates or not (measurement.weights or measurement.activations):
        return ()
    inputs = [
        GroupInputs(c.format, measurement.weights.get(c.name, {}), measurement.activations.get(c.name))
        for c in candidates
    ]
    formats = tuple(dict.fromkeys(f for g in inputs for f in g.weights))
    count = len(candidates)
    draws = None if boot is None else (boot.kl[:, :count], boot.delta_nll[:, :count])
    return rate_proxies(
        inputs,
        formats,
        [c.importance for c in candidates],
        kl,
        delta_nll,
        draws,
        None if boot is None else boot.resamples,
    )


def refinement(
    plan: RefinePlan, measurement: Measurement, boot: Bootstrapped | None, k: int, batches: int
) -> Refinement:
    """The refined ranking (:func:`refined_order`) with its measurements, intervals and cost."""
    measured = measurement.measured()
    position = {c.name: i for i, (c, _) in enumerate(measured)}
    kl = {c.name: r.kl for c, r in measured}
    delta = {c.name: measurement.delta_nll(r) for c, r in measured}
    order, promoted = refined_order(plan.candidates, plan.sets, kl)
    label: dict[str, Literal["top", "control"]] = {c.name: "top" for c in plan.sets.top}
    label |= {c.name: "control" for c in plan.sets.control}

    def interval(name: str) -> Interval | None:
        return None if boot is None else boot.resamples.interval(boot.kl[:, position[name]])

    groups = tuple(
        RefinedGroup(
            name=c.name,
            format=c.format,
            importance=c.importance,
            predicted_rank=c.rank,
            refined_rank=place,
            measured=label.get(c.name, ""),
            kl_div=kl[c.name] if c.name in label else math.nan,
            kl_ci=interval(c.name) if c.name in label else None,
            delta_nll=delta[c.name] if c.name in label else math.nan,
        )
        for place, c in enumerate(order, start=1)
    )
    block = [c.name for c in order[: len(plan.sets.top) + len(promoted)]]
    resolved = 0
    if boot is not None:
        for a, b in itertools.pairwise(block):
            gap = boot.resamples.interval(boot.kl[:, position[a]] - boot.kl[:, position[b]])
            resolved += not math.isnan(gap.low) and not gap.contains(0.0)
    predicted_top = [c.name for c in sorted(plan.candidates, key=lambda c: c.rank)[:k]]
    refined_top = [c.name for c in order[:k]]
    top = plan.sets.top
    return Refinement(
        n=len(top),
        groups=groups,
        k=k,
        entered=tuple(name for name in refined_top if name not in predicted_top),
        left=tuple(name for name in predicted_top if name not in refined_top),
        promoted=promoted,
        spearman_top_kl=stats.spearman([c.importance for c in top], [kl[c.name] for c in top]),
        seconds=measurement.extra_seconds,
        passes=len(measurement.extra),
        forward_batches=len(measurement.extra) * batches,
        reused=len(top) + len(plan.sets.control) - len(measurement.extra),
        neighbours=max(len(block) - 1, 0),
        neighbours_resolved=resolved,
    )


def validation_report(
    measurement: Measurement,
    held_out: HeldOut,
    k: int,
    notes: Sequence[str],
    seconds: float,
    *,
    resamples: int = 0,
    seed: int = 0,
    refine: RefinePlan | None = None,
    batches: int = 0,
) -> ValidationReport:
    """The report: rank agreement, top-k overlap, additivity, and every note on what fell short.

    With ``resamples`` > 0, every measured figure gets a bootstrap interval over the held-out
    captions (seeded by ``seed``) and the report says what lies within the noise and which
    measure leads; the proxies are rated when the measurement recorded them; ``refine`` adds
    the measured refinement (``batches``: held-out batches per pass, for its cost).
    """
    candidates = [c for c, _, _ in measurement.single]
    predicted = [c.importance for c in candidates]
    delta_nll = [measurement.delta_nll(r) for _, _, r in measurement.single]
    kl = [r.kl for _, _, r in measurement.single]
    notes = list(notes)
    if not measurement.restored:
        notes.append("the model did not come back bit-exactly after validation")
    correlations: dict[str, float] = {}
    for what, ys, measure_ in (
        ("Spearman(score, dNLL)", delta_nll, stats.spearman),
        ("Kendall(score, dNLL)", delta_nll, stats.kendall_tau_b),
        ("Spearman(score, KL)", kl, stats.spearman),
        ("Kendall(score, KL)", kl, stats.kendall_tau_b),
    ):
        correlations[what] = measure_(predicted, ys)
        why = stats.nan_reason(predicted, ys, correlations[what])
        if why:
            notes.append(f"{what} is NaN: {why}")
    top = {c.name for c, label, _ in measurement.single if label == "top"}
    joint = measurement.joint
    k_used = min(k, len(candidates))

    started = time.perf_counter()
    boot, why_not = bootstrap(measurement, resamples, seed)
    if why_not:
        notes.append(why_not)
    noise: NoiseFloor | None = None
    nll_cis: Sequence[Interval | None] = [None] * len(candidates)
    kl_cis: Sequence[Interval | None] = [None] * len(candidates)
    if boot is not None and candidates:
        noise, nll_cis, kl_cis = noise_floor(candidates, kl, boot, k_used, seed, started)
        log.info(
            "validation noise floor: %d resamples in %.2f s; ΔNLL within the noise for %d of %d groups, "
            "headline %s",
            noise.resamples,
            noise.seconds,
            len(noise.nll_within_noise),
            len(candidates),
            "KL" if noise.headline == "kl" else "dNLL",
        )
    started = time.perf_counter()
    proxies = proxy_ratings(measurement, kl, delta_nll, boot)
    if proxies:
        log.info(
            "validation proxies: %d rated in %.2f s (%.2f s measuring weight errors)",
            len(proxies),
            time.perf_counter() - started,
            measurement.proxy_seconds,
        )
    refined = None if refine is None else refinement(refine, measurement, boot, k_used, batches)
    return ValidationReport(
        groups=tuple(
            ValidatedGroup(
                name=c.name,
                format=c.format,
                score=c.importance,
                selection=label,
                delta_nll=d,
                kl_div=q,
                rank=c.rank,
                delta_nll_ci=nll_ci,
                kl_ci=kl_ci,
            )
            for (c, label, _), d, q, nll_ci, kl_ci in zip(
                measurement.single, delta_nll, kl, nll_cis, kl_cis, strict=True
            )
        ),
        baseline_nll=measurement.baseline.nll,
        spearman_nll=correlations["Spearman(score, dNLL)"],
        kendall_nll=correlations["Kendall(score, dNLL)"],
        spearman_kl=correlations["Spearman(score, KL)"],
        kendall_kl=correlations["Kendall(score, KL)"],
        topk_overlap=rank_overlap(candidates, delta_nll, k_used),
        k=k_used,
        joint_delta_nll=measurement.delta_nll(joint) if joint is not None else math.nan,
        sum_delta_nll=(
            math.fsum(d for c, d in zip(candidates, delta_nll, strict=True) if c.name in top)
            if joint is not None
            else math.nan
        ),
        holdout_samples=len(held_out.token_lists),
        holdout_tokens=measurement.baseline.tokens,
        seconds=seconds,
        restored_exactly=measurement.restored,
        chosen_delta_nll=measurement.delta_nll(measurement.chosen),
        holdout_source=held_out.source,
        holdout_excluded=held_out.skipped,
        notes=tuple(notes),
        noise=noise,
        proxies=proxies,
        refinement=refined,
        last_position=measurement.last_position,
    )
