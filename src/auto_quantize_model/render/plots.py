"""Pictures of a ranking: where in the network the sensitive groups sit, which ones lead, and
(after validation) whether the predicted scores track the measured damage.

matplotlib is imported inside :func:`write_plots` only, and through its object API (``Figure``,
no ``pyplot``): nothing global changes, no GUI backend is touched, so plotting works headless and
inside a notebook without switching the user's backend.

Scores span many decades (1e-6 to 1e2 in one Qwen3-VL-4B run), so every score axis is
logarithmic. A log axis has no place for 0 or negatives, nor for magnitudes near the ends of the
float range (an overflowed 1e308, a denormal 5e-324), where matplotlib's tick and colour
arithmetic overflows; non-finite values have no place at all. Each plot says in its title what
it did with such values (drawn at the axis edge, left out), and :func:`missing_plots` says why a
plot was not drawn, for the report to show instead.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from auto_quantize_model.core.experts import display_name, expert_slot
from auto_quantize_model.core.noise import random_weights_banner
from auto_quantize_model.core.scores import coefficient_text, group_name, worst
from auto_quantize_model.io.atomic import own_folder
from auto_quantize_model.render.figures import (
    clip,
    clipped_note,
    positive_finite,
    save_figure,
    symlog_ticks,
    titled,
)

if TYPE_CHECKING:
    from auto_quantize_model.artifacts import RoutingStats
    from auto_quantize_model.manifest_records import Manifest, RankedGroup
    from auto_quantize_model.validation_records import Interval, ValidatedGroup, ValidationReport

EXPERT_KINDS = ("experts", "experts gate/up", "experts down")
"""Heatmap rows of a mixture-of-experts layer: all its experts (fused, or each expert whole),
or the experts' gate+up and down apart. A cell holds the worst of the layer's expert groups."""
HEATMAP_KINDS = ("q/k/v", "o", "gate/up", "down", *EXPERT_KINDS, "lm_head")
"""Heatmap rows: the recipe groups of a Qwen-style decoder layer, then the output head."""
_DENSE_MLP_KINDS = ("gate/up", "down")
_EXPERT_KIND = {"all": "experts", "gate/up": "experts gate/up", "down": "experts down"}
MAX_HEATMAP_COLUMNS = 40
"""More layers than this are drawn as stacked panels of at most this many columns each: one strip
of 64 or 94 layers is too thin to read once a report page scales it to its width."""

HEAD_COLUMN = "head"
TOP_GROUPS = 30

HEATMAP_STEM = "sensitivity-heatmap"
TOP_STEM = "sensitivity-top"
SCATTER_STEM = "validation-scatter"
EXPERTS_STEM = "sensitivity-experts"

_PROJECTION_KIND = {
    "q_proj": "q/k/v",
    "k_proj": "q/k/v",
    "v_proj": "q/k/v",
    "qkv_proj": "q/k/v",
    "o_proj": "o",
    "gate_proj": "gate/up",
    "up_proj": "gate/up",
    "gate_up_proj": "gate/up",
    "down_proj": "down",
}
_DECODER_GROUP = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:\w+\.)*?(" + "|".join(_PROJECTION_KIND) + r")$")
_VISION_PART = re.compile(r"(?:^|\.)(?:visual|vision\w*)(?:\.|$)")
_LM_PREFIX = re.compile(r"^(?:.*?\blanguage_model\.|model\.)")


def grid_slot(name: str, module_names: Sequence[str] = ()) -> tuple[int | None, str] | None:
    """Where a group goes in the heatmap: ``(layer, kind)``, ``(None, "lm_head")``, or None.

    Accepts our names (``model.language_model.layers.12.mlp.down_proj``), the previous tool's
    older ones without ``model.``, a plain causal LM's ``model.layers.N...``, and ModelOpt's
    ``.quant_recipe`` suffix. Vision towers also have ``layers.N.self_attn`` in some models, so
    any name with a vision part is left out rather than mixed into the decoder rows. Expert
    groups go to the rows of :data:`EXPERT_KINDS`; ``module_names`` tells a whole split expert
    (named after its ``gate_proj``) from its gate+up alone.
    """
    name = group_name(name)
    if _VISION_PART.search(name):
        return None
    if name == "lm_head" or name.endswith(".lm_head"):
        return (None, "lm_head")
    expert = expert_slot(name, module_names)
    if expert is not None:
        return (expert.layer, _EXPERT_KIND[expert.part])
    match = _DECODER_GROUP.search(name)
    if match is None:
        return None
    return (int(match.group(1)), _PROJECTION_KIND[match.group(2)])


def short_name(name: str) -> str:
    """The group name without the language model's prefix, for axis labels."""
    return _LM_PREFIX.sub("", group_name(name))


