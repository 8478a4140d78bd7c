"""The budget frontier as files: ``frontier.md``, ``frontier.json`` and two pictures.

* ``frontier-score``: predicted total score against the LM effective bits each budget reaches.
  A step to a larger budget should never predict more damage; where it does (ModelOpt's kl_div
  bisection can), the point is drawn as a red cross.
* ``frontier-formats``: which format every group takes at every budget (groups in network
  order, budgets left to right), with a strip above counting the groups that changed format
  at each step: where the budget is spent, and which layers flip first.
* ``frontier-measured`` (when points were measured): predicted score and measured ΔNLL of the
  measured mixes against their LM effective bits, on two axes.
* ``frontier-damage`` (when a damage model was fitted on measured points): predicted held-out KL
  per budget with its interval, the measured points, and with ``--max-kl`` the bound and the
  chosen mix: the damage axis a user states a tolerance on.

matplotlib is imported inside the plotting functions only, through its object API with the Agg
canvas (no ``pyplot``, no global backend switch).
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from auto_quantize_model.core.frontier import step_changes
from auto_quantize_model.frontier_records import Frontier, FrontierPoint
from auto_quantize_model.io.atomic import atomic_write_text, own_folder
from auto_quantize_model.io.convert import dumps_json
from auto_quantize_model.render.cells import NOT_AVAILABLE, number
from auto_quantize_model.render.frontier_figures import frontier_pictures
from auto_quantize_model.render.plots import short_name

if TYPE_CHECKING:
    from auto_quantize_model.artifacts import BudgetFrontier, MeasuredFrontier
    from auto_quantize_model.core.damage import BoundChoice, DamageModel
    from auto_quantize_model.validation_records import LastPosition

MARKDOWN_FILE = "frontier.md"
JSON_FILE = "frontier.json"
"""Every picture a frontier may write (each as PNG and SVG)."""
CHANGES_SHOWN = 12
"""Format changes listed per budget step in the Markdown; the JSON keeps them all."""


def _flags(point: FrontierPoint) -> list[str]:
    flags = []
    if not point.reachable:
        flags.append("unreachable")
    elif not point.satisfied:
        flags.append("not satisfied")
    if point.non_monotone:
        flags.append("non-monotone")
    return flags


def frontier_to_dict(
    frontier: Frontier,
    *,
    run_budget: float | None = None,
    measured: MeasuredFrontier | None = None,
    notes: Sequence[str] = (),
    run_matches: bool | None = None,
    damage: DamageModel | None = None,
    bound: BoundChoice | None = None,
) -> dict[str, Any]:
    """Plain JSON data: the summary, then one record per budget with every group's format.

    ``formats`` lists follow ``groups``; ``changes`` name the groups that differ from the
    previous budget, so a reader can follow one layer without diffing lists. ``measured``
    (predicted vs measured at a few budgets) and ``notes`` are added when given, and
    ``run_matches`` says whether the re-solve at ``run_budget`` is ModelOpt's choice. With
    ``damage`` every point gains ``predicted_kl`` and ``predicted_delta_nll`` (``central``,
    ``low``, ``high``; null beyond the measured scores, where ``beyond_data`` is true) and the
    model itself is under ``damage``; ``bound`` is ``--max-kl``'s answer.
    """
    changes = step_changes(frontier)
    points = []
    for point, changed in zip(frontier.points, changes, strict=True):
        record = attrs.asdict(point)
        record["formats"] = list(point.formats)
        record["changes"] = [attrs.asdict(change) for change in changed]
        if damage is not None:
            inside = damage.within_data(point.total_score)
            record["beyond_data"] = not inside
            record["predicted_kl"] = attrs.asdict(damage.kl(point.total_score)) if inside else None
            record["predicted_delta_nll"] = (
                attrs.asdict(damage.delta_nll(point.total_score)) if inside else None
            )
        points.append(record)
    data: dict[str, Any] = {
        "method": frontier.method,
        "cost_model": frontier.cost_model,
        "run_budget": run_budget,
        "exact_order": frontier.exact_order,
        "lm_weights": frontier.lm_weights,
        "other_weights": frontier.other_weights,
        "min_bits_lm": frontier.min_bits_lm,
        "min_bits_model": frontier.min_bits_model,
        "seconds": frontier.seconds,
        "formats": [{"name": name, "bits": bits} for name, bits in frontier.format_bits],
        "groups": list(frontier.groups),
        "points": points,
    }
    if run_matches is not None:
        data["run_matches"] = run_matches
    if notes:
        data["notes"] = list(notes)
    if measured is not None:
        data["measured"] = attrs.asdict(measured)
    if damage is not None:
        data["damage"] = {
            **attrs.asdict(damage),
            "factor": damage.factor,
            "description": list(damage.lines()),
        }
    if bound is not None:
        data["bound"] = {
            "max_kl": bound.bound,
            "budget": bound.point.budget,
            "effective_bits_lm": bound.point.effective_bits_lm,
            "predicted_score": bound.point.total_score,
            "predicted_kl": attrs.asdict(bound.kl),
            "predicted_delta_nll": attrs.asdict(bound.delta_nll),
            "cheaper_effective_bits_lm": bound.cheaper.effective_bits_lm if bound.cheaper else None,
            "cheaper_predicted_kl": attrs.asdict(bound.cheaper_kl) if bound.cheaper_kl else None,
            "measured_kl": bound.measured_kl,
            "measured_delta_nll": bound.measured_delta_nll,
            "held": bound.held,
            "in_interval": bound.in_interval,
            "description": list(bound.lines()),
        }
    return data


def _prediction_cell(damage: DamageModel, point: FrontierPoint) -> str:
    if not any(fmt != "NONE" for fmt in point.formats):
        return "0 (nothing quantized)"
    if not damage.within_data(point.total_score):
        return "beyond the data"
    return damage.kl(point.total_score).text()


def _damage_markdown(damage: DamageModel) -> list[str]:
    """The damage model in words: how predicted KL comes from the score, and how far to trust it."""
    lines = [
        "",
        "## Damage model: predicted held-out KL",
        "",
        f"Fitted on {len(damage.points)} measured mix(es) (the table's *predicted KL* column is its "
        f"centre and {damage.level:.0%} prediction interval; KL in nats per held-out token, to the "
        "unquantized model):",
        "",
    ]
    lines += [f"- {line}" for line in damage.lines()]
    return lines


def _bound_markdown(bound: BoundChoice) -> list[str]:
    lines = ["", f"## Cheapest mix within KL {bound.bound:.4g}", ""]
    lines += [f"- {line}" for line in bound.lines()]
    lines.append(
        "- Chosen on the upper end of the interval: under the model, a mix chosen this way exceeds "
        "the bound 2.5% of the time; the centre would exceed it about half of the time."
    )
    return lines


def _format_counts(point: FrontierPoint, order: Sequence[str]) -> str:
    counts = Counter(point.formats)
    return ", ".join(f"{name} {counts[name]}" for name in order if counts[name])


def _last_cells(figures: LastPosition | None) -> str:
    """The last-token KL, top-1 and greedy cells of a measured point; ``n/a`` where not measured."""
    if figures is None:
        return " | ".join([NOT_AVAILABLE] * 3)
    greedy = number(figures.greedy_agreement, ".3f") if figures.greedy_tokens else NOT_AVAILABLE
    return f"{number(figures.kl)} | {number(figures.top1, '.3f')} | {greedy}"


def _measured_markdown(measured: MeasuredFrontier) -> list[str]:
    """Predicted vs measured, side by side, with the rank agreement and the measured flags."""
    lines = [
        "",
        "## Measured on held-out captions",
        "",
        f"{len(measured.points)} mix(es) applied to the model and measured against the unquantized model on "
        f"{measured.holdout_samples} held-out captions ({measured.holdout_tokens} tokens, "
        f"`{measured.holdout_source}`): baseline NLL {measured.baseline_nll:.6f}; the run's own choice "
        f"ΔNLL {measured.chosen_delta_nll:.4e}; {measured.seconds:.1f} s.",
        "",
        "| budget | LM bits | quantized groups | predicted score | measured ΔNLL | measured KL "
        "| last-token KL | last-token top-1 | greedy agreement | flags |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :--- |",
    ]
    for point in measured.points:
        lines.append(
            f"| {point.budget:g} | {point.effective_bits_lm:.3f} | {point.quantized_groups} "
            f"| {point.predicted_score:.4e} | {point.delta_nll:.4e} | {point.kl_div:.4e} "
            f"| {_last_cells(point.last_position)} | {'non-monotone' if point.non_monotone else ''} |"
        )
    steps = [p for p in measured.points if p.non_monotone]
    checked = [p.last_position for p in measured.points if p.last_position is not None]
    greedy = next((figures for figures in checked if figures.greedy_tokens), None)
    lines += [
        "",
        "- *Last-token* columns: each mix vs the 16-bit model at each held-out caption's last token, the "
        "position a deployed model generates from, which the ΔNLL and KL columns never score (no next "
        "token there): KL, and the share of captions with the same most likely next token."
        + (
            f" *Greedy agreement*: {greedy.greedy_captions} captions continued by {greedy.greedy_tokens} "
            "tokens greedily by both models; the mean share of the tokens generated before the first one "
            "that differs (1 = the same text throughout)."
            if greedy is not None
            else ""
        ),
        f"- Spearman(predicted score, measured ΔNLL) along the frontier: {measured.spearman_nll:.3f}; "
        f"with measured KL: {measured.spearman_kl:.3f}.",
        (
            f"- {len(steps)} measured non-monotone step(s), more bits and more damage, at "
            + ", ".join(f"{p.budget:g}" for p in steps)
            + "."
            if steps
            else "- Measured damage never grows with more bits along these points."
        ),
        f"- The model came back bit-exactly afterwards: {'yes' if measured.restored_exactly else 'NO'}.",
    ]
    lines += [f"- {note}" for note in measured.notes]
    return lines


def _bits_cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def render_markdown(
    frontier: Frontier,
    *,
    title: str,
    run_budget: float | None = None,
    pictures: Sequence[Path] = (),
    measured: MeasuredFrontier | None = None,
    notes: Sequence[str] = (),
    base: Path | None = None,
    damage: DamageModel | None = None,
    bound: BoundChoice | None = None,
) -> str:
    """The frontier as a Markdown page; ``pictures`` are linked relative to ``base`` (the page's
    folder; their own folder when None). ``notes`` are listed first, ``measured`` points last;
    ``damage`` adds a predicted-KL column and its model, ``bound`` the ``--max-kl`` answer."""
    order = [name for name, _ in frontier.format_bits]
    points = frontier.points
    unreachable = [p for p in points if not p.reachable]
    unsatisfied = [p for p in points if p.reachable and not p.satisfied]
    non_monotone = [p for p in points if p.non_monotone]
    lines = [
        f"# Budget frontier: {title}",
        "",
        f"ModelOpt's {frontier.method} search re-solved at {len(points)} effective-bits budgets from one "
        f"scoring pass, {len(frontier.groups)} language-model groups "
        f"({frontier.lm_weights:,.0f} LM weights"
        + (
            f", {frontier.other_weights:,.0f} non-LM weights held at 16 bits"
            if frontier.other_weights
            else ""
        )
        + f"), in {frontier.seconds:.1f} s.",
        f"Budgets are bits per LM weight; the cheapest mix reaches {frontier.min_bits_lm:.3f} "
        f"({frontier.min_bits_model:.3f} over every costed weight).",
        "Predicted score: the sum of the chosen formats' scores as the search sees them "
        "(each format clamped to at most the score of the one with fewer bits); lower is better.",
        "Formats: `NONE` leaves a group unquantized, at 16 bits. A group is named after its first module "
        "and stands for the modules fused with it (q/k/v after `q_proj`, gate/up after `gate_proj`).",
        "",
    ]
    if not frontier.exact_order:
        lines += [
            "> Groups ModelOpt could only leave unquantized were placed without knowing its order: bits "
            "and scores are exact, but among formats with equal scores and costs (e.g. FP8 clamped to "
            "INT8's score) the choice may differ from ModelOpt's.",
            "",
        ]
    if unreachable:
        lines.append(
            f"- {len(unreachable)} budget(s) below the cheapest mix (unreachable; ModelOpt refuses them): "
            f"their rows show that mix."
        )
    if unsatisfied:
        lines.append(
            f"- {len(unsatisfied)} budget(s) where ModelOpt's search reports its constraint not satisfied "
            "(kl_div keeps its last bisection step even when it overshoots)."
        )
    if non_monotone:
        listed = ", ".join(f"{p.budget:g}" for p in non_monotone[:10])
        lines.append(
            f"- {len(non_monotone)} non-monotone step(s): more budget, worse predicted score (at {listed})."
        )
    lines += [f"- {note}" for note in notes]
    if unreachable or unsatisfied or non_monotone or notes:
        lines.append("")
    if bound is not None:
        lines += [f"**{bound.lines()[0][0].upper()}{bound.lines()[0][1:]}.**", ""]
    kl_head, kl_rule = (" predicted KL [95%] |", " ---: |") if damage is not None else ("", "")
    both = any(point.active_bits_lm is not None for point in points)
    moe_head, moe_rule = (" storage bits | active bits |", " ---: | ---: |") if both else ("", "")
    if both:
        lines += [
            f"Mixture of experts: budgets and LM bits count **{frontier.cost_model}** weights; storage bits "
            "count every expert's weights, active bits each layer's top-k share of its experts (the "
            "weights a token uses).",
            "",
        ]
    lines += [
        f"| budget | LM bits |{moe_head} model bits | predicted score |{kl_head} formats | changed | flags |",
        f"| ---: | ---: |{moe_rule} ---: | ---: |{kl_rule} :--- | ---: | :--- |",
    ]
    changes = step_changes(frontier)
    for point, changed in zip(points, changes, strict=True):
        marker = " (run)" if run_budget is not None and abs(point.budget - run_budget) <= 1e-9 else ""
        if bound is not None and point == bound.point:
            marker += " (max KL)"
        kl = f" {_prediction_cell(damage, point)} |" if damage is not None else ""
        moe = f" {_bits_cell(point.storage_bits_lm)} | {_bits_cell(point.active_bits_lm)} |" if both else ""
        lines.append(
            f"| {point.budget:g}{marker} | {point.effective_bits_lm:.3f} |{moe} "
            f"{point.effective_bits_model:.3f} "
            f"| {point.total_score:.4e} |{kl} {_format_counts(point, order)} | {len(changed)} "
            f"| {', '.join(_flags(point))} |"
        )
    steps = [(a, b, c) for (a, b), c in zip(itertools.pairwise(points), changes[1:], strict=True) if c]
    if steps:
        lines += ["", "## What changes at each step", ""]
        for before, after, changed in steps:
            shown = ", ".join(
                f"`{short_name(c.group)}` {c.before} → {c.after}" for c in changed[:CHANGES_SHOWN]
            )
            more = f" and {len(changed) - CHANGES_SHOWN} more" if len(changed) > CHANGES_SHOWN else ""
            lines.append(f"- **{before.budget:g} → {after.budget:g}**: {shown}{more}")
    if measured is not None:
        lines += _measured_markdown(measured)
    if damage is not None:
        lines += _damage_markdown(damage)
    if bound is not None:
        lines += _bound_markdown(bound)
    pngs = [p for p in pictures if p.suffix == ".png"]
    if pngs:
        lines += ["", "## Plots", ""]
        for png in pngs:
            link = png.name if base is None else Path(os.path.relpath(png, base)).as_posix()
            lines.append(f"![{png.stem}]({link})  \n[SVG]({link.removesuffix('.png')}.svg)")
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def write_frontier(
    frontier: Frontier,
    directory: str | Path,
    *,
    title: str = "frontier",
    run_budget: float | None = None,
    plots: bool = True,
    measured: MeasuredFrontier | None = None,
    notes: Sequence[str] = (),
    run_matches: bool | None = None,
    plots_dir: str | Path | None = None,
    damage: DamageModel | None = None,
    bound: BoundChoice | None = None,
    banner: str = "",
) -> tuple[Path, ...]:
    """Write ``frontier.md``, ``frontier.json`` and (``plots``) the pictures; return every path.

    ``run_budget`` (the budget ModelOpt itself ran at) is marked in the table, the JSON and the
    score plot; ``measured`` adds the predicted-vs-measured section and picture. Pictures go to
    ``plots_dir`` (default: ``directory``), linked from the Markdown by relative paths. Files are
    written atomically: a reader never sees half a report.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    pictures_dir = folder if plots_dir is None else Path(plots_dir)
    pictures: list[Path] = []
    if plots and frontier.points:
        own_folder(pictures_dir)
        pictures = frontier_pictures(
            frontier,
            pictures_dir,
            title=title,
            run_budget=run_budget,
            measured=measured,
            damage=damage,
            bound=bound,
            banner=banner,
        )
    data = frontier_to_dict(
        frontier,
        run_budget=run_budget,
        measured=measured,
        notes=notes,
        run_matches=run_matches,
        damage=damage,
        bound=bound,
    )
    json_path = atomic_write_text(folder / JSON_FILE, dumps_json(data))
    markdown = render_markdown(
        frontier,
        title=title,
        run_budget=run_budget,
        pictures=pictures,
        measured=measured,
        notes=notes,
        base=folder,
        damage=damage,
        bound=bound,
    )
    md_path = atomic_write_text(folder / MARKDOWN_FILE, markdown)
    return (md_path, json_path, *pictures)


