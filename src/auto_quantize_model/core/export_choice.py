"""Which format each recipe group gets in an export, and the rule that fused siblings share one.

A choice is read from the run's own best formats, from the user's per-group overrides, or from
the budget frontier at one budget; each :class:`GroupChoice` carries the full-model module names of
its group, which the export config (:mod:`auto_quantize_model.core.export_config`) names one by one.
Modules that runtimes fuse into one GEMM (q/k/v, gate/up, MoE experts) must end in one format, or
the fused kernel would mix two, so :func:`check_fused_siblings` refuses such a choice. Pure: no
torch, no ModelOpt.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING

import attrs

from auto_quantize_model.core.scores import NO_QUANT
from auto_quantize_model.errors import ConfigError, InputError

if TYPE_CHECKING:
    from auto_quantize_model.artifacts import GroupScore
    from auto_quantize_model.frontier_records import Frontier


@attrs.frozen
class GroupChoice:
    """One recipe group and the format chosen for it (``NONE``: left unquantized)."""

    name: str
    module_names: tuple[str, ...]
    """Full-model module names (as in :attr:`GroupScore.module_names`); they share the format."""
    format: str


def choices_from_groups(
    groups: Sequence[GroupScore], formats: Mapping[str, str] | None = None
) -> tuple[GroupChoice, ...]:
    """Every group on ``formats[group.name]``, or on the run's own choice (``best_format``) if absent.

    A name in ``formats`` that is no group is an error (a typo would otherwise export silently).
    """
    formats = dict(formats or {})
    known = {group.name for group in groups}
    unknown = sorted(set(formats) - known)
    if unknown:
        raise ConfigError(f"format chosen for {unknown[0]!r}, which is no recipe group of this run")
    return tuple(
        GroupChoice(group.name, group.module_names, formats.get(group.name, group.best_format))
        for group in groups
    )


def choices_at(frontier: Frontier, budget: float, groups: Sequence[GroupScore]) -> tuple[GroupChoice, ...]:
    """The frontier's choice at ``budget`` (to 1e-9), with each group's modules from ``groups``.

    ``groups`` are the run's scored groups (SensitivityScores or the manifest): the frontier
    holds group names only.
    """
    try:
        point = frontier.point(budget)
    except KeyError:
        solved = ", ".join(f"{p.budget:g}" for p in frontier.points[:12])
        raise ConfigError(f"the frontier has no point at {budget:g} bits (solved: {solved})") from None
    if not point.reachable:
        raise ConfigError(
            f"{budget:g} bits is below the cheapest mix ({frontier.min_bits_lm:g} bits over the LM); "
            "pick a larger budget"
        )
    by_name = {group.name: group for group in groups}
    missing = [name for name in frontier.groups if name not in by_name]
    if missing:
        raise InputError(f"frontier group {missing[0]!r} is not among the run's scored groups")
    chosen = dict(zip(frontier.groups, point.formats, strict=True))
    return tuple(GroupChoice(g.name, g.module_names, chosen.get(g.name, NO_QUANT)) for g in groups)


_SIBLING_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    # Per-expert projections of one MoE block are searched as one group by ModelOpt.
    (
        re.compile(r"^(?P<parent>.*?\.(?:mlp|mixer)\.experts)\.\d+\.(?:gate_proj|up_proj|down_proj)$"),
        "experts",
    ),
    (
        re.compile(r"^(?P<parent>.*?\.mlp\.experts\.local_experts)\.\d+\.(?:linear_fc1|linear_fc2)$"),
        "experts",
    ),
    (re.compile(r"^(?P<parent>.*)\.(?:q_proj|k_proj|v_proj)$"), "q/k/v"),
    (re.compile(r"^(?P<parent>.*)\.(?:gate_proj|up_proj)$"), "gate/up"),
    (re.compile(r"^(?P<parent>.*?\.linear_attn)\.(?:in_proj_qkv|in_proj_z)$"), "qkv/z"),
    (re.compile(r"^(?P<parent>.*?\.linear_attn)\.(?:in_proj_a|in_proj_b)$"), "a/b"),
)
"""Modules that deployment runtimes fuse into one GEMM, so they must share one format. The same
families ModelOpt's AutoQuant groups (``quant_grouping_rules`` in ``algorithms.py:640``)."""


def fused_siblings(module: str) -> str | None:
    """A key shared by the modules fused with ``module`` (``<parent> q/k/v``), or None."""
    for pattern, family in _SIBLING_RULES:
        match = pattern.match(module)
        if match is not None:
            return f"{match['parent']} {family}"
    return None


def check_fused_siblings(choices: Sequence[GroupChoice], known_modules: Collection[str] = ()) -> None:
    """Refuse a choice that gives fused siblings (q/k/v, gate/up, experts) different formats.

    ``known_modules`` (every linear layer of the model, optional) also catches a sibling the
    choice leaves out: unlisted modules stay unquantized, which splits the family too.
    """
    owner: dict[str, GroupChoice] = {}
    for choice in choices:
        for module in choice.module_names:
            owner[module] = choice
    families: dict[str, list[str]] = {}
    for module in [*owner, *(m for m in known_modules if m not in owner)]:
        key = fused_siblings(module)
        if key is not None:
            families.setdefault(key, []).append(module)
    for key, members in families.items():
        formats = {owner[m].format if m in owner else NO_QUANT for m in members}
        if len(formats) > 1:
            detail = ", ".join(
                f"{m} ({owner[m].format} in group {owner[m].name})" if m in owner else f"{m} (unlisted: NONE)"
                for m in members
            )
            group = next(owner[m].name for m in members if m in owner)
            raise ConfigError(
                f"group {group}: fused siblings {key.split(' ')[-1]} of {key.rsplit(' ', 1)[0]} must share "
                f"one format, got {detail}; choose one format for all of them"
            )
