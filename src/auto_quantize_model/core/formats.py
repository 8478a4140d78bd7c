"""The quantization formats AutoQuant may choose between, and which of them can work here.

Two kinds of names are accepted:

* ModelOpt presets by their ModelOpt name (``INT8_DEFAULT_CFG``). Their table is package data,
  ``data/presets.toml`` (:class:`Preset` rows: cost, calibration, refusal, scheme name, export
  label, CUDA extensions), so that ``aqm formats`` and pre-flight validation never import torch or
  ModelOpt; a test checks it against ``modelopt.torch.quantization.config`` entry by entry.
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
import functools
import importlib.resources
import math
import re
import tomllib
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, cast

import attrs
import cattrs
from cattrs.errors import IterableValidationError, IterableValidationNote
from cattrs.v import format_exception

from auto_quantize_model.errors import ConfigError, InputError

FormatKind = Literal["preset", "custom"]
WeightType = Literal["fp4", "int4", "int8", "fp8"]
WeightGranularity = Literal["pt", "pc", "pic", "b16", "b32", "b64", "b128"]
ActivationType = Literal["16", "fp4", "fp8", "int8", "int4"]
ActivationGranularity = Literal["tensor", "token", "b16"]
Device = Literal["cpu", "cuda"]
CudaExtension = Literal["modelopt_cuda_ext", "modelopt_cuda_ext_fp8", "modelopt_cuda_ext_mx"]

CUDA_EXTENSIONS: tuple[CudaExtension, ...] = typing.get_args(CudaExtension)
"""ModelOpt 0.47's JIT-built CUDA extensions (``modelopt.torch.quantization.extensions``), in the
order a warm-up builds them."""

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
    cuda_extensions: tuple[CudaExtension, ...] = ()
    """The ModelOpt CUDA extensions its quantizers call on a GPU (:func:`quantizer_extensions`);
    empty for refused formats, which never run."""

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


def _custom_info(name: str, spec: CustomFormat) -> FormatInfo:
    same = [p.name for p in presets() if p.equivalent == spec.name]
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
        cuda_extensions=() if spec.refused is not None else spec.cuda_extensions(),
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
# ModelOpt presets: package data (data/presets.toml), read without torch or ModelOpt
# --------------------------------------------------------------------------------------------------

PRESETS_FILE = "presets.toml"
"""The preset table, shipped in ``auto_quantize_model/data``: one row per ModelOpt preset."""


@attrs.frozen
class Preset:
    """One row of ``data/presets.toml``: every fact this package holds about a ModelOpt preset.

    The search (bits, calibration, refusal), ``aqm formats`` (the texts, devices), scheme names,
    the exporter's label and group size and the CUDA warm-up all read the same row, so no fact
    about a preset is written twice. The file's header says what each key means.
    """

    name: str
    bits: float
    weights: str
    activations: str
    description: str
    devices: tuple[Device, ...]
    scheme: str
    """This preset's part of a derived scheme name (the previous tool's short names)."""
    algorithm: str | None = None
    """ModelOpt's calibration method; None for dynamic formats, which need none."""
    equivalent: str | None = None
    refused: str | None = None
    cuda_extensions: tuple[CudaExtension, ...] = ()
    export_label: str | None = None
    """The ``quant_algo`` ModelOpt 0.47's HF exporter records for a layer in this format."""
    export_group_size: int | None = None
    scored_group_size: int | None = None
    """The block size the search fake-quantizes with where it is not ``export_group_size``."""
    export_refused: str | None = None
    """Why ``aqm export`` refuses it (with ``export_label`` set, what would have been written)."""

    @property
    def needs_cuda(self) -> bool:
        return "cpu" not in self.devices

    def problems(self) -> list[str]:
        """What contradicts itself in this row: the rules the file's header states."""
        found = []
        if not self.devices or len(set(self.devices)) != len(self.devices):
            found.append("devices must list cpu and/or cuda once each")
        if len(set(self.cuda_extensions)) != len(self.cuda_extensions):
            found.append("cuda_extensions lists an extension twice")
        export = (self.export_label, self.export_group_size, self.scored_group_size, self.export_refused)
        if self.refused is not None:
            if self.cuda_extensions or any(fact is not None for fact in export):
                found.append("a refused preset never runs: drop its cuda_extensions and export_* keys")
            return found
        if self.export_label is None and self.export_refused is None:
            found.append("say what the exporter records (export_label) or why it is refused (export_refused)")
        if self.export_group_size is not None and self.export_label is None:
            found.append("export_group_size without export_label")
        if self.scored_group_size is not None:
            if self.scored_group_size == self.export_group_size:
                found.append("scored_group_size is only for a block size unlike export_group_size")
            elif self.export_refused is None:
                found.append("scored and exported block sizes differ, so export_refused must say why")
        return found

    def info(self) -> FormatInfo:
        return FormatInfo(
            name=self.name,
            bits=self.bits,
            weights=self.weights,
            activations=self.activations,
            description=self.description,
            needs_cuda=self.needs_cuda,
            kind="preset",
            modelopt_name=self.name,
            algorithm=self.algorithm,
            refused=self.refused,
            equivalent=self.equivalent,
            cuda_extensions=self.cuda_extensions,
        )


