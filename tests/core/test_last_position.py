"""The last-position figures as plain data: their definitions, settings, manifest record and report lines.

The torch side (a fake whose damage sits only at the last position, greedy continuations) is
tests/backend/test_last_position.py; here every figure is built by hand.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest

from auto_quantize_model.artifacts import FrontierSummary, MeasuredFrontier, MeasuredPoint
from auto_quantize_model.core.last_position import (
    greedy_agreement,
    last_position,
    last_position_text,
    leading_matches,
    top1_agreement,
)
from auto_quantize_model.errors import ConfigError
from auto_quantize_model.frontier_records import Frontier, FrontierPoint
from auto_quantize_model.io.manifest import manifest_from_dict, manifest_to_dict, manifest_to_json
from auto_quantize_model.io.pipeline_file import load_pipeline
from auto_quantize_model.manifest_records import Manifest
from auto_quantize_model.render.frontier import render_markdown as frontier_markdown
from auto_quantize_model.render.validation import validation_markdown
from auto_quantize_model.spec_values import SpecError
from auto_quantize_model.specs import FrontierSpec, ManifestSpec, ValidateSpec
from auto_quantize_model.stages.build_manifest import build_manifest
from auto_quantize_model.validation_records import LastPosition, ValidatedGroup, ValidationReport
from builders import TEST_MODEL, int8, scores
from builders import group as score_group

FIGURES = LastPosition(
    captions=64,
    kl=0.0123,
    top1=0.953125,
    greedy_tokens=8,
    greedy_captions=16,
    greedy_agreement=0.8125,
    greedy_identical=0.75,
)

# --------------------------------------------------------------------------------------------------
# Definitions


def test_top1_agreement_is_the_share_of_the_same_most_likely_token() -> None:
    assert top1_agreement([5, 6, 7, 8], [5, 6, 0, 8]) == 0.75
    assert math.isnan(top1_agreement([], []))
    with pytest.raises(ValueError, match="3 top-1 tokens against 2 of the reference"):
        top1_agreement([1, 2, 3], [1, 2])


def test_greedy_agreement_counts_the_tokens_before_the_first_difference() -> None:
    assert leading_matches((1, 2, 3, 4), (1, 2, 9, 4)) == 2  # the 4 after the difference does not count
    assert leading_matches((7, 2), (1, 2)) == 0
    reference = ((1, 2, 3, 4), (5, 6, 7, 8), (9, 9, 9, 9))
    assert greedy_agreement(reference, reference, 4) == (1.0, 1.0)
    flipped = ((1, 2, 3, 4), (5, 0, 7, 8), (0, 9, 9, 9))
    assert greedy_agreement(flipped, reference, 4) == ((1 + 1 / 4 + 0) / 3, 1 / 3)
    assert all(math.isnan(v) for v in greedy_agreement((), (), 4))
    with pytest.raises(ValueError, match="1 continuations against 3 of the reference"):
        greedy_agreement(reference[:1], reference, 4)
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        greedy_agreement(reference, reference, 0)


@attrs.frozen
class Sums:
    last_top: tuple[int, ...]
    last_kl: tuple[float, ...] = ()


def test_last_position_figures_of_a_pass_against_the_baseline() -> None:
    baseline = Sums((3, 4, 5, 6))
    figures = last_position(Sums((3, 4, 0, 6), (0.5, 0.25, 2.0, -1e-18)), baseline)
    assert (figures.captions, figures.kl, figures.top1) == (4, 0.6875, 0.75)
    assert (figures.greedy_tokens, figures.greedy_captions) == (0, 0)  # no generation check
    assert math.isnan(figures.greedy_agreement)
    assert math.isnan(last_position(Sums((3, 4, 5, 6)), baseline).kl)  # no reference: no KL
    assert last_position(Sums((3,), (-1e-17,)), Sums((3,))).kl == 0.0  # rounding below 0 is no damage
    checked = last_position(
        Sums((3, 4, 0, 6), (0.0,) * 4),
        baseline,
        steps=2,
        continuations=((3, 1), (4, 4)),
        reference=((3, 1), (4, 5)),
    )
    assert (checked.greedy_tokens, checked.greedy_captions) == (2, 2)
    assert (checked.greedy_agreement, checked.greedy_identical) == (0.75, 0.5)


def test_the_sentence_says_where_against_what_and_how_greedy_agreement_counts() -> None:
    text = last_position_text(FIGURES)
    assert text == (
        "KL 0.0123 at each held-out caption's last token (the position a deployed model generates from, "
        "which ΔNLL and KL never score), same most likely next token as the 16-bit model on 95% of 64 "
        "captions; greedy agreement 0.81: continuing 16 captions by 8 tokens each, on average that share "
        "of the tokens came before the first one differing from the 16-bit model's (12 of 16 identical "
        "throughout)"
    )
    off = last_position_text(LastPosition(captions=4, kl=0.0, top1=1.0))
    assert off.endswith("on 100% of 4 captions; no generation check (greedy_tokens = 0)")


# --------------------------------------------------------------------------------------------------
# Settings


TABLES: dict[str, Callable[..., ValidateSpec | FrontierSpec]] = {
    "validate": ValidateSpec,
    "frontier": functools.partial(FrontierSpec, "8"),
}


@pytest.mark.parametrize("table", list(TABLES))
def test_the_defaults_are_a_cheap_check_that_is_on(table: str) -> None:
    made = TABLES[table]()
    assert (made.greedy_tokens, made.greedy_samples) == (8, 16)
    assert TABLES[table](greedy_tokens=0).greedy_tokens == 0  # off


REFUSED = [
    ("greedy_tokens", -1, "must be >= 0, got -1"),
    (
        "greedy_tokens",
        65,
        "must be at most 64 (0 = no generation check), got 65: each token costs a forward pass of every "
        "greedy caption with both models",
    ),
    ("greedy_samples", 0, "must be > 0, got 0"),
    ("greedy_samples", -4, "must be > 0, got -4"),
]


@pytest.mark.parametrize(("key", "value", "problem"), REFUSED, ids=[f"{k}={v}" for k, v, _ in REFUSED])
@pytest.mark.parametrize("table", ["validate", "frontier"])
def test_degenerate_greedy_settings_are_refused_naming_the_key(
    table: str, key: str, value: int, problem: str, tmp_path: Path
) -> None:
    with pytest.raises(SpecError) as info:
        TABLES[table](**{key: value})
    owner = "ValidateSpec" if table == "validate" else "FrontierSpec"
    assert str(info.value) == f"{owner}.{key}: {problem}"
    path = tmp_path / "p.toml"
    path.write_text(
        '[model]\npath = "builtin:tiny-qwen3-vl"\n'
        + ("[validate]\n" if table == "validate" else '[frontier]\nbits = "8"\n'),
        encoding="utf-8",
    )
    setting = f"{table}.{key}={value}"
    with pytest.raises(ConfigError) as refused:
        load_pipeline(path, (setting,))
    assert str(refused.value) == f"{path}: {table}.{key}: {problem} (from --set {setting})"


# --------------------------------------------------------------------------------------------------
# The manifest and the reports


def validation(figures: LastPosition | None) -> ValidationReport:
    return ValidationReport(
        groups=(ValidatedGroup("lm_head", "INT8_DEFAULT_CFG", 2.0, "top", 0.5, 0.25, 1),),
        baseline_nll=2.0,
        spearman_nll=math.nan,
        kendall_nll=math.nan,
        spearman_kl=math.nan,
        kendall_kl=math.nan,
        topk_overlap=1.0,
        k=1,
        joint_delta_nll=math.nan,
        sum_delta_nll=math.nan,
        holdout_samples=64,
        holdout_tokens=700,
        seconds=1.0,
        restored_exactly=True,
        chosen_delta_nll=0.03,
        last_position=figures,
    )


def point(budget: float, figures: LastPosition | None) -> MeasuredPoint:
    return MeasuredPoint(budget, budget, 1.0 / budget, 0.01, 0.02, 3, last_position=figures)


def measured(*points: MeasuredPoint) -> MeasuredFrontier:
    return MeasuredFrontier(points, 2.0, 0.01, math.nan, math.nan, 64, 700, "h.txt", True, 1.0)


def manifest_with(report: ValidationReport, frontier: MeasuredFrontier) -> Manifest:
    summary = FrontierSummary("gradient", 2, 8.0, 12.0, 8.0, (), (), None, None, measured=frontier)
    made = build_manifest(
        scores(score_group("lm_head", int8(2.0))), ManifestSpec(scheme="t"), model=TEST_MODEL, dataset=None
    )
    return attrs.evolve(made, validation=report, frontier=summary)


def test_the_manifest_records_the_figures_and_reads_back_the_same() -> None:
    no_greedy = LastPosition(captions=64, kl=0.5, top1=0.25)
    manifest = manifest_with(validation(FIGURES), measured(point(8.0, no_greedy), point(12.0, FIGURES)))
    text = manifest_to_json(manifest)
    data = json.loads(text)
    assert data["validation"]["last_position"] == attrs.asdict(FIGURES)
    stored = data["frontier"]["measured"]["points"]
    assert stored[0]["last_position"]["greedy_agreement"] == "NaN"  # strict JSON spells out NaN
    assert stored[1]["last_position"]["top1"] == 0.953125
    back = manifest_from_dict(data, "m.json")
    assert back.validation is not None
    assert back.validation.last_position == FIGURES
    assert back.frontier is not None
    assert back.frontier.measured is not None
    assert back.frontier.measured.points[1].last_position == FIGURES
    assert manifest_to_json(back) == text


def test_a_manifest_written_before_the_check_reads_and_writes_as_it_always_did() -> None:
    older = manifest_with(validation(None), measured(point(8.0, None)))
    data = manifest_to_dict(older)
    assert "last_position" not in data["validation"]
    assert "last_position" not in data["frontier"]["measured"]["points"][0]
    text = manifest_to_json(older)
    back = manifest_from_dict(json.loads(text), "old.json")
    assert back.validation is not None
    assert back.validation.last_position is None
    assert manifest_to_json(back) == text


def test_the_validation_section_says_what_the_figures_are() -> None:
    manifest = manifest_with(validation(FIGURES), measured())
    lines = validation_markdown(manifest)
    chosen = lines.index("- **AutoQuant's chosen mix:** ΔNLL 0.03")
    assert lines[chosen + 1] == (
        f"- **Where a deployed model generates (chosen mix vs 16-bit):** {last_position_text(FIGURES)}"
    )
    older = validation_markdown(manifest_with(validation(None), measured()))
    assert not any("deployed model" in line for line in older)


def test_the_frontier_table_shows_the_figures_of_each_measured_point() -> None:
    frontier = Frontier(
        method="gradient",
        groups=("lm_head",),
        points=(FrontierPoint(8.0, 8.0, ("INT8",), 8.0, 8.0, 1.0, True, True),),
        format_bits=(("INT8", 8.0), ("NONE", 16.0)),
        min_bits_lm=8.0,
        min_bits_model=8.0,
        lm_weights=100.0,
        other_weights=0.0,
        exact_order=True,
        seconds=0.1,
    )
    no_greedy = LastPosition(captions=64, kl=0.5, top1=0.25)
    text = frontier_markdown(
        frontier, title="t", measured=measured(point(8.0, FIGURES), point(10.0, no_greedy), point(12.0, None))
    )
    lines = text.partition("## Measured on held-out captions")[2].splitlines()
    header = next(line for line in lines if line.startswith("| budget | LM bits"))
    assert header.endswith("| measured KL | last-token KL | last-token top-1 | greedy agreement | flags |")
    rows = [line for line in lines if line.startswith(("| 8 |", "| 10 |", "| 12 |"))]
    assert rows[0].endswith("| 2.0000e-02 | 1.2300e-02 | 0.953 | 0.812 |  |")
    assert rows[1].endswith("| 5.0000e-01 | 0.250 | n/a |  |")  # measured without a generation check
    assert rows[2].endswith("| n/a | n/a | n/a |  |")  # a point measured before aqm had the check
    assert (
        "*Greedy agreement*: 16 captions continued by 8 tokens greedily by both models; the mean share of "
        "the tokens generated before the first one that differs (1 = the same text throughout)."
    ) in text
