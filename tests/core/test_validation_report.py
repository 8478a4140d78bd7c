"""Validation's own reliability on synthetic measurements: intervals, headline, proxies, refinement.

The measurement is built by hand (per-caption sums of known groups), so every figure of the
report can be checked without a model; the stage on a real tiny model is in
stages/test_validate_sensitivity.py.
"""

from __future__ import annotations

import math
import random
from typing import Any, cast

import pytest

from auto_quantize_model.backend.measure import PassResult
from auto_quantize_model.core.proxies import ActivationStats, WeightStats
from auto_quantize_model.core.validation import (
    Candidate,
    GroupSelection,
    HeldOut,
    Measurement,
    RefinePlan,
    RefineSets,
    refine_sets,
)
from auto_quantize_model.core.validation_report import refined_order, validation_report

CAPTIONS = 24
INT8 = "INT8_DEFAULT_CFG"


def candidates(n: int) -> tuple[Candidate, ...]:
    """``g1`` .. ``gn`` with ranks 1 .. n and importance n .. 1."""
    return tuple(Candidate(f"g{r}", INT8, float(n + 1 - r), r) for r in range(1, n + 1))


def test_refine_sets_take_the_top_and_a_seeded_control_set_from_the_rest() -> None:
    ranked = candidates(20)
    sets = refine_sets(ranked, 4, seed=1)
    assert [c.rank for c in sets.top] == [1, 2, 3, 4]
    assert len(sets.control) == 4
    assert all(c.rank > 4 for c in sets.control)
    assert [c.rank for c in sets.control] == sorted(c.rank for c in sets.control)
    assert refine_sets(ranked, 4, seed=1) == sets
    assert len({tuple(c.rank for c in refine_sets(ranked, 4, seed=s).control) for s in range(8)}) > 1
    short = refine_sets(candidates(5), 4, seed=0)
    assert (len(short.top), len(short.control)) == (4, 1)
    assert refine_sets(candidates(3), 0, seed=0) == RefineSets((), ())


def test_refine_sets_reuse_what_the_selection_measures() -> None:
    ranked = candidates(10)
    selection = GroupSelection(top=ranked[:2], bottom=ranked[8:], random=(ranked[5],))
    sets = RefineSets(top=ranked[:3], control=(ranked[5], ranked[6]))
    assert [c.name for c in sets.extra(selection)] == ["g3", "g7"]


def test_refined_order_measured_block_first_then_predicted_order() -> None:
    ranked = candidates(8)
    sets = RefineSets(top=ranked[:3], control=(ranked[4], ranked[6]))
    kl = {"g1": 0.2, "g2": 0.5, "g3": 0.3, "g5": 0.25, "g7": 0.1}
    order, promoted = refined_order(ranked, sets, kl)
    # g5 (a control) measured above g1, the least damaging of the top 3: promoted into the block
    assert promoted == ("g5",)
    assert [c.name for c in order] == ["g2", "g3", "g5", "g1", "g4", "g6", "g7", "g8"]
    ties = {"g1": 0.5, "g2": 0.5, "g3": math.nan, "g5": 0.0, "g7": 0.0}
    order, promoted = refined_order(ranked, sets, ties)
    assert promoted == ()
    assert [c.name for c in order][:3] == ["g3", "g1", "g2"]  # NaN first, ties in predicted order


def pass_result(caption_nll: list[float], caption_kl: list[float], tokens: list[int]) -> PassResult:
    return PassResult(
        nll_sum=math.fsum(caption_nll),
        kl_sum=math.fsum(caption_kl) if caption_kl else math.nan,
        tokens=sum(tokens),
        token_nll=cast(Any, None),  # only the restore check reads it
        caption_nll=tuple(caption_nll),
        caption_kl=tuple(caption_kl),
        caption_tokens=tuple(tokens),
    )


def synthetic_measurement(
    kl_per_token: dict[str, float],
    nll_per_token: dict[str, float],
    ranked: tuple[Candidate, ...],
    extra: tuple[Candidate, ...],
) -> tuple[Measurement, GroupSelection]:
    """Groups whose per-caption KL is ``kl_per_token`` x tokens with 10 % caption-level noise, and
    whose ΔNLL is ``nll_per_token`` x tokens plus noise of size 0.05 per token."""
    rng = random.Random(5)
    tokens = [rng.randint(6, 20) for _ in range(CAPTIONS)]
    base = [2.5 * t for t in tokens]
    selection = GroupSelection(top=ranked[:2], bottom=ranked[-2:], random=(ranked[3],))

    def alone(name: str) -> PassResult:
        kl = [kl_per_token[name] * t * (1 + rng.gauss(0, 0.1)) for t in tokens]
        nll = [b + (nll_per_token[name] + rng.gauss(0, 0.05)) * t for b, t in zip(base, tokens, strict=True)]
        return pass_result(nll, [abs(v) for v in kl], tokens)

    single = tuple((c, label, alone(c.name)) for c, label in selection.labelled())
    weights = {
        c.name: {INT8: WeightStats(error_sq=float(r) ** 2, weight_sq=100.0, max_abs=1.0)}
        for r, (c, _) in enumerate(selection.labelled(), start=1)
    }
    activations = {c.name: ActivationStats(8.0, 20.0, 60.0, 10) for c, _ in selection.labelled()}
    measurement = Measurement(
        baseline=pass_result(base, [0.0] * CAPTIONS, tokens),
        single=single,
        joint=None,
        chosen=pass_result(base, [], tokens),
        restored=True,
        extra=tuple((c, alone(c.name)) for c in extra),
        extra_seconds=1.5,
        weights=weights,
        activations=activations,
    )
    return measurement, selection


