"""How a number or a missing value reads in a report's Markdown, the same in every section."""

from __future__ import annotations

import math

NOT_AVAILABLE = "n/a"
"""What a table shows for a figure that was not recorded or not computed."""


def number(value: float | None, spec: str = ".4e") -> str:
    """``value`` formatted by ``spec``; :data:`NOT_AVAILABLE` for None, and NaN/inf spelled out."""
    if value is None:
        return NOT_AVAILABLE
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return format(value, spec)
