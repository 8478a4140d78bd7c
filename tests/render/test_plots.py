"""Plots: grid placement (pure), and real PNG/SVG files of sensible size (matplotlib, headless)."""

from __future__ import annotations

import json
import math
import struct
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import attrs
import pytest

from auto_quantize_model.render.plots import (
    HEATMAP_STEM,
    SCATTER_STEM,
    TOP_STEM,
    grid_slot,
    importance_grid,
    missing_plots,
    render_plots_markdown,
    short_name,
    write_plots,
)
from auto_quantize_model.validation_records import ValidatedGroup, ValidationReport
from builders import SEEDS
from builders import manifest as make_manifest

pytestmark = pytest.mark.slow  # matplotlib renders every figure: slow tier (fast one under a minute)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("name", "slot"),
    [
        ("model.language_model.layers.12.mlp.down_proj", (12, "down")),
        ("model.language_model.layers.0.self_attn.q_proj", (0, "q/k/v")),
        ("model.language_model.layers.3.self_attn.o_proj", (3, "o")),
        ("model.language_model.layers.35.mlp.gate_proj", (35, "gate/up")),
        ("language_model.layers.7.mlp.up_proj.quant_recipe", (7, "gate/up")),  # previous tool, older layout
        ("model.layers.2.self_attn.k_proj", (2, "q/k/v")),  # plain causal LM
        ("lm_head", (None, "lm_head")),
        ("model.visual.blocks.0.attn.qkv", None),
        ("model.vision_tower.encoder.layers.1.self_attn.q_proj", None),  # vision, despite layers.N
        ("model.visual.merger.linear_fc1", None),
        ("model.language_model.layers.4.mlp.experts.0.w1", None),  # unknown kind
    ],
)
def test_grid_slot(name: str, slot: tuple[int | None, str] | None) -> None:
    assert grid_slot(name) == slot


def test_short_name() -> None:
    assert short_name("model.language_model.layers.12.mlp.down_proj") == "layers.12.mlp.down_proj"
    assert short_name("language_model.layers.1.mlp.gate_proj.quant_recipe") == "layers.1.mlp.gate_proj"
    assert short_name("model.layers.2.self_attn.q_proj") == "layers.2.self_attn.q_proj"
    assert short_name("lm_head") == "lm_head"


L = "model.language_model.layers."
# Two decoder layers scored over six decades, one zero, q and k scored apart, plus head and vision.
ENTRIES = [
    (L + "1.mlp.down_proj", 30.0),
    (L + "0.mlp.down_proj", 2.0),
    (L + "0.mlp.gate_proj", 0.5),
    ("lm_head", 0.02),
    (L + "1.self_attn.k_proj", 4e-3),
    (L + "1.self_attn.q_proj", 1e-3),
    (L + "0.self_attn.q_proj", 1e-4),
    (L + "0.self_attn.o_proj", 3e-5),
    ("model.visual.blocks.0.attn.qkv", 1e-2),
    (L + "1.self_attn.o_proj", 0.0),
]


def test_importance_grid() -> None:
    grid = importance_grid(make_manifest(ENTRIES).groups)
    assert grid.kinds == ("q/k/v", "o", "gate/up", "down", "lm_head")
    assert grid.columns == ("0", "1", "head")
    values = {
        (kind, col): v
        for kind, row in zip(grid.kinds, grid.values, strict=True)
        for col, v in zip(grid.columns, row, strict=True)
    }
    assert values["q/k/v", "1"] == 4e-3  # q and k share the cell: the larger importance shows
    assert values["down", "1"] == 30.0
    assert values["o", "1"] == 0.0
    assert values["lm_head", "head"] == 0.02
    assert math.isnan(values["gate/up", "1"])  # no group there
    assert math.isnan(values["down", "head"])
    assert grid.left_out == ("model.visual.blocks.0.attn.qkv",)


def test_importance_grid_without_head_or_layers() -> None:
    no_head = importance_grid(make_manifest([(L + "2.mlp.down_proj", 1.0)]).groups)
    assert no_head.kinds == ("q/k/v", "o", "gate/up", "down")
    assert no_head.columns == ("0", "1", "2")  # a missing layer is a grey column, not a squeezed axis
    vision_only = importance_grid(make_manifest([("model.visual.blocks.0.attn.qkv", 1.0)]).groups)
    assert vision_only.kinds == ()
    assert vision_only.columns == ()


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def svg_text(path: Path) -> str:
    root = ET.fromstring(path.read_bytes())  # raises on malformed XML
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    return "".join(root.itertext())


