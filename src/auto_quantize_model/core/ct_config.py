"""A chosen format mix as a compressed-tensors quantization config: which formats it can hold, and how.

Pure: no torch, no compressed-tensors. The torch side (quantizing with ModelOpt, compressing with
compressed-tensors, reading back through transformers) is
:mod:`auto_quantize_model.backend.compressed_tensors`.

compressed-tensors (the format vLLM and transformers' ``CompressedTensorsHfQuantizer`` read)
describes a checkpoint by ``config_groups``: each group a ``QuantizationScheme`` with ``targets``,
``weights`` and ``input_activations`` (``QuantizationArgs``: bits, int/float, strategy, group
size, dynamic) and a per-group ``format`` (how the weights are packed); ``ignore`` lists modules
left alone. Both readers match a target against a module name exactly, or as a regular
expression when it starts with ``re:`` (``compressed_tensors.utils.match.match_name``), so the
groups here list every chosen module by its exact name: nothing outside the choice can match.

Which ModelOpt formats map, and why the rest are refused (decided from the format's name, as
:func:`~auto_quantize_model.core.export_labels.export_format` does for ModelOpt's exporter): a
format is written when its weights and activations have a compressed-tensors scheme that means
the same arithmetic and that the engines ship kernels for. ModelOpt's max-calibrated quantizers
scale symmetrically by ``amax / bound`` (``bound`` 127 for INT8, 7 for INT4, 448 for FP8 E4M3:
``TensorQuantizer.maxbound``), which is compressed-tensors' ``scale`` for a symmetric scheme, so
weights and static activation ranges carry over as scales. SmoothQuant and AWQ fold a
per-input-channel ``pre_quant_scale`` into the layer's input that compressed-tensors has no field
for (llm-compressor folds it into the previous layer instead); per-input-channel weights have no
compressed-tensors strategy.

NVFP4 (FP4 E2M1 codes in blocks of 16, each block's scale in FP8 E4M3 under one float32 scale per
tensor) is compressed-tensors' ``nvfp4-pack-quantized``, strategy ``tensor_group``: the same codes
and block scales as ModelOpt's, with the per-tensor scale inverted (``weight_global_scale`` is
``1 / weight_scale_2`` = ``6 * 448 / amax``; compressed-tensors' own ModelOpt converter does the
same). NVFP4 activations (W4A4) are dynamic blocks of 16 under a static global scale
(``input_global_scale`` = ``6 * 448 / amax`` of the calibrated input range); weight-only NVFP4 is
W4A16. vLLM runs both (``CompressedTensorsW4A4Fp4``, ``CompressedTensorsW4A16Fp4``); it has no
compressed-tensors scheme for NVFP4 weights with FP8 or INT8 activations, so those are refused, as
are MX formats (E8M0 block scales ModelOpt quantizes only with CUDA kernels, not written here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import attrs

from auto_quantize_model.core.export_choice import GroupChoice
from auto_quantize_model.core.export_config import ExportConfig
from auto_quantize_model.core.export_labels import ExportFormat, check_checkpoint_choices, export_format
from auto_quantize_model.core.format_grammar import CustomFormat, parse_custom
from auto_quantize_model.core.formats import resolve_format
from auto_quantize_model.core.scores import NO_QUANT
from auto_quantize_model.errors import ConfigError
from auto_quantize_model.spec_values import EXPORT_FORMATS

MODELOPT, COMPRESSED_TENSORS = EXPORT_FORMATS
"""What ``aqm export --format`` and ``[export] format`` accept; ``modelopt`` is the default."""

MIXED_PRECISION = "mixed-precision"
"""compressed-tensors' top-level ``format`` when the groups pack their weights differently."""

Compression = Literal[
    "int-quantized", "pack-quantized", "float-quantized", "naive-quantized", "nvfp4-pack-quantized"
]

