"""The budget frontier's pictures: predicted score, format mix, measured and predicted damage.

Apart from the table and JSON (:mod:`.frontier`) because drawing is its own job, with its own
heavy import: matplotlib is imported inside the figure functions only (object API, Agg canvas).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from auto_quantize_model.core.frontier import step_changes
from auto_quantize_model.frontier_records import Frontier, FrontierPoint
from auto_quantize_model.render.figures import save_figure, symlog_ticks
from auto_quantize_model.render.plots import short_name

if TYPE_CHECKING:
    from auto_quantize_model.artifacts import MeasuredFrontier
    from auto_quantize_model.core.damage import BoundChoice, DamageModel, Prediction

DPI = 150
SCORE_STEM = "frontier-score"
FORMATS_STEM = "frontier-formats"
MEASURED_STEM = "frontier-measured"
DAMAGE_STEM = "frontier-damage"
STEMS = (SCORE_STEM, FORMATS_STEM, MEASURED_STEM, DAMAGE_STEM)


def frontier_pictures(
    frontier: Frontier,
    directory: Path,
    *,
    title: str,
    run_budget: float | None = None,
    measured: MeasuredFrontier | None = None,
    damage: DamageModel | None = None,
    bound: BoundChoice | None = None,
    banner: str = "",
) -> list[Path]:
    """Every picture the frontier has data for, as PNG and SVG in ``directory`` (which must exist)."""
    pictures = _save(_score_figure(frontier, title, run_budget), directory, SCORE_STEM, banner)
    pictures += _save(_formats_figure(frontier, title), directory, FORMATS_STEM, banner)
    if measured is not None and measured.points:
        pictures += _save(_measured_figure(measured, title), directory, MEASURED_STEM, banner)
    if damage is not None:
        pictures += _save(_damage_figure(frontier, damage, bound, title), directory, DAMAGE_STEM, banner)
    return pictures


def _save(figure: Any, directory: Path, stem: str, banner: str = "") -> list[Path]:
    """PNG and SVG without dates or random ids: the same frontier gives the same bytes."""
    return save_figure(figure, directory, stem, salt="auto-quantize-model-frontier", dpi=DPI, banner=banner)


def _kind(point: FrontierPoint) -> str:
    if not point.reachable:
        return "unreachable (cheapest mix)"
    if point.non_monotone:
        return "non-monotone step"
    if not point.satisfied:
        return "not satisfied"
    return "least-score mix"


def _score_figure(frontier: Frontier, title: str, run_budget: float | None) -> Any:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 4.6), layout="constrained")
    axes = figure.add_subplot()
    points = [p for p in frontier.points if math.isfinite(p.total_score)]
    x = [p.effective_bits_lm for p in points]
    y = [p.total_score for p in points]
    axes.plot(x, y, color="C0", linewidth=1.0, zorder=1)
    kinds = [
        ("unreachable (cheapest mix)", "o", "0.6"),
        ("non-monotone step", "X", "C3"),
        ("not satisfied", "s", "C1"),
        ("least-score mix", "o", "C0"),
    ]
    for label, marker, colour in kinds:
        chosen = [p for p in points if _kind(p) == label]
        if chosen:
            axes.scatter(
                [p.effective_bits_lm for p in chosen],
                [p.total_score for p in chosen],
                marker=marker,
                s=22,
                color=colour,
                label=f"{label} ({len(chosen)})",
                zorder=2,
            )
    notes = []
    if y and all(v > 0 for v in y):
        axes.set_yscale("log")
    elif y:
        magnitudes = [abs(v) for v in y if v != 0]
        axes.set_yscale("symlog", linthresh=min(magnitudes) if magnitudes else 1e-12)
        symlog_ticks(axes.yaxis, y)
        notes.append("scores ≤ 0 present: symlog axis")
    if run_budget is not None:
        try:
            run = frontier.point(run_budget)
            axes.axvline(
                run.effective_bits_lm, color="0.3", linestyle="--", linewidth=0.8, label="run's budget"
            )
        except KeyError:
            notes.append(f"run's budget {run_budget:g} not among the points")
    axes.set_xlabel("effective bits reached (language model)")
    axes.set_ylabel("predicted total score (lower is better)")
    header = f"{title}: {frontier.method} frontier, {len(frontier.points)} budgets"
    axes.set_title(header + (f"\n({'; '.join(notes)})" if notes else ""), fontsize=9)
    axes.grid(True, which="major", alpha=0.3)
    if points:
        axes.legend(fontsize=7)
    return figure


def _formats_figure(frontier: Frontier, title: str) -> Any:
    import matplotlib
    import numpy as np
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    names = [name for name, _ in frontier.format_bits]
    index = {name: i for i, name in enumerate(names)}
    grid = np.array([[index[f] for f in p.formats] for p in frontier.points], dtype=float).T
    palette = matplotlib.colormaps["viridis"].resampled(max(len(names) - 1, 1))
    colours = [palette(i) for i in range(len(names) - 1)] + ["#e8e8e8"]  # NONE (16 bits) pale
    if names[-1] != "NONE":
        colours = [palette(i) for i in range(len(names))]
    cmap = ListedColormap(colours)
    norm = BoundaryNorm([i - 0.5 for i in range(len(names) + 1)], cmap.N)
    counts = [len(c) for c in step_changes(frontier)]

    n_groups, n_points = grid.shape
    height = min(2.2 + 0.12 * n_groups, 16.0)
    width = min(max(6.5, 3.0 + 0.05 * n_points), 18.0)
    figure = Figure(figsize=(width, height), layout="constrained")
    strip, heat = figure.subplots(2, 1, sharex=True, height_ratios=[1, 6])
    positions = list(range(n_points))
    strip.bar(positions, counts, width=0.9, color="C3")
    strip.set_ylabel("changed", fontsize=7)
    strip.tick_params(labelsize=7)
    heat.imshow(grid, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    step = max(1, math.ceil(n_points / 24))
    ticks = positions[::step]
    heat.set_xticks(ticks, [f"{frontier.points[i].budget:g}" for i in ticks], fontsize=7, rotation=90)
    row_step = max(1, math.ceil(n_groups / 60))
    rows = list(range(0, n_groups, row_step))
    heat.set_yticks(rows, [short_name(frontier.groups[i]) for i in rows], fontsize=6)
    heat.set_xlabel("budget (LM effective bits)")
    unreachable = [i for i, p in enumerate(frontier.points) if not p.reachable]
    if unreachable:
        heat.axvspan(-0.5, max(unreachable) + 0.5, color="black", alpha=0.15, linewidth=0)
    bits = dict(frontier.format_bits)
    heat.legend(
        handles=[Patch(color=colours[i], label=f"{name} ({bits[name]:g} b)") for i, name in enumerate(names)],
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
    )
    note = "; shaded: unreachable budgets (cheapest mix)" if unreachable else ""
    strip.set_title(
        f"{title}: format of every group per budget, and groups changed per step{note}", fontsize=9
    )
    return figure


def _measured_figure(measured: MeasuredFrontier, title: str) -> Any:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 4.6), layout="constrained")
    axes = figure.add_subplot()
    points = list(measured.points)
    x = [p.effective_bits_lm for p in points]
    predicted = [p.predicted_score for p in points]
    axes.plot(x, predicted, color="C0", marker="o", markersize=5, linewidth=1.0, label="predicted score")
    if predicted and all(v > 0 for v in predicted):
        axes.set_yscale("log")
    axes.set_xlabel("effective bits reached (language model)")
    axes.set_ylabel("predicted total score", color="C0")
    other = axes.twinx()
    nll = [p.delta_nll for p in points]
    other.plot(x, nll, color="C2", marker="s", markersize=5, linewidth=1.0, label="measured ΔNLL")
    flagged = [p for p in points if p.non_monotone]
    if flagged:
        other.scatter(
            [p.effective_bits_lm for p in flagged],
            [p.delta_nll for p in flagged],
            marker="X",
            s=60,
            color="C3",
            zorder=3,
            label="measured non-monotone",
        )
    other.set_ylabel("measured ΔNLL (held-out)", color="C2")
    handles = axes.get_legend_handles_labels()[0] + other.get_legend_handles_labels()[0]
    axes.legend(handles=handles, fontsize=7, loc="upper right")
    axes.set_title(
        f"{title}: predicted vs measured at {len(points)} budgets (Spearman {measured.spearman_nll:.2f})",
        fontsize=9,
    )
    axes.grid(True, which="major", alpha=0.3)
    return figure


def _damage_figure(frontier: Frontier, damage: DamageModel, bound: BoundChoice | None, title: str) -> Any:
    """Predicted KL per budget (centre and interval band within the data), the measured KL of
    the fitted mixes, and the bound with the chosen mix when ``--max-kl`` was asked."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 4.6), layout="constrained")
    axes = figure.add_subplot()
    inside: list[tuple[float, Prediction]] = []
    beyond: list[tuple[float, Prediction]] = []
    for point in sorted(frontier.points, key=lambda p: p.effective_bits_lm):
        if point.total_score > 0.0 and math.isfinite(point.total_score):
            kept = inside if damage.within_data(point.total_score) else beyond
            kept.append((point.effective_bits_lm, damage.kl(point.total_score)))
    if inside:
        x = [bits for bits, _ in inside]
        axes.fill_between(
            x,
            [p.low for _, p in inside],
            [p.high for _, p in inside],
            color="C0",
            alpha=0.2,
            linewidth=0,
            label=f"{damage.level:.0%} prediction interval",
        )
        axes.plot(
            x, [p.central for _, p in inside], color="C0", marker="o", markersize=3, label="predicted KL"
        )
    if beyond:
        axes.plot(
            [bits for bits, _ in beyond],
            [p.central for _, p in beyond],
            color="0.6",
            linestyle="--",
            marker="o",
            markersize=3,
            label="beyond the measured scores (not trusted)",
        )
    axes.scatter(
        [p.effective_bits_lm for p in damage.points],
        [p.kl_div for p in damage.points],
        marker="s",
        s=36,
        color="C2",
        zorder=3,
        label=f"measured KL ({len(damage.points)} fitted)",
    )
    if bound is not None:
        axes.axhline(bound.bound, color="C3", linestyle=":", linewidth=1.0, label=f"bound {bound.bound:.3g}")
        axes.scatter(
            [bound.point.effective_bits_lm],
            [bound.kl.high],
            marker="*",
            s=140,
            color="C3",
            zorder=4,
            label=f"chosen: {bound.point.effective_bits_lm:.3f} bits (upper end)",
        )
        if bound.measured_kl is not None:
            axes.scatter(
                [bound.point.effective_bits_lm],
                [bound.measured_kl],
                marker="D",
                s=40,
                facecolors="none",
                edgecolors="C3",
                zorder=4,
                label="chosen, measured",
            )
    values = [p.kl_div for p in damage.points] + [p.low for _, p in inside + beyond]
    if values and all(v > 0 for v in values):
        axes.set_yscale("log")
    axes.set_xlabel("effective bits reached (language model)")
    axes.set_ylabel("held-out KL to the unquantized model (nats/token)")
    axes.set_title(f"{title}: predicted damage per budget (KL = score x {damage.factor:.3g})", fontsize=9)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize=7)
    return figure
