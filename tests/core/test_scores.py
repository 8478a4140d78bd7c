"""The one definition of score spellings, importance and rank order (core/scores.py, pure)."""

from __future__ import annotations

import math

import pytest

from auto_quantize_model.core.scores import (
    coefficient_text,
    group_name,
    has_quantized_format,
    headline_index,
    importance,
    is_none_format,
    parse_label,
    rank_order,
    ranks,
    recipe_name,
    worst,
)

INT8 = "INT8_DEFAULT_CFG"
FP8 = "FP8_DEFAULT_CFG"
NAN = math.nan
INF = math.inf


@pytest.mark.parametrize(
    ("label", "parsed"),
    [
        ("INT8_DEFAULT_CFG(effective-bits: 8.0)", (INT8, 8.0)),  # ModelOpt's str(recipe)
        ("NONE(effective-bits: 16.0)", ("NONE", 16.0)),
        ("wint4-b64_aint8-token(effective-bits: 4.0)", ("wint4-b64_aint8-token", 4.0)),  # our formats
        (" W4A8_AWQ_BETA_CFG ( effective-bits: 4.5 ) ", ("W4A8_AWQ_BETA_CFG", 4.5)),  # previous tool
    ],
)
def test_parse_label_reads_every_spelling(label: str, parsed: tuple[str, float]) -> None:
    assert parse_label(label) == parsed


@pytest.mark.parametrize(
    "label", ["INT8_DEFAULT_CFG", "(effective-bits: 8.0)", "A B(effective-bits: 8)", "X(effective-bits: x)"]
)
def test_parse_label_refuses_anything_else(label: str) -> None:
    with pytest.raises(
        ValueError, match=r"unexpected ModelOpt recipe label .* is not NAME\(effective-bits: B\)"
    ):
        parse_label(label)


def test_names_none_and_suffix() -> None:
    assert recipe_name("FP8_DEFAULT_CFG(effective-bits: 8.0)") == "FP8_DEFAULT_CFG"
    assert recipe_name(" custom ") == "custom"
    assert is_none_format("NONE")
    assert is_none_format("NONE(effective-bits: 16.0)")
    assert not is_none_format("NONE_OF_THESE")
    assert group_name("model.layers.0.mlp.down_proj.quant_recipe") == "model.layers.0.mlp.down_proj"
    assert group_name("lm_head") == "lm_head"
    assert has_quantized_format((INT8, "NONE"))
    assert not has_quantized_format(("NONE",))


def test_worst_lets_nan_win_whatever_the_order() -> None:
    assert worst([1.0, 3.0, 2.0]) == 3.0
    assert math.isnan(worst([NAN, 3.0]))
    assert math.isnan(worst([3.0, NAN]))
    assert worst([INF, 1.0]) == INF
    with pytest.raises(ValueError, match="no values"):
        worst([])


def test_importance_and_headline_agree() -> None:
    formats = ("FP8_DEFAULT_CFG", INT8, "NONE(effective-bits: 16.0)")
    assert importance(formats, (0.5, 2.0, 99.0)) == 2.0  # NONE, in any spelling, never counts
    assert headline_index(formats, (0.5, 2.0, 99.0)) == 1
    assert math.isnan(importance(formats, (NAN, 2.0, 0.0)))
    assert headline_index(formats, (NAN, 2.0, 0.0)) == 0
    assert importance(("NONE",), (0.0,)) == 0.0


def test_rank_order_nan_first_then_descending_ties_in_input_order() -> None:
    values = [1.0, NAN, 3.0, 1.0, INF, -INF, NAN]
    assert rank_order(values) == [1, 6, 4, 2, 0, 3, 5]
    assert ranks(values) == [5, 1, 4, 6, 3, 7, 2]
    assert rank_order([]) == []


def test_coefficient_text() -> None:
    assert coefficient_text(0.91234) == "0.912"
    assert coefficient_text(-1.0) == "-1.000"
    assert coefficient_text(NAN) == "n/a"


# ---- importance ---------------------------------------------------------------------------------


def test_importance_is_max_over_quantized_formats_ignoring_none() -> None:
    assert importance((INT8, FP8, "NONE"), (0.25, 0.75, 9.0)) == 0.75


def test_importance_without_quantized_format_is_zero() -> None:
    assert importance(("NONE",), (0.0,)) == 0.0


def test_importance_is_nan_when_any_quantized_score_is_nan() -> None:
    # max() alone would give 0.5 or NaN depending on order; NaN must never hide.
    assert math.isnan(importance((INT8, FP8, "NONE"), (0.5, math.nan, 0.0)))
    assert math.isnan(importance((INT8, FP8, "NONE"), (math.nan, 0.5, 0.0)))


def test_headline_format_is_the_one_setting_importance() -> None:
    assert headline_index((INT8, FP8, "NONE"), (0.25, 0.75, 0.0)) == 1
    assert headline_index((INT8, FP8, "NONE"), (0.5, 0.5, 0.0)) == 0  # first on ties
    assert headline_index((INT8, FP8, "NONE"), (0.5, math.nan, 0.0)) == 1
    assert headline_index(("NONE",), (0.0,)) == 0
    assert headline_index((INT8, "NONE"), (0.0, 0.0)) == 0  # quantized format even at score 0


# ---- recipe labels ------------------------------------------------------------------------------


def test_recipe_name_drops_the_effective_bits_suffix() -> None:
    assert recipe_name("INT8_DEFAULT_CFG(effective-bits: 8.0)") == "INT8_DEFAULT_CFG"
    assert recipe_name("NONE(effective-bits: 16.0)") == "NONE"
    assert recipe_name("w8a8_per_channel") == "w8a8_per_channel"


def test_parse_label() -> None:
    assert parse_label("INT8_DEFAULT_CFG(effective-bits: 8.0)") == ("INT8_DEFAULT_CFG", 8.0)
    assert parse_label("NVFP4_DEFAULT_CFG(effective-bits: 4.5)") == ("NVFP4_DEFAULT_CFG", 4.5)
    assert parse_label("wint4-b64_aint8-token(effective-bits: 4.0)") == ("wint4-b64_aint8-token", 4.0)
    with pytest.raises(ValueError, match="unexpected ModelOpt recipe label"):
        parse_label("INT8_DEFAULT_CFG")
