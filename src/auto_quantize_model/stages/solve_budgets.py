"""The ``SolveBudgets`` stage: the run's scores re-solved at many effective-bits budgets, no model."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, ClassVar

import attrs

from auto_quantize_model.artifacts import BudgetFrontier, SensitivityScores
from auto_quantize_model.core.frontier_points import search_method, search_space, solve_budgets
from auto_quantize_model.spec_values import parse_budgets
from auto_quantize_model.specs import FrontierSpec

if TYPE_CHECKING:
    from auto_quantize_model.pipeline import Artifacts

log = logging.getLogger("auto_quantize_model")


@attrs.frozen
class SolveBudgets:
    """The least-score format mix at every budget of ``spec.bits``, from the scores alone.

    Pure: reads :class:`SensitivityScores` (its groups, costs, ModelOpt's group order and fixed
    groups) and solves every budget exactly (:func:`~auto_quantize_model.core.frontier.solve_frontier`),
    so it runs on scores read from disk too. The run's own budget is always among the points, and
    ModelOpt's own search is replayed there and compared with the choice ModelOpt made
    (:attr:`BudgetFrontier.run_mismatches`): the records still rebuild the run.
    """

    requires: ClassVar[tuple[type, ...]] = (SensitivityScores,)
    optional: ClassVar[tuple[type, ...]] = ()
    produces: ClassVar[type] = BudgetFrontier
    spec: FrontierSpec

    def run(self, inputs: Artifacts) -> BudgetFrontier:
        scores = inputs.get(SensitivityScores)
        space, notes = search_space(
            scores.groups,
            search_method(scores.method, "SensitivityScores"),
            order=scores.search_order,
            fixed=scores.fixed_groups,
        )
        budgets = parse_budgets(self.spec.bits)
        log.info(
            "frontier: solving %d budget(s) of %d groups exactly (%s scores)",
            len(budgets),
            len(scores.groups),
            scores.method,
        )
        result = solve_budgets(
            space,
            budgets,
            run_budget=scores.effective_bits_target,
            run_choice=scores.groups,
            workers=self.spec.workers,
            notes=notes,
            routing=scores.routing,
            rare_expert_tokens=scores.rare_expert_tokens,
            cost_model=scores.cost_model,
        )
        for note in result.notes:
            log.info("frontier: %s", note)
        frontier = result.frontier
        log.info(
            "frontier: %d points in %.1f s; cheapest mix %.3f LM bits; %d unreachable, %d non-monotone%s",
            len(frontier.points),
            frontier.seconds,
            frontier.min_bits_lm,
            sum(not p.reachable for p in frontier.points),
            sum(p.non_monotone for p in frontier.points),
            "; the run's budget re-solves to ModelOpt's choice"
            if result.run_checked and not result.run_mismatches
            else "",
        )
        if result.run_mismatches:
            log.warning(
                "frontier: the re-solve at the run's budget differs from ModelOpt's choice in %d group(s)",
                len(result.run_mismatches),
            )
        return result
