"""The quantization formats AutoQuant may choose between, and which of them can work here.

Two kinds of names are accepted:

* ModelOpt presets by their ModelOpt name (``INT8_DEFAULT_CFG``). The table below is static so that
  ``aqm formats`` and pre-flight validation never import torch or ModelOpt; a test checks it
  against ``modelopt.torch.quantization.config`` entry by entry.
* Our own weight/activation names, parsed from a small grammar (:data:`CUSTOM_GRAMMAR`), e.g.
  ``wint8_aint8`` or ``wint4-b128_aint8-token``. They build a ModelOpt config with only the two
  quantizers of a linear layer set, which is all that ``auto_quantize`` looks at. Every name the
  grammar spells parses; those ModelOpt 0.47 cannot run as named (FP4 other than NVFP4's dynamic
  blocks of 16, dynamic blocks of non-FP4 activations) are refused with the reason, and anything
  FP4 needs CUDA.
* An option after a preset name: ``W4A8_AWQ_BETA_CFG:alpha_step=0.25`` is the preset with
  AWQ-lite's alpha grid coarsened (:data:`FORMAT_OPTIONS`). It is another calibration of the same
  quantizers, so it carries its own name everywhere (scores, reports, export) and may be scored
  beside the preset itself.

Why some presets are refused: ``auto_quantize`` applies a format to each linear layer on its own,
matching the config's quantizer patterns against the layer's *local* quantizer names
(``weight_quantizer``, ``input_quantizer``). Patterns naming modules (``*mlp*weight_quantizer``)
therefore never match, and KV-cache presets configure no linear quantizer at all, so the layer
keeps ModelOpt's default quantizer (INT8 per tensor) under the preset's name. Both are costed at
the preset's bits, so the search result would be silently wrong. :func:`local_quantizer` replays
that matching on a config so the refusals can be proven rather than asserted.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, cast

import attrs

from auto_quantize_model.errors import ConfigError

FormatKind = Literal["preset", "custom"]
WeightType = Literal["fp4", "int4", "int8", "fp8"]
WeightGranularity = Literal["pt", "pc", "pic", "b16", "b32", "b64", "b128"]
ActivationType = Literal["16", "fp4", "fp8", "int8", "int4"]
ActivationGranularity = Literal["tensor", "token", "b16"]

LINEAR_QUANTIZERS = ("weight_quantizer", "input_quantizer")
"""Local names of the quantizers ModelOpt puts on a linear layer (besides the output one)."""

CUSTOM_GRAMMAR = (
    "w<fp4|int4|int8|fp8>[-<pt|pc|pic|b16|b32|b64|b128>]_a<16|fp4|fp8|int8|int4>[-<tensor|token|b16>]: "
    "weights pt = per tensor, pc = per output channel, pic = per input channel, bN = static blocks of N "
    "along the input dimension (defaults: int8 pc, fp8 pt, int4 b128, fp4 b16 = NVFP4, its only "
    "layout); activations tensor = static per tensor (default), token = dynamic per token, b16 = "
    "NVFP4 dynamic blocks of 16 (fp4 only, its default), a16 = weights only. Anything FP4 needs CUDA; "
    "INT4/FP4 activations are experimental; W8A4-style pairs are costed at their weights' bits"
)


@attrs.frozen
class FormatInfo:
    """What a format name means, what ModelOpt charges for it and whether it can run here."""

    name: str
    """The name as the user writes it (a ModelOpt preset name or a custom name)."""
    bits: float
    """Effective bits per weight that ModelOpt's effective-bits budget charges for this format."""
    weights: str
    activations: str
    description: str
    needs_cuda: bool = False
    """ModelOpt only implements it with CUDA kernels (NVFP4, MX formats)."""
    kind: FormatKind = "preset"
    modelopt_name: str | None = None
    """The attribute of ``modelopt.torch.quantization.config`` for presets; None for custom."""
    algorithm: str | None = "max"
    """ModelOpt's calibration algorithm (``max``, ``smoothquant``, ``awq_lite``...)."""
    refused: str | None = None
    """Why this format cannot be used for AutoQuant here; None when it can."""
    equivalent: str | None = None
    """Canonical custom name quantizing linear layers exactly like this preset (same calibration)."""
    alpha_step: float | None = None
    """AWQ-lite's alpha grid step when the name sets one (``PRESET:alpha_step=0.25``); None: ModelOpt's."""

    @property
    def usable(self) -> bool:
        return self.refused is None

    @property
    def base_name(self) -> str:
        """The name without its calibration option: what ModelOpt and the exporter know it by."""
        return self.name.partition(OPTION_SEPARATOR)[0]


# --------------------------------------------------------------------------------------------------
# Custom weight/activation formats
# --------------------------------------------------------------------------------------------------

