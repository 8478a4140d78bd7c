"""Split experts' scoring forwards with ModelOpt's score arithmetic, without its per-linear switching.

While ModelOpt 0.47 scores (``_estimate_auto_quantize_scores``, ``algorithms.py`` l. 1553), each
quantized linear's ``forward`` is replaced by ``auto_quantize_score_estimate_forward``: it sets the
linear's recipe group to "no quantization" (``hparam.active``, which re-assigns the quantizers of
every linear of the group), computes the output, then for each format sets the group to that
format, computes the output again and keeps the difference; a full backward hook on the linear
then adds ``(grad_output * difference)^2`` to the format's score. With ``extract.experts =
"expert"`` that is 18,432 linears a forward on Qwen3-VL-30B-A3B, each with three group switches
of nine quantizer assignments each (through ModelOpt's dynamic-module ``__setattr__``) and a full
backward hook: the part of an ``expert`` search that was left after its calibration was batched.

:func:`scoring_forward` computes, per routed expert and projection, the same tensors from the
same quantizer objects, taken from the group's own table of each format's quantizers
(``_all_quantizer_choices``) instead of switching them in: the output with the no-quantization
quantizers, each format's output minus it (under ``no_grad``, in place, as ModelOpt does), and a
tensor hook on the output that adds ModelOpt's own ``_get_auto_quantize_score`` /
``_add_auto_quantize_score`` into the group's ``_importance_dict``, in ModelOpt's order. The
gradient a tensor hook sees on the output is what the full backward hook sees as
``grad_output``. Each group is left at "no quantization" afterwards, as ModelOpt leaves it. Under
``no_grad`` (the first pass of reentrant gradient checkpointing) only the outputs are computed, as
there; the recompute during backward, with gradients on, registers the hooks.

Accepted only when every expert projection is a plain quantized linear in exactly ModelOpt's
scoring state: its scoring ``forward`` wrapping the class's own, one configurable group that
quantizes it, ModelOpt's score hook (and aqm's release hook) and nothing else hooked, no bias.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

SCORING_FORWARD = "auto_quantize_score_estimate_forward"
"""The name of the function ModelOpt 0.47 puts in place of each scored module's ``forward``."""


def in_scoring(experts: Any) -> bool:
    """Whether ModelOpt has put its scoring ``forward`` on the first expert's first projection."""
    first = getattr(experts[0], PROJECTIONS[0], None) if len(experts) else None
    return first is not None and "forward" in vars(first)


def _scored_linear_reason(linear: Any) -> str | None:
    import torch
    from modelopt.torch.quantization.nn import QuantModule

    if not isinstance(linear, QuantModule) or not isinstance(linear, torch.nn.Linear):
        return "an expert projection is not a quantized linear"
    patched = vars(linear).get("forward")
    original = getattr(linear, "_forward_original", None)
    if getattr(getattr(patched, "__func__", None), "__name__", None) != SCORING_FORWARD:
        return "an expert projection's forward is not ModelOpt's scoring forward"
    if getattr(original, "__func__", None) is not type(linear).forward:
        return "an expert projection's forward was patched before scoring"
    if linear._forward_hooks or linear._forward_pre_hooks or linear._backward_pre_hooks:
        return "an expert projection is hooked"
    kinds = [_hook_kind(hook) for hook in linear._backward_hooks.values()]
    if kinds.count("score") != 1 or "other" in kinds:
        return "an expert projection has other backward hooks than ModelOpt's score and aqm's release"
    if linear._parameters.get("bias") is not None:
        return "an expert projection has a bias"
    groups = list(getattr(linear, "_hparams_for_scoring", ()))
    if len(groups) != 1 or not groups[0].is_configurable:
        return "an expert projection is not scored by exactly one configurable group"
    table = groups[0]._all_quantizer_choices
    if any(linear not in table.get(recipe, {}) for recipe in groups[0].choices):
        return "an expert projection's group does not quantize it"
    return None


def _hook_kind(hook: Any) -> str:
    """``score`` (ModelOpt's score hook), ``release`` (aqm's ``release_output_diffs``) or ``other``.

    Both are closures, told apart by where they were defined; the release hook only frees what the
    score hook read, which :func:`_score_hook` does itself.
    """
    name = getattr(hook, "__qualname__", "")
    if name.endswith("_estimate_auto_quantize_scores.<locals>.backward_hook"):
        return "score"
    if name.endswith("release_output_diffs.<locals>.drop"):
        return "release"
    return "other"


