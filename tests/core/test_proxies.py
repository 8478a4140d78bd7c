"""Free proxies of quantization damage and their rating against measured damage (core/proxies.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from auto_quantize_model.core.noise import Resamples
from auto_quantize_model.core.proxies import (
    ActivationStats,
    GroupInputs,
    WeightStats,
    beats,
    proxy_columns,
    rate,
    rate_proxies,
)
from auto_quantize_model.validation_records import Interval, ProxyRating

INT8, FP8 = "INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"


def test_weight_and_activation_stats() -> None:
    assert WeightStats(error_sq=4.0, weight_sq=100.0, max_abs=3.0).relative_error == pytest.approx(0.2)
    assert math.isnan(WeightStats(0.0, 0.0, 0.0).relative_error)
    a = ActivationStats(max_abs=4.0, abs_sum=10.0, square_sum=30.0, count=10)
    b = ActivationStats(max_abs=6.0, abs_sum=2.0, square_sum=6.0, count=2)
    both = a.merged(b)
    assert (both.max_abs, both.count) == (6.0, 12)
    assert both.mean_abs == pytest.approx(1.0)
    assert both.rms == pytest.approx(math.sqrt(3.0))
    assert math.isnan(ActivationStats(0.0, 0.0, 0.0, 0).rms)


def inputs(fmt: str, errors: dict[str, float], act: tuple[float, float] | None) -> GroupInputs:
    """A group measured on ``fmt`` with squared weight errors per format (‖W‖² = 100, max |W| =
    the INT8 error), and activations ``(max |x|, mean |x|)`` over 10 values (rms = 2 mean)."""
    weights = {f: WeightStats(e, 100.0, errors.get(INT8, 0.0)) for f, e in errors.items()}
    activations = None if act is None else ActivationStats(act[0], act[1] * 10, (2 * act[1]) ** 2 * 10, 10)
    return GroupInputs(fmt, weights, activations)


def test_proxy_columns_per_format_and_for_the_measured_format() -> None:
    groups = [
        inputs(INT8, {INT8: 4.0, FP8: 1.0}, (8.0, 2.0)),
        inputs(FP8, {INT8: 9.0, FP8: 16.0}, None),
        inputs(INT8, {INT8: 1.0}, (3.0, 1.0)),  # not offered FP8
    ]
    columns = dict(proxy_columns(groups, (INT8, FP8)))
    assert list(columns) == [
        f"‖W - Q(W)‖ / ‖W‖ ({INT8})",
        f"‖W - Q(W)‖ / ‖W‖ ({FP8})",
        "‖W - Q(W)‖ / ‖W‖ (measured format)",
        "‖W - Q(W)‖ (measured format)",
        "max |W|",
        "max |x| (input)",
        "max |x| / mean |x| (input)",
        "‖W - Q(W)‖ · rms(x) (measured format)",
    ]
    assert columns[f"‖W - Q(W)‖ / ‖W‖ ({INT8})"] == pytest.approx([0.2, 0.3, 0.1])
    fp8 = columns[f"‖W - Q(W)‖ / ‖W‖ ({FP8})"]
    assert fp8[:2] == pytest.approx([0.1, 0.4])
    assert math.isnan(fp8[2])
    assert columns["‖W - Q(W)‖ / ‖W‖ (measured format)"] == pytest.approx([0.2, 0.4, 0.1])
    assert columns["‖W - Q(W)‖ (measured format)"] == pytest.approx([2.0, 4.0, 1.0])
    ratio = columns["max |x| / mean |x| (input)"]
    assert ratio[0] == pytest.approx(4.0)
    assert math.isnan(ratio[1])
    output = columns["‖W - Q(W)‖ · rms(x) (measured format)"]
    assert output[0] == pytest.approx(2.0 * 4.0)  # ‖ΔW‖ 2, rms 2 * mean 2
    assert math.isnan(output[1])
    single = dict(proxy_columns([inputs(INT8, {INT8: 4.0}, None)], (INT8,)))
    assert f"‖W - Q(W)‖ ({INT8})" in single  # one format: named, no separate measured-format column


def draws_around(values: list[float], spread: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.asarray(values) + rng.normal(0.0, spread, size=(300, len(values)))


def test_rating_a_proxy_against_measured_damage_with_intervals() -> None:
    kl = [5.0, 4.0, 3.0, 2.0, 1.0]
    nll = [0.5, 0.1, 0.3, -0.1, 0.0]
    autoquant = [10.0, 8.0, 6.0, 4.0, 2.0]  # orders KL perfectly
    resamples = Resamples(np.ones((300, 1), dtype=np.int64), np.ones(1))
    draws = (draws_around(kl, 0.01, 0), draws_around(nll, 0.5, 1))

    reversed_proxy = rate("rev", [1.0, 2.0, 3.0, 4.0, 5.0], autoquant, kl, nll, draws, resamples)
    assert reversed_proxy.spearman_kl == pytest.approx(-1.0)
    assert reversed_proxy.spearman_kl_ci.high < 0
    assert reversed_proxy.autoquant_lead_kl.low == pytest.approx(2.0)  # 1 - (-1) in every resample
    assert beats(reversed_proxy) == "AutoQuant better"
    assert reversed_proxy.spearman_nll_ci.low < reversed_proxy.spearman_nll_ci.high  # ΔNLL is noisy

    same = rate("same", autoquant, autoquant, kl, nll, draws, resamples)
    assert same.autoquant_lead_kl == Interval(0.0, 0.0)
    assert beats(same) == "tie within noise"

    partial = rate("partial", [math.nan, 2.0, 3.0, math.nan, 1.0], autoquant, kl, nll, draws, resamples)
    assert partial.groups == 3
    assert partial.values[1:3] == (2.0, 3.0)
    assert partial.spearman_kl == pytest.approx(0.5)  # ranks 2, 3, 1 against 3, 2, 1: rho = 1 - 12/24

    better = rate("better", kl, [1.0, 2.0, 3.0, 4.0, 5.0], kl, nll, draws, resamples)
    assert beats(better) == "proxy better"


def test_without_a_bootstrap_the_intervals_are_nan() -> None:
    rating = rate("p", [1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [0.3, 0.2, 0.1], [0.0, 0.1, 0.2], None, None)
    assert rating.spearman_kl == pytest.approx(-1.0)
    assert math.isnan(rating.spearman_kl_ci.low)
    assert beats(rating) == "n/a"


def test_rate_proxies_leaves_out_columns_without_a_value() -> None:
    groups = [
        inputs(INT8, {INT8: 4.0}, None),
        inputs(INT8, {INT8: 1.0}, None),
        inputs(INT8, {INT8: 9.0}, None),
    ]
    ratings = rate_proxies(groups, (INT8,), [3.0, 2.0, 1.0], [0.3, 0.2, 0.1], [0.0, 0.0, 0.0], None, None)
    assert all(isinstance(r, ProxyRating) for r in ratings)
    assert [r.name for r in ratings] == [f"‖W - Q(W)‖ / ‖W‖ ({INT8})", f"‖W - Q(W)‖ ({INT8})", "max |W|"]