_CUSTOM_RE = re.compile(
    r"^w(?P<w>fp4|int4|int8|fp8)(?:-(?P<wg>pt|pc|pic|b16|b32|b64|b128))?"
    r"_a(?P<a>16|fp4|fp8|int8|int4)(?:-(?P<ag>tensor|token|b16))?$"
)
_DEFAULT_WEIGHT_GRANULARITY: dict[str, WeightGranularity] = {
    "int8": "pc",
    "fp8": "pt",
    "int4": "b128",
    "fp4": "b16",
}
_DEFAULT_ACTIVATION_GRANULARITY: dict[str, ActivationGranularity] = {
    "int8": "tensor",
    "fp8": "tensor",
    "int4": "tensor",
    "fp4": "b16",
}
_NUM_BITS: dict[str, int | tuple[int, int]] = {"int4": 4, "int8": 8, "fp8": (4, 3), "fp4": (2, 1)}
NVFP4_BITS = 4.5
"""What ModelOpt charges for NVFP4 (its ``effective_bits``): 4-bit elements plus one 8-bit scale per 16."""
_TYPE_BITS: dict[str, float] = {"int4": 4.0, "int8": 8.0, "fp8": 8.0, "fp4": NVFP4_BITS}
"""Bits as ModelOpt costs one quantizer: integers by width, FP8 E4M3 as 4 + 3 + 1 sign bit, NVFP4
by its ``effective_bits``."""
_TYPE_LABEL = {"int4": "INT4", "int8": "INT8", "fp8": "FP8 E4M3", "fp4": "FP4 E2M1"}
_NVFP4_LABEL = "NVFP4 (FP4 E2M1, blocks of 16, FP8 scales)"
EXPERIMENTAL_ACTIVATIONS = ("int4", "fp4")
"""Activation types the previous tool marked experimental: no deployment runtime computes with them
alongside 8-bit weights; their scores are still what the fake quantization costs."""


def _nvfp4_cfg() -> dict[str, Any]:
    """ModelOpt's NVFP4 quantizer attributes, as its NVFP4 presets spell them (a fresh dict)."""
    return {
        "num_bits": (2, 1),
        "effective_bits": NVFP4_BITS,
        "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)},
    }


_FP4_NEEDS_BLOCKS = (
    "ModelOpt 0.47 quantizes FP4 (E2M1) only with block scales: its per-tensor and per-channel "
    "fake quantization implements FP8 E4M3 alone (scaled_e4m3 raises NotImplementedError for E2M1)"
)
_FP4_BLOCK_SIZE = (
    "ModelOpt 0.47's FP4 weights are NVFP4 (dynamic blocks of 16 with FP8 scales); on GPUs of compute "
    "capability 8.9 or newer with triton (H100, H200) its FP4 fake quantization ignores the configured "
    "block size and always uses 16 (tensor_quant._dynamic_block_quantize_impl calls "
    "fp4_fake_quant_block without it), so other groups would be scored as blocks of 16 under another "
    "name"
)


def _refusal(spec: CustomFormat) -> str | None:
    """Why ModelOpt 0.47 cannot run ``spec`` as named, or None; the reasons are proven in test_formats."""
    if spec.weight == "fp4" and spec.weight_granularity in ("pt", "pc", "pic"):
        return f"{_FP4_NEEDS_BLOCKS}; use wfp4 (NVFP4, blocks of 16)"
    if spec.weight == "fp4" and spec.weight_granularity != "b16":
        return f"{_FP4_BLOCK_SIZE}; use wfp4 (= wfp4-b16)"
    if spec.activation == "fp4" and spec.activation_granularity != "b16":
        return (
            f"{_FP4_NEEDS_BLOCKS}, so FP4 activations exist only as NVFP4 dynamic blocks of 16; "
            "use afp4 (= afp4-b16)"
        )
    if spec.activation not in ("fp4", "16") and spec.activation_granularity == "b16":
        why = {
            "int4": "there is no dynamic block kernel for INT4: _dynamic_block_quantize_impl raises "
            "NotImplementedError",
            "int8": "INT8 dynamic blocks exist only as MXINT8 (blocks of 32, E8M0 scales: "
            "MXINT8_DEFAULT_CFG)",
            "fp8": "FP8 dynamic blocks exist only as MXFP8 (blocks of 32, E8M0 scales: MXFP8_DEFAULT_CFG)",
        }[spec.activation]
        return (
            f"dynamic blocks of 16 are offered for FP4 activations (NVFP4) alone: in ModelOpt 0.47 {why}; "
            f"use a{spec.activation}-token for one dynamic scale per token"
        )
    return None


