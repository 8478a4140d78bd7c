"""Score health checks on a crafted scores artifact, and on the previous tool's real manifests."""

from __future__ import annotations

import json
import math

from auto_quantize_model.core.health import NonFinite, NonMonotone, Tie, render_health_markdown, score_health
from auto_quantize_model.manifest_records import RankedGroup
from builders import NONE, SEEDS, group, ranked_group

CRAFTED = (
    group("fine", ("INT8", 8.0, 1.5), NONE),
    group("nan", ("INT8", 8.0, math.nan), NONE),
    group("inf", ("INT4", 4.0, math.inf), ("INT8", 8.0, 2.0), NONE),
    group("zero_one", ("INT8", 8.0, 0.0), NONE),
    group("zero_two", ("INT8", 8.0, 0.0), ("FP8", 8.0, 0.0), NONE),
    group("tie_a", ("INT8", 8.0, 0.25), NONE),
    group("tie_b", ("FP8", 8.0, 0.125), ("INT8", 8.0, 0.25), NONE),
    # 4 bits hurting less than 8 bits: non-monotone
    group("fewer_bits_lower", ("INT4", 4.0, 0.1), ("INT8", 8.0, 0.3), NONE),
    # negative score: fewer bits than NONE (16) yet lower than NONE's 0
    group("negative", ("INT8", 8.0, -0.01), NONE),
    # same, with NONE not listed: the implicit NONE at 16 bits scoring 0 applies
    group("negative_implicit_none", ("INT8", 8.0, -0.02)),
    group("vision", ("NONE(effective-bits: 16.0)", 16.0, 0.0)),
)


def test_crafted_scores() -> None:
    health = score_health(CRAFTED)
    assert health.groups == len(CRAFTED)
    nan_entry, inf_entry = health.non_finite
    assert (nan_entry.group, nan_entry.format, math.isnan(nan_entry.score)) == ("nan", "INT8", True)
    assert inf_entry == NonFinite("inf", "INT4", math.inf)
    assert health.non_finite_groups == ("nan", "inf")
    assert health.zero == ("zero_one", "zero_two")
    # tie_a and tie_b share importance 0.25 (tie_b's max over its formats); zeros are not ties
    assert health.ties == (Tie(0.25, ("tie_a", "tie_b")),)
    assert health.tied_groups == ("tie_a", "tie_b")
    assert health.non_monotone == (
        NonMonotone("fewer_bits_lower", "INT4", 4.0, 0.1, "INT8", 8.0, 0.3),
        NonMonotone("negative", "INT8", 8.0, -0.01, "NONE", 16.0, 0.0),
        NonMonotone("negative_implicit_none", "INT8", 8.0, -0.02, "NONE", 16.0, 0.0),
    )
    assert health.non_monotone_groups == ("fewer_bits_lower", "negative", "negative_implicit_none")
    assert health.unquantized == ("vision",)
    assert not health.ok


def test_same_bits_never_non_monotone_and_nan_left_to_its_own_check() -> None:
    # INT8 and FP8 are both 8 bits: any order between them is fine. INT4=inf > INT8 is monotone.
    health = score_health([CRAFTED[1], CRAFTED[2], CRAFTED[6]])
    assert health.non_monotone == ()


def test_ranked_groups_work_too() -> None:
    ranked = [
        ranked_group("b", 1, 3.0),
        ranked_group("a", 2, 3.0),
        ranked_group("c", 3, 1.0),
    ]
    health = score_health(ranked)
    assert health.ties == (Tie(3.0, ("b", "a")),)  # rank order kept
    assert (health.zero, health.non_finite, health.non_monotone) == ((), (), ())


def test_clean_scores_render_as_passed() -> None:
    health = score_health([CRAFTED[0], CRAFTED[5]])
    assert health.ok
    text = render_health_markdown(health)
    assert text.startswith("## Score health\n")
    assert "All 2 groups passed every check." in text
    assert "- Non-finite scores (NaN/Inf): none" in text
    assert "- Scores non-monotone in bits: none" in text


def test_markdown_names_every_problem() -> None:
    text = render_health_markdown(score_health(CRAFTED), level=3)
    lines = text.splitlines()
    assert lines[0] == "### Score health"
    by_check = {line.split(":**")[0]: line for line in lines if line.startswith("- **")}
    assert "`nan` (INT8: nan)" in by_check["- **Non-finite scores (NaN/Inf)"]
    assert "`inf` (INT4: inf)" in by_check["- **Non-finite scores (NaN/Inf)"]
    assert "2 groups" in by_check["- **Groups scored 0"]
    assert "`zero_one`, `zero_two`" in by_check["- **Groups scored 0"]
    assert "0.25: `tie_a` = `tie_b`" in by_check["- **Exact ties among non-zero importances"]
    assert (
        "`fewer_bits_lower` (INT4 at 4 bits: 0.1 < INT8 at 8 bits: 0.3)"
        in by_check["- **Scores non-monotone in bits"]
    )
    assert "3 groups" in by_check["- **Scores non-monotone in bits"]
    assert any(line.startswith("- Not scored") and "`vision`" in line for line in lines)


def test_long_lists_are_cut() -> None:
    zeros = [group(f"layers.{i}.mlp", ("INT8", 8.0, 0.0), NONE) for i in range(20)]
    text = render_health_markdown(score_health(zeros))
    line = next(line for line in text.splitlines() if "Groups scored 0" in line)
    assert "20 groups" in line
    assert "`layers.7.mlp`, … and 12 more" in line
    assert "`layers.8.mlp`" not in line


def _legacy(relative: str) -> list[RankedGroup]:
    from auto_quantize_model.io.legacy import legacy_manifest_from_dict

    path = SEEDS / relative
    return list(legacy_manifest_from_dict(json.loads(path.read_text()), path).groups)


def test_real_manifest_old_layout_scores_the_vision_tower_zero() -> None:
    # The older INT8 run offered INT8 to the 105 vision groups, which an LM-only loss never reaches.
    health = score_health(_legacy("int8_lm_default_legacy/int8_autoquant_lm_default_quant_manifest.json"))
    assert len(health.zero) == 105
    assert all(name.startswith("visual.") for name in health.zero)
    assert (health.non_finite, health.ties, health.non_monotone) == ((), (), ())


def test_real_manifest_new_layout_is_healthy() -> None:
    health = score_health(_legacy("wfp8_afp8/wfp8_afp8_autoquant_lm_quant_manifest.json"))
    assert health.ok
    assert len(health.unquantized) == 105
    assert health.groups == 250
