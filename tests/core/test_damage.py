"""The damage model (core/damage.py): Student's t, the fit on measured mixes, the cheapest mix under a
KL bound and its refusals, and merging measurements. Plain data, no model."""

from __future__ import annotations

import math

import attrs
import pytest

from auto_quantize_model.artifacts import MeasuredFrontier, MeasuredPoint
from auto_quantize_model.core.damage import (
    Additivity,
    DamageModel,
    choose_under_bound,
    fit_damage,
    merge_measured,
    t_quantile,
    with_measurement,
)
from auto_quantize_model.core.frontier_points import measured_frontier
from auto_quantize_model.errors import ConfigError, InputError
from auto_quantize_model.frontier_records import FrontierPoint

FACTOR = 0.02
"""The known curve: KL = FACTOR x score (times the noise below), ΔNLL = half the KL."""
NOISE = (0.05, -0.05, 0.0)
"""ln of the multiplicative noise of the three measured points: mean 0, sample sd 0.05."""


def measured(budget: float, bits: float, score: float, noise: float) -> MeasuredPoint:
    kl = FACTOR * score * math.exp(noise)
    return MeasuredPoint(budget, bits, score, kl / 2, kl, quantized_groups=2)


def curve_points() -> list[MeasuredPoint]:
    return [
        measured(7.0, 6.7, 3.27, NOISE[0]),
        measured(10.0, 9.7, 0.13, NOISE[1]),
        measured(13.0, 12.6, 0.01, NOISE[2]),
    ]


def point(
    budget: float, bits: float, score: float, formats: tuple[str, ...] = ("W4", "INT8")
) -> FrontierPoint:
    return FrontierPoint(
        budget=budget,
        constraint=budget,
        formats=formats,
        effective_bits_lm=bits,
        effective_bits_model=bits,
        total_score=score,
        reachable=True,
        satisfied=True,
    )


FRONTIER = (
    point(7.0, 6.737, 3.27),
    point(7.5, 7.368, 2.52),
    point(8.0, 8.0, 2.12),
    point(8.5, 8.421, 1.28),
    point(9.0, 8.842, 0.98),
    point(9.5, 9.263, 0.43),
    point(10.0, 9.684, 0.13),
    point(11.0, 10.947, 0.06),
    point(13.0, 12.632, 0.01),
    point(16.0, 16.0, 0.0, ("NONE", "NONE")),
)
UPPER = FACTOR * math.exp(t_quantile(2) * 0.05 * math.sqrt(1 + 1 / 3))
"""KL per unit score at the upper end of the 95% prediction interval of the three points."""


@pytest.mark.parametrize(
    ("dof", "level", "table"),
    [
        (1, 0.95, 12.706),
        (2, 0.95, 4.303),
        (4, 0.95, 2.776),
        (10, 0.95, 2.228),
        (30, 0.95, 2.042),
        (5, 0.99, 4.032),
    ],
)
def test_t_quantile_matches_the_printed_tables(dof: int, level: float, table: float) -> None:
    assert t_quantile(dof, level) == pytest.approx(table, abs=6e-4)


def test_the_fit_recovers_a_known_proportional_curve_and_its_spread() -> None:
    model = fit_damage(curve_points())
    assert model.factor == pytest.approx(FACTOR, rel=1e-12)
    assert model.log_ratio_sd == pytest.approx(0.05, rel=1e-12)
    assert model.t == pytest.approx(4.3027, abs=1e-4)
    assert model.slope == pytest.approx(1.0, abs=0.02)  # proportional: the log-log check says so
    assert model.max_score == 3.27
    kl = model.kl(1.0)
    assert kl.central == pytest.approx(FACTOR)
    assert kl.high == pytest.approx(UPPER)
    assert kl.low == pytest.approx(FACTOR * FACTOR / UPPER)  # symmetric on the log scale
    nll = model.delta_nll(1.0)
    assert nll.central == pytest.approx(FACTOR / 2, rel=2e-3)  # mean of e^±0.05 / 2 is 1.0004 / 2
    assert model.kl(0.0) == model.delta_nll(0.0)
    assert model.kl(0.0).high == 0.0  # a mix that quantizes nothing predicts no damage


