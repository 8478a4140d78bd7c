"""ModelOpt's search state read as plain numbers.

``scores_from_state`` needs neither torch nor ModelOpt (the state's recipe objects are only
``str()``-ed); :func:`collect_raw_scores` reads ModelOpt's hparams off a searched model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from auto_quantize_model.artifacts import FixedGroup, GroupScore, Method, Scope, SensitivityScores
from auto_quantize_model.core.bits import effective_bits
from auto_quantize_model.core.scores import NO_QUANT, group_name, has_quantized_format, parse_label
from auto_quantize_model.errors import AqmError

WEIGHT_COST = "weight"
"""ModelOpt's default cost model, and the one a state saved before cost models records."""

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger("auto_quantize_model")

RawScores = dict[str, dict[str, float]]
"""``"<module>.quant_recipe"`` -> recipe label -> unclamped score."""


def _number(value: Any) -> float:
    """A float from a Python number or a one-element tensor (ModelOpt stores both)."""
    item = getattr(value, "item", None)
    return float(item() if callable(item) else value)


def _identity(name: str) -> str:
    return name


def _everything(name: str) -> bool:
    return True


@attrs.frozen
class StateReading:
    """The scores read from ModelOpt's search state, and what only :func:`review_search` needs.

    The scores are the artifact RunAutoQuant hands on; the other fields are facts about the
    search that the review checks or logs and the manifest does not record.
    """

    scores: SensitivityScores
    ran_method: str
    """The method ModelOpt says it ran; ``scores.method`` is the one asked for."""
    nonfinite: tuple[str, ...]
    """LM groups with a NaN or infinite score for some format."""
    disabled: tuple[str, ...]
    """LM groups ModelOpt could only leave unquantized (``disabled_layers``); costed at 16 bits."""
    other: tuple[str, ...]
    """Groups outside the language model (vision), all of them costed too."""
    lm_weights: float
    other_weights: float
    cost_model: str = WEIGHT_COST
    """ModelOpt's cost model as its state records it (``weight`` or ``active_moe``): what its
    budget counted. The scores hold storage figures either way."""
    expert_ratio: float | None = None
    """The routed experts' share under ``active_moe``."""


