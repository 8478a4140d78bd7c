"""Reading the previous script-based tool's ``*_quant_manifest.json`` into our :class:`Manifest`.

Their layout: ``scheme`` (name, ``auto_quantize_bits``, method, score size, ``coverage_mode``,
``quant_formats``), ``model.id``, optionally ``dataset``, ``autoquant_state`` (constraint, score,
satisfied) and ``layer_sensitivity``: recipe group (``<module>.quant_recipe``) -> formats spelled
``NAME(effective-bits: B)``, scores, costs. Their ``rank``/``sensitivity_ranking`` run ascending;
we ignore both and rank with :func:`~auto_quantize_model.core.ranking.rank_groups`, which reproduces
the descending order of their own ``per-layer-sensitivity.json`` exactly (ties, all the
zero-score vision groups, stay in the order the manifest lists them).

What we keep verbatim: group names (the older layout's keys lack the ``model.`` prefix; we do not
guess one), format names, scores, costs, scheme name, ``quant_formats`` and ``coverage_mode``
(as the scope). What they never recorded is None or ``""`` (see :mod:`auto_quantize_model.io.manifest`):
the format the search picked per group, the effective bits reached over the language model, step
counts, token counts, the captions' hash, the model's architecture/dtype/device, and which modules
share a group (each group lists just its own module).
"""

from __future__ import annotations

import os
import re
from typing import Any

from auto_quantize_model.artifacts import GroupScore
from auto_quantize_model.core.ranking import rank_groups
from auto_quantize_model.errors import InputError
from auto_quantize_model.io.manifest import SCHEMA_VERSION, DatasetInfo, Manifest, ModelInfo, SchemeInfo

RECIPE_SUFFIX = ".quant_recipe"
LEGACY_LAYOUT = "padded"
"""The previous tool padded every caption to the sequence length."""

_FORMAT_RE = re.compile(
    r"\s*(?P<name>[^()\s]+)\s*\(\s*effective-bits:\s*(?P<bits>[-+0-9.eE]+|inf|nan)\s*\)\s*"
)


def looks_like_legacy(data: Any) -> bool:
    """The previous tool's manifest: no schema version, ``scheme`` and a ``layer_sensitivity`` mapping."""
    return (
        isinstance(data, dict)
        and "schema_version" not in data
        and isinstance(data.get("scheme"), dict)
        and isinstance(data.get("layer_sensitivity"), dict)
    )


def parse_format(spelled: str) -> tuple[str, float]:
    """``"INT8_DEFAULT_CFG(effective-bits: 8.0)"`` -> ``("INT8_DEFAULT_CFG", 8.0)``."""
    match = _FORMAT_RE.fullmatch(spelled)
    if match is None:
        raise ValueError(f"format {spelled!r} is not NAME(effective-bits: B)")
    return match["name"], float(match["bits"])


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


