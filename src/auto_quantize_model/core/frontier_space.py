"""The search space of the budget frontier: every recipe group as ModelOpt's final search sees it.

One scoring pass gives every recipe group a score and a cost per format; the effective-bits
budget only enters ModelOpt's final search. This module rebuilds what that search reads, from a
ModelOpt search state (:func:`space_from_state`) or from plain records (:func:`space_from_scores`),
so that :mod:`auto_quantize_model.core.frontier` can solve it again for any budget with no model
and no GPU.

How ModelOpt 0.47 lays it out (``modelopt/torch/quantization/algorithms.py``): each recipe group
is one row of ``candidate_stats``, its formats sorted by compression (fewest bits first, ``NONE``
last), ``costs`` = weights x bits / 16 and ``scores``, clamped by ``initialize_candidate_stats``
so that a format never scores above the one listed before it (``min(score, previous)``). The
search sees only these clamped scores (:func:`search_scores`). ``run_search`` turns the budget
into a weight size, ``sum(uncompressed_cost) * bits / 16``, so rows the user never chooses
(disabled layers, a vision tower: one format each) still weigh on it and stay rows here.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from auto_quantize_model.core.bits import unquantized_weights
from auto_quantize_model.core.scores import NO_QUANT, group_name, has_quantized_format, parse_label
from auto_quantize_model.errors import InputError
from auto_quantize_model.frontier_records import Method

if TYPE_CHECKING:
    from auto_quantize_model.artifacts import GroupScore


REMAINING_LM = "(LM weights outside the groups)"
REMAINING_OTHER = "(non-LM weights)"


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


def sequential_sum(values: Iterable[float]) -> float:
    """Left-to-right float sum from 0, as ModelOpt accumulates costs and scores (``sum`` may
    compensate rounding on newer Pythons, which would differ in the last bit)."""
    return functools.reduce(operator.add, values, 0)


def cheapest(rows: Sequence[SearchRow]) -> tuple[int, ...]:
    """Each row's cheapest format (lower search score, then ModelOpt's order, on equal cost)."""
    return tuple(min(zip(row.costs, row.scores, range(len(row.costs)), strict=True))[2] for row in rows)
