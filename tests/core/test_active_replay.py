"""The run check under ``autoquant.cost_model = "active"`` replays ModelOpt's ``active_moe`` search.

By hand: one attention group (1,000 weights) and one MoE layer of 4 experts (300 weights each,
top-2: each counts at 0.5), INT8 or NONE, at the run's own budget of 12 LM bits. Active costs
are 1,000 + 4 x 150 = 1,600 at 16 bits, so the budget is 1,200. No mix lands in ModelOpt's first
cost floor, 99 % (1,188..1,200); in the second, 90 % (1,080..1,200), only attention in INT8 with
every expert whole (1,100) fits, and that is what ModelOpt's active_moe search returns. Counted in
storage (2,200 weights, budget 1,650) the same search would quantize every expert and keep the
attention; and with the weight cost model's floor order (unfloored first) CBC takes expert 1's
free INT8 (score 0) as well.
"""

from __future__ import annotations

from auto_quantize_model.artifacts import GroupScore
from auto_quantize_model.core.frontier import modelopt_frontier
from auto_quantize_model.core.frontier_points import search_space, solve_budgets
from auto_quantize_model.core.frontier_replay import ACTIVE_MOE_LOWER_BOUNDS, LOWER_BOUNDS
from auto_quantize_model.core.routing import group_shares, scaled_space
from builders import INT8, MOE_LAYERS, NONE, group, int8, routing

ATTN = f"{MOE_LAYERS}.0.self_attn.q_proj"
TOKENS = (10, 0, 3, 7)
ACTIVE_CHOICE = (INT8, "NONE", "NONE", "NONE", "NONE")


def hand_groups(best: tuple[str, ...]) -> list[GroupScore]:
    def modules(index: int) -> tuple[str, ...]:
        stem = f"{MOE_LAYERS}.0.mlp.experts.{index}"
        return (f"{stem}.gate_proj", f"{stem}.up_proj", f"{stem}.down_proj")

    experts = [
        group(
            f"{MOE_LAYERS}.0.mlp.experts.{i}.gate_proj",
            int8(score),
            NONE,
            best=chosen,
            module_names=modules(i),
            costs=(150.0, 300.0),
        )
        for i, (score, chosen) in enumerate(zip((1.0, 0.0, 0.002, 3.0), best[1:], strict=True))
    ]
    return [group(ATTN, int8(5.0), NONE, best=best[0], costs=(500.0, 1000.0)), *experts]


def test_the_hand_example_tells_the_three_searches_apart() -> None:
    groups = hand_groups(ACTIVE_CHOICE)
    space, _ = search_space(groups, "gradient")
    active = scaled_space(space, group_shares(groups, routing(TOKENS)))
    assert active.lm_weights == 1600.0
    picks = {
        name: modelopt_frontier(where, (12.0,), lower_bounds=bounds).points[0].formats
        for name, where, bounds in (
            ("active_moe", active, ACTIVE_MOE_LOWER_BOUNDS),
            ("active costs, weight floors", active, LOWER_BOUNDS),
            ("storage", space, LOWER_BOUNDS),
        )
    }
    assert picks == {
        "active_moe": ACTIVE_CHOICE,
        "active costs, weight floors": (INT8, "NONE", INT8, "NONE", "NONE"),
        "storage": ("NONE", INT8, INT8, INT8, INT8),
    }


def test_the_run_check_replays_active_moe_and_matches_its_choice() -> None:
    groups = hand_groups(ACTIVE_CHOICE)
    space, _ = search_space(groups, "gradient")
    solved = solve_budgets(
        space, (8.0,), run_budget=12.0, run_choice=groups, routing=routing(TOKENS), cost_model="active"
    )
    assert solved.run_checked
    assert solved.run_mismatches == ()
    assert (
        "budgets count active weights (autoquant.cost_model = 'active'): each routed expert at its layer's "
        "top-k / experts share; ModelOpt's choice in the run counted them the same way (its active_moe "
        "cost model)"
    ) in solved.notes


def test_a_choice_made_counting_storage_is_reported_as_a_mismatch_under_active() -> None:
    storage_choice = ("NONE", INT8, INT8, INT8, INT8)
    groups = hand_groups(storage_choice)
    space, _ = search_space(groups, "gradient")
    solved = solve_budgets(
        space, (8.0,), run_budget=12.0, run_choice=groups, routing=routing(TOKENS), cost_model="active"
    )
    assert solved.run_checked
    assert solved.run_mismatches == (
        f"{ATTN}: {INT8} != NONE",
        *(f"{MOE_LAYERS}.0.mlp.experts.{i}.gate_proj: NONE != {INT8}" for i in range(4)),
    )