FP8_MAX = 448.0
"""The largest FP8 E4M3 value: NVFP4's block scales are FP8, so its global scale is ``amax / (6 * 448)``."""

_BOUND = {("int", 8): 127.0, ("int", 4): 7.0, ("float", 8): FP8_MAX, ("float", 4): 6.0}
"""ModelOpt's ``maxbound`` for each quantized type: a scale is ``amax / bound``."""


FLIP_SHARE = 1e-2
"""Largest accepted share of NVFP4 weights whose written code differs from the fake-quantized model's.

The exporter and ModelOpt's GPU kernel disagree only on weights within a float rounding of an FP4
decision boundary: 5.2e-4 of them on an H100 (tiny model). A scoring/export mismatch of the grid
itself moves far more: W4A8_NVFP4_FP8 scored in blocks of 16 but written in blocks of 32 would
differ on 30% (``benchmarks/results/w4a8-block-h100.json``). Above this share the checkpoint is not
the model that was scored, and the read-back fails."""


@attrs.frozen
class CtArgs:
    """One compressed-tensors ``QuantizationArgs`` (symmetric, as every ModelOpt max format is)."""

    num_bits: int
    type: Literal["int", "float"]
    strategy: Literal["tensor", "channel", "group", "token", "tensor_group"]
    group_size: int | None = None
    dynamic: bool | Literal["local"] = False
    """``local``: scales computed on the fly per group, under a static global scale (NVFP4 inputs)."""

    @property
    def bound(self) -> float:
        """The largest code: a scale is ``amax / bound``."""
        return _BOUND[(self.type, self.num_bits)]

    @property
    def global_bound(self) -> float:
        """``tensor_group`` only: the global scale is ``global_bound / amax`` (FP4 max times FP8 max)."""
        return self.bound * FP8_MAX

    @property
    def static_input(self) -> bool:
        """Whether the checkpoint stores an input range for it (a scale, or NVFP4's global scale)."""
        return self.dynamic is not True

    def as_dict(self) -> dict[str, Any]:
        """The keyword arguments of ``QuantizationArgs``."""
        args: dict[str, Any] = {
            "num_bits": self.num_bits,
            "type": self.type,
            "symmetric": True,
            "strategy": self.strategy,
            "dynamic": self.dynamic,
        }
        if self.group_size is not None:
            args["group_size"] = self.group_size
        if self.strategy == "tensor_group":
            args["scale_dtype"] = "torch.float8_e4m3fn"  # NVFP4's block scales, as its presets say
        return args


@attrs.frozen
class CtScheme:
    """A format as compressed-tensors writes it: weight args, activation args, packing."""

    weights: CtArgs
    inputs: CtArgs | None
    """None: activations stay in 16 bits."""
    compression: Compression
    """The group's ``format``: how compressed-tensors packs its weights."""

    def as_dict(self, targets: Sequence[str]) -> dict[str, Any]:
        """A ``QuantizationScheme`` as a dict (``QuantizationScheme.model_validate`` reads it)."""
        return {
            "targets": list(targets),
            "weights": self.weights.as_dict(),
            "input_activations": self.inputs.as_dict() if self.inputs is not None else None,
            "format": self.compression,
        }


_INT8_PC = CtArgs(8, "int", "channel")
_FP8_PT = CtArgs(8, "float", "tensor")
_FP8_PC = CtArgs(8, "float", "channel")
_INT8_STATIC = CtArgs(8, "int", "tensor")
_INT8_TOKEN = CtArgs(8, "int", "token", dynamic=True)
_FP8_STATIC = CtArgs(8, "float", "tensor")
_FP8_TOKEN = CtArgs(8, "float", "token", dynamic=True)
_NVFP4 = CtArgs(4, "float", "tensor_group", 16)
_NVFP4_INPUT = CtArgs(4, "float", "tensor_group", 16, dynamic="local")

