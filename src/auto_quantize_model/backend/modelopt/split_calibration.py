"""Split experts' calibration forwards as a few tensor operations per layer, not 18,432 quantized linears.

With ``extract.experts = "expert"`` or ``"projection"``,
:class:`~auto_quantize_model.backend.experts.UnfusedExperts` gives every expert three ``nn.Linear``
that ModelOpt converts to ``QuantLinear``, each with its own input, weight and output quantizer.
While ModelOpt max-calibrates (quantization off, statistics on), every routed expert's three
linears run one by one: each input quantizer collects a max behind three device waits
(``MaxCalibrator.collect``'s NaN, sign and inf asserts), and each weight quantizer collects once
more the max of a weight it was calibrated on before the forwards. On Qwen3-VL-30B-A3B that was
17 s a calibration batch on an H100 (BENCHMARKS.md, seventh wave).

While :func:`batched_split_experts` lasts, ``UnfusedExperts.forward`` does the same
arithmetic with the quantizer calls taken out of the loop:

* the routed (token, slot) pairs grouped by expert with one sort, in eager's order;
* each routed expert's three products as ``F.linear`` with its raw weight, as ``QuantLinear``
  computes them while calibrating (nothing is quantized then), and the results added back per
  token in the same order, so the layer's output is bit-identical;
* each input quantizer's max taken over the same rows its ``collect`` would see (a max does not
  depend on anything but the values), all of a layer checked for NaN and inf at once, then merged
  into the calibrator's running max as ``MaxCalibrator.collect`` merges (``torch.max`` of the old
  and the new, same dtype and shape): the ranges are bit-identical too;
* weight quantizers skip the repeated max (their calibrator holds it already), and disabled
  quantizers record the dtype they would have seen (ModelOpt saves it with the quantizer state).

Anything else runs the original forward and is counted by reason (:class:`SplitExpertCounts`):
a quantizer that quantizes (scoring, validation), per-channel, tracked or non-max calibrators,
blocks, pre-quant scales, rotations, biases, hooks or a patched ``forward`` on a linear (AutoQuant's
scoring patches each one), or gradients on.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import attrs

from auto_quantize_model.backend.modelopt import split_scoring
from auto_quantize_model.backend.modelopt.fused_experts import by_reason
from auto_quantize_model.backend.modelopt.patches import swapped

if TYPE_CHECKING:
    import torch


@attrs.define
class SplitExpertCounts:
    """Split-experts forwards during a search: batched calibration, and the original loop by reason.

    Mutable on purpose: filled while the patch is in place, read afterwards (logs, tests).
    """

    batched: int = 0
    """Calibration forwards batched here."""
    scored: int = 0
    """Scoring forwards run by :func:`~auto_quantize_model.backend.modelopt.split_scoring.scoring_forward`."""
    fallback: collections.Counter[str] = attrs.field(factory=collections.Counter)

    def summary(self) -> str:
        loop = sum(self.fallback.values())
        return (
            f"batched calibration {self.batched}, batched scoring {self.scored}, per-expert loop {loop}"
            + (by_reason(self.fallback, " ({})"))
        )


@contextlib.contextmanager
def batched_split_experts() -> Iterator[SplitExpertCounts]:
    """``UnfusedExperts`` calibrates and scores in batched form for a while; undone after.

    Scoring forwards go to :mod:`~auto_quantize_model.backend.modelopt.split_scoring`.

    Undo: the class gets its own ``forward`` back (:func:`swapped`); nothing else is changed.
    """
    from auto_quantize_model.backend.experts import UnfusedExperts

    original = vars(UnfusedExperts)["forward"]
    counts = SplitExpertCounts()

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        if split_scoring.in_scoring(self):
            reason = split_scoring.why_not_scored(self, args, kwargs)
            if reason is None:
                counts.scored += 1
                return split_scoring.scoring_forward(self, *args)
        else:
            reason = why_not_batched(self, args, kwargs)
            if reason is None:
                counts.batched += 1
                return calibration_forward(self, *args)
        counts.fallback[reason] += 1
        return original(self, *args, **kwargs)

    with swapped(UnfusedExperts, "forward", forward):
        yield counts


# --------------------------------------------------------------------------------------------------
# What the batched calibration accepts
# --------------------------------------------------------------------------------------------------


def _quantizer_role(quantizer: Any, *, per_tensor: bool = True) -> str:
    """``off``, ``collect`` (max statistics only; over the whole tensor if ``per_tensor``) or ``other``."""
    from modelopt.torch.quantization.calib import MaxCalibrator
    from modelopt.torch.quantization.nn import TensorQuantizer

    if type(quantizer) is not TensorQuantizer:
        return "other"
    if (
        quantizer.pre_quant_scale is not None
        or quantizer.rotate_is_enabled
        or quantizer.rotate_back_is_enabled
    ):
        return "other"
    if quantizer._disabled:
        return "off"
    if quantizer._if_quant or not quantizer._if_calib or quantizer._dynamic:
        return "other"
    if quantizer.block_sizes is not None or quantizer.bias_calibrator is not None:
        return "other"
    calibrator = quantizer._calibrator
    if type(calibrator) is not MaxCalibrator or calibrator._track_amax:
        return "other"
    if per_tensor and calibrator._axis is not None:
        return "other"
    return "collect"


def _linear_reason(linear: Any) -> str | None:
    import torch
    from modelopt.torch.quantization.nn import QuantModule

    if not isinstance(linear, QuantModule) or not isinstance(linear, torch.nn.Linear):
        return "an expert projection is not a quantized linear"
    if "forward" in vars(linear) or linear._forward_hooks or linear._forward_pre_hooks:
        return "an expert projection's forward is patched or hooked"
    if linear._parameters.get("bias") is not None:
        return "an expert projection has a bias"
    if _quantizer_role(linear.output_quantizer) != "off":
        return "an output quantizer is on"
    if _quantizer_role(linear.input_quantizer) == "other":
        return "an input quantizer quantizes or is not a per-tensor max"
    weight: Any = linear.weight_quantizer
    role = _quantizer_role(weight, per_tensor=False)  # its repeated max is skipped, whatever the axis
    if role == "other" or (role == "collect" and weight._calibrator._calib_amax is None):
        return "a weight quantizer quantizes or has no range yet"
    return None


def why_not_batched(experts: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """Why ``experts`` must run the per-expert loop this time, or None when the batched calibration fits."""
    import torch

    if torch.is_grad_enabled():
        return "gradients on (not a calibration forward)"
    return split_scoring.first_reason(experts, args, kwargs, _linear_reason)


# --------------------------------------------------------------------------------------------------
# The forward
# --------------------------------------------------------------------------------------------------


def calibration_forward(
    experts: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """What ``UnfusedExperts.forward`` computes while ModelOpt calibrates, with the ranges collected
    per layer. ``experts`` is one :func:`why_not_batched` accepted."""
    import torch

    from auto_quantize_model.backend.experts import routed_pairs

    linear = torch.nn.functional.linear
    final = torch.zeros_like(hidden_states)
    maxima: list[tuple[Any, torch.Tensor]] = []
    for index, tokens, slot in routed_pairs(top_k_index, len(experts)):
        expert = experts[index]
        rows = hidden_states[tokens]
        gate = linear(rows, expert.gate_proj._parameters["weight"])
        up = linear(rows, expert.up_proj._parameters["weight"])
        inner = expert.act_fn(gate) * up
        out = linear(inner, expert.down_proj._parameters["weight"])
        row_max = rows.abs().amax()  # what gate's and up's input quantizers both collect
        _seen_by(expert.gate_proj, rows, row_max, gate, maxima)
        _seen_by(expert.up_proj, rows, row_max, up, maxima)
        _seen_by(expert.down_proj, inner, inner.abs().amax(), out, maxima)
        final.index_add_(0, tokens, (out * top_k_weights[tokens, slot, None]).to(final.dtype))
    _merge(maxima)
    return final


def _seen_by(
    linear: Any,
    rows: torch.Tensor,
    row_max: torch.Tensor,
    output: torch.Tensor,
    maxima: list[tuple[Any, Any]],
) -> None:
    """What one projection's quantizers would have recorded of this call (ranges merged later).

    ``row_max`` is ``max |rows|``: ModelOpt's ``reduce_amax`` takes ``max(|max|, |min|)``, the same value.
    """
    quantizer = linear.input_quantizer
    if quantizer._disabled:
        quantizer._input_dtype = rows.dtype
    else:
        maxima.append((quantizer._calibrator, row_max))
    weight = linear.weight_quantizer
    if weight._disabled:
        weight._input_dtype = linear._parameters["weight"].dtype
    linear.output_quantizer._input_dtype = output.dtype


def _merge(maxima: list[tuple[Any, torch.Tensor]]) -> None:
    """Each calibrator's running max updated as ``MaxCalibrator.collect`` would, one device wait in all.

    A NaN or inf anywhere (or a shape change) hands every value to ModelOpt's own ``collect``, whose
    assertion names what went wrong.
    """
    if not maxima:
        return
    import torch

    values = torch.stack([value for _, value in maxima])
    clean = bool(torch.isfinite(values).all()) and all(
        calibrator._calib_amax is None or calibrator._calib_amax.shape == value.shape
        for calibrator, value in maxima
    )
    for calibrator, value in maxima:
        if not clean:
            calibrator.collect(value)
        elif calibrator._calib_amax is None:
            calibrator._calib_amax = value
        else:
            calibrator._calib_amax = torch.max(calibrator._calib_amax, value)
