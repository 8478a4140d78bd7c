"""The budget frontier: AutoQuant's per-group format choice re-solved for many effective-bits budgets.

One scoring pass gives every recipe group a score and a cost per format; the effective-bits budget
only enters ModelOpt's final search. This module solves that choice again, with no model and no
GPU, for as many budgets as wanted, two ways:

* :func:`solve_frontier`, what ``aqm frontier`` reports and ``aqm export`` writes: at each budget
  the mix of least summed search score that fits, solved exactly (:func:`_exact_select`), so that
  more bits never predict more damage, the full budget quantizes nothing and multiplying every
  score by a constant changes no choice. ModelOpt's own search guarantees none of these (below).
* :func:`modelopt_frontier`, ModelOpt 0.47's own choice replayed, tie-breaks and shortfalls
  included: it checks that a run's records rebuild its search (the run check of
  :func:`~auto_quantize_model.core.frontier_points.solve_budgets`).

How ModelOpt 0.47 searches (``modelopt/torch/quantization/algorithms.py``):

* Each recipe group is one row of ``candidate_stats``: its formats sorted by compression (fewest
  bits first, ``NONE`` last), ``costs`` = weights x bits / 16 and ``scores``, clamped by
  ``initialize_candidate_stats`` so that a format never scores above the one listed before it
  (``min(score, previous)``). The search sees only these clamped scores (:func:`search_scores`).
* ``run_search`` turns the budget into a weight size: ``sum(uncompressed_cost) * bits / 16``.
  ``RunAutoQuant`` passes ``bits`` = :func:`model_constraint` of the LM budget, which charges
  non-LM weights (a vision tower) 16 bits; the same is done here, so budgets are LM bits.
* ``gradient``: a 0/1 integer program solved by CBC through PuLP (``LPS`` in
  ``modelopt/torch/opt/searcher.py``): one binary per (group, format), one-hot rows, total cost
  at most the budget; tried again with the cost also at least 99 %, then 90 % of the budget if
  CBC reports anything but ``Optimal``. Equal (score, cost) pairs are common (FP8 clamped to
  INT8's score) and CBC breaks such ties by the problem's exact layout: column names
  ``z<row>_<format>`` sorted as text, rows in order. The same problem is built here, row for
  row, so CBC makes the same choice; groups with one format only (disabled layers, a vision
  tower) are rows too and must stay in place, or the tie-breaks move. CBC's tolerances are
  absolute: with scores of order 1e-7 (a tiny model) it stops at its first mix and calls it
  optimal, and with larger ones it can still stop ~1 % above the optimum. ModelOpt keeps what
  CBC returns, and so does the replay (:attr:`FrontierPoint.non_monotone` shows the damage).
* ``kl_div``: 100 bisection steps on a score threshold; each group takes its first format
  scoring at most the threshold. The last step's choice is kept even when an earlier one met
  the budget (``is_satisfied`` then says False). Replayed step by step; :func:`solve_frontier`
  minimises the summed score for this method too.
* A budget below the cheapest mix is refused before calibration (``_verify_resolved_constraint``);
  here it gives an unreachable point holding the cheapest mix.

``mtq.get_auto_quantize_config(state, {"effective_bits": b})`` re-solves the same way, but
needs torch, ModelOpt and the pickled search state; this module needs plain numbers only.
PuLP (the replay) and numpy (the exact search) are imported inside the solvers only.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import operator
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from auto_quantize_model.core.bits import effective_bits, model_constraint, unquantized_weights
from auto_quantize_model.core.scores import NO_QUANT, group_name, has_quantized_format, parse_label
from auto_quantize_model.errors import ConfigError, InputError
from auto_quantize_model.frontier_records import Frontier, FrontierPoint, Method

if TYPE_CHECKING:
    from auto_quantize_model.artifacts import GroupScore


LOWER_BOUNDS: tuple[float | None, ...] = (None, 0.99, 0.90)
"""ModelOpt's retry schedule for the gradient search (weight cost model): cost floors as budget fractions."""

KL_DIV_STEPS = 100
"""Bisection steps of ModelOpt's threshold search."""

FEASIBILITY_TOLERANCE = 1e-12
"""ModelOpt's slack (relative to the uncompressed size) when it checks that a budget is reachable."""

REMAINING_LM = "(LM weights outside the groups)"
REMAINING_OTHER = "(non-LM weights)"


# --------------------------------------------------------------------------------------------------
# The search space
# --------------------------------------------------------------------------------------------------


def search_scores(scores: Iterable[float]) -> tuple[float, ...]:
    """Scores as ModelOpt's search uses them: each one at most the one before it.

    ``initialize_candidate_stats`` keeps ``min(score, previous)`` along the format order, with
    the same argument order as here (it matters for NaN). Applied to ModelOpt's raw scores this
    gives its clamped ones bit for bit; applied to clamped scores it changes nothing, so it is
    safe on either kind of ``GroupScore.scores``.
    """
    out: list[float] = []
    previous = math.inf
    for score in scores:
        current = min(score, previous)
        out.append(current)
        previous = current
    return tuple(out)


