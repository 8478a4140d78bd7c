"""The budget frontier of a run: its search space from plain records, the run's own check, which
budgets to measure and what the measurements say.

:mod:`auto_quantize_model.core.frontier` solves a search space; this module builds that space
from what a run keeps (``SensitivityScores`` in a pipeline, the manifest in a finished run
folder), always adds the run's own budget so that every frontier checks itself against the
choice ModelOpt made, and reduces measured points to the figures a report shows. Plain data in
and out: no torch, no model.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import attrs

from auto_quantize_model.artifacts import (
    BudgetFrontier,
    FixedGroup,
    FrontierSummary,
    GroupScore,
    MeasuredFrontier,
    MeasuredPoint,
    RoutingStats,
)
from auto_quantize_model.core import stats
from auto_quantize_model.core.bits import unquantized_weights
from auto_quantize_model.core.experts import expert_slot, routing_by_layer
from auto_quantize_model.core.frontier import modelopt_frontier, solve_frontier
from auto_quantize_model.core.frontier_replay import ACTIVE_MOE_LOWER_BOUNDS, LOWER_BOUNDS
from auto_quantize_model.core.frontier_space import SearchRow, SearchSpace, fixed_row, space_from_scores
from auto_quantize_model.core.routing import (
    apply_rare_rule,
    check_cost_model,
    group_shares,
    mix_bits,
    rescored_space,
    scaled_space,
)
from auto_quantize_model.core.scores import NO_QUANT, has_quantized_format
from auto_quantize_model.errors import InputError
from auto_quantize_model.frontier_records import CostModel, Frontier, FrontierPoint, Method

METHODS: tuple[Method, ...] = ("gradient", "kl_div")


def search_method(method: str, where: str) -> Method:
    """``method`` as the frontier's searcher, or an error naming ``where`` it was read."""
    for known in METHODS:
        if method == known:
            return known
    raise InputError(
        f"{where}: the search method is {method!r}; the frontier re-solves 'gradient' or 'kl_div' searches"
    )


def search_space(
    groups: Sequence[GroupScore],
    method: Method,
    *,
    order: Sequence[str] = (),
    fixed: Sequence[FixedGroup] = (),
    groups_in_order: bool = True,
) -> tuple[SearchSpace, tuple[str, ...]]:
    """ModelOpt's search rebuilt from a run's records, and notes on what keeps it from being exact.

    ``groups`` with a quantized format are the rows to solve; groups with ``NONE`` only (the
    previous tool's manifests list them among the scored ones) join ``fixed`` as one-format
    rows. ``order`` (every row's name, ModelOpt's order) places the rows exactly; without it the
    rows keep the order of ``groups``, which is ModelOpt's only when ``groups_in_order`` says so
    (``SensitivityScores`` are, a manifest's rank order is not). Out of order, CBC may break ties
    between formats of equal score and cost differently; bits and scores stay exact.
    """
    scored = [g for g in groups if has_quantized_format(g.formats)]
    rows: list[SearchRow] = [fixed_row(f.name, f.weights, lm=f.lm) for f in fixed]
    rows += [fixed_row(g.name, unquantized_weights(g), lm=True) for g in groups if g not in scored]
    names = [g.name for g in scored] + [row.name for row in rows]
    notes: list[str] = []
    usable = bool(order) and len(order) == len(names) and set(order) == set(names)
    if order and not usable:
        notes.append(
            "the recorded search order does not name the scored and fixed groups one for one; "
            "it was ignored (ties between equal formats may be broken differently from ModelOpt)"
        )
    other = math.fsum(row.weights for row in rows if not row.lm)  # all of it is in the rows
    space = space_from_scores(scored, method, fixed=rows, order=order if usable else (), other_weights=other)
    if not usable and not groups_in_order:
        space = attrs.evolve(space, exact_order=False)
    if not space.exact_order and not notes:
        notes.append(
            "ModelOpt's group order is not recorded (a manifest written before aqm kept it): among "
            "formats of equal score and cost the choice may differ from ModelOpt's"
        )
    return space, tuple(notes)