def test_an_exact_curve_gives_a_zero_width_interval() -> None:
    points = [measured(p.budget, p.effective_bits_lm, p.predicted_score, 0.0) for p in curve_points()]
    model = fit_damage(points)
    assert model.log_ratio_sd == pytest.approx(0.0, abs=1e-14)  # rounding of the logarithms only
    assert model.kl(2.0).low == pytest.approx(2 * FACTOR, rel=1e-12)
    assert model.kl(2.0).high == pytest.approx(2 * FACTOR, rel=1e-12)


def test_predictions_are_monotone_in_the_score() -> None:
    model = fit_damage(curve_points())
    scores = [0.001, 0.01, 0.1, 1.0, 3.0]
    highs = [model.kl(s).high for s in scores]
    assert highs == sorted(highs)
    assert len(set(highs)) == len(highs)


def test_points_that_cannot_be_fitted_are_named_and_two_are_needed() -> None:
    zero = MeasuredPoint(12.0, 12.0, 0.05, -0.001, 0.0, quantized_groups=1)
    model = fit_damage([*curve_points(), zero])
    assert len(model.points) == 3
    assert model.left_out == (
        "the point at 12 bits is not fitted: predicted score 0.05, KL 0, ΔNLL -0.001 (the fit needs a "
        "positive score and KL)",
    )
    with pytest.raises(
        InputError, match=r"^1 measured mix\(es\) with a positive score and KL; the damage model "
    ):
        fit_damage([curve_points()[0], zero])


def test_the_model_states_the_additivity_gap_where_the_validation_measured_it() -> None:
    model = fit_damage(curve_points(), additivity=Additivity(10, 1.201, 1.105))
    assert model.additivity is not None
    assert model.additivity.gap == pytest.approx(0.0869, abs=1e-4)
    assert (
        "additivity: the validation quantized its top 10 groups together: joint ΔNLL 1.201 vs 1.105 summed "
        "over the singles (+9% against additive)"
    ) in model.lines()


# --------------------------------------------------------------------------------------------------
# The cheapest mix under a bound
# --------------------------------------------------------------------------------------------------


def test_the_bound_is_honoured_by_the_chosen_mix_and_breaks_the_next_cheaper_one() -> None:
    model = fit_damage(curve_points())
    choice = choose_under_bound(FRONTIER, model, 0.03)
    assert choice.point.budget == 9.0
    assert choice.kl.high == pytest.approx(0.98 * UPPER)
    assert choice.kl.high <= 0.03
    assert choice.cheaper is not None
    assert choice.cheaper.budget == 8.5
    assert choice.cheaper_kl is not None
    assert choice.cheaper_kl.high > 0.03
    # every candidate with fewer bits predicts more than the bound
    assert all(model.kl(p.total_score).high > 0.03 for p in FRONTIER if p.effective_bits_lm < 8.842)


@pytest.mark.parametrize(
    ("bound", "budget"), [(0.1, 7.0), (0.0834, 7.5), (0.0034, 10.0), (0.003, 11.0), (0.0003, 13.0)]
)
def test_the_choice_moves_with_the_bound(bound: float, budget: float) -> None:
    assert choose_under_bound(FRONTIER, fit_damage(curve_points()), bound).point.budget == budget


def test_a_bound_below_the_least_quantized_mix_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError) as err:
        choose_under_bound(FRONTIER, fit_damage(curve_points()), 1e-4)
    message = str(err.value)
    assert message.startswith(
        "KL bound 0.0001 is below what even the least-quantized mix predicts (12.632 LM bits: KL 0.0002 ["
    )
    assert message.endswith("raise the bound or solve budgets closer to 16")
    assert "\n" not in message