@attrs.frozen
class CustomFormat:
    """A parsed custom format name; equal specs quantize identically whatever the spelling."""

    weight: WeightType
    weight_granularity: WeightGranularity
    activation: ActivationType
    activation_granularity: ActivationGranularity | None
    """None for ``a16`` (activations stay in 16 bits)."""

    @property
    def name(self) -> str:
        """The fully spelled-out name (every granularity explicit)."""
        act = "a16" if self.activation == "16" else f"a{self.activation}-{self.activation_granularity}"
        return f"w{self.weight}-{self.weight_granularity}_{act}"

    @property
    def bits(self) -> float:
        """What the effective-bits budget charges per weight: the weights' own storage.

        ModelOpt charges the narrowest enabled quantizer, activations included; for activations
        narrower than the weights (W8A4) that would count INT8 weights as 4-bit ones, so such
        formats carry a recipe-level ``effective_bits`` (see :meth:`quant_cfg`) and the budget
        stays a budget over weight memory.
        """
        return _TYPE_BITS[self.weight]

    @property
    def modelopt_charge(self) -> float:
        """What ModelOpt's own heuristic would charge: the narrowest enabled quantizer."""
        if self.activation == "16":
            return _TYPE_BITS[self.weight]
        return min(_TYPE_BITS[self.weight], _TYPE_BITS[self.activation])

    @property
    def refused(self) -> str | None:
        """Why ModelOpt 0.47 cannot run this format as named; None when it can."""
        return _refusal(self)

    @property
    def needs_cuda(self) -> bool:
        """FP4 anywhere: ModelOpt's NVFP4 fake quantization asserts CUDA tensors."""
        return "fp4" in (self.weight, self.activation)

    @property
    def experimental(self) -> bool:
        return self.activation in EXPERIMENTAL_ACTIVATIONS

    def weight_cfg(self) -> dict[str, Any]:
        if self.weight == "fp4":
            return _nvfp4_cfg()
        cfg: dict[str, Any] = {"num_bits": _NUM_BITS[self.weight]}
        if self.weight_granularity == "pc":
            cfg["axis"] = 0
        elif self.weight_granularity == "pic":
            cfg["axis"] = 1  # weights are [out, in]: one scale per column
        elif self.weight_granularity == "pt":
            cfg["axis"] = None
        else:
            cfg["block_sizes"] = {-1: int(self.weight_granularity[1:]), "type": "static"}
        return cfg

    def input_cfg(self) -> dict[str, Any] | None:
        if self.activation == "16":
            return None
        if self.activation == "fp4":
            return _nvfp4_cfg()
        cfg: dict[str, Any] = {"num_bits": _NUM_BITS[self.activation], "axis": None}
        if self.activation_granularity == "token":
            # One scale per token, computed on the fly: ModelOpt spells it as a dynamic block
            # spanning the whole last dimension.
            cfg["type"] = "dynamic"
            cfg["block_sizes"] = {-1: None}
        return cfg

    def quant_cfg(self) -> dict[str, Any]:
        """A ModelOpt 0.47 quantize config (list-of-entries ``quant_cfg``), freshly built.

        Refused formats have none: what they name is not what ModelOpt would compute.
        """
        if self.refused is not None:
            raise ConfigError(f"format {self.name} cannot be used for AutoQuant: {self.refused}")
        entries: list[dict[str, Any]] = [
            {"quantizer_name": "*", "enable": False},
            {"quantizer_name": "*weight_quantizer", "cfg": self.weight_cfg()},
        ]
        input_cfg = self.input_cfg()
        if input_cfg is None:
            entries.append({"quantizer_name": "*input_quantizer", "enable": False})
        else:
            entries.append({"quantizer_name": "*input_quantizer", "cfg": input_cfg})
        config: dict[str, Any] = {"quant_cfg": entries, "algorithm": "max"}
        if self.modelopt_charge != self.bits:
            config["effective_bits"] = self.bits
        return config

    def describe_weights(self) -> str:
        if self.weight == "fp4" and self.weight_granularity == "b16":
            return _NVFP4_LABEL
        label = _TYPE_LABEL[self.weight]
        granularity = self.weight_granularity
        if granularity == "pc":
            return f"{label} per output channel"
        if granularity == "pic":
            return f"{label} per input channel"
        if granularity == "pt":
            return f"{label} per tensor"
        return f"{label} in blocks of {granularity[1:]} along the input dimension"

    def describe_activations(self) -> str:
        if self.activation == "16":
            return "16-bit (not quantized)"
        label = _TYPE_LABEL[self.activation]
        if self.activation_granularity == "b16":
            scales = ", FP8 scales (NVFP4)" if self.activation == "fp4" else ""
            return f"{label} dynamic, blocks of 16{scales}"
        if self.activation_granularity == "token":
            return f"{label} per token, dynamic"
        return f"{label} per tensor, static"


def parse_custom(name: str) -> CustomFormat | None:
    """The spec a custom name stands for, or None when ``name`` is not in the grammar.

    Every name the grammar spells parses, also those ModelOpt cannot run: their
    :attr:`CustomFormat.refused` says why, so the user learns the reason rather than "unknown".
    """
    match = _CUSTOM_RE.match(name)
    if match is None:
        return None
    weight = cast(WeightType, match["w"])
    activation = cast(ActivationType, match["a"])
    act_granularity = cast("ActivationGranularity | None", match["ag"])
    if activation == "16":
        if act_granularity is not None:
            return None  # a16 has no granularity: nothing is quantized
    elif act_granularity is None:
        act_granularity = _DEFAULT_ACTIVATION_GRANULARITY[activation]
    granularity = cast("WeightGranularity | None", match["wg"])
    return CustomFormat(
        weight=weight,
        weight_granularity=granularity or _DEFAULT_WEIGHT_GRANULARITY[weight],
        activation=activation,
        activation_granularity=act_granularity,
    )


def _custom_info(name: str, spec: CustomFormat) -> FormatInfo:
    same = [p.name for p in _PRESETS if p.equivalent == spec.name]
    notes = []
    if same:
        notes.append(f"quantizes like {same[0]}")
    if spec.experimental:
        notes.append(f"{spec.activation.upper()} activations: experimental")
    if spec.modelopt_charge != spec.bits:
        notes.append(f"costed at its weights' {spec.bits:g} bits, not ModelOpt's {spec.modelopt_charge:g}")
    return FormatInfo(
        name=name,
        bits=spec.bits,
        weights=spec.describe_weights(),
        activations=spec.describe_activations(),
        description=f"custom: {spec.name}" + (f" ({'; '.join(notes)})" if notes else ""),
        needs_cuda=spec.needs_cuda,
        kind="custom",
        modelopt_name=None,
        algorithm="max",
        refused=spec.refused,
    )