@attrs.frozen
class SearchRow:
    """One recipe group as ModelOpt's search sees it: one row of its integer program."""

    name: str
    formats: tuple[str, ...]
    """ModelOpt's order: fewest bits first, ``NONE`` last where it may be chosen."""
    bits: tuple[float, ...]
    costs: tuple[float, ...]
    """Weights x bits / 16 per format, as ModelOpt costs them."""
    scores: tuple[float, ...]
    """Search scores (clamped as ModelOpt ran its search, see :func:`search_scores`)."""
    weights: float
    """The group's size at 16 bits (ModelOpt's ``uncompressed_cost``): the budget's denominator."""
    lm: bool = True
    """Part of the language model; non-LM rows (a vision tower) only weigh on the whole-model bits."""

    def __attrs_post_init__(self) -> None:
        sizes = {len(self.formats), len(self.bits), len(self.costs), len(self.scores)}
        if len(sizes) != 1 or not self.formats:
            raise InputError(
                f"recipe group {self.name}: formats, bits, costs and scores must have one entry per format"
            )

    @property
    def reported(self) -> bool:
        """A language-model group with a quantized format to choose: a column of the frontier."""
        return self.lm and has_quantized_format(self.formats)


@attrs.frozen
class SearchSpace:
    """Every row of ModelOpt's search, in its ``candidate_stats`` order, and its method."""

    rows: tuple[SearchRow, ...]
    method: Method
    exact_order: bool = True
    """False when rows with one format had to be placed without knowing ModelOpt's order; the
    budget arithmetic is still exact, but CBC may break ties between equal formats differently."""

    @property
    def lm_weights(self) -> float:
        return functools.reduce(operator.add, (r.weights for r in self.rows if r.lm), 0.0)

    @property
    def other_weights(self) -> float:
        return functools.reduce(operator.add, (r.weights for r in self.rows if not r.lm), 0.0)


def _number(value: Any) -> float:
    """A float from a Python number or a one-element tensor (ModelOpt stores both)."""
    item = getattr(value, "item", None)
    return float(item() if callable(item) else value)


def _label(recipe: object) -> tuple[str, float]:
    try:
        return parse_label(str(recipe))
    except ValueError as err:
        raise InputError(f"search state: {err}") from None


def space_from_state(
    state: Mapping[str, Any],
    name_map: Callable[[str], str] = lambda name: name,
    is_lm: Callable[[str], bool] = lambda name: True,
) -> SearchSpace:
    """The exact search space of a ModelOpt search state (``mtq.auto_quantize``'s second result
    or its ``checkpoint=`` file, already unpickled).

    Reads ``method`` and ``candidate_stats`` (formats, clamped scores, costs, module names,
    ``uncompressed_cost``) and nothing else, so any state with those keys works. Names go
    through ``name_map`` (e.g. ``TextLM`` names to full-model names); a group is LM when
    ``is_lm`` holds for all its mapped module names.
    """
    stats: Mapping[str, Mapping[str, Any]] = state["candidate_stats"]
    method = str(state.get("method", ""))
    if method not in ("gradient", "kl_div"):
        raise InputError(f"the search state's method is {method!r}; expected 'gradient' or 'kl_div'")
    rows = []
    for key, entry in stats.items():
        name = name_map(group_name(key))
        labels = [_label(recipe) for recipe in entry["formats"]]
        names = tuple(label for label, _ in labels)
        costs = tuple(_number(cost) for cost in entry["costs"])
        if "uncompressed_cost" in entry:
            weights = _number(entry["uncompressed_cost"])
        else:  # states saved before ModelOpt recorded it: the NONE cost
            weights = costs[names.index(NO_QUANT)]
        modules = [name_map(m) for m in entry.get("module_names", ())] or [name]
        rows.append(
            SearchRow(
                name=name,
                formats=names,
                bits=tuple(bits for _, bits in labels),
                costs=costs,
                scores=tuple(_number(score) for score in entry["scores"]),
                weights=weights,
                lm=all(is_lm(m) for m in modules),
            )
        )
    return SearchSpace(rows=tuple(rows), method="gradient" if method == "gradient" else "kl_div")


def fixed_row(name: str, weights: float, *, lm: bool) -> SearchRow:
    """A group ModelOpt could only leave unquantized (disabled layers, vision): a one-format row."""
    return SearchRow(
        name=name,
        formats=(NO_QUANT,),
        bits=(16.0,),
        costs=(weights,),
        scores=(0.0,),
        weights=weights,
        lm=lm,
    )


def _row_from_group(group: GroupScore) -> SearchRow:
    weights = unquantized_weights(group)
    return SearchRow(
        name=group.name,
        formats=group.formats,
        bits=group.bits,
        costs=group.costs,
        scores=search_scores(group.scores),
        weights=weights,
        lm=True,
    )


