"""The values a pipeline file's fields hold: their grammar, their converters and their range checks.

:mod:`auto_quantize_model.specs` says which knobs each stage has and their defaults; this module says
what a knob's value may be: the effective-bits budget grammar (``4.5:8:0.25``), sizes (``40GiB``),
device maps and memory caps, scheme names, and the attrs validators that turn a bad value into one
:class:`SpecError` sentence (``CalibSpec.max_samples: must be > 0, got 0``). Commands that read a
value outside any spec (``aqm export --bits``, ``aqm frontier``, the sharding planner) parse it here
with the same rules.

The seam: a value's rules depend on nothing about the stage list or the file's layout, and the
schema only names them, so the schema reads as a list of knobs and its module stays under the house
limit of 600 lines. Nouns, below every layer: this imports only :mod:`auto_quantize_model.errors`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from auto_quantize_model.errors import ConfigError

# --------------------------------------------------------------------------- the error and the range checks


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


def bits_in_range(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0 < value <= 16:
        raise SpecError(_owner(instance), attribute.name, f"must be in (0, 16], got {value:g}")


def not_negative(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if value < 0:
        raise SpecError(_owner(instance), attribute.name, f"must be >= 0, got {value}")


MIN_SEQ_LEN = 2
"""Shortest row that scores anything: a token's loss needs the next token as its target."""
MIN_BOOTSTRAP = 40
"""Fewest resamples with at least one beyond each 2.5% tail of the 95% interval (1 / 0.025)."""


def predicts_a_token(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    # 0 and below are left to ``positive`` (listed first), so each value gets one sentence.
    if 0 < value < MIN_SEQ_LEN:
        raise SpecError(
            _owner(instance),
            attribute.name,
            f"must be at least {MIN_SEQ_LEN}, got {value}: a row of {value} token has no next token to "
            "predict, so every score would be 0 and every group quantized",
        )


def resample_count(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
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


def greedy_token_count(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    not_negative(instance, attribute, value)
    if value > MAX_GREEDY_TOKENS:
        raise SpecError(
            _owner(instance),
            attribute.name,
            f"must be at most {MAX_GREEDY_TOKENS} (0 = no generation check), got {value}: each token costs a "
            "forward pass of every greedy caption with both models",
        )


def budget_text(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    try:
        parse_budgets(value)
    except ConfigError as err:
        raise SpecError(_owner(instance), attribute.name, str(err)) from None


def not_empty(instance: object, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    if not value:
        raise SpecError(
            _owner(instance), attribute.name, "empty: name at least one format (aqm formats lists them)"
        )


# --------------------------------------------------------------------------- names

SCHEME_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
"""A scheme name becomes part of file names: no slashes, spaces or leading dots."""
MAX_SCHEME_LENGTH = 200
"""Longest scheme name: ``<scheme>_quant_manifest.json`` must stay under the usual 255-byte limit."""


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


def file_name_safe(instance: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
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


def export_bits(instance: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None:
        try:
            parse_budgets(repr(float(value)))
        except ConfigError as err:
            raise SpecError(_owner(instance), attribute.name, str(err)) from None


EXPORT_FORMATS = ("modelopt", "compressed-tensors")
"""Checkpoint formats ``aqm export`` writes: ModelOpt's Hugging Face checkpoint, or compressed-tensors
(vLLM's format for mixed precision, which transformers also loads)."""


def export_format(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if value not in EXPORT_FORMATS:
        choices = ", ".join(EXPORT_FORMATS)
        raise SpecError(_owner(instance), attribute.name, f"{value!r} is not one of {choices}")


# --------------------------------------------------------------------------- device maps and memory caps

DeviceMap = tuple[tuple[str, str], ...]
"""An explicit placement, module name -> device (``cpu``, ``cuda``, ``cuda:N``), as written.

Held as pairs, not a dict, so that a :class:`~auto_quantize_model.specs.LoadSpec` stays hashable
(sweeps key their shared models and batches by it); pipeline files write it as a TOML table (see
:data:`~auto_quantize_model.specs.TABLE_METADATA`)."""
MemoryLimits = tuple[tuple[str, str], ...]
"""Device (``"0"``, ``"1"``, ... or ``"cpu"``) -> the most memory a placement may use there."""
DeviceMapSetting = str | DeviceMap | None
MemoryLimitsSetting = MemoryLimits | None

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


def device_map_ok(instance: object, attribute: attrs.Attribute[Any], value: DeviceMapSetting) -> None:
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


def memory_limits_ok(instance: object, attribute: attrs.Attribute[Any], value: MemoryLimitsSetting) -> None:
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