CUSTOM_EXAMPLES: tuple[str, ...] = (
    "wint8_aint8",
    "wint8-pc_aint8-token",
    "wint8-pic_a16",
    "wint8_a16",
    "wint8_aint4",
    "wfp8_afp8",
    "wfp8-pc_afp8-token",
    "wfp8_a16",
    "wint4-b128_aint8-token",
    "wint4-b128_afp8",
    "wint4-b128_aint4-token",
    "wint4-b128_a16",
    "wint4-b64_a16",
    "wint4-b32_a16",
    "wfp4_afp4",
    "wfp4_afp8",
    "wfp4_aint8",
    "wfp4_a16",
)
"""Custom names listed by ``aqm formats``; any name in :data:`CUSTOM_GRAMMAR` is accepted."""

CUSTOM_REFUSED_EXAMPLES: tuple[str, ...] = (
    "wfp4-pc_a16",
    "wfp4-b128_a16",
    "wint8_afp4-token",
    "wint8_aint8-b16",
)
"""One spelled-out name per reason a grammar name is refused, listed by ``aqm formats`` with it."""


# --------------------------------------------------------------------------------------------------
# ModelOpt presets (static: no torch/modelopt import)
# --------------------------------------------------------------------------------------------------

_W16 = "16-bit (not quantized)"
_KV = "none (KV cache only)"
_NVFP4 = _NVFP4_LABEL
_NVFP4_ACT = "NVFP4 dynamic, blocks of 16"
_MX_NOTE = "ModelOpt runs MX formats only through its CUDA extension."
_NVFP4_NOTE = "ModelOpt's NVFP4 dynamic block quantization asserts CUDA tensors."


def _kv_refusal(bits: float) -> str:
    return (
        "KV-cache preset: it configures no quantizer of a linear layer, so under auto_quantize every "
        f"layer would keep ModelOpt's default INT8 per-tensor quantizers while being costed at {bits:g} "
        "bits; KV-cache quantization is a deployment choice, not a per-layer one"
    )


def _pattern_refusal(patterns: str, bits: float) -> str:
    return (
        f"its quantizer patterns ({patterns}) name modules, but auto_quantize matches them against a "
        "layer's local quantizer names ('weight_quantizer'), so it would enable no quantizer while "
        f"being costed at {bits:g} bits"
    )


def _mamba_refusal(same_as: str) -> str:
    return (
        "Mamba-MoE preset: its layer exclusions are ignored by auto_quantize's per-layer matching, so "
        f"here it quantizes exactly like {same_as}; use {same_as}"
    )


def _preset(
    name: str,
    bits: float,
    weights: str,
    activations: str,
    description: str,
    *,
    algorithm: str | None = "max",
    needs_cuda: bool = False,
    refused: str | None = None,
    equivalent: str | None = None,
) -> FormatInfo:
    return FormatInfo(
        name=name,
        bits=bits,
        weights=weights,
        activations=activations,
        description=description,
        needs_cuda=needs_cuda,
        kind="preset",
        modelopt_name=name,
        algorithm=algorithm,
        refused=refused,
        equivalent=equivalent,
    )


