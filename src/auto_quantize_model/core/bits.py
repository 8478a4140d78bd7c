"""Effective bits: the three formulas that turn ModelOpt's weight costs into bits per weight.

ModelOpt 0.47 costs a format as ``weights x bits / 16`` and budgets ``sum(cost) <= bits / 16 x
sum(weights)``. The run (``RunAutoQuant``'s plan and its reading of the search state) and the
frontier's replay of the search must compute these numbers the same way, float for float, or a
re-solved budget stops matching ModelOpt's own choice; so each formula lives here once and both
sides import it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from auto_quantize_model.core.scores import NO_QUANT
from auto_quantize_model.errors import InputError

if TYPE_CHECKING:
    from auto_quantize_model.artifacts import GroupScore


def effective_bits(cost: float, weights: float) -> float:
    """Bits per weight of ``weights`` weights that cost ``cost`` in ModelOpt's units."""
    return 16.0 * cost / weights


def shared_bits(items: Iterable[tuple[float, float, float]]) -> float:
    """Effective bits of ``(cost, weights, share)`` items, each weight counted at its ``share``.

    Shares of 1 give the storage figure; an expert's ``top_k / experts`` the active one. Scaling
    a cost and its weights alike keeps :func:`effective_bits` the one formula for both.
    """
    cost = weights = 0.0
    for item_cost, item_weights, share in items:
        cost += share * item_cost
        weights += share * item_weights
    return effective_bits(cost, weights)


def unquantized_weights(group: GroupScore) -> float:
    """A group's size at 16 bits: its NONE cost, or what its first format's cost implies."""
    if NO_QUANT in group.formats:
        return group.costs[group.formats.index(NO_QUANT)]
    return group.costs[0] * 16.0 / group.bits[0]


def model_constraint(target_bits: float, lm_weights: float, other_weights: float) -> float:
    """The effective bits over every costed weight that hold the LM at ``target_bits``.

    Non-LM weights (disabled vision layers) cost 16 bits each whatever is chosen, and ModelOpt
    budgets all costed weights together, so the constraint it is handed must be raised until the
    LM alone meets the target. Integer weight counts are exact in a float, so the run (ints) and
    the frontier (floats) get the same constraint.
    """
    total = lm_weights + other_weights
    if total <= 0:
        raise InputError("the search space holds no weights: nothing to budget")
    return (target_bits * lm_weights + 16.0 * other_weights) / total