@attrs.frozen
class ImportanceGrid:
    """Heatmap data: ``values[row][column]``, rows = ``kinds``, columns = ``columns``.

    A cell with no group is NaN. When several groups share a cell (q, k and v scored apart) the
    cell shows the worst of their importances, by the rule importance itself uses (the largest,
    NaN if any is NaN).
    """

    kinds: tuple[str, ...]
    columns: tuple[str, ...]
    """Layer indices as text (every index from 0 to the largest seen), then ``head`` if present."""
    values: tuple[tuple[float, ...], ...]
    left_out: tuple[str, ...]
    """Groups that fit no cell (vision, unknown module kinds)."""
    experts_per_cell: int = 0
    """Most expert groups sharing one cell (the worst of them is shown); 0 without experts."""


def importance_grid(groups: Iterable[RankedGroup]) -> ImportanceGrid:
    """Place each group's importance on the layer-by-kind grid (pure; the heatmap draws this)."""
    cells: dict[tuple[int | None, str], float] = {}
    shared: dict[tuple[int | None, str], int] = {}
    left_out = []
    for group in groups:
        slot = grid_slot(group.name, group.module_names)
        if slot is None:
            left_out.append(group.name)
            continue
        cells[slot] = worst((cells[slot], group.importance)) if slot in cells else group.importance
        shared[slot] = shared.get(slot, 0) + 1
    layers = [layer for layer, _ in cells if layer is not None]
    n_layers = max(layers) + 1 if layers else 0
    has_head = (None, "lm_head") in cells
    present = {kind for _, kind in cells}
    moe = bool(present.intersection(EXPERT_KINDS))

    def shown(kind: str) -> bool:
        # Every decoder row once any layer is there (a missing kind shows as grey, which is news),
        # except rows of the other MLP flavour: a MoE model's dense gate/up and down only where it
        # has dense layers, its expert rows only for the grouping it was scored with. The lm_head
        # row only when the head was scored.
        if kind == "lm_head":
            return has_head
        if n_layers == 0:
            return False
        if kind in EXPERT_KINDS:
            return kind in present
        if kind in _DENSE_MLP_KINDS:
            return not moe or bool(present.intersection(_DENSE_MLP_KINDS))
        return True

    kinds = tuple(kind for kind in HEATMAP_KINDS if shown(kind))
    column_keys: list[int | None] = [*range(n_layers), *([None] if has_head else [])]
    values = tuple(tuple(cells.get((column, kind), math.nan) for column in column_keys) for kind in kinds)
    columns = tuple(HEAD_COLUMN if column is None else str(column) for column in column_keys)
    per_cell = max((count for (_, kind), count in shared.items() if kind in EXPERT_KINDS), default=0)
    return ImportanceGrid(kinds, columns, values, tuple(left_out), per_cell)


def panels(count: int, most: int = MAX_HEATMAP_COLUMNS) -> list[range]:
    """``count`` columns cut into the fewest panels of at most ``most``, as even as possible."""
    if count <= most:
        return [range(count)]
    n = math.ceil(count / most)
    size = math.ceil(count / n)
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def _save(figure: Any, directory: Path, stem: str, banner: str = "") -> list[Path]:
    return save_figure(figure, directory, stem, salt="auto-quantize-model", banner=banner)


