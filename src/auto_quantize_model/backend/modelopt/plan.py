"""What one ``mtq.auto_quantize`` call is asked to do: which root, which names, which budget, which steps.

ModelOpt 0.47 reads the loader from its first batch for ``num_calib_steps`` batches per format,
then again for ``num_score_steps`` batches. Sizes are given in captions here and turned into
leading batches with :func:`leading_steps`, so the same settings mean the same text in the
packed and padded layouts. ``scope="language_model"`` searches a
:class:`~auto_quantize_model.backend.lm_forward.TextLM` (decoder + lm_head under one root);
``scope="full_model"`` the whole VLM with the vision modules disabled. ModelOpt costs disabled
groups at 16 bits, which would dilute the budget, so the constraint passed is raised until the LM
alone meets the user's target (:func:`~auto_quantize_model.core.bits.model_constraint`).

``autoquant.cost_model = "active"`` on an MoE model hands ModelOpt its ``active_moe`` cost model
(:func:`search_constraints`): every group holding a routed expert is costed, in numerator and
denominator alike, at the experts' ``top_k / num_experts`` share, so the budget counts the weights
one token uses. The weight counts behind the constraint count those experts at the same share.
"""

from __future__ import annotations

import fnmatch
import itertools
import logging
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from auto_quantize_model.artifacts import CalibData, LanguageModel
from auto_quantize_model.core import formats as fmt
from auto_quantize_model.core.batching import IGNORE_INDEX
from auto_quantize_model.core.bits import model_constraint
from auto_quantize_model.errors import AqmError, ConfigError
from auto_quantize_model.specs import AutoQuantSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

    from auto_quantize_model.backend.experts import ExpertLayer

log = logging.getLogger("auto_quantize_model")

# --------------------------------------------------------------------------------------------------
# Steps and captions (pure)
# --------------------------------------------------------------------------------------------------


def leading_steps(captions_per_batch: Sequence[int], size: int | None) -> tuple[int, int]:
    """Fewest leading batches holding at least ``size`` captions: ``(batches, captions)``.

    ModelOpt always reads the loader from its first batch, so "the first N batches" is the only
    subset it can be given. ``None`` means every batch; a size beyond the data uses every batch.
    """
    if size is None:
        return len(captions_per_batch), sum(captions_per_batch)
    covered = 0
    for steps, count in enumerate(captions_per_batch, start=1):
        covered += count
        if covered >= size:
            return steps, covered
    return len(captions_per_batch), covered


@attrs.frozen
class Steps:
    """Leading batches (and the captions in them) for each phase, plus sizes that could not be met."""

    calib_steps: int
    calib_samples: int
    score_steps: int
    score_samples: int
    """Captions in the scoring batches; the captions really scored may be fewer (``score_size``)."""
    unmet: tuple[str, ...]
    """One sentence per size beyond the data (the whole data is used instead)."""


def plan_steps(captions_per_batch: Sequence[int], spec: AutoQuantSpec) -> Steps:
    """Turn ``score_size``/``calib_size`` into leading batches; a size beyond the data is named."""
    available = sum(captions_per_batch)
    unmet = tuple(
        f"autoquant.{what} {size} exceeds the {available} calibration captions; all {available} were used"
        for what, size in (("score_size", spec.score_size), ("calib_size", spec.calib_size))
        if size is not None and size > available
    )
    calib_steps, calib_samples = leading_steps(captions_per_batch, spec.calib_size)
    score_steps, score_samples = leading_steps(captions_per_batch, spec.score_size)
    return Steps(calib_steps, calib_samples, score_steps, score_samples, unmet)


def check_request(spec: AutoQuantSpec, calib: CalibData, device_type: str) -> None:
    """Every setting refused before ModelOpt is imported or the model touched.

    Sizes and the bits range are checked by the spec's own validators when it is built; what
    remains depends on the device, the formats together or the data.
    """
    fmt.check_formats(spec.formats, device_type)
    fmt.check_effective_bits(spec.effective_bits, spec.formats)
    if spec.method not in ("gradient", "kl_div"):
        raise ConfigError(f"autoquant.method must be 'gradient' or 'kl_div', got {spec.method!r}")
    if not calib.batches or sum(calib.captions_per_batch) == 0:
        raise ConfigError("AutoQuant got no calibration batches: the captions produced no tokens")
    if len(calib.captions_per_batch) != len(calib.batches):
        raise ValueError("CalibData.captions_per_batch does not match its batches")


def caption_segments(
    position_ids: Sequence[int], input_ids: Sequence[int], pad_id: int
) -> list[tuple[int, int]]:
    """``(start, end)`` of every caption in one row; padding segments are left out.

    A caption starts wherever positions restart at 0 (packed rows hold several, padded rows one
    whose padding continues its positions). A segment made only of pad tokens is padding.
    """
    starts = [i for i, pos in enumerate(position_ids) if pos == 0]
    bounds = [*starts, len(position_ids)]
    return [
        (start, end)
        for start, end in itertools.pairwise(bounds)
        if any(token != pad_id for token in input_ids[start:end])
    ]