def scores_from_state(
    state: Mapping[str, Any],
    name_map: Callable[[str], str] = _identity,
    is_lm: Callable[[str], bool] = _everything,
    raw_scores: Mapping[str, Mapping[str, float]] | None = None,
    *,
    formats: tuple[str, ...],
    method: Method,
    scope: Scope,
    effective_bits_target: float,
    calib_steps: int,
    score_steps: int,
    score_samples: int,
    autoquant_seconds: float,
    state_path: str | None = None,
    calib_forward_steps: int | None = None,
    score_forward_steps: int | None = None,
    warnings: tuple[str, ...] = (),
) -> StateReading:
    """Convert ``mtq.auto_quantize``'s returned state into :class:`SensitivityScores`.

    The keyword arguments are what the state does not hold (the request, the step counts, the
    timings) and go into the scores unchanged, so that the scores are built in one place, every
    field named. ``method`` is the one asked for; :func:`review_search` checks that ModelOpt ran it.

    ``state["candidate_stats"]`` maps ``"<module>.quant_recipe"`` to ``formats`` (recipe objects
    whose ``str()`` is ``"NAME(effective-bits: B)"``), ``scores``, ``costs`` (weights x bits/16),
    ``module_names`` and, in 0.47, ``uncompressed_cost``; ``state["best"]`` holds the chosen
    ``recipe`` per key, ``constraints.effective_bits``, ``score`` and ``is_satisfied``.
    ``name_map`` turns the names ModelOpt saw into full-model names; ``is_lm`` (on mapped names)
    says which groups belong to the language model: only those become the scores' ``groups``, but
    every group counts toward the whole-model effective bits.

    ``raw_scores`` (``"<module>.quant_recipe"`` -> format label -> score) replaces the scores of
    ``candidate_stats``, which ModelOpt clamps so that no format scores above a cheaper-or-equal
    one listed before it (``min(score, previous)``): that hides non-monotone formats and gives a
    second same-bit format (FP8 after INT8) the first one's score. The search result still comes
    from the clamped scores, as ModelOpt ran it.

    Under ModelOpt's ``active_moe`` cost model (``state["cost_model"]``) each group's ``costs`` and
    ``uncompressed_cost`` come multiplied by its ``cost_weight`` (a routed expert's active share).
    Everything downstream of the scores assumes storage figures and applies shares itself
    (:mod:`auto_quantize_model.core.routing`), so they are divided back here: the groups' costs,
    the fixed groups' weights and both effective bits are storage figures whatever ModelOpt's
    budget counted (:attr:`StateReading.cost_model` says what it did count).
    """
    stats: Mapping[str, Mapping[str, Any]] = state["candidate_stats"]
    best: Mapping[str, Any] = state.get("best", {})
    chosen: Mapping[str, Any] = best.get("recipe", {})

    groups: list[GroupScore] = []
    disabled: list[str] = []
    other: list[str] = []
    nonfinite: list[str] = []
    order: list[str] = []
    fixed: list[FixedGroup] = []
    order_known = True
    lm_cost = lm_weights = all_cost = all_weights = 0.0
    for key, entry in stats.items():
        name = name_map(group_name(key))
        modules = tuple(name_map(m) for m in entry.get("module_names", ())) or (name,)
        labels = [parse_label(str(recipe)) for recipe in entry["formats"]]
        names = tuple(label for label, _ in labels)
        share = _cost_weight(key, entry)
        costs = tuple(_number(c) / share for c in entry["costs"])
        scores = tuple(_number(s) for s in entry["scores"])
        raw = (raw_scores or {}).get(key)
        if raw is not None and all(str(recipe) in raw for recipe in entry["formats"]):
            scores = tuple(_number(raw[str(recipe)]) for recipe in entry["formats"])
        if "uncompressed_cost" in entry:
            weights = _number(entry["uncompressed_cost"]) / share
        else:
            weights = costs[names.index(NO_QUANT)]
        picked = chosen.get(key)
        best_name = parse_label(str(picked))[0] if picked is not None else NO_QUANT
        best_cost = costs[names.index(best_name)] if best_name in names else weights
        all_cost += best_cost
        all_weights += weights
        order.append(name)
        if not all(is_lm(m) for m in modules):
            other.append(name)
            fixed.append(FixedGroup(name=name, weights=weights, lm=False))
            order_known = order_known and not has_quantized_format(names)
            continue
        lm_cost += best_cost
        lm_weights += weights
        if all(label == NO_QUANT for label in names):
            disabled.append(name)
            fixed.append(FixedGroup(name=name, weights=weights, lm=True))
            continue
        if not all(math.isfinite(s) for s, label in zip(scores, names, strict=True) if label != NO_QUANT):
            nonfinite.append(name)
        groups.append(
            GroupScore(
                name=name,
                module_names=modules,
                formats=names,
                bits=tuple(bits for _, bits in labels),
                scores=scores,
                costs=costs,
                best_format=best_name,
            )
        )

    constraints = best.get("constraints", {})
    cost_model = str(state.get("cost_model", WEIGHT_COST))
    if "effective_bits" in constraints and cost_model == WEIGHT_COST:
        bits_model = _number(constraints["effective_bits"])
    else:
        bits_model = effective_bits(all_cost, all_weights) if all_weights else math.nan
    score = best.get("score")
    total = _number(score) if score is not None else math.nan
    if math.isinf(total) and not chosen:
        total = math.nan  # ModelOpt's "no search ran" default
    sensitivity = SensitivityScores(
        groups=tuple(groups),
        formats=formats,
        method=method,
        scope=scope,
        effective_bits_target=effective_bits_target,
        effective_bits_lm=effective_bits(lm_cost, lm_weights) if lm_weights else math.nan,
        effective_bits_model=bits_model,
        total_score=total,
        satisfied=bool(best.get("is_satisfied", False)),
        calib_steps=calib_steps,
        score_steps=score_steps,
        score_samples=score_samples,
        autoquant_seconds=autoquant_seconds,
        state_path=state_path,
        calib_forward_steps=calib_forward_steps,
        score_forward_steps=score_forward_steps,
        warnings=warnings,
        search_order=tuple(order) if order_known else (),
        fixed_groups=tuple(fixed) if order_known else (),
    )
    return StateReading(
        scores=sensitivity,
        ran_method=str(state.get("method", "")),
        nonfinite=tuple(nonfinite),
        disabled=tuple(disabled),
        other=tuple(other),
        lm_weights=lm_weights,
        other_weights=all_weights - lm_weights,
        cost_model=cost_model,
        expert_ratio=_ratio(state) if cost_model != WEIGHT_COST else None,
    )