_SCHEMES: dict[tuple[str, str, str, str | None], CtScheme] = {
    # W8A8 INT8 (vLLM: CompressedTensorsW8A8Int8, static or dynamic activations)
    ("int8", "pc", "int8", "tensor"): CtScheme(_INT8_PC, _INT8_STATIC, "int-quantized"),
    ("int8", "pc", "int8", "token"): CtScheme(_INT8_PC, _INT8_TOKEN, "int-quantized"),
    # W8A16 INT8 (vLLM: CompressedTensorsWNA16)
    ("int8", "pc", "16", None): CtScheme(_INT8_PC, None, "pack-quantized"),
    # W8A8 FP8 (vLLM: CompressedTensorsW8A8Fp8)
    ("fp8", "pt", "fp8", "tensor"): CtScheme(_FP8_PT, _FP8_STATIC, "float-quantized"),
    ("fp8", "pc", "fp8", "token"): CtScheme(_FP8_PC, _FP8_TOKEN, "float-quantized"),
    ("fp8", "pc", "fp8", "tensor"): CtScheme(_FP8_PC, _FP8_STATIC, "float-quantized"),
    # FP8 weight-only (vLLM: CompressedTensorsW8A16Fp8)
    ("fp8", "pt", "16", None): CtScheme(_FP8_PT, None, "naive-quantized"),
    ("fp8", "pc", "16", None): CtScheme(_FP8_PC, None, "naive-quantized"),
    # W4A16 INT4 per output channel or in groups along the input dimension (CompressedTensorsWNA16)
    ("int4", "pc", "16", None): CtScheme(CtArgs(4, "int", "channel"), None, "pack-quantized"),
    **{
        ("int4", f"b{size}", "16", None): CtScheme(CtArgs(4, "int", "group", size), None, "pack-quantized")
        for size in (32, 64, 128)
    },
    # NVFP4 W4A4 (vLLM: CompressedTensorsW4A4Fp4) and weight-only (CompressedTensorsW4A16Fp4)
    ("fp4", "b16", "fp4", "b16"): CtScheme(_NVFP4, _NVFP4_INPUT, "nvfp4-pack-quantized"),
    ("fp4", "b16", "16", None): CtScheme(_NVFP4, None, "nvfp4-pack-quantized"),
}
"""Every custom layout (weights, weight granularity, activations, activation granularity) written."""

WRITTEN = (
    "INT8 W8A8 (INT8_DEFAULT_CFG, wint8-pc_aint8-token), INT8 W8A16 (INT8_WEIGHT_ONLY_CFG), FP8 "
    "(FP8_DEFAULT_CFG, FP8_PER_CHANNEL_PER_TOKEN_CFG, wfp8_a16) and max-calibrated INT4 weight-only "
    "(INT4_BLOCKWISE_WEIGHT_ONLY_CFG, wint4-b128_a16, -b64, -b32), NVFP4 W4A4 (NVFP4_DEFAULT_CFG, "
    "wfp4_afp4) and NVFP4 W4A16 (W4A16_NVFP4_CFG, wfp4_a16)"
)
"""The formats this export writes, for refusals to point at."""


@attrs.frozen
class CtFormat:
    """How compressed-tensors holds a format, or why it cannot."""

    name: str
    scheme: CtScheme | None
    needs_cuda: bool = False
    refused: str | None = None


def _layout_refusal(spec: CustomFormat) -> str:
    if spec.weight == "fp4" and spec.weight_granularity != "b16":
        return "compressed-tensors' NVFP4 (nvfp4-pack-quantized) scales FP4 weights in blocks of 16 only"
    if spec.weight == "fp4":
        return (
            f"NVFP4 weights with {spec.describe_activations()} activations have no compressed-tensors "
            "scheme an engine runs (vLLM's NVFP4 schemes are W4A4 and W4A16: use NVFP4_DEFAULT_CFG or "
            "W4A16_NVFP4_CFG)"
        )
    if spec.weight_granularity == "pic":
        return (
            "compressed-tensors scales weights per tensor, output channel, group or 2-D block, "
            "never per input channel"
        )
    if spec.activation in ("int4", "fp4"):
        return "no engine runs 4-bit activations from a compressed-tensors checkpoint of this layout"
    return (
        f"its {spec.describe_weights()} weights with {spec.describe_activations()} activations are not "
        "among the compressed-tensors schemes this export writes"
    )


