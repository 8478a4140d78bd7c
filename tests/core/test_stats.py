"""Rank statistics against hand-computed values, and against scipy on random inputs."""

from __future__ import annotations

import math
import random

import pytest

from auto_quantize_model.core.stats import (
    average_ranks,
    kendall_tau_b,
    nan_reason,
    spearman,
    top_k_overlap,
    top_k_shared,
)


def test_average_ranks_share_the_mean_rank_of_ties() -> None:
    # sorted: 1 (rank 1), 2, 2 (ranks 2 and 3 -> 2.5 each), 3 (rank 4), 5, 5, 5 (ranks 5..7 -> 6)
    assert average_ranks([3.0, 2.0, 5.0, 1.0, 5.0, 2.0, 5.0]) == [4.0, 2.5, 6.0, 1.0, 6.0, 2.5, 6.0]
    assert average_ranks([]) == []


def test_perfect_and_reversed_orders() -> None:
    x = [1.0, 2.0, 3.0, 4.0]
    assert spearman(x, [10.0, 20.0, 30.0, 40.0]) == pytest.approx(1.0)
    assert kendall_tau_b(x, [10.0, 20.0, 30.0, 40.0]) == pytest.approx(1.0)
    assert spearman(x, [4.0, 3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert kendall_tau_b(x, [4.0, 3.0, 2.0, 1.0]) == pytest.approx(-1.0)


def test_spearman_and_kendall_without_ties_by_hand() -> None:
    # ranks x = 1..5, ranks y = 1, 4, 2, 5, 3; d = 0, 2, 1, 1, 2; sum d² = 10
    # rho = 1 - 6 * 10 / (5 * (25 - 1)) = 0.5
    # y order has 3 inversions (4>2, 4>3, 5>3) among 10 pairs: tau = (7 - 3) / 10 = 0.4
    x = [5.0, 4.0, 3.0, 2.0, 1.0]
    y = [50.0, 10.0, 40.0, 1.0, 20.0]
    assert spearman(x, y) == pytest.approx(0.5)
    assert kendall_tau_b(x, y) == pytest.approx(0.4)


def test_spearman_and_kendall_with_ties_by_hand() -> None:
    # x ranks 1, 2.5, 2.5, 4; y ranks 1, 3, 2, 4. Deviations from 2.5: (-1.5, 0, 0, 1.5) and
    # (-1.5, 0.5, -0.5, 1.5): cov 4.5, var_x 4.5, var_y 5 -> rho = 4.5 / sqrt(22.5) = sqrt(0.9).
    # Pairs: 5 concordant, 0 discordant, 1 tied in x only -> tau_b = 5 / sqrt((6 - 1) * 6).
    x = [1.0, 2.0, 2.0, 3.0]
    y = [1.0, 3.0, 2.0, 4.0]
    assert spearman(x, y) == pytest.approx(math.sqrt(0.9))
    assert kendall_tau_b(x, y) == pytest.approx(5 / math.sqrt(30))


def test_undefined_cases_are_nan() -> None:
    assert math.isnan(spearman([1.0], [2.0]))
    assert math.isnan(kendall_tau_b([], []))
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))  # no variation on one side
    assert math.isnan(kendall_tau_b([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert math.isnan(spearman([1.0, math.nan, 3.0], [1.0, 2.0, 3.0]))
    assert math.isnan(kendall_tau_b([1.0, 2.0, 3.0], [1.0, 2.0, math.nan]))


def test_mismatched_lengths_are_a_bug() -> None:
    with pytest.raises(ValueError, match="paired"):
        spearman([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="paired"):
        kendall_tau_b([1.0], [1.0, 2.0])


def test_top_k_overlap() -> None:
    a = ["a", "b", "c", "d", "e"]
    b = ["a", "c", "e", "b", "d"]
    assert top_k_shared(a, b, 2) == 1  # {a, b} vs {a, c}
    assert top_k_overlap(a, b, 3) == pytest.approx(2 / 3)  # {a, b, c} vs {a, c, e}
    assert top_k_overlap(a, b, 5) == 1.0
    # k beyond the shorter ranking: the denominator shrinks to what can be shared
    assert top_k_overlap(["a", "b"], ["b", "a", "x"], 10) == 1.0
    assert math.isnan(top_k_overlap([], ["a"], 3))
    with pytest.raises(ValueError, match="k must be"):
        top_k_shared(a, b, -1)


@pytest.mark.parametrize("seed", range(6))
def test_agrees_with_scipy_on_random_inputs(seed: int) -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = random.Random(seed)
    n = rng.randint(3, 60)
    # Half the cases draw from a few values so ties are common, like zero-scored groups.
    if seed % 2:
        x = [float(rng.randint(0, 4)) for _ in range(n)]
        y = [float(rng.randint(0, 4)) for _ in range(n)]
    else:
        x = [rng.lognormvariate(0, 3) for _ in range(n)]
        y = [v * rng.lognormvariate(0, 1) for v in x]
    expected_rho = scipy_stats.spearmanr(x, y).statistic
    expected_tau = scipy_stats.kendalltau(x, y, variant="b").statistic
    assert average_ranks(x) == pytest.approx(list(scipy_stats.rankdata(x, method="average")))
    if math.isnan(expected_rho):
        assert math.isnan(spearman(x, y))
    else:
        assert spearman(x, y) == pytest.approx(expected_rho, abs=1e-12)
    if math.isnan(expected_tau):
        assert math.isnan(kendall_tau_b(x, y))
    else:
        assert kendall_tau_b(x, y) == pytest.approx(expected_tau, abs=1e-12)


def test_nan_reason_says_why_a_correlation_is_nan_in_the_order_a_reader_can_act_on() -> None:
    nan = math.nan
    assert nan_reason([1.0, 2.0], [3.0, 4.0], 1.0) == ""
    assert nan_reason([1.0], [0.0], nan) == "fewer than 2 measured groups (1)"
    assert nan_reason([], [], nan, items="points") == "fewer than 2 measured points (0)"
    # a NaN is named before the equal sides it would otherwise look like
    assert nan_reason([1.0, 1.0], [nan, 2.0], nan) == "a NaN among the values"
    assert nan_reason([1.0, 1.0], [3.0, 4.0], nan) == "the predicted scores are all equal"
    assert nan_reason([1.0, 2.0], [0.0, 0.0], nan) == "the measured values are all equal"
    assert nan_reason([1.0, 2.0], [2.0, 1.0], nan) == "no untied pair"


def test_nan_reason_explains_every_nan_spearman_and_kendall_give() -> None:
    cases = (
        ([1.0], [0.0]),
        ([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]),
        ([1.0, 2.0], [5.0, 5.0]),
        ([1.0, 2.0], [1.0, math.nan]),
    )
    for x, y in cases:
        for coefficient in (spearman, kendall_tau_b):
            value = coefficient(x, y)
            assert math.isnan(value)
            assert nan_reason(x, y, value) not in ("", "no untied pair")
