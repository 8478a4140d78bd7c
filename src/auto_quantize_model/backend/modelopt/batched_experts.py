"""Layer-grouped MoE experts through ModelOpt's quantizers in a few tensor operations, not a loop.

With ``extract.experts = "layer"`` ModelOpt 0.47 quantizes a fused experts module
(``_QuantFusedExperts``, ``plugins/huggingface.py`` l. 986) by letting transformers' eager experts
loop run and intercepting each expert's two ``F.linear`` calls: for every routed expert of every
forward, four ``TensorQuantizer`` calls (during calibration two of them are max ``collect``\\ s that
each wait on the GPU three times). On Qwen3-VL-30B-A3B that was 56k intercepted linears, 128k
quantizer calls and two thirds of AutoQuant's time (BENCHMARKS.md, fourth wave). While
:func:`batched_fused_experts` lasts, the fused wrapper's ``forward`` is replaced by one doing the
same arithmetic as grouped work:

* The shared gate/up input quantizer runs once on all tokens, then each (token, expert) pair is
  gathered once. Every token is routed to ``top_k`` experts, so the max calibration sees the same
  rows as the per-expert calls (a max does not care how they are split), and with a fixed range
  (or per-row dynamic blocks along the last axis) fake quantization is element by element, so
  gathering before or after quantizing gives the same bits.
* ``act(gate) * up`` and the shared down input quantizer run once over all pairs, for the same reasons.
* Per-expert weight quantizers: ModelOpt calibrates every expert's weight on the weight itself
  before the calibration forwards (``max_calibrate`` -> ``weight_only_quantize``), so a forward's
  weight ``collect`` only repeats a max over the same tensor; it is skipped for calibrators that
  hold a range already (and run for any that do not). Fake quantization with per-channel or
  per-tensor ranges is one call over the ``[E, out, in]`` weight with every expert's range
  stacked, through the first expert's own quantizer (its range swapped for the call). Any other
  weight format calls each routed expert's quantizer on its slice, as ModelOpt does.
* The matmuls: on CUDA in bfloat16 one grouped GEMM per projection (``grouped_mm``, as
  transformers' ``grouped_mm`` experts); elsewhere a loop over the routed experts' contiguous
  slices in ModelOpt's order, which on CPU gives bit-identical results (the tests compare).
* Results are added back per token in the eager order (expert, then top-k slot, then token).

Anything this does not recognise runs ModelOpt's own forward unchanged and is counted by reason
(:class:`ExpertPathCounts`): another experts layout or eager forward than the 48 transformers
classes sharing Qwen3-VL-MoE's, a non-eager implementation, input quantizers whose result depends
on how rows are grouped (per-tensor dynamic ranges, static blocks, rotation, pre-quant scales,
a non-max calibrator), or arguments passed by name. Nothing is cached between calls, so a
quantizer reconfigured mid-search is read afresh at the next forward.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import attrs

from auto_quantize_model.backend.modelopt.fused_experts import GATED_LISTS, by_reason, quantizer_lists
from auto_quantize_model.backend.modelopt.patches import swapped

log = logging.getLogger("auto_quantize_model")

if TYPE_CHECKING:
    import torch

REFERENCE_EXPERTS = ("transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe", "Qwen3VLMoeTextExperts")
"""The experts class whose eager forward this path reproduces; any class with the same eager source
(transformers 5.17: 48 of them, Qwen2/3-MoE, Mixtral, Qwen3-Next, ...) is handled too."""


CHUNK_ELEMENTS = 1 << 26
"""Weights fake-quantized per call (64 Mi: 256 MiB of float32 temporaries)."""


@attrs.define
class ExpertPathCounts:
    """Fused-experts forwards run during a search: batched, and ModelOpt's own path by reason.

    Mutable on purpose: it is filled while the patch is in place and read afterwards (logs, tests).
    """

    batched: int = 0
    fallback: collections.Counter[str] = attrs.field(factory=collections.Counter)

    def summary(self) -> str:
        loop = sum(self.fallback.values())
        return f"batched {self.batched}, ModelOpt's loop {loop}" + by_reason(self.fallback, " ({})")


@contextlib.contextmanager
def batched_fused_experts() -> Iterator[ExpertPathCounts]:
    """ModelOpt's fused-experts wrapper runs :func:`batched_forward` for a while; undone after.

    Undo: ``_QuantFusedExperts`` gets its own ``forward`` back (:func:`swapped`); modules converted
    meanwhile are instances of ModelOpt's classes and resolve ``forward`` through them, so they run
    ModelOpt's loop again.
    """
    from modelopt.torch.quantization.plugins.huggingface import _QuantFusedExperts

    original = vars(_QuantFusedExperts)["forward"]
    counts = ExpertPathCounts()

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        reason = unsupported(self, args, kwargs)
        if reason is not None:
            counts.fallback[reason] += 1
            return original(self, *args, **kwargs)
        counts.batched += 1
        return batched_forward(self, *args)

    with swapped(_QuantFusedExperts, "forward", forward):
        yield counts


# --------------------------------------------------------------------------------------------------
# What the batched path accepts
# --------------------------------------------------------------------------------------------------


@functools.cache
def _reference_source() -> str:
    import importlib

    module_name, class_name = REFERENCE_EXPERTS
    reference = getattr(importlib.import_module(module_name), class_name)
    return _eager_source(reference) or ""


@functools.cache
def _eager_source(cls: type) -> str | None:
    """The source of the eager forward transformers' ``use_experts_implementation`` wrapped, if any.

    The first ``forward`` below ModelOpt's wrapper classes decides: a subclass that overrides it
    without transformers' wrapper has no eager source to compare.
    """
    for klass in cls.__mro__:
        if klass.__module__.startswith("modelopt.") or "forward" not in vars(klass):
            continue
        wrapped = getattr(vars(klass)["forward"], "__wrapped__", None)
        if wrapped is None:
            return None
        try:
            return inspect.getsource(wrapped)
        except (OSError, TypeError):
            return None
    return None


@functools.cache
def standard_eager_experts(cls: type) -> bool:
    """Whether ``cls``'s eager forward is, to the character, the reference class's (cached per class)."""
    source = _eager_source(cls)
    return source is not None and source == _reference_source()


def _layout_reason(module: Any) -> str | None:
    if getattr(type(module), "_first_proj_attr", None) != "gate_up_proj" or not getattr(
        type(module), "_is_gated", False
    ):
        return "not gated gate_up/down experts"
    if (
        getattr(module, "has_bias", False)
        or getattr(module, "is_transposed", False)
        or not getattr(module, "is_concatenated", True)
        or not getattr(module, "has_gate", True)
    ):
        return "bias, transposed or interleaved experts"
    config = getattr(module, "config", None)
    if getattr(config, "_experts_implementation", None) != "eager":
        return "experts implementation not eager"
    cls: type = type(module)
    if not standard_eager_experts(cls):
        return "eager forward differs from Qwen3-VL-MoE's"
    return None


def _row_separable(quantizer: Any) -> bool:
    """Whether ``quantizer`` gives each row the same result however the rows are grouped.

    True for a plain ``TensorQuantizer`` that is off, or that max-calibrates one range over all
    rows, or that fake-quantizes with a fixed range or dynamic blocks along the last axis; no
    pre-quant scale, rotation, bias or custom backend.
    """
    from modelopt.torch.quantization.calib import MaxCalibrator
    from modelopt.torch.quantization.nn import TensorQuantizer

    if type(quantizer) is not TensorQuantizer:
        return False
    if quantizer.pre_quant_scale is not None or quantizer.rotate_is_enabled:
        return False
    if quantizer._disabled:
        return True
    if quantizer.backend is not None or quantizer.bias_calibrator is not None:
        return False
    if quantizer._if_calib and not quantizer._dynamic:
        calibrator = quantizer._calibrator
        if type(calibrator) is not MaxCalibrator or calibrator._axis is not None:
            return False
    if quantizer._if_quant:
        if not quantizer._fake_quant:
            return False
        blocks = quantizer.block_sizes
        if blocks is not None:
            if blocks.get("type", "static") != "dynamic":
                return False
            axes = [key for key in blocks if isinstance(key, int)]
            if axes != [-1]:
                return False
        elif quantizer._dynamic or not (hasattr(quantizer, "_amax") or quantizer._use_constant_amax):
            return False
    return True


def unsupported(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """Why ``module`` must run ModelOpt's own forward this time, or None when the batched one fits."""
    if kwargs or len(args) != 3:
        return "arguments passed by name"
    reason = _layout_reason(module)
    if reason is not None:
        return reason
    hidden, index, _ = args
    if hidden.dim() != 2 or index.dim() != 2:
        return "unexpected input shapes"
    for attr in ("gate_up_proj_input_quantizer", "down_proj_input_quantizer"):
        if not _row_separable(getattr(module, attr, None)):
            return "input quantizer depends on row grouping"
    lists = list(quantizer_lists(module, GATED_LISTS))
    if len(lists) != len(GATED_LISTS) or any(len(members) != int(module.num_experts) for _, members in lists):
        return "per-expert weight quantizers missing"
    return None


