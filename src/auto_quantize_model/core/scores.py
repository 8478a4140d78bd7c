"""One definition of what a score means and how groups are put in order (pure, no torch).

ModelOpt keys each recipe group ``"<module>.quant_recipe"``, offers ``NONE`` (leave the group
unquantized) as a format of every group, and labels each candidate ``NAME(effective-bits: B)``.
Every reader of scores (state reduction, manifests, validation, the previous tool's files, plots,
health, diff) goes through these, so a spelling accepted in one place is accepted in all, and a
group ranks the same in the manifest, in validation and in every picture of it.

Ranking rules:

* importance of a group = its largest score over the quantized formats (everything but ``NONE``):
  the damage of the worst choice the search could make there. A group with no quantized format
  (e.g. a vision layer kept in 16 bits) has importance 0: quantizing it is not on the table.
* NaN importance (any quantized score NaN) ranks first, ahead of +inf: a score that blew up says
  the quantized layer broke the forward or backward pass, and hiding it at the bottom of a long
  table is the worst place for it.
* ties keep the input order, which is the order the groups sit in the network (ModelOpt lists
  them in module order). This is what Python's stable ``sorted(..., reverse=True)`` gave the
  previous tool, so its manifests (105 zero-score vision groups) come out in exactly its order,
  and it is deterministic because module order is. Sorting ties by name instead would put
  ``layers.10`` before ``layers.2``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

NO_QUANT = "NONE"
"""The format that leaves a group unquantized (16 bits)."""

RECIPE_SUFFIX = ".quant_recipe"
"""ModelOpt's suffix on a recipe group's module name."""

_LABEL = re.compile(r"\s*(?P<name>[^()\s]+)\s*\(\s*effective-bits:\s*(?P<bits>[^()\s]+)\s*\)\s*")


def parse_label(label: str) -> tuple[str, float]:
    """``"INT8_DEFAULT_CFG(effective-bits: 8.0)"`` -> ``("INT8_DEFAULT_CFG", 8.0)``.

    The one spelling both ModelOpt's ``str(recipe)`` and the previous tool's manifests use;
    whitespace around the parts is tolerated, anything else is a ValueError naming the label.
    """
    match = _LABEL.fullmatch(label)
    bits = _float(match["bits"]) if match is not None else None
    if match is None or bits is None:
        raise ValueError(f"unexpected ModelOpt recipe label {label!r}: it is not NAME(effective-bits: B)")
    return match["name"], bits


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def recipe_name(label: str) -> str:
    """The format name of a label (``INT8_DEFAULT_CFG``); a bare name is returned unchanged."""
    match = _LABEL.fullmatch(label)
    return match["name"] if match is not None else label.strip()


def group_name(key: str) -> str:
    """A recipe group's module name without ModelOpt's ``.quant_recipe`` suffix."""
    return key.removesuffix(RECIPE_SUFFIX)


def is_none_format(name: str) -> bool:
    """``NONE`` as ModelOpt names it, also spelled as a label (``NONE(effective-bits: 16.0)``)."""
    return recipe_name(name) == NO_QUANT


def quantized_scores(formats: Sequence[str], scores: Sequence[float]) -> list[float]:
    """The scores of every format but ``NONE``, in the group's order."""
    return [score for name, score in zip(formats, scores, strict=True) if not is_none_format(name)]


def worst(values: Iterable[float]) -> float:
    """The largest value, or NaN when any is NaN (``max`` alone would depend on the order)."""
    found = list(values)
    if not found:
        raise ValueError("no values to take the worst of")
    if any(math.isnan(value) for value in found):
        return math.nan
    return max(found)


def importance(formats: Sequence[str], scores: Sequence[float]) -> float:
    """Largest score over quantized formats; NaN if any of them is NaN; 0 if there is none."""
    quantized = quantized_scores(formats, scores)
    return worst(quantized) if quantized else 0.0


def headline_index(formats: Sequence[str], scores: Sequence[float]) -> int:
    """Index of the format that sets the importance: what a one-format summary shows and what
    validation measures.

    The first quantized format with the importance score (NaN counts as the largest); with no
    quantized format, the first format (``NONE``). For a one-format run this is that format,
    which is what the previous tool's ``num_bits``/``size_cost`` columns showed.
    """
    if not formats:
        raise ValueError("a group without formats has no headline format")
    target = importance(formats, scores)
    for index, (name, score) in enumerate(zip(formats, scores, strict=True)):
        if is_none_format(name):
            continue
        if (math.isnan(target) and math.isnan(score)) or score == target:
            return index
    return 0


def has_quantized_format(formats: Sequence[str]) -> bool:
    """Whether the group offers anything to quantize (a ``NONE``-only group is not scored)."""
    return any(not is_none_format(name) for name in formats)


def _order_key(item: tuple[int, float]) -> tuple[int, float, int]:
    position, value = item
    if math.isnan(value):
        return (0, 0.0, position)
    return (1, -value, position)


def rank_order(values: Sequence[float]) -> list[int]:
    """Positions of ``values`` most sensitive first: NaN first, then descending, ties in input order.

    The tie rule of the manifest, used for predicted importances and measured damage alike.
    """
    return [position for position, _ in sorted(enumerate(values), key=_order_key)]


def ranks(values: Sequence[float]) -> list[int]:
    """Rank of each position under :func:`rank_order` (1 = most sensitive, no gaps, no sharing)."""
    found = [0] * len(values)
    for rank, position in enumerate(rank_order(values), start=1):
        found[position] = rank
    return found


def coefficient_text(value: float) -> str:
    """A correlation as reports and plots print it: three decimals, ``n/a`` when undefined (NaN)."""
    return "n/a" if math.isnan(value) else f"{value:.3f}"
