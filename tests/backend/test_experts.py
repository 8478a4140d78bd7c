"""Mixture-of-experts decoders: extraction, the experts ModelOpt sees, their groups, costs and scores.

The tiny MoE (``builtin:tiny-qwen3-vl-moe``: 2 layers of 4 fused experts, top-2) uses the same
transformers classes as Qwen3-VL-30B-A3B, so what ModelOpt does with it is what it does with the
real model. The slow tests run the real ``mtq.auto_quantize`` on CPU through the pipeline.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
import torch
from torch import nn

import builders
from auto_quantize_model.artifacts import LanguageModel, LoadedModel, SensitivityScores
from auto_quantize_model.backend.experts import (
    UnfusedExperts,
    expert_group_key,
    expert_layers,
    fused_expert_weights,
    prepare_experts,
    router_names,
    unfuse_experts,
    use_eager_experts,
)
from auto_quantize_model.backend.models import build_builtin
from auto_quantize_model.pipeline import Artifacts, Pipeline
from auto_quantize_model.sources import TINY_QWEN3_VL, TINY_QWEN3_VL_MOE
from auto_quantize_model.specs import AutoQuantSpec, CalibSpec, ExtractSpec
from auto_quantize_model.stages.build_calib_loader import BuildCalibLoader
from auto_quantize_model.stages.extract_lm import ExtractLM
from auto_quantize_model.stages.run_autoquant import RunAutoQuant

LM = "model.language_model"
LAYERS = 2
EXPERTS = 4
HIDDEN = MLP = 128  # tiny_moe_text: hidden 128, expert MLP 128
EXPERT_WEIGHTS = 3 * HIDDEN * MLP  # gate, up and down of one expert


def tiny_moe() -> LoadedModel:
    return build_builtin(TINY_QWEN3_VL_MOE, seed=0, dtype="float32", device="cpu")


def experts_of(model: Any, layer: int) -> Any:
    return model.model.language_model.layers[layer].mlp.experts


# --------------------------------------------------------------------------------------------------
# The fused experts and what ModelOpt needs of them (no ModelOpt run)
# --------------------------------------------------------------------------------------------------


def test_fused_experts_are_found_with_their_routers_and_real_weight() -> None:
    model = tiny_moe().model
    layers = expert_layers(model)
    assert [layer.name for layer in layers] == [f"{LM}.layers.{i}.mlp.experts" for i in range(LAYERS)]
    assert all(layer.fused and layer.num_experts == EXPERTS and layer.top_k == 2 for layer in layers)
    assert all(layer.weights == EXPERTS * EXPERT_WEIGHTS for layer in layers)
    assert fused_expert_weights(experts_of(model, 0)) == EXPERTS * EXPERT_WEIGHTS
    assert fused_expert_weights(model.lm_head) == 0
    assert router_names(model) == tuple(f"{LM}.layers.{i}.mlp.gate" for i in range(LAYERS))
    # The router is a bare weight, not a linear layer: nothing for ModelOpt to wrap.
    assert not isinstance(model.get_submodule(f"{LM}.layers.0.mlp.gate"), nn.Linear)


def test_eager_experts_replace_grouped_mm() -> None:
    """transformers picks grouped_mm, which never calls F.linear: ModelOpt's quantizers see nothing."""
    model = tiny_moe().model
    experts = experts_of(model, 0)
    assert experts.config._experts_implementation != "eager"
    switched = use_eager_experts(model)
    assert switched
    assert "eager" not in switched
    assert experts.config._experts_implementation == "eager"
    assert use_eager_experts(model) == ()  # already eager: nothing to switch


