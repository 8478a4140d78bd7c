"""What one ``mtq.auto_quantize`` call is asked to do: which root, which names, which budget, which steps.

ModelOpt 0.47 reads the loader from its first batch for ``num_calib_steps`` batches per format,
then again for ``num_score_steps`` batches. Sizes are given in captions here and turned into
leading batches with :func:`leading_steps`, so the same settings mean the same text in the
packed and padded layouts. ``scope="language_model"`` searches a
:class:`~auto_quantize_model.backend.lm_forward.TextLM` (decoder + lm_head under one root);
``scope="full_model"`` the whole VLM with the vision modules disabled. ModelOpt costs disabled
groups at 16 bits, which would dilute the budget, so the constraint passed is raised until the LM
alone meets the user's target (:func:`~auto_quantize_model.core.bits.model_constraint`).
"""

from __future__ import annotations

import fnmatch
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

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
    lm_weights: int
    other_weights: int
    """Weights ModelOpt costs outside the LM (vision, at 16 bits); 0 in language_model scope."""
    constraint: float
    """Effective bits over every costed weight, so that the LM alone lands on the target."""


def quantizable_weights(root: nn.Module, skip: Callable[[str], bool]) -> int:
    """Weights of the layers ModelOpt costs (linear, convolution, fused MoE experts), outside ``skip``."""
    from torch import nn

    from auto_quantize_model.backend.experts import fused_expert_weights

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d)
    total = 0
    for name, module in root.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, kinds) and weight is not None and not skip(name):
            total += int(weight.numel())
        elif not skip(name):
            total += fused_expert_weights(module)  # ModelOpt costs gate_up_proj + down_proj
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
    """The root for ``lm.scope``, user patterns resolved to its names, and the raised constraint."""
    from auto_quantize_model.backend.lm_forward import TextLM

    if lm.scope == "language_model":
        root: nn.Module = TextLM(lm.module, lm.lm_head)
        name_map = textlm_name_map(lm.prefix, lm.head_name)
        is_lm: Callable[[str], bool] = _everything
        disabled = matching_layers(root, name_map, (*spec.disabled_layers, *lm.routers))
        lm_weights = quantizable_weights(root, _nothing)
        other_weights = 0
    else:
        root = lm.full_model
        name_map = _identity
        is_lm = lm_membership(lm.prefix, lm.head_name)
        vision = [pattern for v in lm.vision_modules for pattern in (v, f"{v}.*")]
        disabled = vision + matching_layers(root, name_map, (*spec.disabled_layers, *lm.routers))
        lm_weights = quantizable_weights(root, lambda name: not is_lm(name))
        other_weights = quantizable_weights(root, is_lm)
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
    )