def run_line(budget_frontier: BudgetFrontier) -> str:
    """One sentence on how the re-solve at the run's own budget compares with ModelOpt's choice."""
    budget = budget_frontier.run_budget
    if budget is None:
        return "The run's own budget is unknown: nothing was compared with ModelOpt's choice."
    if not budget_frontier.run_checked:
        return (
            f"At the run's own budget ({budget:g}) ModelOpt's choice is not recorded (the previous tool's "
            "manifests lack it): nothing was compared."
        )
    if not budget_frontier.run_mismatches:
        return f"At the run's own budget ({budget:g}) the re-solve is ModelOpt's choice in every group."
    return (
        f"At the run's own budget ({budget:g}) the re-solve differs from ModelOpt's choice in "
        f"{len(budget_frontier.run_mismatches)} group(s): {'; '.join(budget_frontier.run_mismatches[:3])}."
    )


def write_budget_frontier(
    budget_frontier: BudgetFrontier,
    directory: str | Path,
    *,
    title: str = "frontier",
    measured: MeasuredFrontier | None = None,
    plots: bool = True,
    plots_dir: str | Path | None = None,
    damage: DamageModel | None = None,
    bound: BoundChoice | None = None,
    notes: Sequence[str] = (),
    banner: str = "",
) -> tuple[Path, ...]:
    """:func:`write_frontier` for a stage's :class:`BudgetFrontier`: its run check and notes included;
    ``banner`` (the random-weights warning) goes on every picture."""
    checked = budget_frontier.run_checked
    return write_frontier(
        budget_frontier.frontier,
        directory,
        title=title,
        run_budget=budget_frontier.run_budget,
        plots=plots,
        measured=measured,
        notes=(run_line(budget_frontier), *budget_frontier.notes, *notes),
        run_matches=not budget_frontier.run_mismatches if checked else None,
        plots_dir=plots_dir,
        damage=damage,
        bound=bound,
        banner=banner,
    )
