"""Which groups are sensitive under every format, and which only under some (pure, no torch).

A multi-format run scores every group under each format in one AutoQuant pass, and the manifest's
ranking orders groups by their worst format. That answers "where does quantizing hurt most", not
"does it hurt there whatever the format": a group may top the INT4 list only because INT4 is
harsh everywhere, while another is sensitive under FP8 alone (an outlier channel, say). This
module ranks the groups under each format by that format's own score and compares the top-k
lists: the groups in every list are the ones to keep in high precision whatever is chosen, those
in one list only point at what that format does badly.

Each format's ranking follows the manifest's rules (:func:`~auto_quantize_model.core.scores.rank_order`:
NaN first, ties in the order the groups are given, which for a manifest is its ranking), over the
groups that were scored under that format, so the summary can be made again from a manifest alone.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Protocol

from auto_quantize_model.core.scores import is_none_format, rank_order
from auto_quantize_model.core.stats import spearman
from auto_quantize_model.manifest_records import FormatAgreement, FormatPair, FormatTop, SharedGroup

TOP_SHARE = 0.10
"""The top-k of each format is this share of the scored groups ..."""
TOP_AT_LEAST = 5
"""... but at least this many (every group when there are fewer)."""


class ScoredGroup(Protocol):
    """What the summary needs of a group: a ranked manifest group or a search's group score."""

    @property
    def name(self) -> str: ...

    @property
    def formats(self) -> tuple[str, ...]: ...

    @property
    def scores(self) -> tuple[float, ...]: ...


def default_k(groups: int) -> int:
    """Top 10% of the scored groups, at least 5, at most all of them."""
    return min(groups, max(TOP_AT_LEAST, math.ceil(TOP_SHARE * groups)))


def _formats_in_order(groups: Sequence[ScoredGroup], order: Sequence[str]) -> tuple[str, ...]:
    """The quantized formats of ``groups``: those named in ``order`` first, in that order (the run's
    own, where ModelOpt lists formats by size), then any other in order of first appearance."""
    scored = {name for group in groups for name in group.formats if not is_none_format(name)}
    seen: dict[str, None] = {name: None for name in order if name in scored}
    for group in groups:
        for name in group.formats:
            if not is_none_format(name):
                seen.setdefault(name, None)
    return tuple(seen)


def _scores_under(groups: Sequence[ScoredGroup], fmt: str) -> dict[str, float]:
    """Group name -> its score under ``fmt``, for the groups scored under it, in network order."""
    found: dict[str, float] = {}
    for group in groups:
        if fmt in group.formats:
            found[group.name] = group.scores[group.formats.index(fmt)]
    return found


def format_agreement(
    groups: Sequence[ScoredGroup], k: int | None = None, *, order: Sequence[str] = ()
) -> FormatAgreement | None:
    """Compare the formats' own top-k lists; None when fewer than two formats were scored.

    ``k`` defaults to :func:`default_k` of the groups scored under any format; ``order`` is the
    order to list the formats in (the run's ``autoquant.formats``).
    """
    formats = _formats_in_order(groups, order)
    if len(formats) < 2:
        return None
    by_format = {fmt: _scores_under(groups, fmt) for fmt in formats}
    if k is None:
        k = default_k(len({name for scores in by_format.values() for name in scores}))
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    top: list[FormatTop] = []
    places: dict[str, dict[str, int]] = {}  # group -> {format: its 1-based place in that format's top-k}
    for fmt in formats:
        names = list(by_format[fmt])
        ranked = [names[position] for position in rank_order(list(by_format[fmt].values()))]
        top.append(FormatTop(format=fmt, groups=tuple(ranked[:k]), scored=len(ranked)))
        for place, name in enumerate(ranked[:k], start=1):
            places.setdefault(name, {})[fmt] = place
    every = [name for name, where in places.items() if len(where) == len(formats)]
    every.sort(key=lambda name: (sum(places[name].values()) / len(formats), min(places[name].values())))
    some = [
        SharedGroup(name=name, formats=tuple(f for f in formats if f in where), best_rank=min(where.values()))
        for name, where in places.items()
        if len(where) < len(formats)
    ]
    some.sort(key=lambda group: (-len(group.formats), group.best_rank))
    return FormatAgreement(
        k=k,
        formats=formats,
        top=tuple(top),
        every=tuple(every),
        some=tuple(some),
        pairs=tuple(_pair(a, b, by_format, k, top) for a, b in itertools.combinations(formats, 2)),
    )


def _pair(
    first: str, second: str, by_format: dict[str, dict[str, float]], k: int, top: Sequence[FormatTop]
) -> FormatPair:
    tops = {entry.format: set(entry.groups) for entry in top}
    a, b = by_format[first], by_format[second]
    both = [name for name in a if name in b and math.isfinite(a[name]) and math.isfinite(b[name])]
    rho = spearman([a[name] for name in both], [b[name] for name in both]) if len(both) >= 2 else math.nan
    return FormatPair(first=first, second=second, shared_top=len(tops[first] & tops[second]), spearman=rho)


# --------------------------------------------------------------------------------------------------
# The report's section
# --------------------------------------------------------------------------------------------------


def _code(name: str) -> str:
    return f"`{name}`"


def _rho(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def format_agreement_markdown(summary: FormatAgreement | None) -> list[str]:
    """The report's "Sensitive under every format vs only some" section; empty for one format."""
    if summary is None:
        return []
    k, formats = summary.k, summary.formats
    lines = [
        "",
        "## Sensitive under every format vs only some",
        "",
        f"The top {k} groups under each of the {len(formats)} formats, ranked by that format's own score "
        "(the ranked table below orders groups by their worst format). A group in every list is "
        "sensitive whatever the format; one in a single list points at what that format does badly.",
        "",
        "| Rank | " + " | ".join(_code(fmt) for fmt in formats) + " |",
        "| ---: |" + " --- |" * len(formats),
    ]
    for place in range(k):
        cells = [_code(entry.groups[place]) if place < len(entry.groups) else "" for entry in summary.top]
        lines.append(f"| #{place + 1} | " + " | ".join(cells) + " |")
    every = ", ".join(_code(name) for name in summary.every) or "none"
    lines += ["", f"**In the top {k} under every format ({len(summary.every)}):** {every}", ""]
    if summary.some:
        lines += [
            f"**In the top {k} under some formats only ({len(summary.some)}):**",
            "",
            "| Group | In the top k of | Best rank |",
            "| --- | --- | ---: |",
        ]
        lines += [
            f"| {_code(group.name)} | {', '.join(_code(f) for f in group.formats)} | {group.best_rank} |"
            for group in summary.some
        ]
        lines.append("")
    lines += ["**Unique to one format:**", ""]
    for fmt in formats:
        unique = summary.unique_to(fmt)
        lines.append(f"- {_code(fmt)}: {', '.join(_code(name) for name in unique) or 'none'}")
    lines += [
        "",
        f"| Formats | Shared in the top {k} | Spearman of their scores |",
        "| --- | ---: | ---: |",
    ]
    lines += [
        f"| {_code(pair.first)} vs {_code(pair.second)} | {pair.shared_top} | {_rho(pair.spearman)} |"
        for pair in summary.pairs
    ]
    return lines
