"""Ranked groups and scheme names: what BuildManifest and the previous tool's reader share.

The ranking rules (importance, NaN first, ties in network order) are defined once in
:mod:`auto_quantize_model.core.scores` and shared with validation, plots, health and diff; the
same rules serve our runs and the previous tool's manifests. Pure: no clock, no environment.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from auto_quantize_model.artifacts import GroupScore
from auto_quantize_model.core.formats import OPTION_SEPARATOR
from auto_quantize_model.core.presets import preset
from auto_quantize_model.core.scores import (
    has_quantized_format,
    importance,
    is_none_format,
    rank_order,
)
from auto_quantize_model.errors import AqmError, ConfigError
from auto_quantize_model.manifest_records import RankedGroup
from auto_quantize_model.spec_values import scheme_name_problem


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
    ranked = [
        RankedGroup.from_score(groups[position], rank=rank, importance=values[position])
        for rank, position in enumerate(rank_order(values), start=1)
    ]
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
    """Scheme-name fragment of one format: a preset's ``scheme`` (data/presets.toml), our own names
    unchanged, and unknown ``*_CFG`` names (a newer ModelOpt's, in an old manifest) shortened.

    An option after the name (``W4A8_AWQ_BETA_CFG:alpha_step=0.25``) becomes ``-a0.25``: ``:`` and
    ``=`` have no place in file names.
    """
    base, sep, option = format_name.partition(OPTION_SEPARATOR)
    if sep:
        return f"{format_scheme_part(base)}-a{option.partition('=')[2]}"
    row = preset(format_name)
    if row is not None:
        return row.scheme
    if format_name.endswith("_CFG"):
        return format_name.removesuffix("_CFG").lower().replace("_default", "")
    return format_name


def scheme_name(formats: Sequence[str], explicit: str | None = None) -> str:
    """``explicit`` when given (checked, since it ends up in file names), else derived from formats."""
    if explicit is not None:
        problem = scheme_name_problem(explicit)
        if problem is not None:
            raise ConfigError(problem)
        return explicit
    parts = [format_scheme_part(name) for name in formats if not is_none_format(name)]
    if not parts:
        raise ConfigError("cannot name the scheme: no quantization format was scored (only NONE)")
    return "+".join(parts)