def ct_format(name: str) -> CtFormat:
    """The compressed-tensors scheme of a format, or why it has none (unknown names raise ConfigError)."""
    if name == NO_QUANT:
        return CtFormat(name, None)
    info = resolve_format(name)
    if info.refused is not None:
        return CtFormat(name, None, info.needs_cuda, info.refused)
    if info.algorithm not in ("max", None):
        return CtFormat(
            name,
            None,
            info.needs_cuda,
            f"its {info.algorithm} calibration scales each layer's input by a per-input-channel "
            "pre_quant_scale that compressed-tensors has no field for (folding it into the previous "
            "layer is not implemented)",
        )
    spec = parse_custom(info.equivalent or info.base_name)
    if spec is None:
        return CtFormat(
            name,
            None,
            info.needs_cuda,
            f"its layout ({info.weights}; activations {info.activations}) has no compressed-tensors "
            "scheme this export writes",
        )
    scheme = _SCHEMES.get(
        (spec.weight, spec.weight_granularity, spec.activation, spec.activation_granularity)
    )
    if scheme is None:
        return CtFormat(name, None, info.needs_cuda, _layout_refusal(spec))
    return CtFormat(name, scheme, info.needs_cuda)


def ct_export_format(name: str) -> ExportFormat:
    """:func:`ct_format` in the shape :func:`build_export_config` checks (label: the group's packing)."""
    found = ct_format(name)
    if found.scheme is None:
        return ExportFormat(name=name, label=None, needs_cuda=found.needs_cuda, refused=found.refused)
    return ExportFormat(
        name=name,
        label=found.scheme.compression,
        group_size=found.scheme.weights.group_size,
        needs_cuda=found.needs_cuda,
    )


def refusal_hint(name: str) -> str:
    """What to use instead of a format compressed-tensors cannot hold."""
    modelopt = export_format(name).refused is None
    instead = "export it with --format modelopt, or " if modelopt else ""
    return f"{instead}choose a run whose formats it writes: {WRITTEN}"


def check_ct_choices(choices: Sequence[GroupChoice]) -> None:
    """Refuse, in one line naming the group and format, a choice compressed-tensors cannot hold.

    Run before anything is loaded or written: the first refused format (in group order) is named
    with the reason and what to use instead.
    """
    seen: set[str] = set()
    for choice in choices:
        if choice.format == NO_QUANT or choice.format in seen:
            continue
        seen.add(choice.format)
        found = ct_format(choice.format)
        if found.refused is not None:
            raise ConfigError(
                f"group {choice.name}: format {choice.format} cannot be exported as compressed-tensors: "
                f"{found.refused}; {refusal_hint(choice.format)}"
            )


def check_checkpoint_format(choices: Sequence[GroupChoice], checkpoint_format: str) -> None:
    """Refuse, in one line, a checkpoint of ``choices`` in ``checkpoint_format`` that would fail late.

    Run before any model is loaded: compressed-tensors refuses what it cannot hold
    (:func:`check_ct_choices`); ModelOpt's format what aqm's read-back cannot decode
    (:func:`~auto_quantize_model.core.export_labels.check_checkpoint_choices`).
    """
    if checkpoint_format == COMPRESSED_TENSORS:
        check_ct_choices(choices)
    else:
        check_checkpoint_choices(choices)


def export_formats_of(name: str) -> tuple[str, ...]:
    """The ``aqm export --format`` values that take a format (``aqm formats``' export column)."""
    taken = []
    if export_format(name).refused is None:
        taken.append(MODELOPT)
    if ct_format(name).refused is None:
        taken.append(COMPRESSED_TENSORS)
    return tuple(taken)


