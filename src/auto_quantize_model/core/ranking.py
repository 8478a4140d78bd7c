"""BuildManifest: turn sensitivity scores into the ranked, self-describing manifest.

Ranking rules (the same for our runs and for the previous tool's manifests):

* importance of a group = its largest score over the quantized formats (everything but ``NONE``):
  the damage of the worst choice the search could make there. A group with no quantized format
  (e.g. a vision layer kept in 16 bits) has importance 0: quantizing it is not on the table.
* rank 1 is the most sensitive group; ranks are 1..n with no gaps and no shared ranks.
* NaN importance (any quantized score NaN) ranks first, ahead of +inf: a score that blew up says
  the quantized layer broke the forward or backward pass, and hiding it at the bottom of a long
  table is the worst place for it. Only runs with ``allow_nonfinite`` get here at all.
* ties keep the input order, which is the order the groups sit in the network (ModelOpt lists
  them in module order). This is what Python's stable ``sorted(..., reverse=True)`` gave the
  previous tool, so its manifests (105 zero-score vision groups) come out in exactly its order,
  and it is deterministic because module order is. Sorting ties by name instead would put
  ``layers.10`` before ``layers.2``.

Everything here is pure except :meth:`BuildManifest.run`, which reads the clock and the installed
package versions and hands them to :func:`build_manifest`.
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
from auto_quantize_model.errors import ConfigError
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

NONE_FORMAT = "NONE"
"""ModelOpt's name for "leave this group unquantized"."""

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


def importance(formats: Sequence[str], scores: Sequence[float]) -> float:
    """Largest score over quantized formats; NaN if any of them is NaN; 0 if there is none."""
    quantized = [score for name, score in zip(formats, scores, strict=True) if name != NONE_FORMAT]
    if not quantized:
        return 0.0
    if any(math.isnan(score) for score in quantized):
        return math.nan
    return max(quantized)


def headline_index(formats: Sequence[str], scores: Sequence[float]) -> int:
    """Index of the format a one-format summary row shows (bits, cost): the one setting the importance.

    The first quantized format with the importance score (NaN counts as the largest); with no
    quantized format, the first format (``NONE``). For a one-format run this is that format,
    which is what the previous tool's ``num_bits``/``size_cost`` columns showed.
    """
    if not formats:
        raise ValueError("a group without formats has no headline format")
    target = importance(formats, scores)
    for index, (name, score) in enumerate(zip(formats, scores, strict=True)):
        if name == NONE_FORMAT:
            continue
        if (math.isnan(target) and math.isnan(score)) or score == target:
            return index
    return 0


def _sort_key(item: tuple[int, float]) -> tuple[int, float, int]:
    position, value = item
    if math.isnan(value):
        return (0, 0.0, position)
    return (1, -value, position)


def rank_groups(groups: Sequence[GroupScore]) -> tuple[RankedGroup, ...]:
    """Rank groups most sensitive first (see the module docstring for ties and NaN)."""
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
    values = [(position, importance(g.formats, g.scores)) for position, g in enumerate(groups)]
    order = sorted(values, key=_sort_key)
    ranked = []
    for rank, (position, value) in enumerate(order, start=1):
        group = groups[position]
        ranked.append(
            RankedGroup(
                name=group.name,
                rank=rank,
                importance=value,
                best_format=group.best_format,
                module_names=group.module_names,
                formats=group.formats,
                bits=group.bits,
                scores=group.scores,
                costs=group.costs,
            )
        )
    return tuple(ranked)


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
    parts = [format_scheme_part(name) for name in formats if name != NONE_FORMAT]
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
    """The whole manifest from plain inputs; the clock and environment come in as arguments."""
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
