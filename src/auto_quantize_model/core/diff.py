"""What changed between two rankings: INT8 vs FP8, 128 vs 512 captions, gradient vs kl_div.

Choices, and why:

* **Matching names.** Groups are matched on their name without ModelOpt's ``.quant_recipe``
  suffix and without a leading ``model.``. The previous tool's older manifests say
  ``language_model.layers.0.mlp.down_proj`` where newer runs say
  ``model.language_model.layers.0.mlp.down_proj``, and ``lm_head`` never has the prefix, so
  stripping it on both sides pairs them all. If stripping would merge two groups of one run
  (a model with both ``model.x`` and ``x``), that run's names are matched exactly instead.
* **What is compared.** Only groups offering a quantized format: a group listed with ``NONE``
  alone (the previous tool lists the vision tower that way) has no score, and 105 such groups
  tied at zero on both sides would inflate any rank correlation. They are counted, not ranked.
* **Ranks.** Correlations, top-k and moves all use ranks *within the groups present in both
  runs* (by importance, ties in manifest order), so a group found in one run only does not
  shift every rank below it. Groups found in one run only are listed apart.
* **Correlations** are computed on the importances (Spearman with average ranks for ties,
  Kendall τ-b), not on the manifest's tie-broken ranks. A NaN importance makes them NaN.

Pure: finding and reading the two manifests is :mod:`auto_quantize_model.app.diff`'s job.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs

from auto_quantize_model.core.scores import coefficient_text, group_name, has_quantized_format
from auto_quantize_model.core.stats import kendall_tau_b, spearman, top_k_shared

if TYPE_CHECKING:
    from auto_quantize_model.manifest_records import Manifest, RankedGroup

LISTED_ONLY = 20
"""Groups present in one run only, listed by name in Markdown before the list is cut."""


@attrs.frozen
class TopKOverlap:
    k: int
    shared: int
    """Groups in the top ``size`` of both runs."""
    size: int
    """``k``, or fewer when fewer groups are common to both runs."""

    @property
    def fraction(self) -> float:
        return self.shared / self.size if self.size else math.nan


@attrs.frozen
class RankMove:
    name: str
    """The group's name in run A."""
    rank_a: int
    rank_b: int
    importance_a: float
    importance_b: float

    @property
    def delta(self) -> int:
        """Positive: the group ranks lower (less sensitive) in B than in A."""
        return self.rank_b - self.rank_a


@attrs.frozen
class ManifestDiff:
    common: int
    """Groups ranked in both runs; every rank below is out of this many."""
    spearman: float
    kendall: float
    top_k: tuple[TopKOverlap, ...]
    moved: tuple[RankMove, ...]
    """The largest rank changes, largest first (ties: the more sensitive group first)."""
    only_a: tuple[str, ...]
    only_b: tuple[str, ...]
    unranked_a: int
    """Groups of A with no quantized format (``NONE`` only), left out of every comparison."""
    unranked_b: int
    names_normalised: bool
    """True when names were matched without a leading ``model.`` (see the module docstring)."""


def _stripped(name: str) -> str:
    return group_name(name).removeprefix("model.")


def _ranked(manifest: Manifest) -> tuple[list[RankedGroup], int]:
    """Groups with a quantized format, most sensitive first, and how many were left out."""
    ordered = sorted(manifest.groups, key=lambda g: g.rank)
    ranked = [g for g in ordered if has_quantized_format(g.formats)]
    return ranked, len(ordered) - len(ranked)


def _keyed(groups: Sequence[RankedGroup], strip: bool) -> dict[str, RankedGroup]:
    key = _stripped if strip else group_name
    return {key(g.name): g for g in groups}


def _can_strip(groups: Sequence[RankedGroup]) -> bool:
    return len({_stripped(g.name) for g in groups}) == len(groups)