@attrs.frozen
class _PresetFile:
    preset: tuple[Preset, ...]


def _strict(kind: type, check: Callable[[Any], bool], make: Callable[[Any], Any]) -> Any:
    def structure(value: Any, _: Any) -> Any:
        if not check(value):
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__} {value!r}")
        return make(value)

    return structure


def _origin(kind: Any) -> object:
    """``typing.get_origin``, typed as a plain object so identity checks against it type-check."""
    return typing.get_origin(kind)


def _preset_converter() -> cattrs.Converter:
    """A converter as strict as the pipeline files' (io/convert.py), for the one file core reads.

    core may not import io, and the preset file needs only a fraction of that converter: exact
    scalar types (an int stands in for a float, nothing else is coerced), lists for tuples, the
    closed choices checked, unknown keys refused.
    """
    converter = cattrs.Converter(forbid_extra_keys=True)
    converter.register_structure_hook(str, _strict(str, lambda v: isinstance(v, str), str))
    converter.register_structure_hook(int, _strict(int, lambda v: type(v) is int, int))
    converter.register_structure_hook(float, _strict(float, lambda v: type(v) in (int, float), float))

    def as_tuple(value: Any, kind: Any) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise TypeError(f"expected a list, got {type(value).__name__} {value!r}")
        item = typing.get_args(kind)[0]
        found: list[Any] = []
        errors: list[Exception] = []
        for index, entry in enumerate(value):
            try:
                found.append(converter.structure(entry, item))
            except Exception as err:  # gathered, raised below with its index
                err.add_note(IterableValidationNote(f"at index {index}", index, item))
                errors.append(err)
        if errors:
            raise IterableValidationError(f"while structuring {kind}", errors, kind)
        return tuple(found)

    def one_of(value: Any, kind: Any) -> Any:
        allowed = typing.get_args(kind)
        if value not in allowed or type(value) is not type(allowed[0]):
            raise TypeError(f"expected one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value

    converter.register_structure_hook_func(lambda kind: _origin(kind) is Literal, one_of)
    converter.register_structure_hook_func(lambda kind: _origin(kind) is tuple, as_tuple)
    return converter


_ROW_PATH = re.compile(r"\$\.preset\[(\d+)\]")


def _problem(err: BaseException, kind: Any) -> str:
    """Our hooks' own words for a wrong type; cattrs' for a missing or unknown key."""
    if isinstance(err, TypeError) and str(err).startswith("expected "):
        return str(err)
    return format_exception(err, kind)


def parse_presets(text: str, source: str) -> tuple[Preset, ...]:
    """The rows of a preset file; InputError naming ``source``, the row and the key on any fault."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"{source}: not valid TOML ({err}); reinstall auto-quantize-model") from None
    rows = raw.get("preset") if isinstance(raw, dict) else None

    def where(path: str) -> str:
        def name(match: re.Match[str]) -> str:
            index = int(match[1])
            row = rows[index] if isinstance(rows, list) and index < len(rows) else None
            named = row.get("name") if isinstance(row, dict) else None
            return f"preset {named}" if isinstance(named, str) else f"preset #{index + 1}"

        return _ROW_PATH.sub(name, path)

    try:
        table = _preset_converter().structure(raw, _PresetFile)
    except cattrs.BaseValidationError as err:
        problems = [where(line) for line in cattrs.transform_error(err, "$", _problem)]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InputError(f"{source}: {problems[0]}{more}") from None
    seen: set[str] = set()
    for row in table.preset:
        if row.name in seen:
            raise InputError(f"{source}: preset {row.name} is listed twice")
        seen.add(row.name)
        problems = row.problems()
        if problems:
            raise InputError(f"{source}: preset {row.name}: {problems[0]}")
    return table.preset


@functools.cache
def presets() -> tuple[Preset, ...]:
    """Every row of the packaged ``data/presets.toml``, in its order (read once per process)."""
    source = f"auto_quantize_model/data/{PRESETS_FILE}"
    try:
        text = (importlib.resources.files("auto_quantize_model.data") / PRESETS_FILE).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{source}: cannot be read ({err}); reinstall auto-quantize-model") from None
    return parse_presets(text, source)


@functools.cache
def _presets_by_name() -> dict[str, Preset]:
    return {row.name: row for row in presets()}


@functools.cache
def _preset_infos() -> tuple[FormatInfo, ...]:
    return tuple(row.info() for row in presets())


def preset(name: str) -> Preset | None:
    """The row of a ModelOpt preset name (without options), or None for any other name."""
    return _presets_by_name().get(name)


def cuda_extensions(names: Iterable[str]) -> tuple[CudaExtension, ...]:
    """The ModelOpt CUDA extensions the formats' quantizers call, in :data:`CUDA_EXTENSIONS` order."""
    wanted = {extension for name in names for extension in resolve_format(name).cuda_extensions}
    return tuple(extension for extension in CUDA_EXTENSIONS if extension in wanted)


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
    return (*_preset_infos(), *customs)


def _closest(name: str) -> str | None:
    candidates = [*_presets_by_name(), *CUSTOM_EXAMPLES]
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
    row = preset(name)
    if row is not None:
        return row.info()
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