_PRESETS: tuple[FormatInfo, ...] = (
    # --- usable on CPU and GPU ---
    _preset(
        "INT8_DEFAULT_CFG",
        8.0,
        "INT8 per output channel",
        "INT8 per tensor, static",
        "W8A8 integer, max calibration",
        equivalent="wint8-pc_aint8-tensor",
    ),
    _preset(
        "INT8_SMOOTHQUANT_CFG",
        8.0,
        "INT8 per output channel",
        "INT8 per tensor, static",
        "W8A8 integer with SmoothQuant activation smoothing",
        algorithm="smoothquant",
    ),
    _preset(
        "INT8_WEIGHT_ONLY_CFG",
        8.0,
        "INT8 per output channel",
        _W16,
        "INT8 weight-only",
        equivalent="wint8-pc_a16",
    ),
    _preset(
        "FP8_DEFAULT_CFG",
        8.0,
        "FP8 E4M3 per tensor",
        "FP8 E4M3 per tensor, static",
        "W8A8 FP8, max calibration",
        equivalent="wfp8-pt_afp8-tensor",
    ),
    _preset(
        "FP8_PER_CHANNEL_PER_TOKEN_CFG",
        8.0,
        "FP8 E4M3 per output channel",
        "FP8 E4M3 per token, dynamic",
        "W8A8 FP8 with per-channel weights and per-token activations",
        equivalent="wfp8-pc_afp8-token",
    ),
    _preset(
        "FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG",
        8.0,
        "FP8 E4M3 in 128x128 blocks",
        _W16,
        "FP8 weight-only with 2-D block scales",
    ),
    _preset(
        "INT4_AWQ_CFG",
        4.0,
        "INT4 in blocks of 128 along the input dimension",
        _W16,
        "W4A16 with AWQ-lite scaling (calibrates with a quarter of the calibration steps)",
        algorithm="awq_lite",
    ),
    _preset(
        "INT4_BLOCKWISE_WEIGHT_ONLY_CFG",
        4.0,
        "INT4 in blocks of 128 along the input dimension",
        _W16,
        "W4A16 integer, max calibration",
        equivalent="wint4-b128_a16",
    ),
    _preset(
        "W4A8_AWQ_BETA_CFG",
        4.0,
        "INT4 blocks of 128, then FP8 per tensor",
        "FP8 E4M3 per tensor, static",
        "W4A8 with AWQ-lite scaling (beta in ModelOpt)",
        algorithm="awq_lite",
    ),
    # --- CUDA only ---
    _preset(
        "NVFP4_DEFAULT_CFG",
        4.5,
        _NVFP4,
        _NVFP4_ACT,
        f"W4A4 NVFP4. {_NVFP4_NOTE}",
        needs_cuda=True,
        equivalent="wfp4-b16_afp4-b16",
    ),
    _preset(
        "NVFP4_AWQ_LITE_CFG",
        4.5,
        _NVFP4,
        _NVFP4_ACT,
        f"W4A4 NVFP4 with AWQ-lite scaling. {_NVFP4_NOTE}",
        algorithm="awq_lite",
        needs_cuda=True,
    ),
    _preset(
        "NVFP4_AWQ_CLIP_CFG",
        4.5,
        _NVFP4,
        _NVFP4_ACT,
        f"W4A4 NVFP4 with AWQ clipping. {_NVFP4_NOTE}",
        algorithm="awq_clip",
        needs_cuda=True,
    ),
    _preset(
        "NVFP4_AWQ_FULL_CFG",
        4.5,
        _NVFP4,
        _NVFP4_ACT,
        f"W4A4 NVFP4 with full AWQ. {_NVFP4_NOTE}",
        algorithm="awq_full",
        needs_cuda=True,
    ),
    _preset(
        "NVFP4_FOUR_OVER_SIX_CFG",
        4.0,
        "NVFP4 static blocks of 16, 4/6 scale search",
        _NVFP4_ACT,
        "W4A4 NVFP4 with MSE-searched static weight scales (needs triton). "
        "Costed at 4 bits: its weights carry no effective-bits override.",
        algorithm="mse",
        needs_cuda=True,
    ),
    _preset(
        "NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG",
        4.0,
        "NVFP4 static blocks of 16, MSE FP8-scale sweep",
        _NVFP4_ACT,
        "W4A4 NVFP4 with MSE-calibrated weight scales (needs triton). Costed at 4 bits.",
        algorithm="mse",
        needs_cuda=True,
    ),
    _preset(
        "NVFP4_W4A4_WEIGHT_LOCAL_HESSIAN_CFG",
        4.0,
        "NVFP4 static blocks of 16, local-Hessian scales",
        _NVFP4_ACT,
        f"W4A4 NVFP4 with local-Hessian weight calibration. Costed at 4 bits. {_NVFP4_NOTE}",
        algorithm="local_hessian",
        needs_cuda=True,
    ),
    _preset(
        "NVFP4_FP8_MHA_CONFIG",
        4.5,
        _NVFP4,
        _NVFP4_ACT,
        "NVFP4 linears; its FP8 attention (bmm/softmax) quantizers do not exist on linear layers, "
        f"so under auto_quantize it is plain NVFP4. {_NVFP4_NOTE}",
        needs_cuda=True,
        equivalent="wfp4-b16_afp4-b16",
    ),
    _preset(
        "W4A16_NVFP4_CFG",
        4.5,
        _NVFP4,
        _W16,
        f"NVFP4 weight-only. {_NVFP4_NOTE}",
        needs_cuda=True,
        equivalent="wfp4-b16_a16",
    ),
    _preset(
        "W4A8_NVFP4_FP8_CFG",
        4.0,
        "NVFP4 (FP4 E2M1, blocks of 32, FP8 scales)",
        "FP8 E4M3 per tensor, static",
        f"W4A8 NVFP4 weights, FP8 activations. {_NVFP4_NOTE} On GPUs of compute capability 8.9+ "
        "with triton (H100, H200) ModelOpt 0.47 fake-quantizes its weights in blocks of 16, not 32.",
        needs_cuda=True,
    ),
    _preset(
        "MXFP8_DEFAULT_CFG",
        8.0,
        "MXFP8 (E4M3, blocks of 32, E8M0 scales)",
        "MXFP8 dynamic, blocks of 32",
        f"W8A8 MXFP8. {_MX_NOTE}",
        algorithm=None,
        needs_cuda=True,
    ),
    _preset(
        "MXFP6_DEFAULT_CFG",
        6.0,
        "MXFP6 (E3M2, blocks of 32, E8M0 scales)",
        "MXFP6 dynamic, blocks of 32",
        f"W6A6 MXFP6. {_MX_NOTE}",
        algorithm=None,
        needs_cuda=True,
    ),
    _preset(
        "MXFP4_DEFAULT_CFG",
        4.0,
        "MXFP4 (E2M1, blocks of 32, E8M0 scales)",
        "MXFP4 dynamic, blocks of 32",
        f"W4A4 MXFP4. {_MX_NOTE}",
        algorithm=None,
        needs_cuda=True,
    ),
    _preset(
        "MXINT8_DEFAULT_CFG",
        8.0,
        "MXINT8 (INT8, blocks of 32, E8M0 scales)",
        "MXINT8 dynamic, blocks of 32",
        f"W8A8 MXINT8. {_MX_NOTE}",
        algorithm=None,
        needs_cuda=True,
    ),
    _preset(
        "W4A8_MXFP4_FP8_CFG",
        4.0,
        "MXFP4 (E2M1, blocks of 32, E8M0 scales)",
        "FP8 E4M3 per tensor, static",
        f"W4A8 MXFP4 weights, FP8 activations. {_MX_NOTE}",
        algorithm=None,
        needs_cuda=True,
    ),
    # --- refused: would be mislabelled or quantize nothing under auto_quantize ---
    _preset("FP8_KV_CFG", 8.0, _KV, _KV, "FP8 KV cache", algorithm=None, refused=_kv_refusal(8.0)),
    _preset(
        "FP8_AFFINE_KV_CFG",
        8.0,
        _KV,
        _KV,
        "FP8 KV cache with affine bias",
        algorithm=None,
        refused=_kv_refusal(8.0),
    ),
    _preset(
        "NVFP4_KV_CFG",
        4.5,
        _KV,
        _KV,
        "NVFP4 KV cache",
        algorithm=None,
        needs_cuda=True,
        refused=_kv_refusal(4.5),
    ),
    _preset(
        "NVFP4_AFFINE_KV_CFG",
        4.5,
        _KV,
        _KV,
        "NVFP4 KV cache with affine bias",
        algorithm=None,
        needs_cuda=True,
        refused=_kv_refusal(4.5),
    ),
    _preset(
        "NVFP4_KV_ROTATE_CFG",
        4.5,
        _KV,
        _KV,
        "NVFP4 KV cache with rotated keys",
        needs_cuda=True,
        refused=_kv_refusal(4.5),
    ),
    _preset(
        "NVFP4_MLP_ONLY_CFG",
        4.5,
        _NVFP4,
        _NVFP4_ACT,
        "NVFP4 on MLP and MoE expert layers only",
        needs_cuda=True,
        refused=_pattern_refusal("'*mlp*weight_quantizer', '*.experts.*weight_quantizer', ...", 4.5),
    ),
    _preset(
        "NVFP4_OMLP_ONLY_CFG",
        4.5,
        _NVFP4,
        _NVFP4_ACT,
        "NVFP4 on o_proj and MLP layers only",
        needs_cuda=True,
        refused=_pattern_refusal("'*o_proj*weight_quantizer', '*mlp*weight_quantizer', ...", 4.5),
    ),
    _preset(
        "NVFP4_EXPERTS_ONLY_CFG",
        4.5,
        _NVFP4,
        _NVFP4_ACT,
        "NVFP4 on MoE expert layers only",
        needs_cuda=True,
        refused=_pattern_refusal("'*.experts.*weight_quantizer', ...", 4.5),
    ),
    _preset(
        "NVFP4_MLP_WEIGHT_ONLY_CFG",
        4.0,
        "NVFP4 (blocks of 32)",
        _W16,
        "NVFP4 weight-only on MLP layers",
        needs_cuda=True,
        refused=_pattern_refusal("'*mlp*weight_quantizer', '*block_sparse_moe*weight_quantizer'", 4.0),
    ),
    _preset(
        "MXFP4_MLP_WEIGHT_ONLY_CFG",
        4.0,
        "MXFP4 (blocks of 32)",
        _W16,
        "MXFP4 weight-only on MLP layers",
        algorithm=None,
        needs_cuda=True,
        refused=_pattern_refusal("'*mlp*weight_quantizer', '*block_sparse_moe*weight_quantizer'", 4.0),
    ),
    _preset(
        "NVFP4_SVDQUANT_DEFAULT_CFG",
        4.5,
        _NVFP4,
        _NVFP4_ACT,
        "NVFP4 with SVDQuant low-rank branch",
        algorithm="svdquant",
        needs_cuda=True,
        refused="its calibration algorithm (svdquant) is not supported by auto_quantize",
    ),
    _preset(
        "MAMBA_MOE_FP8_AGGRESSIVE_CFG",
        8.0,
        "FP8 E4M3 per tensor",
        "FP8 E4M3 per tensor, static",
        "FP8 for Mamba-MoE models, attention excluded",
        refused=_mamba_refusal("FP8_DEFAULT_CFG"),
    ),
    _preset(
        "MAMBA_MOE_FP8_CONSERVATIVE_CFG",
        8.0,
        "FP8 E4M3 per tensor",
        "FP8 E4M3 per tensor, static",
        "FP8 for Mamba-MoE models, attention and mixer projections excluded",
        refused=_mamba_refusal("FP8_DEFAULT_CFG"),
    ),
    _preset(
        "MAMBA_MOE_NVFP4_AGGRESSIVE_CFG",
        4.5,
        _NVFP4,
        _NVFP4_ACT,
        "NVFP4 for Mamba-MoE models, attention excluded",
        needs_cuda=True,
        refused=_mamba_refusal("NVFP4_DEFAULT_CFG"),
    ),
    _preset(
        "MAMBA_MOE_NVFP4_CONSERVATIVE_CFG",
        4.5,
        _NVFP4,
        _NVFP4_ACT,
        "NVFP4 for Mamba-MoE models, attention and mixer projections excluded",
        needs_cuda=True,
        refused=_mamba_refusal("NVFP4_DEFAULT_CFG"),
    ),
)
_PRESETS_BY_NAME: dict[str, FormatInfo] = {info.name: info for info in _PRESETS}


