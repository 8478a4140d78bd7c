"""Which format each group gets: fused siblings kept together, choices from a run or a frontier point."""

from __future__ import annotations

import pytest

from auto_quantize_model.core.export_choice import (
    GroupChoice,
    check_fused_siblings,
    choices_at,
    choices_from_groups,
)
from auto_quantize_model.errors import ConfigError, InputError
from auto_quantize_model.frontier_records import Frontier, FrontierPoint
from builders import FP8, INT8, fp8, group, int8

# --------------------------------------------------------------------------------------------------
# Choices
# --------------------------------------------------------------------------------------------------


def test_fused_siblings_split_across_groups_are_refused_naming_the_group() -> None:
    split = [
        GroupChoice("l.0.q_proj", ("l.0.q_proj",), "wint8_aint8"),
        GroupChoice("l.0.k_proj", ("l.0.k_proj", "l.0.v_proj"), "wfp8_afp8"),
    ]
    with pytest.raises(ConfigError, match=r"^group l\.0\.q_proj: fused siblings q/k/v of l\.0 must share"):
        check_fused_siblings(split)
    gate_only = [GroupChoice("l.0.mlp.gate_proj", ("l.0.mlp.gate_proj",), "wint8_aint8")]
    check_fused_siblings(gate_only)  # alone it splits nothing ...
    with pytest.raises(ConfigError, match=r"l\.0\.mlp\.up_proj \(unlisted: NONE\)"):
        check_fused_siblings(gate_only, known_modules=["l.0.mlp.gate_proj", "l.0.mlp.up_proj"])
    together = [GroupChoice("l.0.mlp.gate_proj", ("l.0.mlp.gate_proj", "l.0.mlp.up_proj"), "wint8_aint8")]
    check_fused_siblings(
        together, known_modules=["l.0.mlp.gate_proj", "l.0.mlp.up_proj", "l.0.mlp.down_proj"]
    )
    experts = [
        GroupChoice("m.mlp.experts.0.gate_proj", ("m.mlp.experts.0.gate_proj",), "wint8_aint8"),
        GroupChoice("m.mlp.experts.1.down_proj", ("m.mlp.experts.1.down_proj",), "NONE"),
    ]
    with pytest.raises(ConfigError, match=r"fused siblings experts of m\.mlp\.experts"):
        check_fused_siblings(experts)


def test_choices_come_from_the_runs_groups_or_a_frontier_point() -> None:
    mods = ("l.0.q_proj", "l.0.k_proj")
    groups = [group("l.0.q_proj", int8(1.0), fp8(2.0), module_names=mods), group("l.0.o_proj", fp8(1.0))]
    assert choices_from_groups(groups) == (
        GroupChoice("l.0.q_proj", mods, INT8),
        GroupChoice("l.0.o_proj", ("l.0.o_proj",), FP8),
    )
    assert choices_from_groups(groups, {"l.0.o_proj": "NONE"})[1].format == "NONE"
    with pytest.raises(ConfigError, match=r"format chosen for 'l\.9', which is no recipe group"):
        choices_from_groups(groups, {"l.9": INT8})

    def point(budget: float, formats: tuple[str, ...], reachable: bool = True) -> FrontierPoint:
        return FrontierPoint(budget, budget, formats, budget, budget, 0.0, reachable, True)

    frontier = Frontier(
        method="gradient",
        groups=("l.0.q_proj", "l.0.o_proj"),
        points=(point(7.0, (INT8, INT8), reachable=False), point(12.0, (FP8, "NONE"))),
        format_bits=((INT8, 8.0), (FP8, 8.0), ("NONE", 16.0)),
        min_bits_lm=8.0,
        min_bits_model=8.0,
        lm_weights=2.0,
        other_weights=0.0,
        exact_order=True,
        seconds=0.0,
    )
    chosen = choices_at(frontier, 12.0, groups)
    assert [(c.name, c.module_names, c.format) for c in chosen] == [
        ("l.0.q_proj", mods, FP8),
        ("l.0.o_proj", ("l.0.o_proj",), "NONE"),
    ]
    with pytest.raises(ConfigError, match=r"no point at 9 bits \(solved: 7, 12\)"):
        choices_at(frontier, 9.0, groups)
    with pytest.raises(ConfigError, match="below the cheapest mix"):
        choices_at(frontier, 7.0, groups)
    with pytest.raises(InputError, match=r"frontier group 'l\.0\.o_proj' is not among"):
        choices_at(frontier, 12.0, groups[:1])