class _Reader:
    """Typed access to one legacy file, every error naming the file and the key path."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = path

    def fail(self, where: str, problem: str) -> InputError:
        return InputError(f"{self.path}: legacy manifest key {where} {problem}")

    def obj(self, parent: dict[str, Any], key: str, where: str) -> dict[str, Any]:
        value = parent.get(key)
        if not isinstance(value, dict):
            raise self.fail(_join(where, key), "is missing or not an object")
        return value

    def text(self, parent: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
        value = parent.get(key, default)
        if not isinstance(value, str):
            raise self.fail(_join(where, key), "is missing or not a string")
        return value

    def number(self, parent: dict[str, Any], key: str, where: str, default: float | None = None) -> float:
        value = parent.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(_join(where, key), "is missing or not a number")
        return float(value)

    def integer(self, parent: dict[str, Any], key: str, where: str) -> int:
        value = parent.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(_join(where, key), "is missing or not an integer")
        return value

    def numbers(self, parent: dict[str, Any], key: str, where: str) -> tuple[float, ...]:
        value = parent.get(key)
        if not isinstance(value, list) or not all(
            isinstance(x, int | float) and not isinstance(x, bool) for x in value
        ):
            raise self.fail(_join(where, key), "is missing or not a list of numbers")
        return tuple(float(x) for x in value)


def _group(reader: _Reader, key: str, entry: Any) -> GroupScore:
    where = f"layer_sensitivity[{key!r}]"
    if not isinstance(entry, dict):
        raise reader.fail(where, "is not an object")
    spelled = entry.get("formats")
    if not isinstance(spelled, list) or not spelled or not all(isinstance(x, str) for x in spelled):
        raise reader.fail(f"{where}.formats", "is missing or not a list of format strings")
    try:
        parsed = [parse_format(x) for x in spelled]
    except ValueError as err:
        raise reader.fail(f"{where}.formats", str(err)) from err
    scores = reader.numbers(entry, "scores", where)
    costs = reader.numbers(entry, "costs", where)
    if not len(parsed) == len(scores) == len(costs):
        raise reader.fail(
            where, f"has {len(parsed)} formats, {len(scores)} scores and {len(costs)} costs (must match)"
        )
    name = key.removesuffix(RECIPE_SUFFIX)
    return GroupScore(
        name=name,
        module_names=(name,),
        formats=tuple(fmt for fmt, _ in parsed),
        bits=tuple(bits for _, bits in parsed),
        scores=scores,
        costs=costs,
        best_format="",
    )


def _dataset(reader: _Reader, data: dict[str, Any]) -> DatasetInfo | None:
    if "dataset" not in data:
        return None
    block = reader.obj(data, "dataset", "")
    samples = reader.integer(block, "num_calib_samples", "dataset")
    seq_len = reader.integer(block, "calib_seq_len", "dataset")
    return DatasetInfo(
        captions_path=reader.text(block, "captions_path", "dataset"),
        captions_sha256=None,
        layout=LEGACY_LAYOUT,
        seq_len=seq_len,
        batch_size=reader.integer(block, "batch_size", "dataset"),
        max_samples=reader.integer(block, "max_calib_samples", "dataset"),
        samples=samples,
        real_tokens=None,
        total_tokens=samples * seq_len,
        batches=reader.integer(block, "num_calib_batches", "dataset"),
    )


def legacy_manifest_from_dict(data: dict[str, Any], source_path: str | os.PathLike[str]) -> Manifest:
    """Convert a parsed legacy manifest; ``source_path`` only names the file in errors."""
    reader = _Reader(source_path)
    scheme = reader.obj(data, "scheme", "")
    state = reader.obj(data, "autoquant_state", "")
    constraints = reader.obj(state, "constraints", "autoquant_state")
    formats = scheme.get("quant_formats")
    if not isinstance(formats, list) or not all(isinstance(x, str) for x in formats):
        raise reader.fail("scheme.quant_formats", "is missing or not a list of strings")
    satisfied = state.get("is_satisfied")
    if not isinstance(satisfied, bool):
        raise reader.fail("autoquant_state.is_satisfied", "is missing or not true/false")
    model = reader.obj(data, "model", "")
    groups = [_group(reader, key, entry) for key, entry in data["layer_sensitivity"].items()]
    info = SchemeInfo(
        name=reader.text(scheme, "name", "scheme"),
        formats=tuple(formats),
        method=reader.text(scheme, "auto_quantize_method", "scheme"),
        scope=reader.text(scheme, "coverage_mode", "scheme", default=""),
        effective_bits_target=reader.number(scheme, "auto_quantize_bits", "scheme"),
        effective_bits_lm=None,
        effective_bits_model=reader.number(constraints, "effective_bits", "autoquant_state.constraints"),
        total_score=reader.number(state, "score", "autoquant_state"),
        satisfied=satisfied,
        score_samples=int(reader.number(scheme, "auto_quantize_score_size", "scheme")),
        calib_steps=None,
        score_steps=None,
    )
    return Manifest(
        schema_version=SCHEMA_VERSION,
        scheme=info,
        model=ModelInfo(source=reader.text(model, "id", "model"), architecture="", dtype="", device=""),
        dataset=_dataset(reader, data),
        groups=rank_groups(groups),
        origin="legacy",
    )