def _heatmap(grid: ImportanceGrid, title: str) -> Any:
    import matplotlib
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.figure import Figure

    values = [v for row in grid.values for v in row]
    data = np.array([[clip(v) for v in row] for row in grid.values], dtype=float)
    positive = positive_finite(data.ravel().tolist())
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9", under="#ffffff")
    notes = ["grey: no group or non-finite", *clipped_note(values, "importance(s)")]
    if grid.experts_per_cell > 1:
        notes.append(f"expert rows: the worst of up to {grid.experts_per_cell} expert groups per layer")
    if positive:
        low, high = min(positive), max(positive)
        norm: Any = LogNorm(vmin=low, vmax=high if high > low else low * 10)
        zero = np.isfinite(data) & (data <= 0)
        if zero.any():
            data = np.where(zero, low / 10, data)  # shown in the "under" colour, not as missing
            notes.append("white: scored ≤ 0")
    else:
        norm = Normalize(vmin=0.0, vmax=1.0)
        notes.append("no positive score to colour")
    parts = panels(len(grid.columns))
    widest = max(len(part) for part in parts)
    width = min(max(6.5, 2.5 + 0.3 * widest), 16.0)
    height = 0.9 + len(parts) * (0.5 + 0.42 * len(grid.kinds))
    figure = Figure(figsize=(width, height), layout="constrained")
    axes_list = figure.subplots(len(parts), 1, squeeze=False)[:, 0]
    image: Any = None
    for axes, part in zip(axes_list, parts, strict=True):
        columns = [grid.columns[i] for i in part]
        image = axes.imshow(
            data[:, part.start : part.stop], aspect="auto", cmap=cmap, norm=norm, interpolation="nearest"
        )
        step = 1 if len(columns) <= 40 else math.ceil(len(columns) / 40)
        ticks = [i for i in range(len(columns)) if i % step == 0 or columns[i] == HEAD_COLUMN]
        axes.set_xticks(ticks, [columns[i] for i in ticks], fontsize=7)
        axes.set_yticks(range(len(grid.kinds)), grid.kinds, fontsize=8)
    axes_list[-1].set_xlabel("decoder layer")
    axes_list[0].set_title(titled(title, notes), fontsize=9)
    colorbar = figure.colorbar(
        image, ax=list(axes_list), extend="min" if "white: scored ≤ 0" in notes else "neither", fraction=0.04
    )
    colorbar.set_label("importance (log)" if positive else "importance")
    return figure


_KIND_COLOURS = dict(
    zip(
        (*HEATMAP_KINDS, "other"),
        ("C0", "C1", "C2", "C3", "C5", "C6", "C8", "C4", "C7"),
        strict=True,
    )
)


def _top_bars(groups: Sequence[RankedGroup], scored: int, non_finite: int, title: str) -> Any:
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    figure = Figure(figsize=(9.0, 1.6 + 0.24 * max(len(groups), 1)), layout="constrained")
    axes = figure.add_subplot()
    kinds = [(grid_slot(g.name, g.module_names) or (None, "other"))[1] for g in groups]
    positions = range(len(groups))
    values = [clip(g.importance) for g in groups]
    axes.barh(positions, values, color=[_KIND_COLOURS[k] for k in kinds])
    labels = [f"{g.rank}. {short_name(display_name(g.name, g.module_names))}" for g in groups]
    axes.set_yticks(positions, labels, fontsize=7)
    axes.invert_yaxis()  # rank 1 on top
    axes.set_xscale("log")
    # Start a decade boundary below the smallest bar so even the shortest bar has a visible length.
    axes.set_xlim(left=10.0 ** math.floor(math.log10(min(values)) - 1e-9))
    axes.set_xlabel("importance (log)")
    notes = [
        *([f"{non_finite} group(s) with a non-finite importance not drawn"] if non_finite else []),
        *clipped_note((g.importance for g in groups), "importance(s)"),
    ]
    header = f"{title}: top {len(groups)} of {scored} groups scored above 0"
    axes.set_title(titled(header, notes), fontsize=9)
    present = list(dict.fromkeys(kinds))
    axes.legend(
        handles=[Patch(color=_KIND_COLOURS[k], label=k) for k in present], fontsize=7, loc="lower right"
    )
    return figure


@attrs.frozen
class ExpertGrid:
    """Per-expert importances and routed tokens: ``values[row][expert]`` (the worst of the expert's
    groups; NaN when experts were scored as one group per layer) and ``tokens[row][expert]``."""

    layers: tuple[int, ...]
    experts: int
    values: tuple[tuple[float, ...], ...]
    groups_per_expert: int
    """1 when each expert was one group, 2 when gate+up and down were scored apart, 0 when the
    experts were not scored apart (fused: one score per layer, no importance panel)."""
    tokens: tuple[tuple[float, ...], ...] | None = None
    """Routed calibration tokens per expert (NaN where a layer was not counted); None without counts."""


