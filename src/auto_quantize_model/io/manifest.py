"""The manifest: the one file that says what was measured, on what, and how layers rank.

Ranks are 1-based and descending everywhere: rank 1 is the group whose quantization hurts most.
The manifest is plain data so ``aqm report`` and ``aqm diff`` never need torch.
Manifests converted from the previous tool (``origin == "legacy"``) lack some facts: numbers it
never recorded are None, names it never recorded are ``""`` (reports print ``n/a`` for both).

The records here are the file's schema. Where an artifact carries the same facts
(:class:`~auto_quantize_model.artifacts.CalibStats` -> :class:`DatasetInfo`,
:class:`~auto_quantize_model.artifacts.SensitivityScores` -> :class:`SchemeInfo`, ...), the
manifest record is made from it by :func:`~auto_quantize_model.io.convert.project`, field by
name; stage timings and validation results are the artifacts themselves.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
from collections.abc import Sequence
from typing import Any

import attrs
import cattrs

from auto_quantize_model.artifacts import FixedGroup, FrontierSummary, StageTiming, ValidationReport
from auto_quantize_model.core.format_agreement import FormatAgreement
from auto_quantize_model.core.noise import random_weights_notice
from auto_quantize_model.errors import InputError
from auto_quantize_model.io.convert import JSON_CONVERTER, dumps_json, json_problems

SCHEMA_VERSION = 1
"""Bumped whenever a field changes meaning; readers refuse versions they do not know."""

VERSIONED_DISTRIBUTIONS: tuple[tuple[str, str], ...] = (
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("modelopt", "nvidia-modelopt"),
    ("auto_quantize_model", "auto-quantize-model"),
)
"""(name in files, distribution) of the packages that shape the numbers."""


@attrs.frozen
class SchemeInfo:
    name: str
    formats: tuple[str, ...]
    method: str
    scope: str
    effective_bits_target: float
    effective_bits_lm: float | None
    effective_bits_model: float
    total_score: float
    satisfied: bool
    score_samples: int
    calib_steps: int | None
    score_steps: int | None


@attrs.frozen
class ModelInfo:
    source: str
    architecture: str
    dtype: str
    device: str
    devices: str = ""
    """Which modules went to which device when a ``device_map`` spread the model; else empty."""


@attrs.frozen
class DatasetInfo:
    captions_path: str
    captions_sha256: str | None
    layout: str
    seq_len: int
    batch_size: int
    max_samples: int
    samples: int
    real_tokens: int | None
    total_tokens: int
    batches: int


@attrs.frozen
class RankedGroup:
    """One recipe group with its scores and its place in the ranking."""

    name: str
    """Module path of the group (ModelOpt's ``.quant_recipe`` suffix stripped)."""
    rank: int
    importance: float
    """Max score over the group's quantized (non-NONE) formats: the damage of the worst choice."""
    best_format: str
    """The format the effective-bits search picked; ``""`` when unknown (legacy manifests)."""
    module_names: tuple[str, ...]
    formats: tuple[str, ...]
    bits: tuple[float, ...]
    scores: tuple[float, ...]
    costs: tuple[float, ...]


@attrs.frozen
class Manifest:
    schema_version: int
    scheme: SchemeInfo
    model: ModelInfo
    dataset: DatasetInfo | None
    groups: tuple[RankedGroup, ...]
    """Sorted by rank (most sensitive first)."""
    timings: tuple[StageTiming, ...] = ()
    created_at: str = ""
    versions: tuple[tuple[str, str], ...] = ()
    validation: ValidationReport | None = None
    origin: str = "aqm"
    """``aqm`` for our runs, ``legacy`` for manifests of the previous script-based tool."""
    warnings: tuple[str, ...] = ()
    """Settings that could not be honoured as written and notes on figures that could not be
    measured, one sentence each (the report shows them first). Left out of the file when empty."""
    search_order: tuple[str, ...] = ()
    """Every recipe group of ModelOpt's search in its order (scored and fixed groups), so that
    ``aqm frontier`` re-solves it exactly from the manifest alone. Left out of the file when empty."""
    fixed_groups: tuple[FixedGroup, ...] = ()
    """Groups of the search with no format to choose, with their weights. Left out when empty."""
    frontier: FrontierSummary | None = None
    """The budget frontier of a pipeline with a ``[frontier]`` table. Left out when absent."""
    format_agreement: FormatAgreement | None = None
    """For runs of two or more formats: each format's top-k groups and which are sensitive under
    every format vs only some. Left out when absent."""


def installed_versions() -> tuple[tuple[str, str], ...]:
    """Versions of Python and the packages that shape the numbers, without importing any of them."""
    found = [("python", platform.python_version())]
    for label, distribution in VERSIONED_DISTRIBUTIONS:
        try:
            found.append((label, importlib.metadata.version(distribution)))
        except importlib.metadata.PackageNotFoundError:
            found.append((label, "not installed"))
    return tuple(found)


def utc_now_iso() -> str:
    """The time files record: UTC, to the second."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def manifest_to_dict(manifest: Manifest) -> dict[str, Any]:
    """Plain data (floats may still be non-finite; :func:`dumps_json` spells those out)."""
    data: dict[str, Any] = JSON_CONVERTER.unstructure(manifest)
    if not data["warnings"]:
        del data["warnings"]  # files of runs without warnings stay as they always were
    for optional in ("search_order", "fixed_groups", "frontier", "format_agreement"):
        if not data[optional]:
            del data[optional]  # likewise for runs without them
    if data["validation"] is not None:
        _drop_unset(data["validation"], VALIDATION_ADDITIONS)
        for group in data["validation"]["groups"]:
            _drop_unset(group, VALIDATED_GROUP_ADDITIONS)
    notice = random_weights_notice(manifest.model.source)
    if notice:  # derived from the model source, first so that no reader misses it
        data = {"schema_version": data.pop("schema_version"), NOTICE_KEY: notice, **data}
    return data


NOTICE_KEY = "notice"
"""Top-level key of the random-weights sentence (:func:`random_weights_notice`); derived from
``model.source`` when written, dropped when read."""
VALIDATION_ADDITIONS = ("noise", "proxies", "refinement", "unmet")
VALIDATED_GROUP_ADDITIONS = ("delta_nll_ci", "kl_ci")
"""Validation fields added after schema 1 was first written: left out when unset, so a manifest
without them reads and writes as it always did."""


def _drop_unset(record: dict[str, Any], keys: Sequence[str]) -> None:
    for key in keys:
        if record.get(key) in (None, [], ()):
            record.pop(key, None)


def manifest_to_json(manifest: Manifest) -> str:
    return dumps_json(manifest_to_dict(manifest))


def manifest_from_dict(data: Any, source_path: str | os.PathLike[str]) -> Manifest:
    """Structure one of our manifests, refusing other schema versions and malformed content.

    ``source_path`` only names the file in error messages.
    """
    if not isinstance(data, dict):
        raise InputError(f"{source_path} is not a quant manifest (top level is not a JSON object)")
    version = data.get("schema_version")
    if type(version) is not int:
        raise InputError(
            f"{source_path} is not a quant manifest (schema_version is {version!r}, expected an integer)"
        )
    if version != SCHEMA_VERSION:
        raise InputError(
            f"{source_path}: unknown manifest schema_version {version}; this aqm reads schema_version "
            f"{SCHEMA_VERSION}"
            + (" (the file is newer: upgrade auto-quantize-model)" if version > SCHEMA_VERSION else "")
        )
    if isinstance(data.get(NOTICE_KEY), str):
        data = {key: value for key, value in data.items() if key != NOTICE_KEY}
    try:
        manifest = JSON_CONVERTER.structure(data, Manifest)
    except (cattrs.BaseValidationError, TypeError, ValueError) as err:
        details = "; ".join(json_problems(err))
        raise InputError(f"{source_path} is not a valid quant manifest: {details}") from err
    ranks = [group.rank for group in manifest.groups]
    if ranks != list(range(1, len(ranks) + 1)):
        raise InputError(
            f"{source_path} is not a valid quant manifest: groups must be listed by rank 1..{len(ranks)}"
        )
    return manifest
