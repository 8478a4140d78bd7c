"""How aqm's solver uses the routed-token counts: the rare-expert rule and the active cost model.

Pure (no torch). Both act on the solver's search space (the frontier, ``aqm export``). ModelOpt's
own search in the run knows no rare-expert rule; it counts the same cost model (``aqm run`` hands
it ``active_moe`` under ``active``), and its choice, recorded as it made it, is checked against a
replay on ModelOpt's scores under that cost model.

**The rare-expert rule.** An expert group whose expert was routed fewer than ``min_tokens``
calibration tokens (``autoquant.rare_expert_tokens``) has a score that rests on too few tokens
to mean anything: three tokens give a score at noise level, and no token gives exactly 0, which
would quantize that expert for free. Its per-format scores are replaced by the mean, format by
format, of the scores of the same layer's other expert groups of the same part (whole expert,
gate+up or down) that were routed at least ``min_tokens``. So the solver treats a rarely routed
expert like a typical expert of its layer, neither free nor singled out. A layer where no expert
of that part reaches ``min_tokens`` keeps its scores (there is nothing better to put in) and
the note says so. Fused experts (``extract.experts = "layer"``) are one group over every token
their layer routed: the rule never applies to them.

**Cost models** (:data:`~auto_quantize_model.frontier_records.CostModel`): ``storage`` counts every
weight once; ``active`` counts each routed expert's weights at its layer's ``top_k / experts``
share, the weights one token uses, as ModelOpt's ``active_moe`` cost model does. The solver
scales the experts' rows (costs and sizes alike), so budgets are then active bits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs

from auto_quantize_model.artifacts import GroupScore, RoutingStats
from auto_quantize_model.core.bits import shared_bits, unquantized_weights
from auto_quantize_model.core.experts import Part, expert_slot, routed_tokens, routing_by_layer
from auto_quantize_model.core.frontier_space import SearchRow, SearchSpace, search_scores
from auto_quantize_model.errors import ConfigError
from auto_quantize_model.frontier_records import CostModel, Frontier, FrontierPoint

DEFAULT_RARE_TOKENS = 16
"""``autoquant.rare_expert_tokens``'s default: fewer routed calibration tokens than this and an
expert's score follows its layer's mean. 16 tokens is about one caption."""


@attrs.frozen
class RareRule:
    """What the rare-expert rule did: the groups whose scores became their layer's mean."""

    min_tokens: int
    applied: tuple[str, ...]
    """Groups whose scores were replaced (rarely routed, with well-routed peers)."""
    kept: tuple[str, ...] = ()
    """Rarely routed groups left as they were: no expert of their layer and part was routed enough."""

    def note(self) -> str:
        kept = (
            f"; {len(self.kept)} more kept their own scores (no expert of their layer and part had as many)"
            if self.kept
            else ""
        )
        return (
            f"rare-expert rule (autoquant.rare_expert_tokens = {self.min_tokens}): {len(self.applied)} "
            f"expert group(s) routed fewer than {self.min_tokens} calibration tokens take the mean scores of "
            f"their layer's other experts{kept}"
        )


def apply_rare_rule(
    groups: Sequence[GroupScore], routing: RoutingStats | None, min_tokens: int
) -> tuple[tuple[GroupScore, ...], RareRule]:
    """``groups`` with the scores of rarely routed expert groups replaced (see the module docstring).

    Nothing changes with ``min_tokens`` 0 or without counts. Scores are taken as the search uses
    them (:func:`search_scores`) before averaging, so that the mean is of what the solver compares.
    """
    tokens = routed_tokens(groups, routing) if min_tokens > 0 else {}
    peers: dict[tuple[int, Part], list[GroupScore]] = {}
    rare: list[tuple[GroupScore, tuple[int, Part]]] = []
    for group in groups:
        slot = expert_slot(group.name, group.module_names)
        if slot is None or slot.expert is None or group.name not in tokens:
            continue
        key = (slot.layer, slot.part)
        if tokens[group.name] < min_tokens:
            rare.append((group, key))
        else:
            peers.setdefault(key, []).append(group)
    replaced: dict[str, GroupScore] = {}
    kept: list[str] = []
    for group, key in rare:
        mean = _mean_scores(group, peers.get(key, []))
        if mean is None:
            kept.append(group.name)
        else:
            replaced[group.name] = attrs.evolve(group, scores=mean)
    out = tuple(replaced.get(group.name, group) for group in groups)
    return out, RareRule(min_tokens, tuple(replaced), tuple(kept))


