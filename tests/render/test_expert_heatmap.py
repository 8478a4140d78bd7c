"""The MoE heatmap: layers x experts, importance beside routed tokens, at 30B-A3B's 48 x 128."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import attrs
import pytest

from auto_quantize_model.render.plots import EXPERTS_STEM, HEATMAP_STEM, _expert_map, expert_grid, write_plots
from builders import moe_manifest, routing

LAYERS, EXPERTS, TOP_K = 48, 128, 8
BASE = [(e * 37) % 101 for e in range(EXPERTS)]  # uneven loads, a few experts sent nothing


def counts(layer: int) -> list[int]:
    """Layer ``layer``'s counts: the same loads rotated, so every layer routes the same total."""
    return BASE[layer:] + BASE[:layer]


def moe_30b(grouping: str) -> Any:
    built = moe_manifest(LAYERS, EXPERTS, grouping)
    stats = routing(*(counts(layer) for layer in range(LAYERS)), top_k=TOP_K)
    return attrs.evolve(built, routing=attrs.evolve(stats, real_tokens=sum(BASE) // TOP_K))


def images(figure: Any) -> dict[str, Any]:
    """The panels of an expert map by name: each one's axes."""
    return {axes.get_label(): axes for axes in figure.axes if axes.get_xlabel() == "expert"}


def test_the_expert_map_holds_layers_by_experts_of_scores_and_tokens() -> None:
    manifest = moe_30b("expert")
    grid = expert_grid(manifest.groups, manifest.routing)
    assert grid is not None
    assert (len(grid.layers), grid.experts, grid.groups_per_expert) == (LAYERS, EXPERTS, 1)
    assert grid.tokens is not None
    assert grid.tokens[5][0] == counts(5)[0]
    panels = images(_expert_map(grid, "t"))
    assert set(panels) == {"importance", "routed tokens"}
    for axes in panels.values():
        data = axes.images[0].get_array()
        assert data.shape == (LAYERS, EXPERTS)
        assert [label.get_text() for label in axes.get_yticklabels()] == [str(i) for i in range(LAYERS)]
        assert [label.get_text() for label in axes.get_xticklabels()][:3] == ["0", "4", "8"]
    tokens = panels["routed tokens"].images[0].get_array()
    assert tokens[3][10] == counts(3)[10]
    assert tokens[0][0] < 1  # an expert sent no token: drawn in the "under" colour, below the scale
    importance = panels["importance"].images[0].get_array()
    assert math.isclose(importance[1][2], 1e-3 / (1 + 1 * EXPERTS + 2))


def test_fused_experts_get_a_map_of_their_routed_tokens_only() -> None:
    manifest = moe_30b("layer")
    grid = expert_grid(manifest.groups, manifest.routing)
    assert grid is not None
    assert grid.groups_per_expert == 0
    panels = images(_expert_map(grid, "t"))
    assert list(panels) == ["routed tokens"]
    assert panels["routed tokens"].images[0].get_array().shape == (LAYERS, EXPERTS)
    assert expert_grid(moe_manifest(2, 4, "layer").groups, None) is None  # nothing per expert to draw


@pytest.mark.slow
def test_the_moe_heatmap_file_is_written_beside_the_layer_heatmap(tmp_path: Path) -> None:
    from matplotlib.image import imread

    written = {p.name for p in write_plots(moe_30b("projection"), tmp_path)}
    assert {f"{EXPERTS_STEM}.png", f"{EXPERTS_STEM}.svg", f"{HEATMAP_STEM}.png"} <= written
    height, width = imread(tmp_path / f"{EXPERTS_STEM}.png").shape[:2]
    assert width <= 2400
    assert height / width > 0.3, f"{width}x{height}: too thin to read"