# --------------------------------------------------------------------------------------------------
# Lookup and validation
# --------------------------------------------------------------------------------------------------


def all_formats() -> tuple[FormatInfo, ...]:
    """Every preset and the listed custom examples (refused ones too, with the reason)."""
    customs = []
    for name in (*CUSTOM_EXAMPLES, *CUSTOM_REFUSED_EXAMPLES):
        spec = parse_custom(name)
        assert spec is not None, name
        customs.append(_custom_info(name, spec))
    return (*_PRESETS, *customs)


def _closest(name: str) -> str | None:
    candidates = [*_PRESETS_BY_NAME, *CUSTOM_EXAMPLES]
    folded = {c.lower(): c for c in candidates}
    found = difflib.get_close_matches(name.lower(), list(folded), n=1, cutoff=0.5)
    return folded[found[0]] if found else None


OPTION_SEPARATOR = ":"
ALPHA_STEP_OPTION = "alpha_step"
MODELOPT_ALPHA_STEP = 0.1
"""ModelOpt 0.47's ``AWQLiteCalibConfig.alpha_step``: 11 alphas, 0 to 1."""
FORMAT_OPTIONS = (
    f"AWQ-lite formats take {OPTION_SEPARATOR}{ALPHA_STEP_OPTION}=S (e.g. "
    f"W4A8_AWQ_BETA_CFG{OPTION_SEPARATOR}{ALPHA_STEP_OPTION}=0.25): search the scale exponent alpha over "
    f"0, S, 2S ... 1 instead of ModelOpt's step of {MODELOPT_ALPHA_STEP:g} (11 alphas). AWQ-lite's "
    "search pass runs one quantized forward per alpha through every layer, so it shrinks in proportion "
    "(Qwen3-VL-4B on an H200: 5.8 s at 11 alphas, 1.5 s at 3); its cache pass and per-layer set-up "
    "(~13 s there) do not, and the scale is chosen from a coarser grid"
)
"""What ``aqm formats`` prints about options after a format name."""


