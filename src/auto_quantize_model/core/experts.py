"""Mixture-of-experts recipe groups read off their names: what each one stands for, per layer.

Pure (no torch): reports and plots call it on manifests, including ones written before this
module existed. A group's name is ModelOpt's name for its first module, so the module list says
what the group really holds:

* ``layers.<L>.mlp.experts`` (one module): layer ``L``'s fused experts, every expert's gate, up
  and down projections under one format and one score (``extract.experts = "layer"``);
* ``layers.<L>.mlp.experts.<i>.gate_proj`` holding gate, up and down of expert ``i``: that
  expert alone (``"expert"``);
* the same name holding gate and up only, and ``...experts.<i>.down_proj``: expert ``i``'s two
  GEMMs apart (``"projection"``).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Literal, Protocol

import attrs

from auto_quantize_model.core.scores import group_name, worst

if TYPE_CHECKING:
    from auto_quantize_model.artifacts import LayerRouting, RoutingStats

Part = Literal["all", "gate/up", "down"]
Grouping = Literal["layer", "expert", "projection"]

_FUSED = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:\w+\.)*?experts$")
_SPLIT = re.compile(
    r"(?:^|\.)layers\.(\d+)\.(?:\w+\.)*?experts\.(\d+)\.(gate_proj|up_proj|down_proj|gate_up_proj)$"
)

MEANING: dict[Grouping, str] = {
    "layer": (
        "one group is one layer's experts, all of them (ModelOpt's fused experts): every expert's gate, "
        "up and down projections take the same format, and the score is their summed effect on the "
        "experts' output. Per-expert sensitivity is not visible this way; rerun with "
        '`extract.experts = "expert"` (or `"projection"`) to score each expert apart'
    ),
    "expert": (
        "one group is one expert of one layer: its gate, up and down projections under one format, "
        "scored at their own outputs. A group is named after its first projection, so "
        "`...experts.<i>.gate_proj` stands for the whole expert `i`. An expert's score grows with the "
        "tokens the router sent it during scoring: one that no scored caption reached scores 0"
    ),
    "projection": (
        "one expert of one layer is two groups: gate+up (named `...experts.<i>.gate_proj`, one GEMM when "
        "deployed) and `...experts.<i>.down_proj`, each scored at its own output. An expert's score "
        "grows with the tokens the router sent it during scoring: one that no scored caption reached "
        "scores 0"
    ),
}
"""What one expert recipe group stands for, by grouping, as the report says it."""


class NamedGroup(Protocol):
    """What this module reads of a recipe group (``RankedGroup`` and ``GroupScore`` both fit)."""

    @property
    def name(self) -> str: ...

    @property
    def module_names(self) -> tuple[str, ...]: ...


class ImportantGroup(NamedGroup, Protocol):
    @property
    def importance(self) -> float: ...


@attrs.frozen
class ExpertSlot:
    """Where an expert group sits: its layer, its expert (None for all of them) and its part."""

    layer: int
    expert: int | None
    part: Part


def expert_slot(name: str, module_names: Sequence[str] = ()) -> ExpertSlot | None:
    """The expert slot of a group, or None for a group that holds no experts."""
    name = group_name(name)
    fused = _FUSED.search(name)
    if fused is not None:
        return ExpertSlot(int(fused.group(1)), None, "all")
    split = _SPLIT.search(name)
    if split is None:
        return None
    projections = {_SPLIT.search(group_name(m)) for m in module_names} - {None}
    kinds = {match.group(3) for match in projections if match is not None} | {split.group(3)}
    if "down_proj" in kinds and kinds & {"gate_proj", "up_proj", "gate_up_proj"}:
        part: Part = "all"
    elif kinds == {"down_proj"}:
        part = "down"
    else:
        part = "gate/up"
    return ExpertSlot(int(split.group(1)), int(split.group(2)), part)


def display_name(name: str, module_names: Sequence[str] = ()) -> str:
    """The group's name as a reader needs it: a whole expert as ``...experts.<i>``, gate+up as
    ``...experts.<i>.gate_up_proj``; every other name unchanged."""
    slot = expert_slot(name, module_names)
    if slot is None or slot.expert is None:
        return group_name(name)
    stem = group_name(name).rsplit(".", 1)[0]
    return {"all": stem, "gate/up": f"{stem}.gate_up_proj", "down": f"{stem}.down_proj"}[slot.part]


def grouping_of(groups: Iterable[NamedGroup]) -> Grouping | None:
    """How the experts of these groups were grouped; None when no group holds experts."""
    parts = {slot.part if slot.expert is not None else "layer" for g in groups if (slot := _slot(g))}
    if not parts:
        return None
    if "layer" in parts:
        return "layer"
    return "expert" if parts == {"all"} else "projection"


def _slot(group: NamedGroup) -> ExpertSlot | None:
    return expert_slot(group.name, group.module_names)


@attrs.frozen
class LayerExperts:
    """One layer's expert groups summarised (importances as the ranking defines them)."""

    layer: int
    groups: int
    experts: int
    worst: float
    worst_expert: int | None
    median: float
    best: float


