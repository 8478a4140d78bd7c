"""The grammar of our own weight/activation format names, and what each name quantizes.

A name such as ``wint8_aint8`` or ``wint4-b128_aint8-token`` (:data:`CUSTOM_GRAMMAR`) spells the
element type and granularity of a linear layer's two quantizers. :func:`parse_custom` turns it into
a :class:`CustomFormat`, which builds the ModelOpt 0.47 config for those two quantizers, says what
the effective-bits budget charges for it, and says why ModelOpt cannot run it as named where it
cannot. The element types and the CUDA extensions their fake quantization calls are defined here
too, because preset rows (:mod:`auto_quantize_model.core.presets`) are described in the same terms.
Resolving a name, preset or grammar, is :mod:`auto_quantize_model.core.formats`.
"""

from __future__ import annotations

import re
import typing
from typing import Any, Literal, cast

import attrs

from auto_quantize_model.errors import ConfigError

WeightType = Literal["fp4", "int4", "int8", "fp8"]
WeightGranularity = Literal["pt", "pc", "pic", "b16", "b32", "b64", "b128"]
ActivationType = Literal["16", "fp4", "fp8", "int8", "int4"]
ActivationGranularity = Literal["tensor", "token", "b16"]
CudaExtension = Literal["modelopt_cuda_ext", "modelopt_cuda_ext_fp8", "modelopt_cuda_ext_mx"]

CUDA_EXTENSIONS: tuple[CudaExtension, ...] = typing.get_args(CudaExtension)
"""ModelOpt 0.47's JIT-built CUDA extensions (``modelopt.torch.quantization.extensions``), in the
order a warm-up builds them."""

CUSTOM_GRAMMAR = (
    "w<fp4|int4|int8|fp8>[-<pt|pc|pic|b16|b32|b64|b128>]_a<16|fp4|fp8|int8|int4>[-<tensor|token|b16>]: "
    "weights pt = per tensor, pc = per output channel, pic = per input channel, bN = static blocks of N "
    "along the input dimension (defaults: int8 pc, fp8 pt, int4 b128, fp4 b16 = NVFP4, its only "
    "layout); activations tensor = static per tensor (default), token = dynamic per token, b16 = "
    "NVFP4 dynamic blocks of 16 (fp4 only, its default), a16 = weights only. Anything FP4 needs CUDA; "
    "INT4/FP4 activations are experimental; W8A4-style pairs are costed at their weights' bits"
)


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


def quantizer_extensions(cfg: Any) -> tuple[CudaExtension, ...]:
    """The CUDA extensions ModelOpt 0.47 calls to fake-quantize with quantizer attributes ``cfg``.

    Read from ``TensorQuantizer._fake_quantize`` and ``tensor_quant``: dynamic blocks (MX, NVFP4)
    go to the MX extension (NVFP4 reaches triton instead on compute 8.9+ GPUs with triton, but
    falls back to it elsewhere), other FP8 E4M3 to the FP8 one, integers to the base one; static
    NVFP4 blocks run on triton alone. A list (a sequential quantizer) needs what each step needs;
    None (disabled, or a16) needs nothing. The preset rows are checked against this rule.
    """
    if cfg is None:
        return ()
    if isinstance(cfg, list | tuple):
        wanted = {extension for step in cfg for extension in quantizer_extensions(step)}
        return tuple(extension for extension in CUDA_EXTENSIONS if extension in wanted)
    blocks = cfg.get("block_sizes") or {}
    if blocks.get("type") == "dynamic":
        return ("modelopt_cuda_ext_mx",)
    num_bits = cfg.get("num_bits", 8)
    if isinstance(num_bits, int):
        return ("modelopt_cuda_ext",)
    if tuple(num_bits) == _NUM_BITS["fp8"]:
        return ("modelopt_cuda_ext_fp8",)
    return ()


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

    def cuda_extensions(self) -> tuple[CudaExtension, ...]:
        """What its two quantizers call on a GPU, derived from their element types and blocks."""
        return quantizer_extensions([self.weight_cfg(), self.input_cfg()])

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