def _alpha_step(name: str, base: FormatInfo, option: str) -> float:
    key, sep, value = option.partition("=")
    if key != ALPHA_STEP_OPTION or not sep:
        raise ConfigError(
            f"format {name!r}: unknown option {option!r} after {OPTION_SEPARATOR!r}; the one option is "
            f"{ALPHA_STEP_OPTION}=S for AWQ-lite formats "
            f"(e.g. {base.name}{OPTION_SEPARATOR}{ALPHA_STEP_OPTION}=0.25)"
        )
    if base.algorithm != "awq_lite":
        raise ConfigError(
            f"format {name!r}: {ALPHA_STEP_OPTION} is an AWQ-lite setting and {base.name} calibrates with "
            f"{base.algorithm or 'no calibration'}; drop the option or use an AWQ-lite preset "
            "(INT4_AWQ_CFG, W4A8_AWQ_BETA_CFG, NVFP4_AWQ_LITE_CFG)"
        )
    try:
        step = float(value)
    except ValueError:
        step = math.nan
    steps = 1.0 / step if 0.0 < step <= 1.0 else math.nan
    if not math.isfinite(steps) or abs(steps - round(steps)) > 1e-9:
        raise ConfigError(
            f"format {name!r}: {ALPHA_STEP_OPTION}={value} must be a step in (0, 1] that divides 1 "
            "(0.5, 0.25, 0.2, 0.125, 0.1, 0.05...), so that the grid ends at alpha = 1 as ModelOpt's does"
        )
    return step


def _with_options(name: str, base: FormatInfo, options: str) -> FormatInfo:
    step = _alpha_step(name, base, options)
    alphas = round(1.0 / step) + 1
    return attrs.evolve(
        base,
        name=name,
        description=f"{base.description}; AWQ-lite alpha step {step:g} ({alphas} alphas, ModelOpt's: "
        f"{round(1.0 / MODELOPT_ALPHA_STEP) + 1})",
        equivalent=None,
        alpha_step=step,
    )


def resolve_format(name: str) -> FormatInfo:
    """The format behind a name; refused formats resolve too (check :attr:`FormatInfo.refused`).

    Raises ConfigError for names that are neither a ModelOpt preset nor in the custom grammar,
    suggesting the closest known name, and for options a format does not take.
    """
    base_name, sep, options = name.partition(OPTION_SEPARATOR)
    if sep:
        return _with_options(name, resolve_format(base_name), options)
    preset = _PRESETS_BY_NAME.get(name)
    if preset is not None:
        return preset
    spec = parse_custom(name)
    if spec is not None:
        return _custom_info(name, spec)
    closest = _closest(name)
    hint = f"; did you mean {closest!r}?" if closest else ""
    raise ConfigError(
        f"unknown quantization format {name!r}{hint} (`aqm formats` lists them; custom names follow "
        f"{CUSTOM_GRAMMAR.split(':')[0]})"
    )


