"""Routed-token counts in the manifest and the report; the rare-expert rule; both cost models.

Plain data only: the counts are written down (``builders.routing``), the groups are a 30B-A3B
shaped manifest at toy size (``builders.moe_manifest``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import attrs
import pytest

from auto_quantize_model.artifacts import GroupScore
from auto_quantize_model.core.experts import experts_markdown, routed_tokens
from auto_quantize_model.core.frontier_points import search_space, solve_budgets
from auto_quantize_model.core.routing import apply_rare_rule, chosen_bits, group_shares
from auto_quantize_model.errors import ConfigError, InputError
from auto_quantize_model.io.manifest import manifest_from_dict, manifest_to_dict, manifest_to_json
from auto_quantize_model.render.reports import render_layer_json, render_markdown
from builders import INT8, MOE_LAYERS, NONE, group, int8, moe_manifest, routing

EXPERT = f"{MOE_LAYERS}.1.mlp.experts.2"
COUNTS = ((6, 0, 3, 3), (1, 5, 4, 2))  # 6 tokens, top-2: 12 routed per layer


def test_each_expert_group_rests_on_its_experts_tokens() -> None:
    stats = routing(*COUNTS)
    split = moe_manifest(2, 4, "expert")
    tokens = routed_tokens(split.groups, stats)
    assert tokens[f"{EXPERT}.gate_proj"] == 4
    assert tokens[f"{MOE_LAYERS}.0.mlp.experts.1.gate_proj"] == 0
    assert f"{MOE_LAYERS}.0.self_attn.q_proj" not in tokens
    assert len(tokens) == 8
    projection = routed_tokens(moe_manifest(2, 4, "projection").groups, stats)
    assert projection[f"{EXPERT}.gate_proj"] == projection[f"{EXPERT}.down_proj"] == 4
    fused = routed_tokens(moe_manifest(2, 4, "layer").groups, stats)
    assert fused == {f"{MOE_LAYERS}.0.mlp.experts": 12, f"{MOE_LAYERS}.1.mlp.experts": 12}
    assert routed_tokens(split.groups, None) == {}


def test_the_report_shows_the_tokens_beside_the_scores() -> None:
    stats = routing(*COUNTS)
    split = attrs.evolve(moe_manifest(2, 4, "expert"), routing=stats)
    text = "\n".join(experts_markdown(split.groups, stats))
    assert "the calibration's 6 real tokens (1 batches, padding left out)" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    # Layer 0's worst expert is expert 0 (importances fall along network order): 6 tokens.
    assert rows[0].split(" | ")[3:5] == ["0", "6"]
    assert rows[0].endswith("| 0 / 3 / 6 |")
    assert rows[1].endswith("| 1 / 3 / 5 |")
    fused = "\n".join(experts_markdown(moe_manifest(2, 4, "layer").groups, stats))
    assert "| 0 | 4 | 2 | 0 / 3 / 6 | 1 |" in fused  # one expert of layer 0 was sent nothing
    without = "\n".join(experts_markdown(split.groups, None))
    assert "were not counted for this run" in without
    rows_json = render_layer_json(split)["layer_sensitivity"]
    by_name = {row["layer"]: row for row in rows_json}
    assert by_name[f"{EXPERT}.gate_proj"]["routed_tokens"] == 4
    assert "routed_tokens" not in by_name["lm_head"]


def test_the_manifest_keeps_the_counts_and_older_manifests_still_read(tmp_path: Path) -> None:
    stats = routing(*COUNTS)
    built = attrs.evolve(moe_manifest(2, 4, "expert"), routing=stats)
    data = json.loads(manifest_to_json(built))
    assert data["routing"]["layers"][1]["tokens"] == [1, 5, 4, 2]
    assert manifest_from_dict(data, "m.json").routing == stats
    older = manifest_to_dict(moe_manifest(2, 4, "expert"))
    assert "routing" not in older  # left out when absent: files of dense runs stay as they were
    assert manifest_from_dict(older, "m.json").routing is None


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda layer: layer | {"tokens": [6, 0, 3, 2]},
            "routed 11 tokens; 6 tokens to top-2 experts each make 12",
        ),
        (lambda layer: layer | {"top_k": 5}, "has top_k 5 for 4 experts"),
        (lambda layer: layer | {"tokens": [13, -1, 0, 0]}, "gives an expert a negative token count"),
    ],
)
def test_counts_no_run_can_write_are_refused(edit: object, message: str) -> None:
    data = json.loads(manifest_to_json(attrs.evolve(moe_manifest(2, 4, "expert"), routing=routing(*COUNTS))))
    data["routing"]["layers"][0] = edit(data["routing"]["layers"][0])  # type: ignore[operator]
    with pytest.raises(InputError, match=re.escape("routing.layers[0] (layer 0)")) as caught:
        manifest_from_dict(data, "m.json")
    assert message in str(caught.value)


# --------------------------------------------------------------------------------------------------
# The rare-expert rule and the two cost models, by hand: one MoE layer of 4 experts (top-2) of
# 300 weights each, and an attention group of 1,000 weights. INT8 halves a group's cost.
# --------------------------------------------------------------------------------------------------

ATTN = f"{MOE_LAYERS}.0.self_attn.q_proj"
TOKENS = (10, 0, 3, 7)  # 10 real tokens, 2 experts each; experts 1 and 2 saw fewer than 5


def expert_name(index: int) -> str:
    return f"{MOE_LAYERS}.0.mlp.experts.{index}.gate_proj"


def hand_groups(best: str = INT8) -> list[GroupScore]:
    def modules(index: int) -> tuple[str, ...]:
        stem = f"{MOE_LAYERS}.0.mlp.experts.{index}"
        return (f"{stem}.gate_proj", f"{stem}.up_proj", f"{stem}.down_proj")

    experts = [
        group(expert_name(i), int8(score), NONE, best=best, module_names=modules(i), costs=(150.0, 300.0))
        for i, score in enumerate((1.0, 0.0, 0.002, 3.0))
    ]
    return [group(ATTN, int8(5.0), NONE, best=best, costs=(500.0, 1000.0)), *experts]


def solve_at(budget: float, *, rare: int, cost_model: Any) -> Any:
    groups = hand_groups()
    space, _ = search_space(groups, "gradient")
    solved = solve_budgets(
        space,
        (budget,),
        run_budget=None,
        run_choice=groups,
        routing=routing(TOKENS),
        rare_expert_tokens=rare,
        cost_model=cost_model,
    )
    return solved, solved.frontier.point(budget)


def test_rarely_routed_experts_take_their_layers_mean_scores() -> None:
    groups = hand_groups()
    out, rule = apply_rare_rule(groups, routing(TOKENS), 5)
    assert rule.applied == (expert_name(1), expert_name(2))
    scores = {g.name: g.scores for g in out}
    assert scores[expert_name(1)] == scores[expert_name(2)] == (2.0, 0.0)  # mean of experts 0 and 3
    assert scores[expert_name(0)] == (1.0, 0.0)
    assert scores[ATTN] == (5.0, 0.0)
    assert "2 expert group(s) routed fewer than 5 calibration tokens" in rule.note()
    assert apply_rare_rule(groups, routing(TOKENS), 0)[1].applied == ()
    assert apply_rare_rule(groups, None, 5)[1].applied == ()
    # A layer with no expert routed enough keeps its scores: nothing better to put in.
    _, none_enough = apply_rare_rule(groups, routing(TOKENS), 11)
    assert none_enough.applied == ()
    assert len(none_enough.kept) == 4


def test_the_rule_changes_the_solvers_choice() -> None:
    """Active budget 13 bits = 1,300 of 1,600 active weight-units: save 300. Without the rule the
    four experts (scores 1 + 0 + 0.002 + 3) beat the attention (5); with it they score 8."""
    _, plain = solve_at(13.0, rare=0, cost_model="active")
    assert plain.formats == ("NONE", INT8, INT8, INT8, INT8)
    assert plain.effective_bits_lm == plain.active_bits_lm == pytest.approx(13.0)
    solved, ruled = solve_at(13.0, rare=5, cost_model="active")
    assert ruled.formats == (INT8, "NONE", "NONE", "NONE", "NONE")
    assert ruled.effective_bits_lm == ruled.active_bits_lm == pytest.approx(16 * (500 + 600) / 1600)
    assert ruled.storage_bits_lm == pytest.approx(16 * (500 + 1200) / 2200)
    assert solved.frontier.cost_model == "active"
    assert any("rare-expert rule" in note for note in solved.notes)


def test_storage_and_active_bits_by_hand() -> None:
    """Storage budget 13 bits = 1,787.5 of 2,200: save 412.5, three experts (450) at least score."""
    _, point = solve_at(13.0, rare=0, cost_model="storage")
    assert point.formats == ("NONE", INT8, INT8, INT8, "NONE")
    assert point.effective_bits_lm == point.storage_bits_lm == pytest.approx(16 * 1750 / 2200)
    # Active: attention whole (1,000), each expert at 2/4: (3 x 150 + 300) / 2 = 375 of 600.
    assert point.active_bits_lm == pytest.approx(16 * 1375 / 1600)
    groups = hand_groups()  # every group on INT8
    shares = group_shares(groups, routing(TOKENS))
    assert shares == {expert_name(i): 0.5 for i in range(4)}
    assert chosen_bits(groups, 0.0, shares) == pytest.approx(16 * (500 + 300) / 1600)
    assert chosen_bits(groups, 0.0, {}) == pytest.approx(8.0)
    assert chosen_bits(groups, 400.0, {}) == pytest.approx(16 * (1100 + 400) / 2600)


def test_active_budgets_need_routing_counts() -> None:
    groups = hand_groups()
    space, _ = search_space(groups, "gradient")
    with pytest.raises(ConfigError, match="cost_model = 'active' needs the MoE routing counts"):
        solve_budgets(space, (8.0,), run_budget=None, run_choice=groups, cost_model="active")


def test_the_report_states_both_bits_and_the_rule() -> None:
    built = manifest_of(hand_groups())
    text = render_markdown(built)
    assert "storage 8.000 (every expert's weights), active 8.000" in text
    assert "budgets count `storage`" in text
    assert "applied to 2 expert group(s)" in text
    assert f"`{MOE_LAYERS}.0.mlp.experts.1`" in text.split("Rare-expert rule applied to", 1)[1]
    half = manifest_of([g if g.name == ATTN else attrs.evolve(g, best_format="NONE") for g in hand_groups()])
    # Attention on INT8 (500 of 1,000), experts whole: storage 16 x 1,700 / 2,200, active 16 x 1,100 / 1,600.
    assert f"storage {16 * 1700 / 2200:.3f}" in render_markdown(
        attrs.evolve(half, scheme=attrs.evolve(half.scheme, effective_bits_lm=16 * 1700 / 2200))
    )
    assert f"active {16 * 1100 / 1600:.3f}" in render_markdown(half)


def manifest_of(groups: list[GroupScore]) -> Any:
    from auto_quantize_model.core.ranking import rank_groups

    base = moe_manifest(1, 4, "expert")
    return attrs.evolve(
        base,
        groups=rank_groups(groups),
        routing=routing(TOKENS),
        scheme=attrs.evolve(base.scheme, rare_expert_tokens=5, effective_bits_lm=8.0),
    )


def test_the_frontier_page_shows_both_bits() -> None:
    from auto_quantize_model.render.frontier import render_markdown as frontier_markdown

    solved, _ = solve_at(13.0, rare=5, cost_model="active")
    page = frontier_markdown(solved.frontier, title="t", notes=solved.notes)
    assert "budgets and LM bits count **active** weights" in page
    assert "| budget | LM bits | storage bits | active bits | model bits |" in page
    assert f"| 13 | 11.000 | {16 * 1700 / 2200:.3f} | 11.000 |" in page