# --------------------------------------------------------------------------------------------------
# The plan: one group per format, the rest ignored
# --------------------------------------------------------------------------------------------------


@attrs.frozen
class CtGroup:
    """One ``config_groups`` entry: a format and the exact names of the modules that carry it."""

    format: str
    scheme: CtScheme
    modules: tuple[str, ...]


@attrs.frozen
class CtPlan:
    """What the compressed-tensors checkpoint holds: the groups and the linear layers left at 16 bits."""

    groups: tuple[CtGroup, ...]
    ignore: tuple[str, ...]

    @property
    def compression(self) -> str:
        """The top-level ``format``: the groups' one packing, or ``mixed-precision``."""
        packings = {group.scheme.compression for group in self.groups}
        return packings.pop() if len(packings) == 1 else MIXED_PRECISION

    @property
    def holds_nvfp4(self) -> bool:
        """Whether a group is NVFP4 (transformers decompresses those layers to bfloat16)."""
        return any(group.scheme.compression == "nvfp4-pack-quantized" for group in self.groups)

    def scheme_of(self) -> dict[str, CtScheme]:
        """Module -> its scheme."""
        return {module: group.scheme for group in self.groups for module in group.modules}

    def quantization_config(self, status: str = "frozen") -> dict[str, Any]:
        """The ``QuantizationConfig`` as a dict (``QuantizationConfig.model_validate`` reads it)."""
        return {
            "config_groups": {group.format: group.scheme.as_dict(group.modules) for group in self.groups},
            "format": self.compression,
            "quantization_status": status,
            "ignore": list(self.ignore),
        }


def plan_ct(config: ExportConfig, linear_modules: Sequence[str]) -> CtPlan:
    """The groups of ``config`` (formats in first-use order) and every other linear layer as ignored.

    ``linear_modules`` are the model's linear layers in module order: those the choice leaves at
    16 bits (``NONE`` groups, vision towers, anything outside the recipe) are listed in
    ``ignore``, as compressed-tensors' own ``QuantizationConfig.from_pretrained`` does.
    """
    modules: dict[str, list[str]] = {}
    for layer in config.quantized:
        modules.setdefault(layer.format, []).append(layer.module)
    groups = []
    for name, members in modules.items():
        found = ct_format(name)
        if found.scheme is None:
            raise ConfigError(f"format {name} cannot be exported as compressed-tensors: {found.refused}")
        groups.append(CtGroup(name, found.scheme, tuple(members)))
    quantized = {layer.module for layer in config.quantized}
    unknown = sorted(quantized - set(linear_modules))
    if unknown:
        raise ConfigError(f"the chosen layer {unknown[0]} is not a linear layer of this model")
    return CtPlan(tuple(groups), tuple(name for name in linear_modules if name not in quantized))


# --------------------------------------------------------------------------------------------------
# README of a compressed-tensors export folder
# --------------------------------------------------------------------------------------------------

VLLM_NEEDS = (
    "a vLLM whose compressed-tensors loader reads each group's own `format` "
    "(vllm-project/vllm#22468, merged in August 2025), needed when the groups pack differently "
    "(`format: mixed-precision`)"
)


NVFP4_NEEDS = (
    "NVFP4 groups: vLLM reads them with its compressed-tensors NVFP4 schemes (CompressedTensorsW4A4Fp4, "
    "CompressedTensorsW4A16Fp4); llm-compressor's scheme table lists NVFP4 as accelerated from compute "
    "capability 10.0 (Blackwell); whether a given vLLM runs them on an older GPU was not checked here"
)

NVFP4_TRANSFORMERS = (
    "transformers 5.17 with compressed-tensors 0.20.1 decompresses NVFP4 layers to bfloat16 whatever "
    "the model's dtype, so load this folder with dtype=torch.bfloat16 (a float32 load fails in the "
    "first NVFP4 layer)"
)