def space_from_scores(
    groups: Sequence[GroupScore],
    method: Method,
    *,
    lm_weights: float | None = None,
    other_weights: float = 0.0,
    fixed: Sequence[SearchRow] = (),
    order: Sequence[str] = (),
) -> SearchSpace:
    """The search space rebuilt from ``SensitivityScores``/manifest groups (no ModelOpt state).

    ``groups`` are the LM groups with formats to choose; their scores may be ModelOpt's raw or
    clamped ones (:func:`search_scores` makes both the search's). ``fixed`` are one-format rows
    (:func:`fixed_row`) and ``order`` every row's name in ModelOpt's order; without them the
    budget is still exact when ``lm_weights``/``other_weights`` (counted as in
    ``RunAutoQuant``) say how much the groups leave out: that remainder becomes 16-bit rows at
    the end, and ``exact_order`` is False because CBC's tie-breaks depend on where rows sit.
    """
    rows = [_row_from_group(group) for group in groups] + list(fixed)
    if order:
        by_name = {row.name: row for row in rows}
        missing = sorted(set(order) - set(by_name))
        unplaced = sorted(set(by_name) - set(order))
        if missing or unplaced or len(by_name) != len(rows):
            raise InputError(
                "the search order must name every group and fixed row once "
                f"(not found: {missing[:3]}, not ordered: {unplaced[:3]})"
            )
        rows = [by_name[name] for name in order]
    exact = bool(order) or not fixed
    covered_lm = functools.reduce(operator.add, (r.weights for r in rows if r.lm), 0.0)
    covered_other = functools.reduce(operator.add, (r.weights for r in rows if not r.lm), 0.0)
    for what, given, covered, name, lm in (
        ("lm_weights", lm_weights, covered_lm, REMAINING_LM, True),
        ("other_weights", other_weights, covered_other, REMAINING_OTHER, False),
    ):
        if given is None:
            continue
        rest = given - covered
        if rest < -0.5:
            raise InputError(
                f"{what} = {given:g} is smaller than the {covered:g} weights of the groups given; "
                "pass the count RunAutoQuant used (or leave it out)"
            )
        if rest > 0.5:
            rows.append(fixed_row(name, float(round(rest)), lm=lm))
            exact = False
    if not any(row.reported for row in rows):
        raise InputError("no language-model group has a quantized format: there is no frontier to solve")
    return SearchSpace(rows=tuple(rows), method=method, exact_order=exact)


# --------------------------------------------------------------------------------------------------
# The two searchers
# --------------------------------------------------------------------------------------------------


def lp_problem(
    costs: Sequence[Sequence[float]],
    scores: Sequence[Sequence[float]],
    max_weight: float,
    lower: float | None,
) -> tuple[Any, list[list[Any]]]:
    """ModelOpt's ``LPS`` problem for one budget and cost floor, built the same way.

    Same variable names (``z<row>_<format>``: PuLP sorts columns by name), same constraint
    order, coefficients entered as ``variable * number`` (PuLP drops zero terms that way), so
    the MPS file CBC reads is byte-identical to ModelOpt's and CBC breaks ties the same way.
    Returns the PuLP problem and its binaries per row.
    """
    import pulp  # type: ignore[import-untyped]

    variables = [
        [pulp.LpVariable(f"z{row}_{col}", lowBound=0, upBound=1, cat=pulp.LpBinary) for col in range(len(rc))]
        for row, rc in enumerate(costs)
    ]
    pairs = list(zip(variables, scores, costs, strict=True))
    problem = pulp.LpProblem(name="AutoQuantize", sense=pulp.LpMinimize)
    problem += (pulp.lpSum(z * s for zs, ss, _ in pairs for z, s in zip(zs, ss, strict=True)), "L")
    for zs in variables:
        problem += pulp.lpSum(zs) == 1
    total = pulp.lpSum(z * c for zs, _, cs in pairs for z, c in zip(zs, cs, strict=True))
    problem += total <= max_weight
    if lower is not None:
        problem += total >= lower * max_weight
    return problem, variables


def _lp_select(
    costs: Sequence[Sequence[float]], scores: Sequence[Sequence[float]], max_weight: float
) -> tuple[tuple[int, ...], str]:
    """CBC on :func:`lp_problem` with ModelOpt's cost-floor retries; each row's index and the status.

    The index is the first largest binary of the row, like ModelOpt's ``np.argmax``.
    """
    import pulp

    selection: tuple[int, ...] = ()
    status = "Not Solved"
    for lower in LOWER_BOUNDS:
        problem, variables = lp_problem(costs, scores, max_weight, lower)
        problem.solve(pulp.PULP_CBC_CMD(msg=False))
        status = pulp.LpStatus[problem.status]
        selection = tuple(_first_largest([z.varValue or 0.0 for z in zs]) for zs in variables)
        if status == "Optimal":
            break
    return selection, status


def _first_largest(values: Sequence[float]) -> int:
    best = 0
    for index, value in enumerate(values):
        if value > values[best]:
            best = index
    return best


def _lp_select_many(
    job: tuple[Sequence[Sequence[float]], Sequence[Sequence[float]], Sequence[float]],
) -> list[tuple[tuple[int, ...], str]]:
    """Worker entry point: several budgets of one search space (a top-level function for pickling)."""
    costs, scores, max_weights = job
    return [_lp_select(costs, scores, max_weight) for max_weight in max_weights]