def solve_budgets(
    space: SearchSpace,
    budgets: Sequence[float],
    *,
    run_budget: float | None,
    run_choice: Sequence[GroupScore] = (),
    workers: int | None = None,
    notes: Sequence[str] = (),
    routing: RoutingStats | None = None,
    rare_expert_tokens: int = 0,
    cost_model: CostModel = "storage",
) -> BudgetFrontier:
    """The frontier at ``budgets`` plus the run's own budget, checked against the run's choice.

    ``run_choice`` holds the run's groups with the format ModelOpt picked (``best_format``;
    ``""`` when the previous tool did not record it, and then nothing is compared). The check
    replays ModelOpt's own search at the run's budget (:func:`modelopt_frontier`, one CBC solve):
    matching it proves the records rebuild ModelOpt's search. The frontier itself is the exact
    optimum, which may beat ModelOpt's choice there; a note then says by how much.

    MoE runs (``routing``): the frontier solves ``space`` under the rare-expert rule and the cost
    model (:mod:`auto_quantize_model.core.routing`); every point carries its LM bits under both cost
    models. The replay solves the space ModelOpt searched: ModelOpt's own scores (it knows no
    rare-expert rule), and under ``active`` its ``active_moe`` cost model, which ``aqm run`` hands
    it for an MoE model: expert rows costed at their share and its cost floors tried first.
    """
    check_cost_model(cost_model, routing, "the frontier")
    rescored, rule = apply_rare_rule(run_choice, routing, rare_expert_tokens)
    shares = _row_shares(space, run_choice, routing)
    solved_space = rescored_space(space, rescored) if rule.applied else space
    replay_space, lower_bounds = space, LOWER_BOUNDS
    if cost_model == "active":
        solved_space = scaled_space(solved_space, shares)
        replay_space, lower_bounds = scaled_space(space, shares), ACTIVE_MOE_LOWER_BOUNDS
    asked = tuple(budgets)
    solved = set(asked)
    extra: list[str] = []
    if run_budget is not None and math.isfinite(run_budget) and 0.0 < run_budget <= 16.0:
        if not any(abs(run_budget - b) <= 1e-9 for b in asked):
            solved.add(run_budget)
            extra.append(
                f"the run's own budget {run_budget:g} was added to the budgets asked for (marked run)"
            )
    else:
        run_budget = None
    frontier = _both_bits(
        solve_frontier(solved_space, sorted(solved), workers=workers), space, shares, routing
    )
    frontier = attrs.evolve(frontier, cost_model=cost_model)
    if rule.applied or rule.kept:
        extra.append(rule.note())
    if cost_model == "active":
        extra.append(
            "budgets count active weights (autoquant.cost_model = 'active'): each routed expert at its "
            "layer's top-k / experts share; ModelOpt's choice in the run counted them the same way (its "
            "active_moe cost model)"
        )
    checked, mismatches = False, tuple[str, ...]()
    if run_budget is not None and _choice_recorded(frontier, run_choice):
        replay = modelopt_frontier(replay_space, (run_budget,), workers=1, lower_bounds=lower_bounds)
        checked, mismatches = run_check(replay, run_budget, run_choice)
        if mismatches:
            extra.append(
                f"at the run's own budget {len(mismatches)} group(s) differ from ModelOpt's choice in the "
                f"run (first: {mismatches[0]})"
            )
        elif not rule.applied:  # then the frontier solved the space ModelOpt searched
            extra.extend(_beyond_modelopt(frontier.point(run_budget), replay.point(run_budget)))
    return BudgetFrontier(
        frontier=frontier,
        run_budget=run_budget,
        run_checked=checked,
        run_mismatches=mismatches,
        notes=(*notes, *extra),
    )


def _row_shares(
    space: SearchSpace, run_choice: Sequence[GroupScore], routing: RoutingStats | None
) -> dict[str, float]:
    """Each expert row's active share: the scored groups' (:func:`group_shares`) and the fixed
    expert rows' (experts in ``autoquant.disabled_layers``), which ModelOpt's ``active_moe`` costs
    at the same share."""
    shares = group_shares(run_choice, routing)
    layers = routing_by_layer(routing)
    for row in space.rows:
        slot = None if row.name in shares else expert_slot(row.name)
        layer = None if slot is None else layers.get(slot.layer)
        if layer is not None:
            shares[row.name] = layer.top_k / layer.num_experts
    return shares


def _both_bits(
    frontier: Frontier, space: SearchSpace, shares: dict[str, float], routing: RoutingStats | None
) -> Frontier:
    """Every point with its LM bits under both cost models; a frontier without routing counts (a
    dense model) is left as it is, its one cost model being storage."""
    if routing is None:
        return frontier
    points = tuple(
        attrs.evolve(
            point,
            storage_bits_lm=mix_bits(space, frontier, point, {}),
            active_bits_lm=mix_bits(space, frontier, point, shares),
        )
        for point in frontier.points
    )
    return attrs.evolve(frontier, points=points)


def _choice_recorded(frontier: Frontier, run_choice: Sequence[GroupScore]) -> bool:
    chosen = {g.name: g.best_format for g in run_choice}
    return bool(chosen) and all(chosen.get(name) for name in frontier.groups)


def _beyond_modelopt(best: FrontierPoint, modelopt: FrontierPoint) -> tuple[str, ...]:
    """A note when the frontier's mix at the run's budget is not ModelOpt's (which the run kept)."""
    differ = sum(ours != theirs for ours, theirs in zip(best.formats, modelopt.formats, strict=True))
    if not differ:
        return ()
    if best.total_score < modelopt.total_score:
        return (
            f"at the run's own budget {best.budget:g} ModelOpt's search stopped short of the best mix: its "
            f"choice predicts {modelopt.total_score:.4g}, the frontier's {best.total_score:.4g} "
            f"({differ} group(s) differ); the frontier and aqm export --bits take the better mix",
        )
    return (
        f"at the run's own budget {best.budget:g} the frontier's mix predicts the same score as "
        f"ModelOpt's choice but {differ} group(s) take another format of equal score",
    )