def _describe(args: CtArgs | None) -> str:
    if args is None:
        return "16-bit"
    kind = f"{'FP' if args.type == 'float' else 'INT'}{args.num_bits}"
    if args.strategy == "tensor_group":
        scales = "FP8 scales per block of 16 under a global scale"
        return f"NVFP4 ({kind} E2M1, {scales}" + (", blocks dynamic)" if args.dynamic else ")")
    if args.strategy == "group":
        return f"{kind} groups of {args.group_size}"
    return f"{kind} per {args.strategy}" + (", dynamic" if args.dynamic else "")


def ct_readme_text(
    plan: CtPlan,
    *,
    model_class: str,
    checked: Sequence[str] = (),
    notes: Sequence[str] = (),
) -> str:
    """``README.md`` of a compressed-tensors export: the groups, the files, how to serve and load it.

    ``model_class`` is the transformers auto class the read-back used; ``checked`` are lines saying
    what this tool ran on the folder (nothing else is claimed).
    """
    lines = [
        "# Mixed-precision export (auto-quantize-model): compressed-tensors checkpoint",
        "",
        f"{sum(len(g.modules) for g in plan.groups)} quantized linear layers in {len(plan.groups)} "
        f"compressed-tensors group(s), {len(plan.ignore)} linear layers left at 16 bits (`ignore`); "
        f"top-level format `{plan.compression}`.",
        "",
        "| group (format) | layers | weights | activations | packing |",
        "| :--- | ---: | :--- | :--- | :--- |",
    ]
    for group in plan.groups:
        lines.append(
            f"| `{group.format}` | {len(group.modules)} | {_describe(group.scheme.weights)} | "
            f"{_describe(group.scheme.inputs)} | `{group.scheme.compression}` |"
        )
    lines += [
        "",
        "| file | what |",
        "| :--- | :--- |",
        "| `config.json` | the model config; `quantization_config` is compressed-tensors' (`config_groups` "
        "with exact module names as `targets`, `ignore`) |",
        "| `*.safetensors` | weights: quantized layers hold packed codes with `weight_scale` "
        "(and `input_scale` for static activations)"
        + (
            "; NVFP4 layers hold `weight_packed` (two FP4 codes a byte), FP8 `weight_scale` per block "
            "of 16, `weight_global_scale` and, with FP4 activations, `input_global_scale`"
            if plan.holds_nvfp4
            else ""
        )
        + " |",
        "| `quant_config.json`, `quant_recipe.yaml` | the same mix as a ModelOpt quantize config and "
        "PTQ recipe |",
        "| `export.json` | the budget, the mix and the read-back figures |",
        "",
        "## Serve with vLLM (not run here)",
        "",
        "```",
        "vllm serve THIS_FOLDER",
        "```",
        "",
        f"Needs {VLLM_NEEDS}. vLLM was not run on this folder by auto-quantize-model.",
    ]
    if plan.holds_nvfp4:
        lines += ["", f"{NVFP4_NEEDS}."]
    load = f'model = {model_class}.from_pretrained("THIS_FOLDER")  # needs compressed-tensors installed'
    if plan.holds_nvfp4:
        load = f'model = {model_class}.from_pretrained("THIS_FOLDER", dtype=torch.bfloat16)'
    lines += [
        "",
        "## Load with transformers",
        "",
        "```python",
        *(["import torch"] if plan.holds_nvfp4 else []),
        f"from transformers import {model_class}",
        "",
        load,
        "# dense weights in memory: also pass quantization_config=CompressedTensorsConfig(dequantize=True)",
        "```",
    ]
    if plan.holds_nvfp4:
        lines += ["", f"Needs compressed-tensors installed; {NVFP4_TRANSFORMERS}."]
    if checked:
        lines += ["", "## Checked by auto-quantize-model", "", *(f"- {line}" for line in checked)]
    if notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"