def _cost_weight(key: str, entry: Mapping[str, Any]) -> float:
    """The factor ModelOpt multiplied a group's costs by (1 under ``weight``, and in states saved
    before ModelOpt recorded it); a group costed at nothing cannot be read back as storage."""
    share = _number(entry.get("cost_weight", 1.0))
    if not share > 0.0:
        raise AqmError(
            f"ModelOpt's search state costs recipe group {group_name(key)} at weight {share:g}: its storage "
            "cost cannot be recovered (aqm never passes excluded_module_name_patterns); search again"
        )
    return share


def _ratio(state: Mapping[str, Any]) -> float | None:
    value = state.get("active_moe_expert_ratio")
    return None if value is None else _number(value)


def nonfinite_message(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
    return (
        f"AutoQuant produced NaN or infinite sensitivity scores for {len(names)} recipe group(s): {shown}; "
        "the forward/backward pass overflowed (try float32 or bfloat16, or fewer/shorter captions), "
        "or set autoquant.allow_nonfinite = true to keep going"
    )


def collect_raw_scores(root: nn.Module) -> RawScores:
    """Each recipe group's unclamped score per format, read from ModelOpt's hparams.

    Only meaningful right after scoring ran in this process: a search restored from a
    checkpoint has no per-module importances (the raw-score sidecar written then holds them).
    """
    from modelopt.torch.opt.utils import named_hparams
    from modelopt.torch.quantization.algorithms import QuantRecipeHparam

    raw: RawScores = {}
    for name, hparam in named_hparams(root, configurable=True, unique=True):
        if isinstance(hparam, QuantRecipeHparam):
            raw[name] = {str(recipe): float(hparam.get_score(recipe)) for recipe in hparam.choices}
    return raw


def quantized_in_place(model: nn.Module) -> bool:
    """Whether ModelOpt already put quantizers into ``model`` (a previous search in this process)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    return any(isinstance(module, TensorQuantizer) for module in model.modules())


def review_search(
    reading: StateReading,
    allow_nonfinite: bool,
    other_weights: int,
    cost_model: tuple[str, float | None] = (WEIGHT_COST, None),
) -> None:
    """Refuse a result that is not what was asked for; log what is merely imperfect.

    ``cost_model`` is the cost model and expert ratio the search was given
    (:attr:`~.plan.SearchPlan.cost_model`): a state that counted anything else is refused.
    """
    asked = reading.scores.method
    if reading.ran_method != asked:
        raise AqmError(f"ModelOpt ran method {reading.ran_method!r}, asked for {asked!r}")
    if (reading.cost_model, reading.expert_ratio) != cost_model:
        raise AqmError(
            f"ModelOpt's search counted cost model {reading.cost_model!r} (expert ratio "
            f"{reading.expert_ratio}), asked for {cost_model[0]!r} (expert ratio {cost_model[1]})"
        )
    if reading.nonfinite:
        if not allow_nonfinite:
            raise AqmError(nonfinite_message(reading.nonfinite))
        log.warning("%s (kept: allow_nonfinite)", nonfinite_message(reading.nonfinite).split(";")[0])
    if other_weights and abs(reading.other_weights - other_weights) > 0.5:
        log.warning(
            "AutoQuant costed %d non-LM weights, %d were expected: the LM effective bits may miss the "
            "target slightly",
            int(reading.other_weights),
            other_weights,
        )
    if not reading.scores.satisfied:
        log.warning("AutoQuant found no choice meeting the effective-bits constraint")
