"""The budget frontier's records: one point per budget, and the frontier they make.

Nouns, below every layer: :class:`~auto_quantize_model.artifacts.BudgetFrontier` carries a
:class:`Frontier`, the renderers draw it and the solver (:mod:`auto_quantize_model.core.frontier`)
produces it. They lived in the solver's module, which made the artifacts import core.
"""

from __future__ import annotations

from typing import Literal

import attrs

Method = Literal["gradient", "kl_div"]
"""ModelOpt's two search methods (the score the frontier minimises comes from one of them)."""
CostModel = Literal["storage", "active"]
"""What a weight counts for in a budget: ``storage``, every weight once (every expert's, as ModelOpt's
``weight`` cost model); ``active``, the weights a token uses, each routed expert's at its layer's
``top_k / experts`` share (ModelOpt's ``active_moe`` cost model, with each layer's own share)."""


@attrs.frozen
class FrontierPoint:
    """ModelOpt's choice at one budget and what it reaches."""

    budget: float
    """Asked-for effective bits over the language model's weights."""
    constraint: float
    """Effective bits over every costed weight: what ModelOpt is given (:func:`model_constraint`)."""
    formats: tuple[str, ...]
    """Chosen format of every :attr:`Frontier.groups` entry, in that order."""
    effective_bits_lm: float
    effective_bits_model: float
    total_score: float
    """Predicted damage: the sum of the chosen formats' search scores (ModelOpt's ``best["score"]``)."""
    reachable: bool
    """False when even the cheapest mix exceeds the budget; the point then holds that mix."""
    satisfied: bool
    """:func:`solve_frontier`: the mix is proven the least score within the budget. The replay:
    ModelOpt's ``is_satisfied``, CBC proved an optimum (gradient) or the last threshold fits (kl_div)."""
    non_monotone: bool = False
    """This budget is above the previous point's and the predicted score is worse (higher)."""
    storage_bits_lm: float | None = None
    """LM bits of the mix counting every weight once; None where only one cost model was solved
    (dense models, files written before both were recorded)."""
    active_bits_lm: float | None = None
    """LM bits of the mix counting each routed expert at its ``top_k / experts`` share; None for a
    dense model or without routing counts."""


@attrs.frozen
class Frontier:
    """Per-group formats and predicted scores over a range of budgets, from one scoring pass."""

    method: Method
    groups: tuple[str, ...]
    """The LM groups with a quantized format to choose, in ModelOpt's order."""
    points: tuple[FrontierPoint, ...]
    """One per budget, budgets ascending."""
    format_bits: tuple[tuple[str, float], ...]
    """Every format the groups choose from and its bits, fewest bits first (``NONE`` last)."""
    min_bits_lm: float
    """The fewest LM effective bits any mix reaches (every group on its cheapest format)."""
    min_bits_model: float
    lm_weights: float
    other_weights: float
    exact_order: bool
    """See :attr:`SearchSpace.exact_order`."""
    seconds: float
    """Wall time of the solve (CBC runs included in the replay)."""
    cost_model: CostModel = "storage"
    """What the budgets count (:data:`CostModel`): :attr:`FrontierPoint.effective_bits_lm` is in
    these bits."""

    def point(self, budget: float) -> FrontierPoint:
        """The point of ``budget`` (to 1e-9), for looking up e.g. the run's own budget."""
        for candidate in self.points:
            if abs(candidate.budget - budget) <= 1e-9:
                return candidate
        raise KeyError(f"no frontier point at {budget:g} bits")