def _threshold_select(rows: Sequence[SearchRow], max_weight: float) -> tuple[tuple[int, ...], bool]:
    """ModelOpt's kl_div search: bisection on a score threshold, 100 steps, the last step kept."""
    all_scores = [score for row in rows for score in row.scores]
    if not all_scores:
        return (), False
    low, high = min(all_scores), max(all_scores)
    threshold = (low + high) / 2.0
    selection: tuple[int, ...] = ()
    total = 0.0
    for _ in range(KL_DIV_STEPS):
        picked = []
        total = 0.0
        for row in rows:
            index = 0
            for candidate, score in enumerate(row.scores):
                if score <= threshold:
                    index = candidate
                    break
            picked.append(index)
            total += row.costs[index]
        selection = tuple(picked)
        if total <= max_weight:
            high = threshold
        else:
            low = threshold
        threshold = (low + high) / 2.0
    return selection, total <= max_weight


def _cheapest(rows: Sequence[SearchRow]) -> tuple[int, ...]:
    """Each row's cheapest format (lower search score, then ModelOpt's order, on equal cost)."""
    return tuple(min(zip(row.costs, row.scores, range(len(row.costs)), strict=True))[2] for row in rows)


# --------------------------------------------------------------------------------------------------
# The exact search (what the frontier reports)
# --------------------------------------------------------------------------------------------------

PRUNE_SLACK = 1e-9
"""Relative margin of every pruning test of the exact search, so that float rounding (~1e-16
relative) can only keep a mix that could have been dropped, never drop one that could win."""

SEARCH_WORK = 2_000_000
"""Partial mixes the exact search may weigh for one budget before it settles for its best mix so far.

250 groups x 5 formats with scores spread over decades weigh ~10^4 a budget, 7 x 10^5 at most
when every group scores within a factor 1.6 of the others (measured). Only scores almost exactly
proportional to the weights saved (every mix of one size then scores nearly alike) pass the
limit; such a point keeps the best mix found, is marked not satisfied, and still scores no
worse than the budget before it. The limit bounds a budget to ~0.3 s and ~70 MB (measured)."""


@attrs.frozen
class _Step:
    """One step along a row's lower convex hull of (cost, score): more bits for less damage."""

    efficiency: float
    """Score saved per unit of cost; decreasing along a row."""
    cost: float
    row: int
    target: int
    """The format the step moves the row to."""


def _hull(row: SearchRow) -> list[int]:
    """The row's formats on the lower convex hull of (cost, score), cheapest first.

    Formats that cost more and score no less than another are dropped first; among equal
    (cost, score) the one ModelOpt lists first stays; a non-finite score is never on it.
    """
    usable = [j for j, score in enumerate(row.scores) if math.isfinite(score)]
    points = sorted(usable, key=lambda j: (row.costs[j], row.scores[j], j))
    kept: list[int] = []
    for j in points:
        if kept and row.scores[j] >= row.scores[kept[-1]]:
            continue
        while len(kept) >= 2:
            a, b = kept[-2], kept[-1]
            left = (row.scores[b] - row.scores[a]) * (row.costs[j] - row.costs[b])
            right = (row.scores[j] - row.scores[b]) * (row.costs[b] - row.costs[a])
            if left < right:
                break
            kept.pop()
        kept.append(j)
    return kept


def _hull_steps(rows: Sequence[SearchRow]) -> tuple[tuple[int, ...], list[_Step]]:
    """Each row's first hull format and every hull step, most efficient first.

    Taking the steps in this order while they fit is the greedy solution of the problem's LP
    relaxation (at most one row would be split); the first step that does not fit prices a
    unit of cost (:func:`_exact_select`). Steps of one row keep their order, since a convex
    hull's efficiencies decrease along it.
    """
    starts = []
    steps = []
    for index, row in enumerate(rows):
        hull = _hull(row)
        if not hull:
            listed = ", ".join(map(repr, row.scores))
            raise InputError(
                f"recipe group {row.name}: no format has a finite score ({listed}); "
                "the frontier cannot place it: re-score the run"
            )
        starts.append(hull[0])
        for a, b in itertools.pairwise(hull):
            cost = row.costs[b] - row.costs[a]
            steps.append(_Step((row.scores[a] - row.scores[b]) / cost, cost, index, b))
    steps.sort(key=lambda step: -step.efficiency)
    return tuple(starts), steps


def _fits(rows: Sequence[SearchRow], selection: Sequence[int], limit: float) -> bool:
    return _sequential_sum(row.costs[i] for row, i in zip(rows, selection, strict=True)) <= limit


def _score(rows: Sequence[SearchRow], selection: Sequence[int]) -> float:
    return float(_sequential_sum(row.scores[i] for row, i in zip(rows, selection, strict=True)))


@attrs.frozen(eq=False)
class _Table:
    """Every row's costs and scores as arrays padded to the widest row (numpy, built once).

    A format with a non-finite score (NaN: its damage is unknown) is left out like padding, so
    the exact search never picks it; ModelOpt's CBC refuses such scores outright.
    """

    costs: Any
    """(rows, formats); +inf where a row has no such usable format."""
    scores: Any
    """(rows, formats); +inf where a row has no such usable format."""

    @classmethod
    def of(cls, rows: Sequence[SearchRow]) -> _Table:
        import numpy as np

        width = max(len(row.costs) for row in rows)
        costs = np.full((len(rows), width), np.inf)
        scores = np.full((len(rows), width), np.inf)
        for index, row in enumerate(rows):
            for column, (cost, score) in enumerate(zip(row.costs, row.scores, strict=True)):
                if math.isfinite(score):
                    costs[index, column] = cost
                    scores[index, column] = score
        return cls(costs=costs, scores=scores)