def layer_summaries(groups: Iterable[ImportantGroup]) -> tuple[LayerExperts, ...]:
    """Per layer: how many expert groups, the worst (and which expert), the median and the best."""
    by_layer: dict[int, list[tuple[float, int | None]]] = {}
    for group in groups:
        slot = _slot(group)
        if slot is not None:
            by_layer.setdefault(slot.layer, []).append((group.importance, slot.expert))
    summaries = []
    for layer in sorted(by_layer):
        entries = by_layer[layer]
        values = [value for value, _ in entries]
        top = worst(values)
        finite = sorted(v for v in values if not math.isnan(v))
        which = next((expert for value, expert in entries if value == top), None)
        summaries.append(
            LayerExperts(
                layer=layer,
                groups=len(entries),
                experts=len({expert for _, expert in entries if expert is not None}),
                worst=top,
                worst_expert=None if math.isnan(top) else which,
                median=statistics.median(finite) if finite else math.nan,
                best=finite[0] if finite else math.nan,
            )
        )
    return tuple(summaries)


def routing_by_layer(routing: RoutingStats | None) -> dict[int, LayerRouting]:
    return {} if routing is None else {layer.layer: layer for layer in routing.layers}


def routed_tokens(groups: Iterable[NamedGroup], routing: RoutingStats | None) -> dict[str, int]:
    """Calibration tokens behind each expert group's score, by group name.

    A group of one expert (``"expert"``) or of one of its projections (``"projection"``) rests on
    the tokens routed to that expert; a layer's fused experts (``"layer"``) on every token the
    layer routed (``top_k`` per token). Groups without experts, or in a layer the counts do not
    cover, are left out.
    """
    layers = routing_by_layer(routing)
    found: dict[str, int] = {}
    for group in groups:
        slot = _slot(group)
        layer = None if slot is None else layers.get(slot.layer)
        if slot is None or layer is None:
            continue
        if slot.expert is None:
            found[group.name] = sum(layer.tokens)
        elif slot.expert < layer.num_experts:
            found[group.name] = layer.tokens[slot.expert]
    return found


def _num(value: float) -> str:
    return "NaN" if math.isnan(value) else format(value, ".3e")


def _spread(layer: LayerRouting | None) -> str:
    if layer is None:
        return "n/a"
    low, high = min(layer.tokens), max(layer.tokens)
    return f"{low} / {statistics.median(layer.tokens):g} / {high}"


def _routing_lines(routing: RoutingStats | None) -> list[str]:
    if routing is None:
        return [
            "",
            "Routed tokens per expert were not counted for this run (a manifest written before aqm "
            "counted them, or a count that did not cover every calibration batch).",
        ]
    return [
        "",
        f"Routed tokens: the calibration's {routing.real_tokens} real tokens ({routing.batches} batches, "
        "padding left out), each sent by every MoE layer's router to its top-k experts; an expert's "
        "score rests on the tokens it was sent, so one that saw a handful has a noise-level score.",
    ]


def experts_markdown(
    groups: Sequence[ImportantGroup], routing: RoutingStats | None = None, rare: Sequence[str] = ()
) -> list[str]:
    """The report's "Experts" section; empty for a model without experts.

    Says what one expert group stands for, how many calibration tokens the routers sent each
    expert, and, when experts were scored apart, a row per layer (worst, median and least
    sensitive expert, and the tokens behind the worst), which stays readable where the ranked
    table of 6,000 expert groups cannot. ``rare`` names the groups the solver's rare-expert rule
    applied to (see :mod:`auto_quantize_model.core.routing`).
    """
    grouping = grouping_of(groups)
    if grouping is None:
        return []
    layers = layer_summaries(groups)
    routed = routing_by_layer(routing)
    tokens = routed_tokens(groups, routing)
    lines = ["", "## Experts", "", f"Mixture of experts, {len(layers)} layers: {MEANING[grouping]}."]
    lines += _routing_lines(routing)
    if grouping == "layer":
        if routing is not None:
            lines += [
                "",
                "| Layer | Experts | Top-k | Tokens per expert (fewest / median / most) "
                "| Experts sent none |",
                "| ---: | ---: | ---: | ---: | ---: |",
            ]
            for layer in routing.layers:
                idle = sum(1 for count in layer.tokens if count == 0)
                lines.append(
                    f"| {layer.layer} | {layer.num_experts} | {layer.top_k} | {_spread(layer)} | {idle} |"
                )
        return lines
    lines += [
        "",
        "Importance per layer over its expert groups (the heatmap shows the worst; every group is in the "
        "JSON and the manifest), and the tokens routed to its experts.",
        "",
        "| Layer | Expert groups | Worst | Worst expert | Its tokens | Median | Least "
        "| Tokens per expert (fewest / median / most) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    worst_tokens = {
        (slot.layer, slot.expert): tokens[group.name]
        for group in groups
        if (slot := _slot(group)) is not None and group.name in tokens
    }
    for summary in layers:
        which = "" if summary.worst_expert is None else str(summary.worst_expert)
        its = worst_tokens.get((summary.layer, summary.worst_expert))
        lines.append(
            f"| {summary.layer} | {summary.groups} | {_num(summary.worst)} | {which} | "
            f"{'' if its is None else its} | {_num(summary.median)} | {_num(summary.best)} | "
            f"{_spread(routed.get(summary.layer))} |"
        )
    if rare:
        modules = {group.name: group.module_names for group in groups}
        shown = ", ".join(f"`{display_name(name, modules.get(name, ()))}`" for name in rare[:10])
        more = ", ..." if len(rare) > 10 else ""
        lines += ["", f"Rare-expert rule applied to {len(rare)} expert group(s): {shown}{more}."]
    return lines