def test_eager_experts_call_f_linear_per_expert(mocker: Any) -> None:
    """What ModelOpt's fused wrapper intercepts: two F.linear calls per routed expert."""
    model = tiny_moe().model
    use_eager_experts(model)
    experts = experts_of(model, 0)
    hidden = torch.randn(6, HIDDEN)
    index = torch.tensor([[0, 1], [1, 2], [0, 3], [2, 3], [0, 2], [1, 3]])
    weights = torch.full((6, 2), 0.5)
    spy = mocker.spy(torch.nn.functional, "linear")
    experts(hidden, index, weights)
    assert spy.call_count == 2 * EXPERTS


def test_unfused_experts_compute_what_the_fused_ones_do_on_the_same_storage() -> None:
    model = tiny_moe().model
    use_eager_experts(model)
    fused = experts_of(model, 1)
    hidden = torch.randn(10, HIDDEN)
    index = torch.randint(0, EXPERTS, (10, 2))
    weights = torch.rand(10, 2)
    with torch.no_grad():
        expected = fused(hidden, index, weights)
    replaced = unfuse_experts(model)
    assert replaced == tuple(f"{LM}.layers.{i}.mlp.experts" for i in range(LAYERS))
    assert isinstance(experts_of(model, 1), UnfusedExperts)
    split = experts_of(model, 1)
    assert len(split) == EXPERTS
    with torch.no_grad():
        got = split(hidden, index, weights)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # Views, not copies: the split weights live in the fused parameters' storage.
    storage = fused.gate_up_proj.untyped_storage().data_ptr()
    assert split[2].up_proj.weight.untyped_storage().data_ptr() == storage
    assert torch.equal(split[2].up_proj.weight, fused.gate_up_proj[2, MLP:])
    assert torch.equal(split[3].down_proj.weight, fused.down_proj[3])
    names = {name for name, _ in model.named_modules()}
    assert f"{LM}.layers.1.mlp.experts.3.down_proj" in names
    assert expert_layers(model)[1].weights == EXPERTS * EXPERT_WEIGHTS


