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
from typing import Any

import attrs
import cattrs

from auto_quantize_model.artifacts import GroupScore
from auto_quantize_model.core.ranking import rank_groups
from auto_quantize_model.core.scores import group_name, parse_label
from auto_quantize_model.errors import InputError
from auto_quantize_model.io.convert import JSON_CONVERTER, json_problems, open_schema
from auto_quantize_model.io.manifest import SCHEMA_VERSION
from auto_quantize_model.manifest_records import DatasetInfo, Manifest, ModelInfo, SchemeInfo

LEGACY_LAYOUT = "padded"
"""The previous tool padded every caption to the sequence length."""

# The previous tool's file, as far as we read it. Every class is open: their files hold more
# (``coverage_fraction``, ``layers``, their own ranks...), which we ignore.


@open_schema
@attrs.frozen
class LegacyScheme:
    name: str
    quant_formats: tuple[str, ...]
    auto_quantize_method: str
    auto_quantize_bits: float
    auto_quantize_score_size: float
    coverage_mode: str = ""


@open_schema
@attrs.frozen
class LegacyConstraints:
    effective_bits: float


@open_schema
@attrs.frozen
class LegacyState:
    constraints: LegacyConstraints
    score: float
    is_satisfied: bool


@open_schema
@attrs.frozen
class LegacyModel:
    id: str


@open_schema
@attrs.frozen
class LegacyDataset:
    captions_path: str
    max_calib_samples: int
    num_calib_samples: int
    calib_seq_len: int
    batch_size: int
    num_calib_batches: int


@open_schema
@attrs.frozen
class LegacyGroup:
    formats: tuple[str, ...]
    """Spelled ``NAME(effective-bits: B)``."""
    scores: tuple[float, ...]
    costs: tuple[float, ...]


@open_schema
@attrs.frozen
class LegacyManifest:
    scheme: LegacyScheme
    model: LegacyModel
    autoquant_state: LegacyState
    layer_sensitivity: dict[str, LegacyGroup]
    """Recipe group (``<module>.quant_recipe``) -> its formats and scores, in network order."""
    dataset: LegacyDataset | None = None


def looks_like_legacy(data: Any) -> bool:
    """The previous tool's manifest: no schema version, ``scheme`` and a ``layer_sensitivity`` mapping."""
    return (
        isinstance(data, dict)
        and "schema_version" not in data
        and isinstance(data.get("scheme"), dict)
        and isinstance(data.get("layer_sensitivity"), dict)
    )


def parse_format(spelled: str) -> tuple[str, float]:
    """``"INT8_DEFAULT_CFG(effective-bits: 8.0)"`` -> ``("INT8_DEFAULT_CFG", 8.0)``, by ModelOpt's
    label rule (:func:`~auto_quantize_model.core.scores.parse_label`), worded for a file's key."""
    try:
        return parse_label(spelled)
    except ValueError:
        raise ValueError(f"format {spelled!r} is not NAME(effective-bits: B)") from None


def _fail(source_path: str | os.PathLike[str], where: str, problem: str) -> InputError:
    return InputError(f"{source_path}: legacy manifest key {where} {problem}")


def _group(key: str, entry: LegacyGroup, source_path: str | os.PathLike[str]) -> GroupScore:
    where = f"layer_sensitivity[{key!r}]"
    if not entry.formats:
        raise _fail(source_path, f"{where}.formats", "is empty (expected NAME(effective-bits: B) strings)")
    try:
        parsed = [parse_format(x) for x in entry.formats]
    except ValueError as err:
        raise _fail(source_path, f"{where}.formats", str(err)) from err
    counts = (len(parsed), len(entry.scores), len(entry.costs))
    if len(set(counts)) != 1:
        raise _fail(source_path, where, "has {} formats, {} scores and {} costs (must match)".format(*counts))
    name = group_name(key)
    return GroupScore(
        name=name,
        module_names=(name,),
        formats=tuple(fmt for fmt, _ in parsed),
        bits=tuple(bits for _, bits in parsed),
        scores=entry.scores,
        costs=entry.costs,
        best_format="",
    )


def _dataset(dataset: LegacyDataset | None) -> DatasetInfo | None:
    if dataset is None:
        return None
    return DatasetInfo(
        captions_path=dataset.captions_path,
        captions_sha256=None,
        layout=LEGACY_LAYOUT,
        seq_len=dataset.calib_seq_len,
        batch_size=dataset.batch_size,
        max_samples=dataset.max_calib_samples,
        samples=dataset.num_calib_samples,
        real_tokens=None,
        total_tokens=dataset.num_calib_samples * dataset.calib_seq_len,
        batches=dataset.num_calib_batches,
    )


def legacy_manifest_from_dict(data: dict[str, Any], source_path: str | os.PathLike[str]) -> Manifest:
    """Convert a parsed legacy manifest; ``source_path`` only names the file in errors."""
    try:
        legacy = JSON_CONVERTER.structure(data, LegacyManifest)
    except (cattrs.BaseValidationError, TypeError, ValueError) as err:
        raise InputError(f"{source_path}: legacy manifest key " + "; key ".join(json_problems(err))) from err
    scheme, state = legacy.scheme, legacy.autoquant_state
    groups = [_group(key, entry, source_path) for key, entry in legacy.layer_sensitivity.items()]
    info = SchemeInfo(
        name=scheme.name,
        formats=scheme.quant_formats,
        method=scheme.auto_quantize_method,
        scope=scheme.coverage_mode,
        effective_bits_target=scheme.auto_quantize_bits,
        effective_bits_lm=None,
        effective_bits_model=state.constraints.effective_bits,
        total_score=state.score,
        satisfied=state.is_satisfied,
        score_samples=int(scheme.auto_quantize_score_size),
        calib_steps=None,
        score_steps=None,
    )
    return Manifest(
        schema_version=SCHEMA_VERSION,
        scheme=info,
        model=ModelInfo(source=legacy.model.id, architecture="", dtype="", device=""),
        dataset=_dataset(legacy.dataset),
        groups=rank_groups(groups),
        origin="legacy",
        search_order=tuple(group.name for group in groups),  # their file lists ModelOpt's order
    )
