"""ModelOpt's presets as package data: the rows of ``data/presets.toml``, read strictly.

Each row holds every fact this package keeps about one ModelOpt preset (cost, calibration,
refusal, scheme name, export label, CUDA extensions), so that ``aqm formats``, pre-flight
validation, scheme names, export labels and the CUDA warm-up never import torch or ModelOpt and
never disagree. The file is read once per process with a small converter as strict as the
pipeline files' one; a fault names the file, the row and the key.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
import tomllib
import typing
from collections.abc import Callable
from typing import Any, Literal

import attrs
import cattrs
from cattrs.errors import IterableValidationError, IterableValidationNote
from cattrs.v import format_exception

from auto_quantize_model.core.format_grammar import CudaExtension
from auto_quantize_model.errors import InputError

Device = Literal["cpu", "cuda"]

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


def preset(name: str) -> Preset | None:
    """The row of a ModelOpt preset name (without options), or None for any other name."""
    return _presets_by_name().get(name)