def _least_score(
    table: _Table, limit: float, price: float, incumbent: Sequence[int], incumbent_score: float
) -> tuple[tuple[int, ...], bool]:
    """The mix of least score with cost at most ``limit``: a dynamic program over the rows
    that keeps, for each reachable cost, the least score (Pareto states), pruned two ways.

    * By the Lagrangian bound: for any ``price`` >= 0 and any mix x within the limit,
      ``score(x) >= L + sum_r d_r(x_r)`` with ``L = sum_r min_j (s_rj + price c_rj) - price
      limit`` and ``d_r(j) = s_rj + price c_rj - min_j' (...)`` >= 0. A mix that beats the
      ``incumbent`` (feasible) therefore has ``sum_r d_r <= score(incumbent) - L``: formats
      with a larger reduced cost are never tried, and partial mixes whose reduced costs
      already add up to more are dropped. At the LP's price most rows keep one format.
    * By feasibility: a partial mix that cannot fit even with the cheapest remaining formats.

    Sums run row by row in row order from 0, as :func:`_point` adds them, so the scores
    compared are the ones reported, bit for bit. Among mixes of equal score the cheaper one
    is kept, then the one whose earlier rows cost less, then the format listed first. Returns
    the mix and whether it is proven best: past :data:`SEARCH_WORK` partial mixes, or if
    nothing scores at most as well as the incumbent (rounding only), the incumbent comes back.
    """
    import numpy as np

    with np.errstate(invalid="ignore"):  # 0 x inf in padding: masked below
        priced = np.where(np.isfinite(table.costs), table.scores + price * table.costs, np.inf)
    least = priced.min(axis=1)
    reduced = priced - least[:, None]
    bound = math.fsum(least.tolist()) - price * limit
    scale = math.fsum(np.abs(least).tolist()) + price * limit + abs(incumbent_score)
    allowance = incumbent_score - bound + PRUNE_SLACK * scale
    allowed = reduced <= allowance
    cheapest = np.where(allowed, table.costs, np.inf).min(axis=1)
    rest = np.append(np.cumsum(cheapest[::-1])[::-1], 0.0)
    cost_limit = limit + PRUNE_SLACK * abs(limit)

    cost = np.zeros(1)
    score = np.zeros(1)
    spent = np.zeros(1)
    history: list[tuple[Any, Any]] = []
    work = 0
    for index, options in enumerate(allowed):
        columns = np.flatnonzero(options)
        if columns.size == 1:  # one format left: every partial mix takes it
            column = int(columns[0])
            cost += table.costs[index, column]
            score += table.scores[index, column]
            spent += reduced[index, column]
            history.append((None, column))
            continue
        width = columns.size
        work += cost.size * width
        if work > SEARCH_WORK:
            return tuple(incumbent), False
        parent = np.repeat(np.arange(cost.size, dtype=np.int32), width)
        chosen = np.tile(columns.astype(np.int8), cost.size)
        cost = (cost[:, None] + table.costs[index, columns][None, :]).ravel()
        score = (score[:, None] + table.scores[index, columns][None, :]).ravel()
        spent = (spent[:, None] + reduced[index, columns][None, :]).ravel()
        order = np.flatnonzero((cost + rest[index + 1] <= cost_limit) & (spent <= allowance))
        if order.size > 1:
            order = order[np.lexsort((chosen[order], parent[order], score[order], cost[order]))]
            ranked = score[order]
            before = np.empty_like(ranked)
            before[0] = np.inf
            np.minimum.accumulate(ranked[:-1], out=before[1:])
            order = order[ranked < before]
        if not order.size:
            return tuple(incumbent), False
        cost, score, spent = cost[order], score[order], spent[order]
        history.append((parent[order], chosen[order]))
    feasible = np.flatnonzero(cost <= limit)
    if not feasible.size:
        return tuple(incumbent), False
    pick = int(feasible[np.lexsort((feasible, cost[feasible], score[feasible]))[0]])
    if float(score[pick]) > incumbent_score:
        return tuple(incumbent), False
    selection = [0] * len(history)
    for index in range(len(history) - 1, -1, -1):
        parents, chosen_of = history[index]
        if parents is None:
            selection[index] = chosen_of
        else:
            selection[index] = int(chosen_of[pick])
            pick = int(parents[pick])
    return tuple(selection), True


def _prefer_unquantized(rows: Sequence[SearchRow], selection: Sequence[int], limit: float) -> tuple[int, ...]:
    """Ties with ``NONE`` left unquantized, row by row, while the mix still fits.

    A format whose search score equals ``NONE``'s (clamping makes ``NONE`` the least, so equal
    is a tie) predicts no damage saved by quantizing; the exact search keeps the cheaper of
    equal mixes, this pass then spends spare budget on leaving such groups alone. The score is
    unchanged to the last bit, so optimality and monotonicity hold; at the full budget every
    group is left unquantized.
    """
    chosen = list(selection)
    for index, row in enumerate(rows):
        if NO_QUANT not in row.formats:
            continue
        none = row.formats.index(NO_QUANT)
        current = chosen[index]
        tie = row.scores[current] == row.scores[none] and row.costs[current] < row.costs[none]
        if not tie:
            continue
        trial = [*chosen[:index], none, *chosen[index + 1 :]]
        if _fits(rows, trial, limit):
            chosen = trial
    return tuple(chosen)