def run_check(
    frontier: Frontier, run_budget: float | None, run_choice: Sequence[GroupScore]
) -> tuple[bool, tuple[str, ...]]:
    """Whether the run's choice could be compared, and the groups where the re-solve differs."""
    chosen = {g.name: g.best_format for g in run_choice}
    if run_budget is None or not chosen or any(not chosen.get(name) for name in frontier.groups):
        return False, ()
    point = frontier.point(run_budget)
    return True, tuple(
        f"{name}: {ours} != {chosen[name]}"
        for name, ours in zip(frontier.groups, point.formats, strict=True)
        if ours != chosen[name]
    )


# --------------------------------------------------------------------------------------------------
# Measured points
# --------------------------------------------------------------------------------------------------


def measured_budgets(frontier: Frontier, count: int) -> tuple[FrontierPoint, ...]:
    """``count`` reachable points with distinct mixes, spread evenly over the budget range.

    A mix that several budgets share is measured once (at its smallest budget); a mix that
    quantizes nothing is the unquantized baseline itself and is never measured. Each target of an
    even grid from the lowest to the highest remaining budget takes the nearest point not yet
    taken; with ``count`` at least the number of distinct mixes, every one is measured.
    """
    distinct: list[FrontierPoint] = []
    seen: set[tuple[str, ...]] = set()
    for point in frontier.points:
        quantizes = any(fmt != NO_QUANT for fmt in point.formats)
        if point.reachable and quantizes and point.formats not in seen:
            seen.add(point.formats)
            distinct.append(point)
    if count <= 0 or not distinct:
        return ()
    if count >= len(distinct):
        return tuple(distinct)
    low, high = distinct[0].budget, distinct[-1].budget
    if count == 1:
        targets = [(low + high) / 2]
    else:
        targets = [low + (high - low) * i / (count - 1) for i in range(count)]
    taken: list[int] = []
    for target in targets:
        free = [i for i in range(len(distinct)) if i not in taken]
        taken.append(min(free, key=lambda i: (abs(distinct[i].budget - target), i)))
    return tuple(distinct[i] for i in sorted(taken))


def flag_measured(points: Sequence[MeasuredPoint]) -> tuple[MeasuredPoint, ...]:
    """Mark each point (budgets ascending) whose measured ΔNLL is larger than the previous one's:
    more bits, more damage. Points with the same effective bits are not a step."""
    out = list(points[:1])
    for previous, current in itertools.pairwise(points):
        step = current.effective_bits_lm > previous.effective_bits_lm
        out.append(attrs.evolve(current, non_monotone=step and current.delta_nll > previous.delta_nll))
    return tuple(out)


def measured_frontier(
    points: Sequence[MeasuredPoint],
    *,
    baseline_nll: float,
    chosen_delta_nll: float,
    holdout_samples: int,
    holdout_tokens: int,
    holdout_source: str,
    restored_exactly: bool,
    seconds: float,
    notes: Sequence[str] = (),
) -> MeasuredFrontier:
    """The measured points with their non-monotone flags and rank correlations with the prediction."""
    ordered = flag_measured(sorted(points, key=lambda p: p.budget))
    predicted = [p.predicted_score for p in ordered]
    nll = [p.delta_nll for p in ordered]
    kl = [p.kl_div for p in ordered]
    spearman_nll = stats.spearman(predicted, nll)
    spearman_kl = stats.spearman(predicted, kl)
    found = [
        f"{label} along the frontier is NaN: {why}"
        for label, measured, value in (
            ("Spearman(predicted, dNLL)", nll, spearman_nll),
            ("Spearman(predicted, KL)", kl, spearman_kl),
        )
        if (why := stats.nan_reason(predicted, measured, value, items="points"))
    ]
    if not restored_exactly:
        found.append("the model did not come back bit-exactly after the measurements")
    return MeasuredFrontier(
        points=ordered,
        baseline_nll=baseline_nll,
        chosen_delta_nll=chosen_delta_nll,
        spearman_nll=spearman_nll,
        spearman_kl=spearman_kl,
        holdout_samples=holdout_samples,
        holdout_tokens=holdout_tokens,
        holdout_source=holdout_source,
        restored_exactly=restored_exactly,
        seconds=seconds,
        notes=(*notes, *found),
    )


def frontier_summary(budget_frontier: BudgetFrontier, measured: MeasuredFrontier | None) -> FrontierSummary:
    """What the manifest keeps of a frontier (the files ``frontier.md``/``.json`` hold the rest)."""
    frontier = budget_frontier.frontier
    points = frontier.points
    return FrontierSummary(
        method=frontier.method,
        budgets=len(points),
        lowest_budget=points[0].budget,
        highest_budget=points[-1].budget,
        min_bits_lm=frontier.min_bits_lm,
        unreachable=tuple(p.budget for p in points if not p.reachable),
        non_monotone=tuple(p.budget for p in points if p.non_monotone),
        run_budget=budget_frontier.run_budget,
        run_matches=not budget_frontier.run_mismatches if budget_frontier.run_checked else None,
        measured=measured,
    )