def check_images(paths: tuple[Path, ...], directory: Path) -> None:
    assert all(p.parent == directory and p.is_file() for p in paths)
    for png in (p for p in paths if p.suffix == ".png"):
        width, height = png_size(png)
        assert 300 <= width <= 6000, (png.name, width)
        assert 200 <= height <= 6000, (png.name, height)
        svg_text(png.with_suffix(".svg"))
    leftovers = [p.name for p in directory.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
    assert leftovers == []  # atomic writes leave no temporary files


VALIDATION = ValidationReport(
    groups=(
        ValidatedGroup(L + "1.mlp.down_proj", "INT8", 30.0, "top", 0.05, 0.04),
        ValidatedGroup(L + "0.mlp.down_proj", "INT8", 2.0, "top", 0.01, 0.008),
        ValidatedGroup(L + "0.self_attn.o_proj", "INT8", 3e-5, "bottom", -2e-4, 1e-5),  # noise: ΔNLL < 0
        ValidatedGroup(L + "1.self_attn.o_proj", "INT8", 0.0, "bottom", 0.0, 0.0),
        ValidatedGroup("lm_head", "INT8", 0.02, "random", 3e-3, 2e-3),
        ValidatedGroup(L + "0.mlp.gate_proj", "INT8", 0.5, "random", math.nan, math.nan),
    ),
    baseline_nll=3.2,
    spearman_nll=0.9,
    kendall_nll=0.8,
    spearman_kl=0.85,
    kendall_kl=0.7,
    topk_overlap=1.0,
    k=2,
    joint_delta_nll=0.07,
    sum_delta_nll=0.06,
    holdout_samples=16,
    holdout_tokens=400,
    seconds=1.0,
    restored_exactly=True,
)


def test_write_plots_with_validation(tmp_path: Path) -> None:
    out = tmp_path / "reports"  # created on demand
    paths = write_plots(make_manifest(ENTRIES, validation=VALIDATION), out)
    assert [p.name for p in paths] == [
        f"{stem}.{fmt}" for stem in (HEATMAP_STEM, TOP_STEM, SCATTER_STEM) for fmt in ("png", "svg")
    ]
    check_images(paths, out)
    assert "white: scored ≤ 0" in svg_text(out / f"{HEATMAP_STEM}.svg")
    assert "top 9 of 9 groups scored above 0" in svg_text(out / f"{TOP_STEM}.svg")
    scatter = svg_text(out / f"{SCATTER_STEM}.svg")
    assert "Spearman 0.900, Kendall 0.800, n=5" in scatter
    assert "2 ΔNLL ≤ 0: symlog axis" in scatter
    assert "1 score ≤ 0: symlog axis" in scatter
    assert "1 non-finite point(s) left out" in scatter


def test_write_plots_is_deterministic_and_overwrites(tmp_path: Path) -> None:
    manifest = make_manifest(ENTRIES[:4])
    first = write_plots(manifest, tmp_path)
    before = {p: p.read_bytes() for p in first}
    second = write_plots(manifest, tmp_path)
    assert first == second
    assert all(p.read_bytes() == before[p] for p in second)  # same input, byte-identical files


def test_each_figure_is_laid_out_and_drawn_once_per_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two drawings a figure (Agg, then SVG through its mixed-mode renderer); savefig per format made
    four (a layout pass before each)."""
    from matplotlib.figure import Figure

    draws: list[str] = []
    original = Figure.draw

    def counted(self: Figure, renderer: Any) -> None:
        draws.append(type(renderer).__name__)
        original(self, renderer)

    monkeypatch.setattr(Figure, "draw", counted)
    paths = write_plots(make_manifest(ENTRIES, validation=VALIDATION), tmp_path)
    figures = len(paths) // 2
    assert figures == 3
    assert sorted(draws) == sorted(["RendererAgg", "MixedModeRenderer"] * figures), draws


def test_the_png_is_what_savefig_writes_and_the_svg_has_its_layout(tmp_path: Path) -> None:
    import io as bytes_io

    from matplotlib.figure import Figure

    from auto_quantize_model.render.figures import DPI, save_figure

    def figure() -> Figure:
        made = Figure(figsize=(4, 3), layout="constrained")
        axes = made.subplots()
        axes.plot([1, 2, 3], [3, 1, 2])
        axes.set_title("a title long enough to move the layout")
        axes.set_ylabel("importance")
        return made

    png, svg = save_figure(figure(), tmp_path, "f", salt="s")
    reference = bytes_io.BytesIO()
    figure().savefig(reference, format="png", dpi=DPI, metadata={"Software": None})
    assert png.read_bytes() == reference.getvalue()
    assert "a title long enough" in svg_text(svg)


def test_validation_argument_and_what_is_left_out(tmp_path: Path) -> None:
    only_vision = make_manifest([("model.visual.blocks.0.attn.qkv", 1.0), ("model.visual.merger.fc", 0.0)])
    paths = write_plots(only_vision, tmp_path, validation=VALIDATION)
    # no decoder group: no heatmap; the bar chart and the scatter (validation passed in) remain
    assert [p.name for p in paths] == [
        f"{TOP_STEM}.png",
        f"{TOP_STEM}.svg",
        f"{SCATTER_STEM}.png",
        f"{SCATTER_STEM}.svg",
    ]
    check_images(paths, tmp_path)
    nothing = make_manifest([("model.visual.merger.fc", 0.0)])
    assert write_plots(nothing, tmp_path / "empty") == ()


def test_render_plots_markdown(tmp_path: Path) -> None:
    paths = (tmp_path / f"{HEATMAP_STEM}.png", tmp_path / f"{HEATMAP_STEM}.svg", tmp_path / f"{TOP_STEM}.png")
    text = render_plots_markdown(paths, tmp_path)
    assert (
        text.splitlines()[0]
        == f"![Importance by decoder layer and module kind (log colour scale)]({HEATMAP_STEM}.png)  "
    )
    assert f"[SVG]({TOP_STEM}.svg)" in text
    assert text.count("![") == 2
    assert render_plots_markdown((), tmp_path) == ""


@pytest.mark.parametrize(
    ("relative", "has_head", "scored"),
    [
        ("wint8_aint8/wint8_aint8_autoquant_lm_quant_manifest.json", True, 145),
        # older layout: names without "model.", no lm_head group, vision groups scored 0
        ("int8_lm_default_legacy/int8_autoquant_lm_default_quant_manifest.json", False, 144),
    ],
)
def test_real_manifests(tmp_path: Path, relative: str, has_head: bool, scored: int) -> None:
    from auto_quantize_model.io.legacy import legacy_manifest_from_dict

    path = SEEDS / relative
    manifest = legacy_manifest_from_dict(json.loads(path.read_text()), path)
    grid = importance_grid(manifest.groups)
    assert grid.columns == (*map(str, range(36)), *(("head",) if has_head else ()))
    assert len(grid.left_out) == 105  # the vision tower
    assert not any(math.isnan(v) for row in grid.values[:4] for v in row[:36])  # every decoder cell scored
    paths = write_plots(manifest, tmp_path)
    assert [p.name for p in paths] == [
        f"{stem}.{fmt}" for stem in (HEATMAP_STEM, TOP_STEM) for fmt in ("png", "svg")
    ]
    check_images(paths, tmp_path)
    width, height = png_size(tmp_path / f"{HEATMAP_STEM}.png")
    assert width > 2 * height  # 36 layers across, 4-5 module kinds down
    assert f"top 30 of {scored} groups scored above 0" in svg_text(tmp_path / f"{TOP_STEM}.svg")


EXTREME = [
    (L + "0.mlp.down_proj", math.inf),  # rank 1 as in the manifest, but a bar cannot be infinite
    (L + "1.mlp.down_proj", 1e308),  # an overflowed score
    (L + "0.self_attn.q_proj", 1.0),
    (L + "1.self_attn.q_proj", 1.0),  # equal importances
    (L + "0.self_attn.o_proj", 5e-324),  # a denormal
]


def validation_of(points: list[tuple[float, float]]) -> ValidationReport:
    return attrs.evolve(
        VALIDATION,
        groups=tuple(
            ValidatedGroup(f"{L}{i}.mlp.up_proj", "INT8", score, "random", delta, 0.0)
            for i, (score, delta) in enumerate(points)
        ),
        spearman_nll=math.nan,
        kendall_nll=math.nan,
    )


def test_extreme_values_are_drawn_at_the_edge_and_the_titles_say_so(tmp_path: Path) -> None:
    validation = validation_of([(1e308, 1e308), (1.0, -1e308), (1.0, 0.5), (5e-324, 0.5)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow or "non-positive xlim" on the way
        paths = write_plots(make_manifest(EXTREME, validation=validation), tmp_path)
    assert [p.stem for p in paths if p.suffix == ".png"] == [HEATMAP_STEM, TOP_STEM, SCATTER_STEM]
    check_images(paths, tmp_path)
    assert "2 importance(s) beyond 1e±100 drawn at the edge" in svg_text(tmp_path / f"{HEATMAP_STEM}.svg")
    bars = svg_text(tmp_path / f"{TOP_STEM}.svg")
    assert "top 4 of 4 groups scored above 0" in bars
    assert "1 group(s) with a non-finite importance not drawn" in bars
    assert "2 importance(s) beyond 1e±100 drawn at the edge" in bars
    scatter = svg_text(tmp_path / f"{SCATTER_STEM}.svg")
    assert "Spearman n/a, Kendall n/a, n=4" in scatter
    assert "2 score(s) beyond 1e±100 drawn at the edge" in scatter
    assert "2 ΔNLL value(s) beyond 1e±100 drawn at the edge" in scatter


def test_missing_plots_say_why(tmp_path: Path) -> None:
    assert missing_plots(make_manifest(ENTRIES, validation=VALIDATION)) == ()
    assert missing_plots(make_manifest([])) == ("No plots: the manifest ranks no group.",)
    vision = make_manifest([("model.visual.merger.fc", 0.0), ("model.visual.blocks.0.attn.qkv", math.nan)])
    no_heatmap, no_bars = missing_plots(vision)
    assert no_heatmap.startswith("No heatmap: none of the 2 groups is a decoder layer's projection")
    assert (
        no_bars
        == "No bar chart: no group has a positive finite importance (1 scored 0 or less, 1 non-finite)."
    )
    assert write_plots(vision, tmp_path) == ()
    unmeasured = attrs.evolve(VALIDATION, groups=())
    assert missing_plots(make_manifest(ENTRIES), unmeasured) == ("No scatter: validation measured no group.",)
    text = render_plots_markdown((), tmp_path, missing_plots(vision))
    assert text == f"*{no_heatmap}*\n\n*{no_bars}*\n"
