"""BuildManifest's pure half: ranked groups, scheme naming and the manifest record.

The ranking rules (importance, NaN first, ties in network order) are defined once in
:mod:`auto_quantize_model.core.scores` and shared with validation, plots, health and diff; the
same rules serve our runs and the previous tool's manifests.

Everything here is pure except :func:`installed_versions` and :func:`utc_now_iso`, which
:class:`~auto_quantize_model.stages.build_manifest.BuildManifest` calls for the environment.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import math
import platform
import re
from collections.abc import Sequence

from auto_quantize_model.artifacts import (
    CalibStats,
    GroupScore,
    LoadedModel,
    SensitivityScores,
    ValidationReport,
)
from auto_quantize_model.core.scores import (
    NO_QUANT,
    has_quantized_format,
    importance,
    is_none_format,
    rank_order,
)
from auto_quantize_model.core.scores import headline_index as headline_index
from auto_quantize_model.errors import AqmError, ConfigError
from auto_quantize_model.io.manifest import (
    SCHEMA_VERSION,
    DatasetInfo,
    Manifest,
    ModelInfo,
    RankedGroup,
    SchemeInfo,
    Timing,
)
from auto_quantize_model.specs import ManifestSpec

NONE_FORMAT = NO_QUANT
"""Old name of :data:`auto_quantize_model.core.scores.NO_QUANT`, kept until render/reports.py
imports that instead."""

PRESET_SCHEME_NAMES: dict[str, str] = {
    "INT8_DEFAULT_CFG": "wint8_aint8",
    "INT8_SMOOTHQUANT_CFG": "wint8_aint8_sq",
    "INT8_WEIGHT_ONLY_CFG": "wint8",
    "FP8_DEFAULT_CFG": "wfp8_afp8",
    "FP8_PER_CHANNEL_PER_TOKEN_CFG": "wfp8_afp8_pcpt",
    "FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG": "wfp8_block2d",
    "INT4_AWQ_CFG": "wint4_awq",
    "INT4_BLOCKWISE_WEIGHT_ONLY_CFG": "wint4_block",
    "W4A8_AWQ_BETA_CFG": "wint4_afp8_awq",
    "NVFP4_DEFAULT_CFG": "wnvfp4_anvfp4",
    "W4A16_NVFP4_CFG": "wnvfp4",
    "W4A8_NVFP4_FP8_CFG": "wnvfp4_afp8",
    "W4A8_MXFP4_FP8_CFG": "wmxfp4_afp8",
    "MXFP8_DEFAULT_CFG": "wmxfp8_amxfp8",
    "MXFP6_DEFAULT_CFG": "wmxfp6_amxfp6",
    "MXFP4_DEFAULT_CFG": "wmxfp4_amxfp4",
    "MXINT8_DEFAULT_CFG": "wmxint8_amxint8",
}
"""Short weight/activation names for ModelOpt presets, the previous tool's naming (``wint8_aint8``)."""

SCHEME_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
"""A scheme name becomes part of file names: no slashes, spaces or leading dots."""

VERSIONED_DISTRIBUTIONS: tuple[tuple[str, str], ...] = (
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("modelopt", "nvidia-modelopt"),
    ("auto_quantize_model", "auto-quantize-model"),
)


def rank_groups(groups: Sequence[GroupScore]) -> tuple[RankedGroup, ...]:
    """Rank groups most sensitive first (ties and NaN: :mod:`auto_quantize_model.core.scores`)."""
    seen: set[str] = set()
    for group in groups:
        if group.name in seen:
            raise ValueError(f"group {group.name} is listed twice")
        seen.add(group.name)
        lengths = {len(group.formats), len(group.bits), len(group.scores), len(group.costs)}
        if len(lengths) != 1:
            raise ValueError(
                f"group {group.name}: formats, bits, scores and costs differ in length "
                f"({len(group.formats)}, {len(group.bits)}, {len(group.scores)}, {len(group.costs)})"
            )
    values = [importance(g.formats, g.scores) for g in groups]
    ranked = []
    for rank, position in enumerate(rank_order(values), start=1):
        group = groups[position]
        ranked.append(
            RankedGroup(
                name=group.name,
                rank=rank,
                importance=values[position],
                best_format=group.best_format,
                module_names=group.module_names,
                formats=group.formats,
                bits=group.bits,
                scores=group.scores,
                costs=group.costs,
            )
        )
    return tuple(ranked)