def _semantics(info: FormatInfo) -> str:
    """A key equal for two formats that quantize every linear layer the same way."""
    if info.kind == "custom":
        spec = parse_custom(info.name)
        assert spec is not None
        return spec.name
    return info.equivalent or info.name


def _is_cuda(device: str) -> bool:
    return device.strip().lower().startswith("cuda")


def check_formats(names: Iterable[str], device: str) -> None:
    """Refuse, before any model is loaded, formats that cannot give a meaningful search here.

    ``device`` is where the model runs (``cpu``, ``cuda``, ``cuda:1``...). Raises ConfigError
    naming the format and the reason: unknown, refused, CUDA-only on a CPU run, or the same
    quantization listed twice (it would be scored twice under two names).
    """
    names = list(names)
    if not names:
        raise ConfigError("no quantization format given: list at least one (see `aqm formats`)")
    seen: dict[str, str] = {}
    for name in names:
        info = resolve_format(name)
        if info.refused is not None:
            raise ConfigError(f"format {name} cannot be used for AutoQuant: {info.refused}")
        if info.needs_cuda and not _is_cuda(device):
            raise ConfigError(
                f"format {name} needs a CUDA GPU (ModelOpt implements it only with CUDA kernels) "
                f"but this run is on {device}; pick another format or run on CUDA"
            )
        key = _semantics(info)
        if key in seen:
            other = seen[key]
            what = "is listed twice" if other == name else f"quantizes linear layers exactly like {other}"
            raise ConfigError(f"format {name} {what}; list it once")
        seen[key] = name


def min_effective_bits(names: Iterable[str]) -> float:
    """The lowest effective-bits target the formats can reach: every layer in the smallest format."""
    bits = [resolve_format(name).bits for name in names]
    if not bits:
        raise ConfigError("no quantization format given: list at least one (see `aqm formats`)")
    return min(bits)


def check_effective_bits(target: float, names: Iterable[str]) -> None:
    """Refuse a budget below what the formats can reach (the (0, 16] range is the spec's own check)."""
    lowest = min_effective_bits(names)
    if target < lowest:
        raise ConfigError(
            f"effective_bits {target:g} is below the minimum reachable with these formats "
            f"({lowest:g}: every layer in the smallest format); raise it or add a smaller format"
        )


# --------------------------------------------------------------------------------------------------
# Replaying auto_quantize's per-layer matching on a config (pure)
# --------------------------------------------------------------------------------------------------


@attrs.frozen
class LocalQuantizer:
    """How one quantizer of a linear layer ends up after a format is applied to that layer alone."""

    enabled: bool
    cfg: Any
    """The attributes of the last entry with a ``cfg`` that matched (a dict, or a list for
    sequential quantizers); None when no entry configured it, i.e. ModelOpt's defaults stay."""

    @property
    def configured(self) -> bool:
        return self.cfg is not None


def local_quantizer(quant_cfg: Sequence[Mapping[str, Any]], local_name: str) -> LocalQuantizer:
    """Replay a ModelOpt 0.47 ``quant_cfg`` list on one quantizer, as ``auto_quantize`` does.

    auto_quantize gives each layer fresh quantizers (enabled, ModelOpt defaults) and applies the
    entries in order with ``fnmatch`` against the *local* name (``weight_quantizer``). An entry
    with ``cfg`` replaces the attributes; one without only toggles ``enable``. Entries restricted to
    a ``parent_class`` are skipped: presets only use them for non-linear parents.
    """
    enabled = True
    cfg: Any = None
    for entry in quant_cfg:
        if entry.get("parent_class"):
            continue
        if not fnmatch.fnmatchcase(local_name, str(entry["quantizer_name"])):
            continue
        entry_cfg = entry.get("cfg")
        default_enable = entry_cfg.get("enable", True) if isinstance(entry_cfg, Mapping) else True
        enable = bool(entry.get("enable", default_enable))
        if entry_cfg is None:
            enabled = enable
        else:
            cfg = entry_cfg
            enabled = enable
    return LocalQuantizer(enabled=enabled, cfg=cfg)


def linear_quantizers(quant_cfg: Sequence[Mapping[str, Any]]) -> dict[str, LocalQuantizer]:
    """The weight and input quantizers a config gives every linear layer under auto_quantize."""
    return {name: local_quantizer(quant_cfg, name) for name in LINEAR_QUANTIZERS}


def inert_reason(quant_cfg: Sequence[Mapping[str, Any]]) -> str | None:
    """Why a config would not really quantize linear weights under auto_quantize, or None.

    ``disabled``: no weight quantizer ends enabled (module-name patterns never match locally).
    ``unconfigured``: the weight quantizer stays enabled with ModelOpt's defaults because no entry
    configures it (KV-cache presets), so the layer is quantized in a format nobody asked for.
    """
    weight = local_quantizer(quant_cfg, "weight_quantizer")
    if not weight.enabled:
        return "disabled"
    if not weight.configured:
        return "unconfigured"
    return None