# --------------------------------------------------------------------------------------------------
# The forward
# --------------------------------------------------------------------------------------------------


def batched_forward(
    module: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """What ModelOpt's fused wrapper computes around the eager experts loop, as grouped work.

    ``module`` is a converted fused experts module that :func:`unsupported` accepted.
    """
    import torch

    final = torch.zeros_like(hidden_states)
    tokens_total, top_k = top_k_index.shape
    if tokens_total == 0:
        return final
    experts = int(module.num_experts)
    with torch.no_grad():
        # ModelOpt's loop visits experts in order and, within one, torch.where's order over the
        # (slot, token) mask: sorting on that key puts every pair where the loop computes it.
        flat = top_k_index.reshape(-1)
        position = torch.arange(flat.numel(), device=flat.device)
        token = position // top_k
        slot = position % top_k
        order = torch.argsort(flat * (top_k * tokens_total) + slot * tokens_total + token)
        token, slot, expert_of_pair = token[order], slot[order], flat[order]
        counts = torch.bincount(expert_of_pair, minlength=experts)
    sizes = [int(c) for c in counts.tolist()]
    routed = [expert for expert, size in enumerate(sizes) if size]
    grouped = _grouped_mm_for(hidden_states)

    gate_up = _expert_weights(module.gate_up_proj, module.gate_up_proj_weight_quantizers, routed)
    down = _expert_weights(module.down_proj, module.down_proj_weight_quantizers, routed)

    pairs = module.gate_up_proj_input_quantizer(hidden_states)[token]
    projected = _per_expert_linear(pairs, gate_up, sizes, counts, grouped)
    gate, up = projected.chunk(2, dim=-1)
    inner = module.down_proj_input_quantizer(module.act_fn(gate) * up)
    out = _per_expert_linear(inner, down, sizes, counts, grouped)
    out = out * top_k_weights[token, slot, None]
    final.index_add_(0, token, out.to(final.dtype))
    return final


def _grouped_mm_for(hidden_states: torch.Tensor) -> Callable[..., torch.Tensor] | None:
    """torch's grouped GEMM where it is fast and exercised by transformers (CUDA, bfloat16), else None."""
    import torch

    if hidden_states.device.type != "cuda" or hidden_states.dtype != torch.bfloat16:
        return None
    grouped = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if grouped is None or torch.cuda.get_device_capability(hidden_states.device) < (8, 0):
        return None
    return grouped  # type: ignore[no-any-return]


_GROUPED_FAILED: list[str] = []
"""The error that made torch's grouped GEMM fail once in this process (then the loop is used)."""


def _per_expert_linear(
    rows: torch.Tensor,
    weights: torch.Tensor,
    sizes: list[int],
    counts: torch.Tensor,
    grouped: Callable[..., torch.Tensor] | None,
) -> torch.Tensor:
    """Rows grouped by expert times their expert's weight: one grouped GEMM where it runs, else a loop.

    A grouped GEMM that refuses these tensors (a torch build without it for this GPU or layout)
    is logged once and not tried again in this process: the loop computes the same products.
    """
    import torch

    if grouped is not None and not _GROUPED_FAILED:
        try:
            offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
            return grouped(rows, weights.transpose(-2, -1), offs=offsets)
        except (RuntimeError, NotImplementedError, TypeError) as err:
            _GROUPED_FAILED.append(f"{type(err).__name__}: {err}")
            log.warning(
                "torch's grouped GEMM failed for the MoE experts (%s); looping over the experts instead",
                _GROUPED_FAILED[0].splitlines()[0],
            )
    return _looped_linear(rows, weights, sizes)


def _looped_linear(rows: torch.Tensor, weights: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Each expert's contiguous rows times its weight: one ``F.linear`` per routed expert, as ModelOpt's
    loop calls it (same rows, same weight values, so the same result on CPU)."""
    import torch

    parts = []
    start = 0
    for expert, size in enumerate(sizes):
        if size:
            parts.append(torch.nn.functional.linear(rows[start : start + size], weights[expert]))
            start += size
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _expert_weights(weight: torch.Tensor, quantizers: Any, routed: list[int]) -> torch.Tensor:
    """Every expert's weight as its quantizer would hand it to ``F.linear`` (``[E, out, in]``).

    Unrouted experts keep their raw slice (no matmul reads it). Calibration ranges are collected
    as ModelOpt's loop would, minus repeats of a max a calibrator already holds.
    """
    import torch

    states = {_state(q) for q in quantizers}
    if states == {"off"}:
        for expert in routed:  # the loop calls them; a disabled quantizer records the dtype it saw
            if quantizers[expert]._input_dtype is not weight.dtype:
                quantizers[expert]._input_dtype = weight.dtype
        return weight
    if states == {"collect"}:
        for expert in routed:
            if quantizers[expert]._calibrator._calib_amax is None:
                quantizers[expert](weight[expert])
        return weight
    if states == {"fake"}:
        stacked = _stacked_fake_quant(weight, quantizers)
        if stacked is not None:
            return stacked
    if not routed:
        return weight
    hit = set(routed)
    return torch.stack([quantizers[e](weight[e]) if e in hit else weight[e] for e in range(len(quantizers))])


def _state(quantizer: Any) -> str:
    """``off``, ``collect`` (max calibration only), ``fake`` (static fake quantization only) or ``other``."""
    from modelopt.torch.quantization.calib import MaxCalibrator
    from modelopt.torch.quantization.nn import TensorQuantizer

    if type(quantizer) is not TensorQuantizer:
        return "other"
    if quantizer.pre_quant_scale is not None or quantizer.rotate_is_enabled:
        return "other"
    if quantizer._disabled:
        return "off"
    if quantizer.backend is not None or quantizer.bias_calibrator is not None:
        return "other"
    calibrating = quantizer._if_calib and not quantizer._dynamic
    if calibrating and not quantizer._if_quant and type(quantizer._calibrator) is MaxCalibrator:
        return "collect"
    if (
        quantizer._if_quant
        and not calibrating
        and quantizer._fake_quant
        and not quantizer._dynamic
        and quantizer.block_sizes is None
        and not quantizer._use_constant_amax
        and hasattr(quantizer, "_amax")
    ):
        return "fake"
    return "other"


def _stacked_fake_quant(
    weight: torch.Tensor, quantizers: Any, chunk_elements: int = CHUNK_ELEMENTS
) -> torch.Tensor | None:
    """All experts' weights fake-quantized a few at a time, or None when their ranges do not stack.

    Per-channel ranges (``[out, 1]``) become one ``[n * out, 1]`` range over the ``[n * out, in]``
    view of ``n`` experts, the 2-D per-channel case ModelOpt's kernels see for one expert;
    per-tensor ranges become ``[n, 1, 1]``. The first expert's quantizer runs each call with the
    stacked range swapped in, so every other setting is its own; all experts must agree on those
    settings. Experts go ``chunk_elements`` weights at a time: ModelOpt's plain-PyTorch fake
    quantization works in float32, and a whole 30B-A3B layer at once would take ~5 GB extra.
    """
    import torch

    first = quantizers[0]
    if "_amax" in first.__dict__.get("_shared_quant_tied_attrs", ()):
        return None  # ModelOpt forbids reassigning a range shared with other quantizers
    settings = _fake_settings(first)
    amaxes = []
    for quantizer in quantizers:
        if _fake_settings(quantizer) != settings:
            return None
        amaxes.append(quantizer._amax)
    experts, out_features, in_features = weight.shape
    per_tensor = amaxes[0].numel() == 1
    if not per_tensor and (tuple(amaxes[0].shape) != (out_features, 1) or first.axis not in (0, (0,))):
        return None
    quantized = torch.empty_like(weight)
    step = max(1, chunk_elements // max(1, out_features * in_features))
    original = first._amax
    try:
        for start in range(0, experts, step):
            part = slice(start, min(experts, start + step))
            if per_tensor:
                target = weight[part]
                first._amax = torch.stack([a.reshape(()) for a in amaxes[part]]).reshape(-1, 1, 1)
            else:
                target = weight[part].reshape(-1, in_features)
                first._amax = torch.cat(amaxes[part])
            quantized[part] = first._fake_quantize(target).reshape(quantized[part].shape)
    finally:
        first._amax = original
    return quantized


def _fake_settings(quantizer: Any) -> tuple[Any, ...]:
    return (
        quantizer._num_bits,
        quantizer._axis,
        quantizer._unsigned,
        quantizer._narrow_range,
        getattr(quantizer, "_trt_high_precision_dtype", None),
        getattr(quantizer, "_pass_through_bwd", None),
        tuple(quantizer._amax.shape) if hasattr(quantizer, "_amax") else None,
    )