def _fill(start: Sequence[int], steps: Sequence[_Step], room: float) -> tuple[int, ...]:
    """``start`` with later hull steps added while they fit ``room``, most efficient first; a
    row whose step did not fit takes no further step (its later steps build on that one)."""
    chosen = list(start)
    blocked: set[int] = set()
    for step in steps:
        if step.row in blocked:
            continue
        if step.cost <= room:
            chosen[step.row] = step.target
            room -= step.cost
        else:
            blocked.add(step.row)
    return tuple(chosen)


def _exact_select(rows: Sequence[SearchRow], limits: Sequence[float]) -> list[tuple[tuple[int, ...], bool]]:
    """The least-score mix within each cost limit (ascending), exactly, whatever the scores' scale.

    Each limit is priced from the LP relaxation (:func:`_hull_steps`) and solved by
    :func:`_least_score`, starting from the better of the LP's rounded-down mix and the previous
    limit's answer (feasible here too, so no answer scores worse than a smaller limit's).
    """
    table = _Table.of(rows)
    starts, steps = _hull_steps(rows)
    start_cost = _sequential_sum(row.costs[i] for row, i in zip(rows, starts, strict=True))
    reach = list(itertools.accumulate(step.cost for step in steps))
    greedy = list(starts)
    taken = 0
    previous: tuple[int, ...] | None = None
    out = []
    for limit in limits:
        while taken < len(steps) and reach[taken] <= limit - start_cost:
            greedy[steps[taken].row] = steps[taken].target
            taken += 1
        price = steps[taken].efficiency if taken < len(steps) else 0.0
        filled = _fill(greedy, steps[taken:], limit - start_cost - (reach[taken - 1] if taken else 0.0))
        candidates = [filled] if _fits(rows, filled, limit) else []
        if previous is not None:
            candidates.append(previous)
        if not candidates:  # rounding put the greedy mix a hair over: the cheapest mix fits
            candidates.append(_cheapest(rows))
        incumbent_score, incumbent = min((_score(rows, mix), mix) for mix in candidates)
        best, proven = _least_score(table, limit, price, incumbent, incumbent_score)
        found = _prefer_unquantized(rows, best, limit)
        out.append((found, proven))
        previous = found
    return out


# --------------------------------------------------------------------------------------------------
# The frontier
# --------------------------------------------------------------------------------------------------


@attrs.frozen
class FormatChange:
    """A group whose format differs from the previous budget's point."""

    group: str
    before: str
    after: str


def step_changes(frontier: Frontier) -> tuple[tuple[FormatChange, ...], ...]:
    """Per point, the groups whose format changed since the previous point (none for the first)."""
    out: list[tuple[FormatChange, ...]] = [()] if frontier.points else []
    for previous, current in itertools.pairwise(frontier.points):
        out.append(
            tuple(
                FormatChange(name, before, after)
                for name, before, after in zip(
                    frontier.groups, previous.formats, current.formats, strict=True
                )
                if before != after
            )
        )
    return tuple(out)


def _sequential_sum(values: Iterable[float]) -> float:
    """Left-to-right float sum from 0, as ModelOpt accumulates costs and scores (``sum`` may
    compensate rounding on newer Pythons, which would differ in the last bit)."""
    return functools.reduce(operator.add, values, 0)


IN_PROCESS_BELOW = 2000
"""Rows x budgets below which the default solves every budget in this process.

A worker process costs about 0.6 s to start (a fresh interpreter importing PuLP), and a solve
costs roughly 1 ms per row x budget (measured on 2 cores: 17 rows x 17 budgets, 0.5 s in
process and 1.2 s with 2 workers; 17 x 60, 2.0 s against 2.6 s; 250 x 60, 18 s against 15 s).
Below this size the workers' start-up eats what they would save."""


def solver_processes(rows: int, budgets: int, requested: int | None = None) -> int:
    """Processes that share ``budgets`` CBC solves of ``rows`` rows each.

    A requested count is obeyed (capped at one per budget); by default a problem smaller than
    :data:`IN_PROCESS_BELOW` is solved here and a larger one gets one process per available CPU.
    """
    if requested is not None:
        if requested < 1:
            raise ConfigError(f"workers must be at least 1, got {requested}")
        return min(requested, max(budgets, 1))
    if rows * budgets < IN_PROCESS_BELOW:
        return 1
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(available, budgets))


_WORKER_CODE = "import sys; from auto_quantize_model.core.frontier import run_worker; run_worker(sys.argv[1])"


def run_worker(job_path: str) -> None:
    """A CBC worker process: solve the budgets of a job file, print the choices as JSON.

    The job holds costs, scores and weight budgets; JSON floats round-trip exactly (``repr``),
    so the worker's problems are the parent's to the last bit.
    """
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    results = _lp_select_many((job["costs"], job["scores"], job["max_weights"]))
    sys.stdout.write(json.dumps([[list(selection), status] for selection, status in results]))