def first_reason(
    experts: Any, args: tuple[Any, ...], kwargs: dict[str, Any], per_linear: Callable[[Any], str | None]
) -> str | None:
    """The call's or the first expert projection's reason (``per_linear``) against a batched path."""
    if kwargs or len(args) != 3:
        return "arguments passed by name"
    hidden, index, _ = args
    if hidden.dim() != 2 or index.dim() != 2:
        return "unexpected input shapes"
    for expert in experts:
        for projection in PROJECTIONS:
            reason = per_linear(getattr(expert, projection, None))
            if reason is not None:
                return reason
    return None


def why_not_scored(experts: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """Why ``experts`` must run ModelOpt's per-linear scoring this time, or None when the batched one fits."""
    return first_reason(experts, args, kwargs, _scored_linear_reason)


def scoring_forward(
    experts: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """What ``UnfusedExperts.forward`` computes while ModelOpt scores, the scores recorded as it does.

    ``experts`` is one :func:`why_not_scored` accepted.
    """
    import torch
    from modelopt.torch.quantization.algorithms import QuantRecipe

    from auto_quantize_model.backend.experts import routed_pairs

    unquantized = QuantRecipe(quant_cfg=None)
    final = torch.zeros_like(hidden_states)
    touched: dict[int, Any] = {}
    for index, tokens, slot in routed_pairs(top_k_index, len(experts)):
        expert = experts[index]
        rows = hidden_states[tokens]
        gate = _scored(expert.gate_proj, rows, unquantized, touched)
        up = _scored(expert.up_proj, rows, unquantized, touched)
        out = _scored(expert.down_proj, expert.act_fn(gate) * up, unquantized, touched)
        final.index_add_(0, tokens, (out * top_k_weights[tokens, slot, None]).to(final.dtype))
    for group in touched.values():
        group.active = unquantized  # where ModelOpt's scoring forward leaves every group it ran
    return final


def _scored(linear: Any, rows: torch.Tensor, unquantized: Any, touched: dict[int, Any]) -> torch.Tensor:
    """One projection's output as ModelOpt's scoring forward returns it, its score hook in place."""
    import torch

    [group] = linear._hparams_for_scoring
    touched[id(group)] = group
    output = _through(group._all_quantizer_choices[unquantized][linear], rows, linear)
    if not torch.is_grad_enabled():
        return output
    differences = []
    with torch.no_grad():
        for recipe in group.choices:
            if recipe == unquantized:
                continue
            difference = _through(group._all_quantizer_choices[recipe][linear], rows, linear)
            difference -= output
            differences.append((recipe, difference.detach()))
    if output.requires_grad:
        hooked: Any = output
        hooked.register_hook(_score_hook(group, linear, differences))
    return output


def _through(quantizers: dict[str, Any], rows: torch.Tensor, linear: Any) -> torch.Tensor:
    """``QuantLinear.forward`` with these quantizers: input, weight, ``F.linear``, output, in its order."""
    import torch

    quantized_rows = quantizers["input_quantizer"](rows)
    weight = quantizers["weight_quantizer"](linear._parameters["weight"])
    out: torch.Tensor = quantizers["output_quantizer"](torch.nn.functional.linear(quantized_rows, weight))
    return out


def _score_hook(group: Any, linear: Any, differences: list[tuple[Any, torch.Tensor]]) -> Any:
    """ModelOpt's backward hook for one linear, as a hook on its output tensor (same gradient)."""
    from modelopt.torch.quantization.algorithms import _add_auto_quantize_score, _get_auto_quantize_score

    def hook(grad: torch.Tensor) -> None:
        for recipe, difference in differences:
            held = group._importance_dict[recipe][linear]
            if held is None:
                group._importance_dict[recipe][linear] = _get_auto_quantize_score(grad, difference)
            else:
                _add_auto_quantize_score(grad, difference, held)
        differences.clear()  # freed now, as release_output_diffs frees ModelOpt's

    return hook
