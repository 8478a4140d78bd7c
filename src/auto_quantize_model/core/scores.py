"""One definition of the names ModelOpt's search results are spelled in (pure, no torch).

ModelOpt keys each recipe group ``"<module>.quant_recipe"``, offers ``NONE`` (leave the group
unquantized) as a format of every group, and labels each candidate ``NAME(effective-bits: B)``.
Every reader of scores (state reduction, manifests, validation, the previous tool's files) goes
through these, so a spelling accepted in one place is accepted in all.
"""

from __future__ import annotations

import re

NO_QUANT = "NONE"
"""The format that leaves a group unquantized (16 bits)."""

RECIPE_SUFFIX = ".quant_recipe"
"""ModelOpt's suffix on a recipe group's module name."""

_LABEL = re.compile(r"^(?P<name>.*?)\s*\(effective-bits:\s*(?P<bits>[^()]*)\)\s*$")


def parse_label(label: str) -> tuple[str, float]:
    """``"INT8_DEFAULT_CFG(effective-bits: 8.0)"`` -> ``("INT8_DEFAULT_CFG", 8.0)``."""
    match = _LABEL.match(label)
    if match is None:
        raise ValueError(f"unexpected ModelOpt recipe label {label!r}")
    return match["name"], float(match["bits"])