def _solve_lp(
    rows: Sequence[SearchRow], max_weights: Sequence[float], workers: int
) -> list[tuple[tuple[int, ...], str]]:
    """CBC for every budget, in several worker processes when there is more than one budget.

    Each solve is a PuLP model build and MPS file (tens of ms of Python, holding the GIL) and
    a CBC process (tens to hundreds of ms), so the budgets are shared among fresh Python
    processes rather than threads. They are started as plain subprocesses, not through
    ``multiprocessing``: that would re-run an unguarded calling script, or fork a process
    holding torch's threads and CUDA. Budgets are dealt round-robin, since the hard ones
    (close to the cheapest mix) sit together.
    """
    costs = [list(row.costs) for row in rows]
    scores = [list(row.scores) for row in rows]
    if workers <= 1 or len(max_weights) <= 1:
        return _lp_select_many((costs, scores, max_weights))
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    out: list[tuple[tuple[int, ...], str]] = [((), "")] * len(max_weights)
    with tempfile.TemporaryDirectory(prefix="aqm-frontier-") as scratch:
        processes = []
        for start in range(workers):
            job = Path(scratch) / f"job-{start}.json"
            chunk = list(max_weights[start::workers])
            job.write_text(
                json.dumps({"costs": costs, "scores": scores, "max_weights": chunk}), encoding="utf-8"
            )
            command = [sys.executable, "-c", _WORKER_CODE, str(job)]
            processes.append(
                subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            )
        for start, process in enumerate(processes):
            stdout, stderr = process.communicate()
            if process.returncode != 0:
                tail = stderr.strip().splitlines()[-1:] or ["no message"]
                raise RuntimeError(f"frontier CBC worker failed (exit {process.returncode}): {tail[0]}")
            for offset, (selection, status) in enumerate(json.loads(stdout)):
                out[start + offset * workers] = (tuple(int(i) for i in selection), str(status))
    return out


def _point(
    space: SearchSpace,
    reported: Sequence[int],
    budget: float,
    constraint: float,
    selection: Sequence[int],
    *,
    reachable: bool,
    satisfied: bool,
) -> FrontierPoint:
    rows = space.rows
    costs = [row.costs[index] for row, index in zip(rows, selection, strict=True)]
    total_weights = _sequential_sum(row.weights for row in rows)
    lm_cost = _sequential_sum(cost for row, cost in zip(rows, costs, strict=True) if row.lm)
    return FrontierPoint(
        budget=budget,
        constraint=constraint,
        formats=tuple(rows[i].formats[selection[i]] for i in reported),
        effective_bits_lm=effective_bits(lm_cost, space.lm_weights),
        effective_bits_model=(_sequential_sum(costs) / total_weights) * 16,
        total_score=float(_sequential_sum(row.scores[i] for row, i in zip(rows, selection, strict=True))),
        reachable=reachable,
        satisfied=satisfied,
    )


def flag_non_monotone(points: Sequence[FrontierPoint]) -> tuple[FrontierPoint, ...]:
    """Mark each point (budgets ascending) whose predicted score is worse than the previous one's.

    Only steps between reachable points count (below the cheapest mix every point is the same
    mix); differences within 1e-9 relative are summation noise between equal mixes, not a step.
    """
    out = list(points[:1])
    for previous, current in itertools.pairwise(points):
        worse = current.total_score > previous.total_score and not math.isclose(
            current.total_score, previous.total_score, rel_tol=1e-9, abs_tol=0.0
        )
        flagged = previous.reachable and current.reachable and worse
        out.append(attrs.evolve(current, non_monotone=flagged))
    return tuple(out)


Selector = Callable[[Sequence[SearchRow], Sequence[float], float], list[tuple[tuple[int, ...], bool]]]
"""Rows, ascending weight budgets and the feasibility slack -> per budget a selection and whether
the search calls it satisfied."""


def _exact_selector(
    rows: Sequence[SearchRow], max_weights: Sequence[float], slack: float
) -> list[tuple[tuple[int, ...], bool]]:
    return _exact_select(rows, [mw + slack for mw in max_weights])


def _modelopt_selector(workers: int | None, method: Method) -> Selector:
    def select(
        rows: Sequence[SearchRow], max_weights: Sequence[float], slack: float
    ) -> list[tuple[tuple[int, ...], bool]]:
        if method == "kl_div":
            return [_threshold_select(rows, mw) for mw in max_weights]
        results = _solve_lp(rows, max_weights, solver_processes(len(rows), len(max_weights), workers))
        return [(selection, status == "Optimal") for selection, status in results]

    return select


