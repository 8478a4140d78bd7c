"""Ranking rules and scheme names, on plain data (no model, no torch)."""

from __future__ import annotations

import math
import re
from typing import Any, cast

import pytest

from auto_quantize_model.artifacts import (
    GroupScore,
)
from auto_quantize_model.core.ranking import check_ranking, rank_groups, scheme_name
from auto_quantize_model.errors import AqmError, ConfigError
from auto_quantize_model.io.convert import project
from auto_quantize_model.manifest_records import RankedGroup
from builders import NONE, fp8, group, int8

INT8 = "INT8_DEFAULT_CFG"
FP8 = "FP8_DEFAULT_CFG"


# ---- rank_groups --------------------------------------------------------------------------------


def test_ranks_descend_from_one_without_gaps() -> None:
    ranked = rank_groups(
        [group("a", int8(0.1), NONE), group("b", int8(3.0), NONE), group("c", int8(1.0), NONE)]
    )
    assert [(g.rank, g.name, g.importance) for g in ranked] == [(1, "b", 3.0), (2, "c", 1.0), (3, "a", 0.1)]


def test_ties_keep_input_order() -> None:
    groups = [
        group("v2", NONE),
        group("x", int8(1.0), NONE),
        group("v0", NONE),
        group("y", int8(0.0), NONE),
        group("v1", NONE),
    ]
    ranked = rank_groups(groups)
    assert [g.name for g in ranked] == ["x", "v2", "v0", "y", "v1"]
    # Deterministic: the same input gives the same ranking every time.
    assert rank_groups(groups) == ranked


def test_nan_ranks_first_then_infinities() -> None:
    ranked = rank_groups(
        [
            group("low", int8(0.5), NONE),
            group("ninf", int8(-math.inf), NONE),
            group("inf", int8(math.inf), NONE),
            group("nan", int8(math.nan), NONE),
        ]
    )
    assert [g.name for g in ranked] == ["nan", "inf", "low", "ninf"]
    assert [g.rank for g in ranked] == [1, 2, 3, 4]
    assert math.isnan(ranked[0].importance)


def test_ranked_group_keeps_scores_costs_and_best_format() -> None:
    source = group("a", int8(0.5), fp8(0.25), NONE, best=FP8)
    (ranked,) = rank_groups([source])
    assert ranked.formats == source.formats
    assert ranked.scores == source.scores
    assert ranked.costs == source.costs
    assert ranked.bits == source.bits
    assert ranked.best_format == FP8
    assert ranked.module_names == ("a",)


def test_a_ranked_group_is_what_the_field_by_name_copy_made() -> None:
    """``RankedGroup.from_score`` replaced ``io.convert.project`` in core: the same record, integer
    bits and lists included (they become floats and tuples, as in a manifest read back)."""
    loose = cast(Any, GroupScore)("a.b", ["a.b", "a.c"], [INT8, "NONE"], [8, 16], [0.5, 0], [3, 4], INT8)
    made = RankedGroup.from_score(loose, rank=2, importance=0.5)
    assert made == project(loose, RankedGroup, rank=2, importance=0.5)
    assert made == RankedGroup(
        name="a.b",
        rank=2,
        importance=0.5,
        best_format=INT8,
        module_names=("a.b", "a.c"),
        formats=(INT8, "NONE"),
        bits=(8.0, 16.0),
        scores=(0.5, 0.0),
        costs=(3.0, 4.0),
    )
    assert [type(value) for value in (*made.bits, *made.scores, *made.costs)] == [float] * 6


def test_duplicate_group_is_refused() -> None:
    with pytest.raises(ValueError, match="group a is listed twice"):
        rank_groups([group("a", int8(0.1), NONE), group("a", int8(0.2), NONE)])


def test_ragged_group_is_refused() -> None:
    bad = GroupScore("a", ("a",), (INT8, "NONE"), (8.0, 16.0), (0.1,), (1.0, 2.0), INT8)
    with pytest.raises(ValueError, match="group a: formats, bits, scores and costs differ"):
        rank_groups([bad])


def test_empty_input_ranks_to_nothing() -> None:
    assert rank_groups([]) == ()


@pytest.mark.parametrize(
    ("groups", "detail"),
    [
        ([], "AutoQuant reported no recipe group"),
        (
            [group("v", NONE), group("nan", int8(math.nan), NONE), group("inf", int8(math.inf), NONE)],
            "none of the 3 recipe group(s) has a finite score for a quantized format "
            "(1 offer only NONE, 2 scored NaN or infinite)",
        ),
    ],
)
def test_an_empty_ranking_is_refused(groups: list[GroupScore], detail: str) -> None:
    with pytest.raises(AqmError, match="^empty ranking: " + re.escape(detail) + "; check that"):
        check_ranking(groups)
    check_ranking([*groups, group("fine", int8(0.0), NONE)])  # one finite importance, even 0, is a ranking


# ---- scheme names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("formats", "expected"),
    [
        ((INT8,), "wint8_aint8"),
        ((FP8,), "wfp8_afp8"),
        ((INT8, FP8), "wint8_aint8+wfp8_afp8"),
        ((INT8, "NONE"), "wint8_aint8"),
        (("w4a8_pc_pt",), "w4a8_pc_pt"),
        (("NVFP4_AWQ_LITE_CFG",), "nvfp4_awq_lite"),
        (("MXFP8_DEFAULT_CFG",), "wmxfp8_amxfp8"),
    ],
)
def test_scheme_name_derived_from_formats(formats: tuple[str, ...], expected: str) -> None:
    assert scheme_name(formats) == expected


def test_explicit_scheme_name_wins() -> None:
    assert scheme_name((INT8,), "int8_autoquant_lm_default") == "int8_autoquant_lm_default"


@pytest.mark.parametrize("bad", ["", "a/b", "../x", ".hidden", "with space"])
def test_scheme_name_unusable_in_file_names_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="cannot be used in file names"):
        scheme_name((INT8,), bad)


def test_scheme_name_needs_a_quantized_format() -> None:
    with pytest.raises(ConfigError, match="only NONE"):
        scheme_name(("NONE",))


# ---- BuildManifest ------------------------------------------------------------------------------


def test_a_format_option_becomes_a_file_name_safe_scheme_part() -> None:
    from auto_quantize_model.core.ranking import scheme_name
    from auto_quantize_model.spec_values import scheme_name_problem

    name = scheme_name(["INT8_DEFAULT_CFG", "W4A8_AWQ_BETA_CFG:alpha_step=0.25"])
    assert name == "wint8_aint8+wint4_afp8_awq-a0.25"
    assert scheme_name_problem(name) is None
