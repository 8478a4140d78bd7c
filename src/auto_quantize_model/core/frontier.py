"""The budget frontier: AutoQuant's per-group format choice re-solved for many effective-bits budgets.

One scoring pass gives every recipe group a score and a cost per format; the effective-bits budget
only enters ModelOpt's final search. Given that search's rows (a
:class:`~auto_quantize_model.core.frontier_space.SearchSpace`), this module solves the choice
again, with no model and no GPU, for as many budgets as wanted, two ways:

* :func:`solve_frontier`, what ``aqm frontier`` reports and ``aqm export`` writes: at each budget
  the mix of least summed search score that fits, solved exactly
  (:mod:`~auto_quantize_model.core.frontier_exact`), so that more bits never predict more damage,
  the full budget quantizes nothing and multiplying every score by a constant changes no choice.
  ModelOpt's own search guarantees none of these.
* :func:`modelopt_frontier`, ModelOpt 0.47's own choice replayed
  (:mod:`~auto_quantize_model.core.frontier_replay`), tie-breaks and shortfalls included: it
  checks that a run's records rebuild its search (the run check of
  :func:`~auto_quantize_model.core.frontier_points.solve_budgets`).

Both share the budget arithmetic here. ModelOpt's ``run_search`` turns the budget into a weight
size, ``sum(uncompressed_cost) * bits / 16``; ``RunAutoQuant`` passes ``bits`` =
:func:`~auto_quantize_model.core.bits.model_constraint` of the LM budget, which charges non-LM
weights (a vision tower) 16 bits; the same is done here, so budgets are LM bits. A budget below
the cheapest mix is refused by ModelOpt before calibration (``_verify_resolved_constraint``);
here it gives an unreachable point holding the cheapest mix.

``mtq.get_auto_quantize_config(state, {"effective_bits": b})`` re-solves the same way, but needs
torch, ModelOpt and the pickled search state; these modules need plain numbers only.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence

import attrs

from auto_quantize_model.core.bits import effective_bits, model_constraint
from auto_quantize_model.core.frontier_exact import exact_select
from auto_quantize_model.core.frontier_replay import (
    LOWER_BOUNDS,
    LowerBounds,
    replay_select,
    solver_processes,
)
from auto_quantize_model.core.frontier_space import SearchRow, SearchSpace, cheapest, sequential_sum
from auto_quantize_model.core.scores import NO_QUANT
from auto_quantize_model.errors import ConfigError, InputError
from auto_quantize_model.frontier_records import Frontier, FrontierPoint, Method

FEASIBILITY_TOLERANCE = 1e-12
"""ModelOpt's slack (relative to the uncompressed size) when it checks that a budget is reachable."""


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
    total_weights = sequential_sum(row.weights for row in rows)
    lm_cost = sequential_sum(cost for row, cost in zip(rows, costs, strict=True) if row.lm)
    return FrontierPoint(
        budget=budget,
        constraint=constraint,
        formats=tuple(rows[i].formats[selection[i]] for i in reported),
        effective_bits_lm=effective_bits(lm_cost, space.lm_weights),
        effective_bits_model=(sequential_sum(costs) / total_weights) * 16,
        total_score=float(sequential_sum(row.scores[i] for row, i in zip(rows, selection, strict=True))),
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
    return exact_select(rows, [mw + slack for mw in max_weights])


def _modelopt_selector(workers: int | None, method: Method, lower_bounds: LowerBounds) -> Selector:
    """ModelOpt's searches check a budget against its weight size as given (no slack)."""

    def select(
        rows: Sequence[SearchRow], max_weights: Sequence[float], slack: float
    ) -> list[tuple[tuple[int, ...], bool]]:
        return replay_select(rows, max_weights, method=method, workers=workers, lower_bounds=lower_bounds)

    return select


def solve_frontier(space: SearchSpace, budgets: Iterable[float], *, workers: int | None = None) -> Frontier:
    """The mix of least predicted score at every budget (LM effective bits): the frontier aqm
    reports and exports, for either method.

    Solved exactly (:func:`~auto_quantize_model.core.frontier_exact.exact_select`) instead of
    by ModelOpt's CBC run: CBC's tolerances are absolute, so with the scores real models give
    (1e-6..1e-9) it stops at its first mix and calls it optimal. On the tiny default run 8 of the
    32 steps of 8:16:0.25 then predicted more damage for more bits; 36 groups scored ~1e-9 kept
    the cheapest mix even at 16 bits. Dividing the scores by the largest one first mostly rescues
    CBC (one budget in 121 still 8e-5 above the optimum, measured) but proves nothing and keeps
    its cost (~0.3 s a budget for 250 groups). The search here is a dynamic program over Pareto
    states, pruned by the LP relaxation's Lagrangian bound (~7 ms a budget for the same); it only
    compares sums of the given scores, so multiplying every score by a positive constant changes
    no choice. Hence:

    * the predicted score never rises as the budget grows: a mix that fits a budget fits every
      larger one, and each budget also starts from the previous budget's answer;
    * where leaving a group unquantized scores as well as quantizing it, it is left alone while
      the budget allows (``_prefer_unquantized`` in
      :mod:`~auto_quantize_model.core.frontier_exact`): the full budget quantizes nothing;
    * a reachable point is satisfied when its optimum is proven, which only scores almost
      proportional to the weights saved can prevent
      (:data:`~auto_quantize_model.core.frontier_exact.SEARCH_WORK`).

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
    space: SearchSpace,
    budgets: Iterable[float],
    *,
    workers: int | None = None,
    lower_bounds: LowerBounds = LOWER_BOUNDS,
) -> Frontier:
    """ModelOpt's format choice at every budget (LM effective bits), as its own search would make it.

    CBC's shortfalls and the kl_div bisection's quirks included (:attr:`FrontierPoint.non_monotone`
    shows them); used to check that a run's records rebuild ModelOpt's search, not to pick mixes.
    Each gradient budget is one CBC solve (0.1-0.5 s for 250 groups x 5 formats), shared among
    ``workers`` subprocesses (default: in this process for a small problem, else one per
    available CPU, see :func:`~auto_quantize_model.core.frontier_replay.solver_processes`; 1
    solves in this process); measured for 299 budgets x 250 groups x 5 formats: 28 s on one
    core, 2.6 s on 16. kl_div needs no CBC and always runs here (1.7-4.8 s for the same).
    ``lower_bounds`` is the cost-floor schedule of ModelOpt's cost model
    (:data:`~auto_quantize_model.core.frontier_replay.ACTIVE_MOE_LOWER_BOUNDS` for ``active_moe``).
    """
    return _frontier(space, budgets, _modelopt_selector(workers, space.method, lower_bounds))


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
    total_weights = sequential_sum(row.weights for row in rows)
    cheapest_mix = cheapest(rows)
    min_cost = sequential_sum(row.costs[i] for row, i in zip(rows, cheapest_mix, strict=True))
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
        selection, satisfied = solved[max_weight] if reachable else (cheapest_mix, False)
        points.append(
            _point(space, reported, budget, constraint, selection, reachable=reachable, satisfied=satisfied)
        )
    cheapest_point = _point(space, reported, 0.0, 0.0, cheapest_mix, reachable=False, satisfied=False)
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
