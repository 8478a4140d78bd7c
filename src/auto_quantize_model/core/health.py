"""Checks that say whether a set of sensitivity scores can be trusted before anyone reads a ranking.

AutoQuant's scores are a gradient proxy; when something upstream goes wrong (a layer outside the
loss graph, overflow in half precision, too few calibration tokens) the ranking still renders, it
just means nothing. These checks catch the symptoms that show in the numbers themselves:

* non-finite scores (NaN/Inf) — the ranking order of such a group is arbitrary;
* groups scored exactly 0 — usually a module the loss never reached (vision layers under an
  LM-only loss did exactly that in the previous tool), not a harmless layer;
* exact ties among non-zero importances — two independent gradient sums agreeing to the last bit
  points at duplicated or shared weights, or a group scored through another group's hook;
* scores non-monotone in bits — within a group, a format with fewer bits scoring lower than one
  with more bits. Between formats of one kind this is a bug symptom; across kinds (4-bit
  weight-only against 8-bit weights *and* activations) it can be real, so read it as a warning.
  ``NONE`` (16 bits) scores 0, so a negative score is caught here too.

Groups with no quantized format at all (kept in full precision by construction) are listed apart:
they are not scored, so they are not "scored 0".
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol

import attrs

from auto_quantize_model.core.scores import NO_QUANT, importance, is_none_format, quantized_scores

NONE_BITS = 16.0
"""What an unquantized module costs and scores when the manifest does not list ``NONE`` itself."""

LISTED_NAMES = 8
"""Names shown per check in Markdown before the list is cut to "… and N more"."""


class ScoredGroup(Protocol):
    """What the checks read; both :class:`~auto_quantize_model.manifest_records.RankedGroup` and
    :class:`~auto_quantize_model.artifacts.GroupScore` fit, so health runs before ranking too."""

    @property
    def name(self) -> str: ...
    @property
    def formats(self) -> tuple[str, ...]: ...
    @property
    def bits(self) -> tuple[float, ...]: ...
    @property
    def scores(self) -> tuple[float, ...]: ...


@attrs.frozen
class NonFinite:
    group: str
    format: str
    score: float


@attrs.frozen
class Tie:
    """Groups whose importance is bit-for-bit identical (and not zero)."""

    importance: float
    groups: tuple[str, ...]


@attrs.frozen
class NonMonotone:
    """Within ``group``, ``fewer_bits_format`` scored lower than ``more_bits_format``."""

    group: str
    fewer_bits_format: str
    fewer_bits: float
    fewer_bits_score: float
    more_bits_format: str
    more_bits: float
    more_bits_score: float


@attrs.frozen
class ScoreHealth:
    """Result of :func:`score_health`; every tuple keeps the input (rank) order."""

    groups: int
    non_finite: tuple[NonFinite, ...]
    zero: tuple[str, ...]
    """Groups whose every quantized format scored exactly 0."""
    ties: tuple[Tie, ...]
    non_monotone: tuple[NonMonotone, ...]
    unquantized: tuple[str, ...]
    """Groups offering no quantized format (only ``NONE``): not scored, listed for completeness."""

    @property
    def non_finite_groups(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(item.group for item in self.non_finite))

    @property
    def tied_groups(self) -> tuple[str, ...]:
        return tuple(name for tie in self.ties for name in tie.groups)

    @property
    def non_monotone_groups(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(item.group for item in self.non_monotone))

    @property
    def ok(self) -> bool:
        """No symptom found (groups without a quantized format are not a symptom)."""
        return not (self.non_finite or self.zero or self.ties or self.non_monotone)


def _with_reference(group: ScoredGroup) -> list[tuple[str, float, float]]:
    """(format, bits, score) triples, plus ``NONE`` at 16 bits scoring 0 when the group omits it."""
    triples = list(zip(group.formats, group.bits, group.scores, strict=True))
    if not any(is_none_format(f) for f in group.formats):
        triples.append((NO_QUANT, NONE_BITS, 0.0))
    return triples


def _non_monotone(group: ScoredGroup) -> list[NonMonotone]:
    found = []
    triples = _with_reference(group)
    for fewer_format, fewer_bits, fewer_score in triples:
        for more_format, more_bits, more_score in triples:
            # NaN compares False both ways, so non-finite scores are left to their own check.
            if fewer_bits < more_bits and fewer_score < more_score:
                found.append(
                    NonMonotone(
                        group.name, fewer_format, fewer_bits, fewer_score, more_format, more_bits, more_score
                    )
                )
    found.sort(key=lambda item: (item.fewer_bits, item.more_bits))
    return found


def score_health(groups: Sequence[ScoredGroup]) -> ScoreHealth:
    """Run every check over ``groups`` (scores as AutoQuant reported them).

    Importance is recomputed by the manifest's rule (:mod:`auto_quantize_model.core.scores`), so
    the checks also work on raw :class:`~auto_quantize_model.artifacts.GroupScore` values.
    """
    non_finite: list[NonFinite] = []
    zero: list[str] = []
    unquantized: list[str] = []
    non_monotone: list[NonMonotone] = []
    by_importance: defaultdict[float, list[str]] = defaultdict(list)
    for group in groups:
        non_finite.extend(
            NonFinite(group.name, f, s)
            for f, s in zip(group.formats, group.scores, strict=True)
            if not math.isfinite(s)
        )
        non_monotone.extend(_non_monotone(group))
        quantized = quantized_scores(group.formats, group.scores)
        if not quantized:
            unquantized.append(group.name)
            continue
        if not all(math.isfinite(s) for s in quantized):
            continue
        value = importance(group.formats, group.scores)
        if value == 0.0:
            zero.append(group.name)
        else:
            by_importance[value].append(group.name)
    ties = tuple(Tie(value, tuple(names)) for value, names in by_importance.items() if len(names) > 1)
    return ScoreHealth(
        groups=len(groups),
        non_finite=tuple(non_finite),
        zero=tuple(zero),
        ties=ties,
        non_monotone=tuple(non_monotone),
        unquantized=tuple(unquantized),
    )


def _listing(items: Sequence[str], limit: int = LISTED_NAMES) -> str:
    shown = ", ".join(items[:limit])
    rest = len(items) - limit
    return f"{shown}, … and {rest} more" if rest > 0 else shown


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def render_health_markdown(health: ScoreHealth, level: int = 2) -> str:
    """A short Markdown section: one bullet per check, offending groups named (long lists cut)."""
    lines = [f"{'#' * level} Score health", ""]
    if health.ok:
        lines += [f"All {health.groups} groups passed every check.", ""]

    if health.non_finite:
        entries = [f"`{i.group}` ({i.format}: {i.score})" for i in health.non_finite]
        lines.append(
            f"- **Non-finite scores (NaN/Inf):** {_plural(len(health.non_finite_groups), 'group')}, "
            f"their rank is meaningless — {_listing(entries)}"
        )
    else:
        lines.append("- Non-finite scores (NaN/Inf): none")

    if health.zero:
        entries = [f"`{name}`" for name in health.zero]
        lines.append(
            f"- **Groups scored 0:** {_plural(len(health.zero), 'group')}, usually outside the loss "
            f"graph rather than harmless — {_listing(entries)}"
        )
    else:
        lines.append("- Groups scored 0: none")

    if health.ties:
        entries = [
            f"{tie.importance:.6g}: " + " = ".join(f"`{g}`" for g in tie.groups) for tie in health.ties
        ]
        lines.append(
            f"- **Exact ties among non-zero importances:** {_plural(len(health.ties), 'set')} over "
            f"{_plural(len(health.tied_groups), 'group')} — {_listing(entries, limit=4)}"
        )
    else:
        lines.append("- Exact ties among non-zero importances: none")

    if health.non_monotone:
        entries = [
            f"`{i.group}` ({i.fewer_bits_format} at {i.fewer_bits:g} bits: {i.fewer_bits_score:.4g} < "
            f"{i.more_bits_format} at {i.more_bits:g} bits: {i.more_bits_score:.4g})"
            for i in health.non_monotone
        ]
        lines.append(
            f"- **Scores non-monotone in bits:** {_plural(len(health.non_monotone_groups), 'group')} "
            f"where fewer bits scored less damage — {_listing(entries, limit=4)}"
        )
    else:
        lines.append("- Scores non-monotone in bits: none")

    if health.unquantized:
        lines.append(
            f"- Not scored (no quantized format, kept in full precision): "
            f"{_plural(len(health.unquantized), 'group')} — "
            f"{_listing([f'`{name}`' for name in health.unquantized], limit=3)}"
        )
    return "\n".join(lines) + "\n"