def diff_manifests(
    a: Manifest, b: Manifest, ks: Sequence[int] = (10, 25, 50), moved: int = 15
) -> ManifestDiff:
    """Compare the rankings of two manifests (ours or the previous tool's, in any mix)."""
    ranked_a, unranked_a = _ranked(a)
    ranked_b, unranked_b = _ranked(b)
    strip = _can_strip(ranked_a) and _can_strip(ranked_b)
    by_key_a = _keyed(ranked_a, strip)
    by_key_b = _keyed(ranked_b, strip)

    common_a = [key for key in by_key_a if key in by_key_b]  # A's rank order
    common_b = [key for key in by_key_b if key in by_key_a]  # B's rank order
    rank_in_b = {key: i + 1 for i, key in enumerate(common_b)}

    importance_a = [by_key_a[key].importance for key in common_a]
    importance_b = [by_key_b[key].importance for key in common_a]

    top_k = tuple(TopKOverlap(k, top_k_shared(common_a, common_b, k), min(k, len(common_a))) for k in ks)
    moves = [
        RankMove(
            by_key_a[key].name, i + 1, rank_in_b[key], by_key_a[key].importance, by_key_b[key].importance
        )
        for i, key in enumerate(common_a)
        if rank_in_b[key] != i + 1
    ]
    moves.sort(key=lambda m: (-abs(m.delta), min(m.rank_a, m.rank_b), m.rank_a))
    return ManifestDiff(
        common=len(common_a),
        spearman=spearman(importance_a, importance_b),
        kendall=kendall_tau_b(importance_a, importance_b),
        top_k=top_k,
        moved=tuple(moves[:moved]),
        only_a=tuple(g.name for key, g in by_key_a.items() if key not in by_key_b),
        only_b=tuple(g.name for key, g in by_key_b.items() if key not in by_key_a),
        unranked_a=unranked_a,
        unranked_b=unranked_b,
        names_normalised=strip,
    )


def _only_section(title: str, names: Sequence[str]) -> list[str]:
    if not names:
        return [f"**{title}:** none", ""]
    shown = ", ".join(f"`{name}`" for name in names[:LISTED_ONLY])
    rest = len(names) - LISTED_ONLY
    return [f"**{title} ({len(names)}):** {shown}" + (f", … and {rest} more" if rest > 0 else ""), ""]


def render_diff_markdown(diff: ManifestDiff, label_a: str, label_b: str, level: int = 2) -> str:
    """The diff as a Markdown section (heading level ``level``), ready for a README or a PR."""
    h = "#" * level
    matching = (
        "names matched without a leading `model.`" if diff.names_normalised else "names matched exactly"
    )
    lines = [
        f"{h} Ranking diff: {label_a} (A) vs {label_b} (B)",
        "",
        f"{diff.common} groups are ranked in both runs ({matching}); every rank below is among those "
        f"{diff.common}, 1 = most sensitive.",
    ]
    if diff.unranked_a or diff.unranked_b:
        lines.append(
            f"Groups with no quantized format (not scored) are left out: {diff.unranked_a} in A, "
            f"{diff.unranked_b} in B."
        )
    lines += ["", "| measure | value |", "| :--- | ---: |"]
    lines.append(f"| Spearman rho (importance) | {coefficient_text(diff.spearman)} |")
    lines.append(f"| Kendall tau-b (importance) | {coefficient_text(diff.kendall)} |")
    for overlap in diff.top_k:
        share = "n/a" if math.isnan(overlap.fraction) else f"{overlap.fraction:.0%}"
        lines.append(f"| top-{overlap.k} overlap | {overlap.shared}/{overlap.size} ({share}) |")
    lines.append("")

    lines.append(f"{h}# Groups that moved most")
    lines.append("")
    if diff.moved:
        lines += [
            "| group | rank A | rank B | change | importance A | importance B |",
            "| :--- | ---: | ---: | ---: | ---: | ---: |",
        ]
        lines += [
            f"| `{m.name}` | {m.rank_a} | {m.rank_b} | {m.delta:+d} | {m.importance_a:.3e} | "
            f"{m.importance_b:.3e} |"
            for m in diff.moved
        ]
        lines += ["", "A positive change means the group is less sensitive in B than in A.", ""]
    else:
        lines += ["No group changed rank.", ""]

    lines.append(f"{h}# Groups in one run only")
    lines.append("")
    lines += _only_section(f"Only in {label_a}", diff.only_a)
    lines += _only_section(f"Only in {label_b}", diff.only_b)
    return "\n".join(lines).rstrip("\n") + "\n"