def _mean_scores(group: GroupScore, peers: Sequence[GroupScore]) -> tuple[float, ...] | None:
    """Per format of ``group``, the mean search score of the peers that list that format."""
    if not peers:
        return None
    means = []
    for name in group.formats:
        values = [
            search_scores(peer.scores)[peer.formats.index(name)] for peer in peers if name in peer.formats
        ]
        finite = [value for value in values if math.isfinite(value)]
        if not finite:
            return None
        means.append(math.fsum(finite) / len(finite))
    return tuple(means)


def group_shares(groups: Sequence[GroupScore], routing: RoutingStats | None) -> dict[str, float]:
    """Each expert group's ``top_k / experts`` share of its layer (the active cost model's weight);
    groups without experts are left out (they count whole)."""
    layers = routing_by_layer(routing)
    shares: dict[str, float] = {}
    for group in groups:
        slot = expert_slot(group.name, group.module_names)
        layer = None if slot is None else layers.get(slot.layer)
        if layer is not None:
            shares[group.name] = layer.top_k / layer.num_experts
    return shares


def check_cost_model(cost_model: CostModel, routing: RoutingStats | None, where: str) -> None:
    """Refuse the active cost model without the counts that give each layer's share."""
    if cost_model == "active" and routing is None:
        raise ConfigError(
            f"{where}: autoquant.cost_model = 'active' needs the MoE routing counts of the run (top-k and "
            "experts per layer), and there are none (a dense model, or a manifest written before aqm "
            "counted them); use cost_model = 'storage'"
        )


def scaled_space(space: SearchSpace, shares: dict[str, float]) -> SearchSpace:
    """``space`` with each expert row's costs and size counted at its share: budgets in active bits."""
    rows = []
    for row in space.rows:
        share = shares.get(row.name)
        if share is None:
            rows.append(row)
        else:
            rows.append(
                attrs.evolve(row, costs=tuple(c * share for c in row.costs), weights=row.weights * share)
            )
    return attrs.evolve(space, rows=tuple(rows))


def rescored_space(space: SearchSpace, groups: Sequence[GroupScore]) -> SearchSpace:
    """``space`` with the scores of the rows named in ``groups`` taken from them."""
    by_name = {group.name: group for group in groups}
    rows: list[SearchRow] = []
    for row in space.rows:
        group = by_name.get(row.name)
        rows.append(row if group is None else attrs.evolve(row, scores=search_scores(group.scores)))
    return attrs.evolve(space, rows=tuple(rows))


def mix_bits(space: SearchSpace, frontier: Frontier, point: FrontierPoint, shares: dict[str, float]) -> float:
    """LM effective bits of ``point``'s mix, each row counted at its share (1 when not in ``shares``).

    Rows the frontier does not report (one-format LM rows) count at their only cost.
    """
    chosen = dict(zip(frontier.groups, point.formats, strict=True))
    items = []
    for row in space.rows:
        if not row.lm:
            continue
        index = row.formats.index(chosen[row.name]) if row.name in chosen else 0
        items.append((row.costs[index], row.weights, shares.get(row.name, 1.0)))
    return shared_bits(items)


def chosen_bits(groups: Sequence[GroupScore], lm_fixed: float, shares: dict[str, float]) -> float:
    """LM effective bits of every group on its ``best_format`` (``lm_fixed`` weights at 16 bits),
    each group counted at its share; NaN when a choice is not recorded."""
    items = [(lm_fixed, lm_fixed, 1.0)] if lm_fixed else []
    for group in groups:
        if group.best_format not in group.formats:
            return math.nan
        cost = group.costs[group.formats.index(group.best_format)]
        items.append((cost, unquantized_weights(group), shares.get(group.name, 1.0)))
    return shared_bits(items)