def check_ranking(groups: Sequence[GroupScore]) -> None:
    """Refuse a ranking without a single finite importance: it would rank nothing a user can act on.

    Reached with no groups at all, or with every quantized score NaN/infinite (a run that kept
    going with ``autoquant.allow_nonfinite``).
    """
    scored = [g for g in groups if has_quantized_format(g.formats)]
    if any(math.isfinite(importance(g.formats, g.scores)) for g in scored):
        return
    detail = (
        "AutoQuant reported no recipe group"
        if not groups
        else f"none of the {len(groups)} recipe group(s) has a finite score for a quantized format "
        f"({len(groups) - len(scored)} offer only NONE, {len(scored)} scored NaN or infinite)"
    )
    raise AqmError(
        f"empty ranking: {detail}; check that the language model is in the loss graph (score health "
        "lists groups scored 0 or NaN) and that autoquant.formats quantize its layers"
    )


def format_scheme_part(format_name: str) -> str:
    """Scheme-name fragment of one format: short names for presets, our own names unchanged."""
    if format_name in PRESET_SCHEME_NAMES:
        return PRESET_SCHEME_NAMES[format_name]
    if format_name.endswith("_CFG"):
        return format_name.removesuffix("_CFG").lower().replace("_default", "")
    return format_name


def scheme_name(formats: Sequence[str], explicit: str | None = None) -> str:
    """``explicit`` when given (checked, since it ends up in file names), else derived from formats."""
    if explicit is not None:
        if not SCHEME_NAME_RE.fullmatch(explicit):
            raise ConfigError(
                f"scheme name {explicit!r} cannot be used in file names "
                "(use letters, digits and . _ + -, starting with a letter or digit)"
            )
        return explicit
    parts = [format_scheme_part(name) for name in formats if not is_none_format(name)]
    if not parts:
        raise ConfigError("cannot name the scheme: no quantization format was scored (only NONE)")
    return "+".join(parts)


def model_info(loaded: LoadedModel | None) -> ModelInfo:
    if loaded is None:
        return ModelInfo(source="", architecture="", dtype="", device="")
    return ModelInfo(
        source=loaded.source, architecture=loaded.architecture, dtype=loaded.dtype, device=loaded.device
    )


def dataset_info(stats: CalibStats | None) -> DatasetInfo | None:
    if stats is None:
        return None
    return DatasetInfo(
        captions_path=stats.captions_path,
        captions_sha256=stats.captions_sha256,
        layout=stats.layout,
        seq_len=stats.seq_len,
        batch_size=stats.batch_size,
        max_samples=stats.max_samples,
        samples=stats.samples,
        real_tokens=stats.real_tokens,
        total_tokens=stats.total_tokens,
        batches=stats.batches,
    )


def scheme_info(scores: SensitivityScores, name: str) -> SchemeInfo:
    return SchemeInfo(
        name=name,
        formats=scores.formats,
        method=scores.method,
        scope=scores.scope,
        effective_bits_target=scores.effective_bits_target,
        effective_bits_lm=scores.effective_bits_lm,
        effective_bits_model=scores.effective_bits_model,
        total_score=scores.total_score,
        satisfied=scores.satisfied,
        score_samples=scores.score_samples,
        calib_steps=scores.calib_steps,
        score_steps=scores.score_steps,
    )


def build_manifest(
    scores: SensitivityScores,
    spec: ManifestSpec,
    *,
    model: ModelInfo,
    dataset: DatasetInfo | None,
    timings: Sequence[Timing] = (),
    validation: ValidationReport | None = None,
    created_at: str = "",
    versions: tuple[tuple[str, str], ...] = (),
) -> Manifest:
    """The whole manifest from plain inputs; the clock and environment come in as arguments.

    An empty ranking (:func:`check_ranking`) is an error, not a manifest of nothing.
    """
    check_ranking(scores.groups)
    return Manifest(
        schema_version=SCHEMA_VERSION,
        scheme=scheme_info(scores, scheme_name(scores.formats, spec.scheme)),
        model=model,
        dataset=dataset,
        groups=rank_groups(scores.groups),
        timings=tuple(timings),
        created_at=created_at,
        versions=versions,
        validation=validation,
        origin="aqm",
    )


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
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
