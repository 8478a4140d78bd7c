"""The exact least-score search: the mix of formats of least summed search score within a cost limit.

What :func:`~auto_quantize_model.core.frontier.solve_frontier` reports and ``aqm export`` writes,
in place of ModelOpt's CBC run (:mod:`auto_quantize_model.core.frontier_replay` replays that one).
CBC's tolerances are absolute, so with the scores real models give (1e-6..1e-9) it stops at its
first mix and calls it optimal; the search here only compares sums of the given scores, so it
finds the least one at any scale.

How: the problem's LP relaxation is solved greedily along each row's lower convex hull of (cost,
score) (:func:`_hull_steps`); its price of a unit of cost bounds every mix from below (a
Lagrangian bound), and a dynamic program over Pareto states (:func:`_least_score`) keeps only
the partial mixes that bound cannot rule out. Each limit also starts from the previous limit's
answer, so more budget never gives a worse score. numpy is imported inside the search only.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import attrs

from auto_quantize_model.core.frontier_space import SearchRow, cheapest, sequential_sum
from auto_quantize_model.core.scores import NO_QUANT
from auto_quantize_model.errors import InputError

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
    unit of cost (:func:`exact_select`). Steps of one row keep their order, since a convex
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
    return sequential_sum(row.costs[i] for row, i in zip(rows, selection, strict=True)) <= limit


def _score(rows: Sequence[SearchRow], selection: Sequence[int]) -> float:
    return float(sequential_sum(row.scores[i] for row, i in zip(rows, selection, strict=True)))


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

    Sums run row by row in row order from 0, as the frontier adds them for its points
    (:func:`~auto_quantize_model.core.frontier_space.sequential_sum`), so the scores compared
    are the ones reported, bit for bit. Among mixes of equal score the cheaper one is kept, then
    the one whose earlier rows cost less, then the format listed first. Returns the mix and
    whether it is proven best: past :data:`SEARCH_WORK` partial mixes, or if nothing scores at
    most as well as the incumbent (rounding only), the incumbent comes back.
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
    least_cost = np.where(allowed, table.costs, np.inf).min(axis=1)
    rest = np.append(np.cumsum(least_cost[::-1])[::-1], 0.0)
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


def exact_select(rows: Sequence[SearchRow], limits: Sequence[float]) -> list[tuple[tuple[int, ...], bool]]:
    """The least-score mix within each cost limit (ascending), exactly, whatever the scores' scale.

    Each limit is priced from the LP relaxation (:func:`_hull_steps`) and solved by
    :func:`_least_score`, starting from the better of the LP's rounded-down mix and the previous
    limit's answer (feasible here too, so no answer scores worse than a smaller limit's).
    """
    table = _Table.of(rows)
    starts, steps = _hull_steps(rows)
    start_cost = sequential_sum(row.costs[i] for row, i in zip(rows, starts, strict=True))
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
            candidates.append(cheapest(rows))
        incumbent_score, incumbent = min((_score(rows, mix), mix) for mix in candidates)
        best, proven = _least_score(table, limit, price, incumbent, incumbent_score)
        found = _prefer_unquantized(rows, best, limit)
        out.append((found, proven))
        previous = found
    return out