def _per_expert_loop(
    split: Any, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """transformers' eager experts loop, one ``torch.where`` per routed expert."""
    final = torch.zeros_like(hidden)
    routed = torch.nn.functional.one_hot(index, num_classes=len(split)).permute(2, 1, 0)
    for expert in range(len(split)):
        slot, tokens = torch.where(routed[expert])
        if tokens.numel():
            final.index_add_(0, tokens, split[expert](hidden[tokens]) * weights[tokens, slot, None])
    return final


def test_split_experts_route_with_one_sort_to_the_same_bits_and_skip_unrouted_experts(mocker: Any) -> None:
    model = tiny_moe().model
    use_eager_experts(model)
    unfuse_experts(model)
    split = experts_of(model, 0)
    hidden = torch.randn(13, HIDDEN)
    index = torch.randint(0, EXPERTS - 1, (13, 2))  # the last expert is never routed
    index[:, 1] = (index[:, 0] + 1) % (EXPERTS - 1)  # two different experts a token, as a router picks
    weights = torch.rand(13, 2)
    unrouted = mocker.spy(split[EXPERTS - 1], "forward")
    with torch.no_grad():
        got = split(hidden, index, weights)
        expected = _per_expert_loop(split, hidden, index, weights)
    assert torch.equal(got, expected)
    assert unrouted.call_count == 0


def test_unfusing_twice_changes_nothing_and_dense_models_have_no_experts() -> None:
    model = tiny_moe().model
    unfuse_experts(model)
    assert unfuse_experts(model) == ()
    dense = build_builtin(TINY_QWEN3_VL, seed=0, device="cpu").model
    assert expert_layers(dense) == ()
    assert prepare_experts(dense, "expert") == ()
    assert router_names(dense) == ()


@pytest.mark.parametrize(
    ("grouping", "name", "key"),
    [
        ("expert", "decoder.layers.3.mlp.experts.17.gate_proj", "decoder.layers.3.mlp.experts.17"),
        ("expert", "decoder.layers.3.mlp.experts.17.down_proj", "decoder.layers.3.mlp.experts.17"),
        (
            "projection",
            "decoder.layers.3.mlp.experts.17.up_proj",
            "decoder.layers.3.mlp.experts.17.gate_up_proj",
        ),
        (
            "projection",
            "decoder.layers.3.mlp.experts.17.down_proj",
            "decoder.layers.3.mlp.experts.17.down_proj",
        ),
        ("layer", "decoder.layers.3.mlp.experts.17.gate_proj", None),
        ("expert", "decoder.layers.3.mlp.gate_proj", None),
        ("expert", "decoder.layers.3.self_attn.q_proj", None),
    ],
)
def test_expert_group_keys(grouping: Any, name: str, key: str | None) -> None:
    assert expert_group_key(grouping, name) == key


# --------------------------------------------------------------------------------------------------
# ExtractLM
# --------------------------------------------------------------------------------------------------


def test_extract_lm_prepares_the_experts_and_records_them() -> None:
    loaded = tiny_moe()
    lm = ExtractLM(ExtractSpec()).run(Artifacts.of([loaded]))
    assert isinstance(lm, LanguageModel)
    assert lm.experts == tuple(f"{LM}.layers.{i}.mlp.experts" for i in range(LAYERS))
    assert lm.routers == tuple(f"{LM}.layers.{i}.mlp.gate" for i in range(LAYERS))
    assert lm.expert_grouping == "layer"
    assert experts_of(loaded.model, 0).config._experts_implementation == "eager"
    assert not isinstance(experts_of(loaded.model, 0), UnfusedExperts)


def test_extract_lm_splits_experts_when_asked() -> None:
    loaded = tiny_moe()
    lm = ExtractLM(ExtractSpec(experts="projection")).run(Artifacts.of([loaded]))
    assert lm.expert_grouping == "projection"
    assert isinstance(experts_of(loaded.model, 1), UnfusedExperts)
    assert lm.experts[1] == f"{LM}.layers.1.mlp.experts"


def test_extract_lm_on_a_dense_model_warns_that_there_is_nothing_to_split(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loaded = build_builtin(TINY_QWEN3_VL, seed=0, device="cpu")
    with caplog.at_level(logging.WARNING, logger="auto_quantize_model"):
        lm = ExtractLM(ExtractSpec(experts="expert")).run(Artifacts.of([loaded]))
    assert lm.experts == ()
    assert lm.routers == ()
    assert "has no mixture-of-experts layers, nothing to split" in caplog.text


# --------------------------------------------------------------------------------------------------
# What RunAutoQuant is told: weights counted, routers disabled
# --------------------------------------------------------------------------------------------------


def test_search_plan_counts_expert_weights_and_disables_linear_routers() -> None:
    """ModelOpt costs fused experts by gate_up + down; the plan's own count must agree, and a
    router that is an nn.Linear (older MoE classes) is disabled rather than silently costed."""
    from auto_quantize_model.backend.modelopt.plan import plan_search

    loaded = tiny_moe()
    lm = ExtractLM(ExtractSpec()).run(Artifacts.of([loaded]))
    model: Any = loaded.model
    layer0 = model.model.language_model.layers[0]
    layer0.mlp.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)  # stands in for a Linear router
    plan = plan_search(lm, AutoQuantSpec(formats=("INT8_DEFAULT_CFG",), effective_bits=8.0))
    linears = sum(m.weight.numel() for m in plan.root.modules() if isinstance(m, nn.Linear))
    assert plan.lm_weights == linears + LAYERS * EXPERTS * EXPERT_WEIGHTS
    assert "decoder.layers.0.mlp.gate" in plan.disabled
    assert "decoder.layers.1.mlp.gate" in plan.disabled


# --------------------------------------------------------------------------------------------------
# The real search on CPU
# --------------------------------------------------------------------------------------------------


def search(grouping: Any, loaded: LoadedModel | None = None, method: Any = "gradient") -> SensitivityScores:
    loaded = tiny_moe() if loaded is None else loaded
    store = Pipeline(
        [
            ExtractLM(ExtractSpec(experts=grouping)),
            BuildCalibLoader(CalibSpec(max_samples=8, seq_len=32, batch_size=4)),
            RunAutoQuant(
                AutoQuantSpec(formats=("INT8_DEFAULT_CFG",), effective_bits=12.0, score_size=8, method=method)
            ),
        ],
        supplied=[loaded],
    ).run()
    return store.get(SensitivityScores)


def expert_groups(result: SensitivityScores) -> list[Any]:
    return [g for g in result.groups if ".experts" in g.name]


def cost(group: Any, fmt: str) -> float:
    return float(group.costs[group.formats.index(fmt)])


@pytest.mark.slow
def test_autoquant_scores_each_layers_fused_experts_as_one_group() -> None:
    loaded = tiny_moe()
    result = search("layer", loaded)
    experts = expert_groups(result)
    assert [g.name for g in experts] == [f"{LM}.layers.{i}.mlp.experts" for i in range(LAYERS)]
    for group in experts:
        assert group.module_names == (group.name,)
        # Costed by every expert's real weights: 16 bits each unquantized, 8 in INT8.
        assert cost(group, "NONE") == EXPERTS * EXPERT_WEIGHTS
        assert cost(group, "INT8_DEFAULT_CFG") == EXPERTS * EXPERT_WEIGHTS / 2
        # Eager experts: the quantizers saw the matmuls (grouped_mm would leave exactly 0).
        assert group.scores[group.formats.index("INT8_DEFAULT_CFG")] > 0
    assert not [g for g in result.groups if g.name.endswith(".mlp.gate")]
    model: Any = loaded.model
    router = model.get_submodule(f"{LM}.layers.0.mlp.gate")
    assert not [m for m in router.modules() if "Quantizer" in type(m).__name__]
    experts0 = experts_of(model, 0)
    assert len(experts0.gate_up_proj_weight_quantizers) == EXPERTS
    assert experts0.gate_up_proj_input_quantizer.amax is not None  # calibrated through F.linear
    # The effective bits count the experts at their weight: the LM total is every group's weights.
    total = sum(cost(g, "NONE") for g in result.groups)
    chosen = sum(cost(g, g.best_format) for g in result.groups)
    assert math.isclose(result.effective_bits_lm, 16 * chosen / total)


@pytest.mark.slow
def test_autoquant_scores_each_expert_apart_when_split() -> None:
    result = search("expert")
    experts = expert_groups(result)
    assert len(experts) == LAYERS * EXPERTS
    first = experts[0]
    stem = f"{LM}.layers.0.mlp.experts.0"
    assert first.name == f"{stem}.gate_proj"  # ModelOpt names a group after its first module
    assert first.module_names == (f"{stem}.gate_proj", f"{stem}.up_proj", f"{stem}.down_proj")
    for group in experts:
        assert cost(group, "NONE") == EXPERT_WEIGHTS
        assert group.scores[group.formats.index("INT8_DEFAULT_CFG")] > 0
    # Split or fused, the experts weigh the same in the budget.
    assert sum(cost(g, "NONE") for g in experts) == LAYERS * EXPERTS * EXPERT_WEIGHTS


@pytest.mark.slow
def test_projection_grouping_then_fused_search_in_one_process() -> None:
    """gate+up and down apart per expert; afterwards a fused search still works (ModelOpt's
    process-wide registration of the split MoE block is undone)."""
    split = search("projection")
    experts = expert_groups(split)
    assert len(experts) == 2 * LAYERS * EXPERTS
    gate_up = [g for g in experts if len(g.module_names) == 2]
    down = [g for g in experts if g.module_names == (g.name,)]
    assert len(gate_up) == len(down) == LAYERS * EXPERTS
    assert all(g.name.endswith(".down_proj") for g in down)
    assert all(cost(g, "NONE") == 2 * HIDDEN * MLP for g in gate_up)
    fused = search("layer")
    assert len(expert_groups(fused)) == LAYERS


# --------------------------------------------------------------------------------------------------
# Reports and plots at scale: 64 dense layers (257 groups) and 48 layers x 128 experts
# --------------------------------------------------------------------------------------------------

P = "model.language_model.layers"
moe_manifest = builders.moe_manifest


def dense_manifest(layers: int) -> Any:
    from builders import descending, manifest

    names = [
        f"{P}.{layer}.{kind}"
        for layer in range(layers)
        for kind in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
    ]
    return manifest(descending([*names, "lm_head"], top=1000.0), scheme="dense")


@pytest.mark.parametrize(
    ("name", "modules", "slot", "shown"),
    [
        (f"{P}.3.mlp.experts", (), (3, None, "all"), f"{P}.3.mlp.experts"),
        (
            f"{P}.3.mlp.experts.17.gate_proj",
            (
                f"{P}.3.mlp.experts.17.gate_proj",
                f"{P}.3.mlp.experts.17.up_proj",
                f"{P}.3.mlp.experts.17.down_proj",
            ),
            (3, 17, "all"),
            f"{P}.3.mlp.experts.17",
        ),
        (
            f"{P}.3.mlp.experts.17.gate_proj",
            (f"{P}.3.mlp.experts.17.gate_proj", f"{P}.3.mlp.experts.17.up_proj"),
            (3, 17, "gate/up"),
            f"{P}.3.mlp.experts.17.gate_up_proj",
        ),
        (f"{P}.3.mlp.experts.17.down_proj", (), (3, 17, "down"), f"{P}.3.mlp.experts.17.down_proj"),
        (f"{P}.3.mlp.gate_proj", (), None, f"{P}.3.mlp.gate_proj"),
        ("lm_head", (), None, "lm_head"),
    ],
)
def test_expert_groups_are_read_off_their_names(
    name: str, modules: tuple[str, ...], slot: tuple[int, int | None, str] | None, shown: str
) -> None:
    from auto_quantize_model.core.experts import ExpertSlot, display_name, expert_slot

    assert expert_slot(name, modules) == (None if slot is None else ExpertSlot(*slot))  # type: ignore[arg-type]
    assert display_name(name, modules) == shown


@pytest.mark.parametrize("grouping", ["layer", "expert", "projection"])
def test_what_one_expert_group_stands_for_is_said(grouping: str) -> None:
    from auto_quantize_model.core.experts import MEANING, experts_markdown, grouping_of

    built = moe_manifest(layers=3, experts=4, grouping=grouping)
    assert grouping_of(built.groups) == grouping
    text = "\n".join(experts_markdown(built.groups))
    assert "## Experts" in text
    assert MEANING[grouping] in text
    per_layer = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(per_layer) == (0 if grouping == "layer" else 3)
    if grouping == "expert":
        # Layer 1's worst expert is its first (importances fall along network order).
        assert per_layer[1].startswith("| 1 | 4 | ")
        assert per_layer[1].split(" | ")[3] == "0"
    assert experts_markdown(dense_manifest(2).groups) == []


def test_heatmap_grid_gives_experts_their_own_rows() -> None:
    from auto_quantize_model.render.plots import importance_grid

    dense = importance_grid(dense_manifest(2).groups)
    assert dense.kinds == ("q/k/v", "o", "gate/up", "down", "lm_head")
    assert dense.experts_per_cell == 0
    fused = importance_grid(moe_manifest(2, 4, "layer").groups)
    assert fused.kinds == ("q/k/v", "o", "experts", "lm_head")
    assert fused.values[2][:2] == (0.25, 0.25)
    assert fused.left_out == ()
    split = importance_grid(moe_manifest(2, 4, "expert").groups)
    assert split.kinds == ("q/k/v", "o", "experts", "lm_head")
    assert split.experts_per_cell == 4
    assert split.values[2][1] == pytest.approx(1e-3 / 5)  # the worst of layer 1's experts: its first
    projection = importance_grid(moe_manifest(2, 4, "projection").groups)
    assert projection.kinds == ("q/k/v", "o", "experts gate/up", "experts down", "lm_head")


def test_expert_map_is_layers_by_experts_only_when_experts_were_split() -> None:
    from auto_quantize_model.render.plots import expert_grid

    assert expert_grid(moe_manifest(2, 4, "layer").groups) is None
    grid = expert_grid(moe_manifest(3, 4, "projection").groups)
    assert grid is not None
    assert (grid.layers, grid.experts, grid.groups_per_expert) == ((0, 1, 2), 4, 2)
    assert grid.values[2][3] == pytest.approx(1e-3 / (1 + 2 * 4 + 3))  # gate+up beats down (half)


def test_long_heatmaps_are_cut_into_panels() -> None:
    from auto_quantize_model.render.plots import panels

    assert panels(37) == [range(37)]  # 36 layers + head: one strip, as for 4B
    assert [len(p) for p in panels(65)] == [33, 32]  # 32B: 64 layers + head
    assert [len(p) for p in panels(49)] == [25, 24]  # 30B-A3B
    assert [len(p) for p in panels(95)] == [32, 32, 31]
    assert [i for p in panels(95) for i in p] == list(range(95))


def test_long_rankings_show_the_top_and_collapse_or_point_to_the_rest() -> None:
    import re

    from auto_quantize_model.render.reports import TABLE_TOP, render_markdown

    def ranks(text: str) -> list[int]:
        table = text.split("## Ranked groups", 1)[1]
        return [int(rank) for rank in re.findall(r"^\| (\d+) \| `", table, flags=re.MULTILINE)]

    short = render_markdown(dense_manifest(10))  # 41 groups: one table as before
    assert ranks(short) == list(range(1, 42))
    assert "<details>" not in short
    dense = render_markdown(dense_manifest(64))  # 257 groups
    assert ranks(dense) == list(range(1, 258))  # every rank once, in order
    assert dense.index(f"The {TABLE_TOP} most sensitive of 257 groups") < dense.index("<details>")
    assert "<summary>The others (ranks 31 to 257)</summary>" in dense
    split = render_markdown(moe_manifest(48, 128, "expert"))
    assert len(moe_manifest(48, 128, "expert").groups) == 48 * (2 + 128) + 1
    assert ranks(split) == list(range(1, TABLE_TOP + 1))
    assert "The others (ranks 31 to 6241) are in `per-layer-sensitivity.json`" in split
    assert len(split) < 40_000  # readable, not 700 kB of table


@pytest.mark.slow
def test_plots_at_scale_stay_readable(tmp_path: Any) -> None:
    """32B-shaped and 30B-A3B-shaped reports: every picture is written and none is a thin strip."""
    from matplotlib.image import imread

    from auto_quantize_model.render.plots import EXPERTS_STEM, HEATMAP_STEM, TOP_STEM, write_plots

    written = {p.name for p in write_plots(dense_manifest(64), tmp_path / "dense")}
    assert {f"{HEATMAP_STEM}.png", f"{TOP_STEM}.png"} <= written
    assert f"{EXPERTS_STEM}.png" not in written
    heatmap = imread(tmp_path / "dense" / f"{HEATMAP_STEM}.png")
    height, width = heatmap.shape[:2]
    assert width <= 2400
    assert height / width > 0.3, f"{width}x{height}: too thin to read"
    written = {p.name for p in write_plots(moe_manifest(48, 128, "projection"), tmp_path / "moe")}
    assert f"{EXPERTS_STEM}.png" in written
    experts = imread(tmp_path / "moe" / f"{EXPERTS_STEM}.png")
    assert experts.shape[1] <= 2400
