"""The quantization formats AutoQuant may choose between, and which of them can work here.

This is the public entry: :func:`resolve_format` turns any accepted name into a
:class:`FormatInfo`, :func:`all_formats` lists them for ``aqm formats``, and :func:`check_formats`
refuses, before a model loads, what cannot give a meaningful search. Three kinds of names are
accepted:

* ModelOpt presets by their ModelOpt name (``INT8_DEFAULT_CFG``), answered from the rows of
  ``data/presets.toml`` (:mod:`auto_quantize_model.core.presets`), so that ``aqm formats`` and
  pre-flight validation never import torch or ModelOpt; a test checks the rows against
  ``modelopt.torch.quantization.config`` entry by entry.
* Our own weight/activation names (``wint8_aint8``, ``wint4-b128_aint8-token``), parsed by
  :mod:`auto_quantize_model.core.format_grammar`. Every name the grammar spells resolves; those
  ModelOpt 0.47 cannot run as named are refused with the reason, and anything FP4 needs CUDA.
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
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import attrs

from auto_quantize_model.core.format_grammar import (
    CUDA_EXTENSIONS,
    CUSTOM_GRAMMAR,
    CudaExtension,
    CustomFormat,
    parse_custom,
)
from auto_quantize_model.core.presets import Preset, preset, presets
from auto_quantize_model.errors import ConfigError

FormatKind = Literal["preset", "custom"]

LINEAR_QUANTIZERS = ("weight_quantizer", "input_quantizer")
"""Local names of the quantizers ModelOpt puts on a linear layer (besides the output one)."""


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
    """The ModelOpt CUDA extensions its quantizers call on a GPU
    (:func:`~auto_quantize_model.core.format_grammar.quantizer_extensions`);
    empty for refused formats, which never run."""

    @property
    def usable(self) -> bool:
        return self.refused is None

    @property
    def base_name(self) -> str:
        """The name without its calibration option: what ModelOpt and the exporter know it by."""
        return self.name.partition(OPTION_SEPARATOR)[0]


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
"""Custom names listed by ``aqm formats``; any name in
:data:`~auto_quantize_model.core.format_grammar.CUSTOM_GRAMMAR` is accepted."""

CUSTOM_REFUSED_EXAMPLES: tuple[str, ...] = (
    "wfp4-pc_a16",
    "wfp4-b128_a16",
    "wint8_afp4-token",
    "wint8_aint8-b16",
)
"""One spelled-out name per reason a grammar name is refused, listed by ``aqm formats`` with it."""


# --------------------------------------------------------------------------------------------------
# Lookup and validation
# --------------------------------------------------------------------------------------------------


def _preset_info(row: Preset) -> FormatInfo:
    return FormatInfo(
        name=row.name,
        bits=row.bits,
        weights=row.weights,
        activations=row.activations,
        description=row.description,
        needs_cuda=row.needs_cuda,
        kind="preset",
        modelopt_name=row.name,
        algorithm=row.algorithm,
        refused=row.refused,
        equivalent=row.equivalent,
        cuda_extensions=row.cuda_extensions,
    )


@functools.cache
def _preset_infos() -> tuple[FormatInfo, ...]:
    return tuple(_preset_info(row) for row in presets())


def cuda_extensions(names: Iterable[str]) -> tuple[CudaExtension, ...]:
    """The ModelOpt CUDA extensions the formats' quantizers call, in :data:`CUDA_EXTENSIONS` order."""
    wanted = {extension for name in names for extension in resolve_format(name).cuda_extensions}
    return tuple(extension for extension in CUDA_EXTENSIONS if extension in wanted)


def all_formats() -> tuple[FormatInfo, ...]:
    """Every preset and the listed custom examples (refused ones too, with the reason)."""
    customs = []
    for name in (*CUSTOM_EXAMPLES, *CUSTOM_REFUSED_EXAMPLES):
        spec = parse_custom(name)
        assert spec is not None, name
        customs.append(_custom_info(name, spec))
    return (*_preset_infos(), *customs)


def _closest(name: str) -> str | None:
    candidates = [*(row.name for row in presets()), *CUSTOM_EXAMPLES]
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
        return _preset_info(row)
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