def held_out() -> HeldOut:
    return HeldOut(
        texts=("x",) * CAPTIONS, token_lists=((1, 2),) * CAPTIONS, skipped=0, source="h.txt", notes=()
    )


def test_validation_report_states_its_noise_floor_proxies_and_refinement() -> None:
    ranked = candidates(8)
    kl = {"g1": 0.05, "g2": 0.03, "g3": 0.08, "g4": 0.02, "g5": 0.01, "g6": 0.04, "g7": 0.004, "g8": 0.002}
    nll = dict.fromkeys(kl, 0.0) | {"g1": 0.5}  # only g1 moves the loss beyond the noise
    sets = RefineSets(top=ranked[:3], control=(ranked[5], ranked[6]))  # g7 is measured by the selection too
    selection_names = {"g1", "g2", "g4", "g7", "g8"}
    extra = tuple(c for c in (*sets.top, *sets.control) if c.name not in selection_names)
    measurement, selection = synthetic_measurement(kl, nll, ranked, extra)
    assert [c.name for c in extra] == ["g3", "g6"]
    assert {c.name for c, _ in selection.labelled()} == selection_names

    report = validation_report(
        measurement,
        held_out(),
        k=2,
        notes=(),
        seconds=1.0,
        resamples=400,
        seed=0,
        refine=RefinePlan(ranked, sets, 3),
        batches=4,
    )
    noise = report.noise
    assert noise is not None
    assert (noise.resamples, noise.confidence, noise.seed) == (400, 0.95, 0)
    assert noise.headline == "kl"  # 4 of the 5 ΔNLL are within the noise
    assert set(noise.nll_within_noise) == {"g2", "g4", "g7", "g8"}
    assert noise.kl_within_noise == ()
    assert noise.pairs == 10
    assert noise.kl_pairs_resolved > noise.nll_pairs_resolved
    for g in report.groups:
        assert g.delta_nll_ci is not None
        assert g.kl_ci is not None
        assert g.kl_ci.low > 0
        assert g.delta_nll_ci.contains(0.0) is (g.name in noise.nll_within_noise)
    assert noise.spearman_kl.low <= report.spearman_kl <= noise.spearman_kl.high
    assert noise.topk_overlap_kl == 1.0
    assert not report.notes

    names = [r.name for r in report.proxies]
    assert names[:2] == [f"‖W - Q(W)‖ / ‖W‖ ({INT8})", f"‖W - Q(W)‖ ({INT8})"]
    weight_error = report.proxies[0]
    assert weight_error.groups == 5
    assert weight_error.values == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])  # labelled order
    assert weight_error.autoquant_lead_kl.low > 0  # that proxy grows with the selection's order: bad

    refinement = report.refinement
    assert refinement is not None
    assert (refinement.n, refinement.k, refinement.passes, refinement.reused) == (3, 2, 2, 3)
    assert refinement.forward_batches == 8
    assert refinement.seconds == 1.5
    assert [g.name for g in refinement.groups][:4] == ["g3", "g1", "g6", "g2"]  # g6 promoted
    assert refinement.promoted == ("g6",)
    assert (refinement.entered, refinement.left) == (("g3",), ("g2",))
    assert [g.refined_rank for g in refinement.groups] == list(range(1, 9))
    by_name = {g.name: g for g in refinement.groups}
    assert (by_name["g3"].measured, by_name["g6"].measured, by_name["g4"].measured) == ("top", "control", "")
    assert by_name["g3"].kl_ci is not None
    assert by_name["g3"].kl_ci.low > 0
    assert math.isnan(by_name["g4"].kl_div)
    assert by_name["g4"].kl_ci is None
    assert refinement.neighbours == 3  # g3, g1, g6, g2: KL 0.08, 0.05, 0.04, 0.03 per token, 10 % noise
    assert refinement.neighbours_resolved >= 2
    assert refinement.spearman_top_kl == pytest.approx(-0.5)  # predicted g1 > g2 > g3, measured g3 > g1 > g2


def test_without_bootstrap_or_with_one_caption_there_is_no_noise_floor() -> None:
    ranked = candidates(5)
    kl = {c.name: 0.01 * c.importance for c in ranked}
    measurement, _ = synthetic_measurement(kl, dict.fromkeys(kl, 0.0), ranked, ())
    off = validation_report(measurement, held_out(), 2, (), 1.0, resamples=0)
    assert off.noise is None
    assert all(g.delta_nll_ci is None for g in off.groups)
    assert off.proxies  # proxies do not need the bootstrap
    assert math.isnan(off.proxies[0].spearman_kl_ci.low)
    assert off.refinement is None

    one = PassResult(1.0, math.nan, 3, cast(Any, None), (1.0,), (), (3,))
    single = Measurement(baseline=one, single=(), joint=None, chosen=one, restored=True)
    report = validation_report(single, held_out(), 2, (), 1.0, resamples=100)
    assert report.noise is None
    assert report.notes[-1] == "no bootstrap intervals: 1 held-out caption(s), at least 2 are needed"