def limit_scored_captions(
    batches: Sequence[dict[str, torch.Tensor]],
    captions_per_batch: Sequence[int],
    score_steps: int,
    score_size: int,
    pad_id: int,
) -> tuple[list[dict[str, torch.Tensor]], int]:
    """Score exactly ``score_size`` captions even when a packed batch holds hundreds.

    The last scoring batch gets ``-100`` labels on the captions past ``score_size``: the loss (and
    the kl_div logits) skip them, and since attention never crosses a caption boundary they leave
    the other captions' outputs untouched. Only the scoring phase gets these copies (calibration
    keeps every caption). Returns the batches and the captions scored.
    """
    out = list(batches)
    before = sum(captions_per_batch[: score_steps - 1])
    keep = score_size - before
    last = score_steps - 1
    if last < 0 or keep >= captions_per_batch[last]:
        return out, min(score_size, sum(captions_per_batch[:score_steps]))
    batch = dict(out[last])
    labels = batch["labels"].clone()
    positions = batch["position_ids"].tolist()
    tokens = batch["input_ids"].tolist()
    seen = 0
    for row, (row_pos, row_ids) in enumerate(zip(positions, tokens, strict=True)):
        for start, end in caption_segments(row_pos, row_ids, pad_id):
            if seen >= keep:
                labels[row, start:end] = IGNORE_INDEX
            seen += 1
    batch["labels"] = labels
    out[last] = batch
    return out, score_size


def textlm_name_map(prefix: str, head_name: str) -> Callable[[str], str]:
    """Maps module names inside ``TextLM`` (``decoder.*``, ``lm_head``) to full-model names."""

    def full_name(name: str) -> str:
        if name == "lm_head" or name.startswith("lm_head."):
            return head_name + name.removeprefix("lm_head")
        if name == "decoder":
            return prefix
        if name.startswith("decoder."):
            rest = name.removeprefix("decoder.")
            return f"{prefix}.{rest}" if prefix else rest
        return name

    return full_name


def lm_membership(prefix: str, head_name: str) -> Callable[[str], bool]:
    """Whether a full-model module name belongs to the language model (decoder or head)."""

    def is_lm(name: str) -> bool:
        if name == head_name or name.startswith(head_name + "."):
            return True
        return not prefix or name == prefix or name.startswith(prefix + ".")

    return is_lm


# --------------------------------------------------------------------------------------------------
# The root ModelOpt searches and the budget over it (torch, lazily)
# --------------------------------------------------------------------------------------------------


def _identity(name: str) -> str:
    return name


def _everything(name: str) -> bool:
    return True


def _nothing(name: str) -> bool:
    return False


@attrs.frozen(eq=False)
class SearchPlan:
    """The module ModelOpt searches, how its names map back, and the budget handed to it."""

    root: nn.Module
    """``TextLM`` (language_model scope) or the full model; quantizers land in the caller's modules."""
    name_map: Callable[[str], str]
    """Names inside ``root`` -> full-model names."""
    is_lm: Callable[[str], bool]
    """Whether a full-model name belongs to the language model."""
    disabled: tuple[str, ...]
    """Patterns (names inside ``root``) ModelOpt must leave unquantized."""
    lm_weights: float
    """LM weights as ModelOpt's cost model counts them: routed experts at :attr:`expert_ratio`."""
    other_weights: int
    """Weights ModelOpt costs outside the LM (vision, at 16 bits); 0 in language_model scope."""
    constraint: float
    """Effective bits over every costed weight, so that the LM alone lands on the target."""
    expert_ratio: float | None = None
    """``top_k / num_experts`` of the routed experts when ModelOpt counts active weights
    (``active_moe``); None when it counts every weight (``weight``, a dense model or storage)."""

    @property
    def cost_model(self) -> str:
        """ModelOpt's name of the cost model its search is given."""
        return ACTIVE_MOE if self.expert_ratio is not None else WEIGHT_COST

    @property
    def constraints(self) -> dict[str, Any]:
        """``mtq.auto_quantize``'s ``constraints`` argument."""
        return search_constraints(self.constraint, self.expert_ratio)


WEIGHT_COST = "weight"
ACTIVE_MOE = "active_moe"
"""ModelOpt 0.47's cost models (``_auto_quantize_cost.py``): every weight once, or routed experts
at their active share."""

_ROUTED_EXPERT = re.compile(r"(?:^|\.)experts(?:\.|$)")


def is_routed_expert(name: str) -> bool:
    """Whether ModelOpt's ``active_moe`` counts the module ``name`` (inside the searched root) at the
    experts' share: a dotted component exactly ``experts``, and no ``shared_expert`` anywhere in
    the name (shared experts run for every token). ModelOpt scales a whole recipe group when any of
    its modules is one; aqm's groups never mix experts with other layers, so per module is the same.
    """
    return "shared_expert" not in name and _ROUTED_EXPERT.search(name) is not None


def search_constraints(constraint: float, expert_ratio: float | None) -> dict[str, Any]:
    """ModelOpt's constraints: the effective bits and, for active weights, the cost model and ratio."""
    if expert_ratio is None:
        return {"effective_bits": constraint}
    return {
        "effective_bits": constraint,
        "cost_model": ACTIVE_MOE,
        "cost": {"active_moe_expert_ratio": expert_ratio},
    }