def test_a_bound_met_only_beyond_the_measured_scores_is_refused_as_extrapolation() -> None:
    model = fit_damage(curve_points()[1:])  # the largest measured score is 0.13 (10 bits)
    with pytest.raises(ConfigError) as err:
        choose_under_bound(FRONTIER, model, 0.2)
    message = str(err.value)
    assert message.startswith(
        "KL bound 0.2 reaches beyond the measured data: the mix at 6.737 LM bits has predicted score 3.27, "
        "above the largest measured one (0.13, KL upper end"
    )
    assert "measure cheaper mixes first or lower the bound to" in message
    assert "\n" not in message
    # a bound the measured range answers is not extrapolation
    assert choose_under_bound(FRONTIER, model, model.kl(0.13).high).point.budget == 10.0


@pytest.mark.parametrize("bound", [0.0, -1.0, math.nan, math.inf])
def test_a_bound_that_is_not_a_positive_number_is_refused(bound: float) -> None:
    with pytest.raises(ConfigError, match="the KL bound must be a positive number"):
        choose_under_bound(FRONTIER, fit_damage(curve_points()), bound)


def test_only_reachable_mixes_that_quantize_something_are_candidates() -> None:
    model = fit_damage(curve_points())
    unreachable = [attrs.evolve(p, reachable=False) for p in FRONTIER[:-1]]
    with pytest.raises(InputError, match="no solved budget gives a reachable mix that quantizes anything"):
        choose_under_bound([*unreachable, FRONTIER[-1]], model, 1.0)


def test_the_measured_chosen_mix_says_whether_the_bound_held() -> None:
    model = fit_damage(curve_points())
    choice = choose_under_bound(FRONTIER, model, 0.03)
    held = with_measurement(choice, [measured(9.0, 8.842, 0.98, 0.05)])
    assert held.held is True
    assert held.in_interval is True
    assert held.lines()[-1] == (
        f"measured: KL {0.0196 * math.exp(0.05):.4g}, ΔNLL {0.0098 * math.exp(0.05):.4g}: the bound held "
        "(inside the predicted interval)"
    )
    broke = with_measurement(choice, [MeasuredPoint(8.9, 8.842, 0.98, 0.02, 0.04, quantized_groups=2)])
    assert broke.held is False
    assert (
        broke.lines()[-1]
        == "measured: KL 0.04, ΔNLL 0.02: the bound did NOT hold (OUTSIDE the predicted interval)"
    )
    other = with_measurement(choice, [measured(10.0, 9.684, 0.13, 0.0)])
    assert other.measured_kl is None  # another mix is no check of this one


# --------------------------------------------------------------------------------------------------
# Earlier measurements
# --------------------------------------------------------------------------------------------------


def report(points: list[MeasuredPoint], baseline: float = 3.0) -> MeasuredFrontier:
    return measured_frontier(
        points,
        baseline_nll=baseline,
        chosen_delta_nll=0.01,
        holdout_samples=8,
        holdout_tokens=80,
        holdout_source="held.txt",
        restored_exactly=True,
        seconds=1.0,
    )


def test_merging_keeps_earlier_points_of_other_mixes_on_the_same_held_out_text() -> None:
    earlier = report(curve_points())
    later = report([measured(9.0, 8.842, 0.98, 0.0), measured(13.0, 12.6, 0.01, 0.3)])
    merged = merge_measured(earlier, later)
    assert [p.budget for p in merged.points] == [7.0, 9.0, 10.0, 13.0]
    assert merged.points[-1].kl_div == later.points[-1].kl_div  # the later measurement of a mix wins
    assert "2 point(s) measured earlier on the same held-out text are kept beside these" in merged.notes
    assert isinstance(fit_damage(merged.points), DamageModel)


def test_merging_leaves_out_points_of_other_held_out_text() -> None:
    merged = merge_measured(report(curve_points(), baseline=3.5), report([measured(9.0, 8.842, 0.98, 0.0)]))
    assert [p.budget for p in merged.points] == [9.0]
    assert merged.notes[-1].startswith(
        "3 earlier measured point(s) were left out: they used other held-out text"
    )