def solve_frontier(space: SearchSpace, budgets: Iterable[float], *, workers: int | None = None) -> Frontier:
    """The mix of least predicted score at every budget (LM effective bits): the frontier aqm
    reports and exports, for either method.

    Solved exactly (:func:`_exact_select`) instead of by ModelOpt's CBC run: CBC's tolerances
    are absolute, so with the scores real models give (1e-6..1e-9) it stops at its first mix
    and calls it optimal. On the tiny default run 8 of the 32 steps of 8:16:0.25 then predicted
    more damage for more bits; 36 groups scored ~1e-9 kept the cheapest mix even at 16 bits.
    Dividing the scores by the largest one first mostly rescues CBC (one budget in 121 still
    8e-5 above the optimum, measured) but proves nothing and keeps its cost (~0.3 s a budget
    for 250 groups). The search here is a dynamic program over Pareto states, pruned by the LP
    relaxation's Lagrangian bound (~7 ms a budget for the same); it only compares sums of the
    given scores, so multiplying every score by a positive constant changes no choice. Hence:

    * the predicted score never rises as the budget grows: a mix that fits a budget fits every
      larger one, and each budget also starts from the previous budget's answer;
    * where leaving a group unquantized scores as well as quantizing it, it is left alone while
      the budget allows (:func:`_prefer_unquantized`): the full budget quantizes nothing;
    * a reachable point is satisfied when its optimum is proven, which only scores almost
      proportional to the weights saved can prevent (:data:`SEARCH_WORK`).

    It is not always ModelOpt's choice: where CBC stopped short the mix scores less, and
    between formats of equal search score and cost (FP8 clamped to INT8's) the one listed first
    is taken, whose own score is the lower; :func:`modelopt_frontier` replays ModelOpt's search
    (the run check uses it). One pass per budget in this process; ``workers`` is accepted for
    callers that size CBC processes and checked, but the exact search does not use processes.
    """
    if workers is not None:
        solver_processes(len(space.rows), 1, workers)  # the same check as the replay's
    return _frontier(space, budgets, _exact_selector)


def modelopt_frontier(
    space: SearchSpace, budgets: Iterable[float], *, workers: int | None = None
) -> Frontier:
    """ModelOpt's format choice at every budget (LM effective bits), as its own search would make it.

    CBC's shortfalls and the kl_div bisection's quirks included (:attr:`FrontierPoint.non_monotone`
    shows them); used to check that a run's records rebuild ModelOpt's search, not to pick mixes.
    Each gradient budget is one CBC solve (0.1-0.5 s for 250 groups x 5 formats), shared among
    ``workers`` subprocesses (default: in this process for a small problem, else one per
    available CPU, see :func:`solver_processes`; 1 solves in this process); measured for 299
    budgets x 250 groups x 5 formats: 28 s on one core, 2.6 s on 16. kl_div needs no CBC and
    always runs here (1.7-4.8 s for the same).
    """
    return _frontier(space, budgets, _modelopt_selector(workers, space.method))


def _frontier(space: SearchSpace, budgets: Iterable[float], select: Selector) -> Frontier:
    """The points of ``budgets`` (sorted, deduplicated) with ``select`` choosing the reachable mixes."""
    started = time.perf_counter()
    ordered = sorted({float(b) for b in budgets})
    if not ordered:
        raise ConfigError("no budgets to solve")
    for budget in ordered:
        if not math.isfinite(budget) or not 0.0 < budget <= 16.0:
            raise ConfigError(f"budget {budget:g} is outside (0, 16]; effective bits are bits per weight")
    rows = space.rows
    reported = [i for i, row in enumerate(rows) if row.reported]
    if not reported:
        raise InputError("no language-model group has a quantized format: there is no frontier to solve")
    lm_weights, other_weights = space.lm_weights, space.other_weights
    total_weights = _sequential_sum(row.weights for row in rows)
    cheapest = _cheapest(rows)
    min_cost = _sequential_sum(row.costs[i] for row, i in zip(rows, cheapest, strict=True))
    slack = total_weights * FEASIBILITY_TOLERANCE

    plans = []
    for budget in ordered:
        constraint = model_constraint(budget, lm_weights, other_weights)
        max_weight = total_weights * (constraint / 16.0)
        reachable = min_cost <= max_weight + slack
        plans.append((budget, constraint, max_weight, reachable))

    todo = sorted({max_weight for _, _, max_weight, reachable in plans if reachable})
    solved = dict(zip(todo, select(rows, todo, slack), strict=True))

    points = []
    for budget, constraint, max_weight, reachable in plans:
        selection, satisfied = solved[max_weight] if reachable else (cheapest, False)
        points.append(
            _point(space, reported, budget, constraint, selection, reachable=reachable, satisfied=satisfied)
        )
    cheapest_point = _point(space, reported, 0.0, 0.0, cheapest, reachable=False, satisfied=False)
    seen: dict[str, float] = {}
    for i in reported:
        for name, bits in zip(rows[i].formats, rows[i].bits, strict=True):
            seen.setdefault(name, bits)
    return Frontier(
        method=space.method,
        groups=tuple(rows[i].name for i in reported),
        points=flag_non_monotone(points),
        format_bits=tuple(sorted(seen.items(), key=lambda item: (item[0] == NO_QUANT, item[1]))),
        min_bits_lm=cheapest_point.effective_bits_lm,
        min_bits_model=cheapest_point.effective_bits_model,
        lm_weights=lm_weights,
        other_weights=other_weights,
        exact_order=space.exact_order,
        seconds=time.perf_counter() - started,
    )