def active_expert_ratio(layers: Sequence[ExpertLayer]) -> float:
    """The one ``top_k / num_experts`` ModelOpt's ``active_moe`` takes for every routed expert.

    ModelOpt accepts a single ratio, so layers that disagree (or a router that does not say its
    top-k) cannot be costed by it: refused, naming the layers.
    """
    ratios: dict[float, list[str]] = {}
    unknown: list[str] = []
    for layer in layers:
        if layer.top_k is None or layer.num_experts <= 0:
            unknown.append(layer.name)
        else:
            ratios.setdefault(layer.top_k / layer.num_experts, []).append(layer.name)
    if unknown:
        raise ConfigError(
            f"autoquant.cost_model = 'active': the router of {', '.join(unknown[:3])} does not say how many "
            "experts a token uses (top_k); use cost_model = 'storage'"
        )
    if len(ratios) > 1:
        shown = "; ".join(
            f"{names[0]}{f' and {len(names) - 1} more' if len(names) > 1 else ''}: {ratio:g}"
            for ratio, names in ratios.items()
        )
        raise ConfigError(
            f"autoquant.cost_model = 'active': the MoE layers use different top_k / num_experts ratios "
            f"({shown}) and ModelOpt's active_moe cost model takes one; use cost_model = 'storage'"
        )
    return next(iter(ratios))


def quantizable_weights(
    root: nn.Module, skip: Callable[[str], bool], expert_ratio: float | None = None
) -> float:
    """Weights of the layers ModelOpt costs (linear, convolution, fused MoE experts), outside ``skip``.

    With ``expert_ratio`` each routed expert's weights count at that share, as ``active_moe``
    costs them (each module's count times the ratio, then summed: ModelOpt's order of operations).
    Without it the count is an integer (returned as ``int``).
    """
    from torch import nn

    from auto_quantize_model.backend.experts import fused_expert_weights

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d)
    total: float = 0
    for name, module in root.named_modules():
        if skip(name):
            continue
        weight = getattr(module, "weight", None)
        if isinstance(module, kinds) and weight is not None:
            count = int(weight.numel())
        else:
            count = fused_expert_weights(module)  # ModelOpt costs gate_up_proj + down_proj
        if count and expert_ratio is not None and is_routed_expert(name):
            total += count * expert_ratio
        else:
            total += count
    return total


def matching_layers(root: nn.Module, name_map: Callable[[str], str], patterns: Sequence[str]) -> list[str]:
    """Names inside ``root`` of the layers whose full-model name matches a user pattern.

    Users write full-model names; inside ``TextLM`` ModelOpt sees ``decoder.*``, so patterns are
    resolved here into exact names rather than handed to ModelOpt as they are.
    """
    matched: list[str] = []
    unused = list(patterns)
    for name, _ in root.named_modules():
        hits = [p for p in patterns if name and fnmatch.fnmatchcase(name_map(name), p)]
        if hits:
            matched.append(name)
            unused = [p for p in unused if p not in hits]
    for pattern in unused:
        log.warning("autoquant.disabled_layers: %r matches no layer of the language model", pattern)
    return matched


def plan_search(lm: LanguageModel, spec: AutoQuantSpec) -> SearchPlan:
    """The root for ``lm.scope``, user patterns resolved to its names, and the raised constraint.

    ``spec.cost_model = "active"`` gives ModelOpt ``active_moe`` on an MoE model (the ratio read
    off its routers); a dense model has nothing to scale and keeps ``weight``.
    """
    from auto_quantize_model.backend.experts import expert_layers
    from auto_quantize_model.backend.lm_forward import TextLM

    ratio: float | None = None
    if spec.cost_model == "active" and lm.experts:
        ratio = active_expert_ratio(expert_layers(lm.full_model))
    if lm.scope == "language_model":
        root: nn.Module = TextLM(lm.module, lm.lm_head)
        name_map = textlm_name_map(lm.prefix, lm.head_name)
        is_lm: Callable[[str], bool] = _everything
        disabled = matching_layers(root, name_map, (*spec.disabled_layers, *lm.routers))
        lm_weights = quantizable_weights(root, _nothing, ratio)
        other_weights = 0
    else:
        root = lm.full_model
        name_map = _identity
        is_lm = lm_membership(lm.prefix, lm.head_name)
        vision = [pattern for v in lm.vision_modules for pattern in (v, f"{v}.*")]
        disabled = vision + matching_layers(root, name_map, (*spec.disabled_layers, *lm.routers))
        lm_weights = quantizable_weights(root, lambda name: not is_lm(name), ratio)
        other_weights = int(quantizable_weights(root, is_lm))
    if lm_weights == 0:
        raise AqmError("the language model has no linear layers for AutoQuant to quantize")
    return SearchPlan(
        root=root,
        name_map=name_map,
        is_lm=is_lm,
        disabled=tuple(disabled),
        lm_weights=lm_weights,
        other_weights=other_weights,
        constraint=model_constraint(spec.effective_bits, lm_weights, other_weights),
        expert_ratio=ratio,
    )