def expert_grid(groups: Iterable[RankedGroup], routing: RoutingStats | None = None) -> ExpertGrid | None:
    """Layers by experts, when experts were scored apart or their routing was counted (else None)."""
    cells: dict[tuple[int, int], list[float]] = {}
    for group in groups:
        slot = expert_slot(group.name, group.module_names)
        if slot is not None and slot.expert is not None:
            cells.setdefault((slot.layer, slot.expert), []).append(group.importance)
    counted = {} if routing is None else {layer.layer: layer.tokens for layer in routing.layers}
    if not cells and not counted:
        return None
    layers = tuple(sorted({layer for layer, _ in cells} | set(counted)))
    experts = max([expert + 1 for _, expert in cells] + [len(tokens) for tokens in counted.values()])
    values = tuple(
        tuple(worst(cells[(layer, e)]) if (layer, e) in cells else math.nan for e in range(experts))
        for layer in layers
    )
    tokens = None
    if counted:
        tokens = tuple(
            tuple(
                float(counted[layer][e]) if layer in counted and e < len(counted[layer]) else math.nan
                for e in range(experts)
            )
            for layer in layers
        )
    per_expert = max((len(v) for v in cells.values()), default=0)
    return ExpertGrid(layers, experts, values, per_expert, tokens)


def _expert_panel(
    figure: Any, axes: Any, grid: ExpertGrid, rows: Sequence[Sequence[float]], what: str
) -> list[str]:
    """One layers x experts image on ``axes``, log-coloured; returns the notes for the title."""
    import matplotlib
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize

    values = [v for row in rows for v in row]
    data = np.array([[clip(v) for v in row] for row in rows], dtype=float)
    positive = positive_finite(data.ravel().tolist())
    cmap = matplotlib.colormaps["viridis" if what == "importance" else "magma"].with_extremes(
        bad="#d9d9d9", under="#ffffff"
    )
    notes = [*clipped_note(values, f"{what}(s)")]
    if positive:
        low, high = min(positive), max(positive)
        norm: Any = LogNorm(vmin=low, vmax=high if high > low else low * 10)
        zero = np.isfinite(data) & (data <= 0)
        if zero.any():
            data = np.where(zero, low / 10, data)
            notes.append(f"white: {what} ≤ 0")
    else:
        norm = Normalize(vmin=0.0, vmax=1.0)
    image = axes.imshow(data, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    x_step = max(1, math.ceil(grid.experts / 32))
    axes.set_xticks(
        range(0, grid.experts, x_step), [str(e) for e in range(0, grid.experts, x_step)], fontsize=7
    )
    y_step = max(1, math.ceil(len(grid.layers) / 48))
    shown = range(0, len(grid.layers), y_step)
    axes.set_yticks(list(shown), [str(grid.layers[i]) for i in shown], fontsize=7)
    axes.set_xlabel("expert")
    axes.set_ylabel("decoder layer")
    colorbar = figure.colorbar(image, ax=axes, fraction=0.04)
    colorbar.set_label(f"{what} (log)" if positive else what)
    return notes


def _expert_map(grid: ExpertGrid, title: str) -> Any:
    """Importance (when experts were scored apart) above routed tokens (when counted): stacked, so
    that 128 experts keep their width on a report page."""
    from matplotlib.figure import Figure

    panels_shown: list[tuple[Sequence[Sequence[float]], str]] = []
    if grid.groups_per_expert:
        panels_shown.append((grid.values, "importance"))
    if grid.tokens is not None:
        panels_shown.append((grid.tokens, "routed tokens"))
    width = min(max(6.5, 2.0 + 0.08 * grid.experts), 16.0)
    height = min(max(3.0, 1.4 + 0.16 * len(grid.layers)), 14.0) * len(panels_shown)
    figure = Figure(figsize=(width, height), layout="constrained")
    axes_list = figure.subplots(len(panels_shown), 1, squeeze=False)[:, 0]
    notes = ["grey: no group, not counted or non-finite"]
    if grid.groups_per_expert > 1:
        notes.append("importance: the worse of the expert's gate+up and down")
    if not grid.groups_per_expert:
        notes.append("experts scored as one group per layer: no per-expert importance")
    for axes, (rows, what) in zip(axes_list, panels_shown, strict=True):
        notes += _expert_panel(figure, axes, grid, rows, what)
        axes.set_label(what)  # names the panel for readers of the figure object (tests)
        axes.set_title(what, fontsize=9)
    # The whole figure's title (with its notes) heads the first panel: the random-weights banner
    # takes the figure's own title (render.figures.save_figure).
    axes_list[0].set_title(titled(f"{title}: {panels_shown[0][1]}", notes, width=70), fontsize=9)
    return figure


def _scatter_panel(axes: Any, validation: ValidationReport, title: str, measure: str) -> None:
    """Predicted score against one measured quantity (``delta_nll`` or ``kl``), with the bootstrap
    interval of each measurement as an error bar when the validation has them."""

    def value(g: ValidatedGroup) -> float:
        return g.delta_nll if measure == "delta_nll" else g.kl_div

    def interval(g: ValidatedGroup) -> Interval | None:
        found = g.delta_nll_ci if measure == "delta_nll" else g.kl_ci
        return found if found is not None and math.isfinite(found.low) and math.isfinite(found.high) else None

    what = "ΔNLL" if measure == "delta_nll" else "KL"
    points = [g for g in validation.groups if math.isfinite(g.score) and math.isfinite(value(g))]
    dropped = len(validation.groups) - len(points)
    for selection, marker in (("top", "o"), ("bottom", "s"), ("random", "^")):
        chosen = [g for g in points if g.selection == selection]
        if not chosen:
            continue
        xs = [clip(g.score) for g in chosen]
        ys = [clip(value(g)) for g in chosen]
        drawn = axes.scatter(xs, ys, marker=marker, label=selection)
        bars = [
            (x, y, interval(g)) for x, y, g in zip(xs, ys, chosen, strict=True) if interval(g) is not None
        ]
        if bars:
            axes.errorbar(
                [x for x, _, _ in bars],
                [y for _, y, _ in bars],
                yerr=[
                    [max(y - clip(i.low), 0.0) for _, y, i in bars if i is not None],
                    [max(clip(i.high) - y, 0.0) for _, y, i in bars if i is not None],
                ],
                fmt="none",
                ecolor=drawn.get_facecolor()[0],
                elinewidth=1.0,
                capsize=2.5,
                alpha=0.7,
            )
    notes = [
        *clipped_note((g.score for g in points), "score(s)"),
        *clipped_note((value(g) for g in points), f"{what} value(s)"),
    ]
    ends = [clip(end) for g in points if (i := interval(g)) is not None for end in (i.low, i.high)]
    for values, set_scale, label, extra in (
        ([clip(g.score) for g in points], axes.set_xscale, "score", []),
        ([clip(value(g)) for g in points], axes.set_yscale, what, ends),
    ):
        if values and all(v > 0 for v in (*values, *extra)):
            set_scale("log")
        elif values:
            # symlog: linear within ±linthresh, logarithmic beyond, so ≤ 0 stays visible.
            magnitudes = positive_finite(abs(v) for v in values)
            set_scale("symlog", linthresh=min(magnitudes) if magnitudes else 1e-6)
            symlog_ticks(axes.xaxis if label == "score" else axes.yaxis, [*values, *extra])
            below = sum(v <= 0 for v in values)
            notes.append(
                f"{below} {label} ≤ 0: symlog axis" if below else f"{label} intervals reach ≤ 0: symlog axis"
            )
    if dropped:
        notes.append(f"{dropped} non-finite point(s) left out")
    if any(interval(g) is not None for g in points):
        confidence = validation.noise.confidence if validation.noise is not None else 0.95
        notes.append(f"bars: {confidence:.0%} bootstrap intervals")
    axes.set_xlabel("predicted score (AutoQuant)")
    axes.set_ylabel(f"measured {what} (held-out captions)")
    spearman, kendall = (
        (validation.spearman_nll, validation.kendall_nll)
        if measure == "delta_nll"
        else (validation.spearman_kl, validation.kendall_kl)
    )
    headline = validation.noise is not None and validation.noise.headline == measure
    header = (
        f"{title}{' (headline)' if headline else ''}: Spearman {coefficient_text(spearman)}, "
        f"Kendall {coefficient_text(kendall)}, n={len(points)}"
    )
    axes.set_title(titled(header, notes, width=60), fontsize=9)
    if points:
        axes.legend(fontsize=8)
    axes.grid(True, which="major", alpha=0.3)


def _scatter(validation: ValidationReport, title: str) -> Any:
    """Predicted score vs measured ΔNLL (left) and KL (right)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12.0, 5.2), layout="constrained")
    left, right = figure.subplots(1, 2)
    _scatter_panel(left, validation, f"{title}: ΔNLL", "delta_nll")
    _scatter_panel(right, validation, f"{title}: KL", "kl")
    return figure


def write_plots(
    manifest: Manifest, directory: Path, validation: ValidationReport | None = None
) -> tuple[Path, ...]:
    """Write the plots as PNG and SVG into ``directory`` (created if needed); return their paths.

    ``validation`` defaults to ``manifest.validation``. A plot with nothing to show is not
    written: no heatmap when no group fits the layer grid, no bar chart when no group has a
    positive finite importance, no scatter without validation points.
    """
    own_folder(directory)
    validation = validation if validation is not None else manifest.validation
    scheme = manifest.scheme.name
    banner = random_weights_banner(manifest.model.source)
    written: list[Path] = []

    grid = importance_grid(manifest.groups)
    if grid.kinds:
        written += _save(
            _heatmap(grid, f"{scheme}: importance by layer and module"), directory, HEATMAP_STEM, banner
        )

    ranked = sorted(manifest.groups, key=lambda g: g.rank)
    scored = [g for g in ranked if math.isfinite(g.importance) and g.importance > 0]
    non_finite = sum(1 for g in ranked if not math.isfinite(g.importance))
    if scored:
        top = _top_bars(scored[:TOP_GROUPS], len(scored), non_finite, scheme)
        written += _save(top, directory, TOP_STEM, banner)

    experts = expert_grid(manifest.groups, manifest.routing)
    if experts is not None:
        title = f"{scheme}: each expert by layer"
        written += _save(_expert_map(experts, title), directory, EXPERTS_STEM, banner)

    if validation is not None and validation.groups:
        written += _save(_scatter(validation, scheme), directory, SCATTER_STEM, banner)
    return tuple(written)


def missing_plots(manifest: Manifest, validation: ValidationReport | None = None) -> tuple[str, ...]:
    """Why :func:`write_plots` leaves a plot out, one sentence each, for the report to show.

    Empty when every plot is drawn; the scatter is only accounted for when there is validation.
    """
    validation = validation if validation is not None else manifest.validation
    groups = manifest.groups
    if not groups:
        return ("No plots: the manifest ranks no group.",)
    missing: list[str] = []
    if not importance_grid(groups).kinds:
        missing.append(
            f"No heatmap: none of the {len(groups)} groups is a decoder layer's projection or the lm_head "
            "(vision towers and other modules are not placed on the layer grid)."
        )
    if not any(math.isfinite(g.importance) and g.importance > 0 for g in groups):
        non_finite = sum(1 for g in groups if not math.isfinite(g.importance))
        missing.append(
            "No bar chart: no group has a positive finite importance "
            f"({len(groups) - non_finite} scored 0 or less, {non_finite} non-finite)."
        )
    if validation is not None and not validation.groups:
        missing.append("No scatter: validation measured no group.")
    return tuple(missing)


_CAPTIONS = {
    HEATMAP_STEM: "Importance by decoder layer and module kind (log colour scale)",
    TOP_STEM: f"Top {TOP_GROUPS} groups by importance (log scale)",
    EXPERTS_STEM: "Each expert by layer: importance and routed calibration tokens (log colour scales)",
    SCATTER_STEM: "Predicted score vs measured ΔNLL and KL (bars: bootstrap intervals)",
}


def render_plots_markdown(paths: Sequence[Path], relative_to: Path, missing: Sequence[str] = ()) -> str:
    """Markdown image links to the PNGs of :func:`write_plots` (SVG linked beside each), then the
    sentences of :func:`missing_plots` in italics, so a reader learns why a picture is absent."""
    lines = []
    for png in (p for p in paths if p.suffix == ".png"):
        caption = _CAPTIONS.get(png.stem, png.stem)
        link = png.relative_to(relative_to).as_posix() if png.is_relative_to(relative_to) else str(png)
        lines.append(f"![{caption}]({link})  \n[SVG]({link.removesuffix('.png')}.svg)")
    lines += [f"*{sentence}*" for sentence in missing]
    return "\n\n".join(lines) + ("\n" if lines else "")
