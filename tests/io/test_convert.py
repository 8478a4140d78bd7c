"""TOML values written by io/convert.py."""

from __future__ import annotations

import math
import tomllib

import pytest

from auto_quantize_model.io.convert import toml_value

# --------------------------------------------------------------------------- back to TOML


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, "true"),
        (3, "3"),
        (8.0, "8.0"),
        (1e-7, "1e-07"),
        (math.inf, "inf"),
        (-math.inf, "-inf"),
        ('a"b\\c\n', '"a\\"b\\\\c\\n"'),
        ("\x01", '"\\u0001"'),
        ([1, "x", [2.5]], '[1, "x", [2.5]]'),
        ({"a.b": 1}, '{ "a.b" = 1 }'),
    ],
)
def test_toml_value(value: object, expected: str) -> None:
    assert toml_value(value) == expected
    assert tomllib.loads(f"v = {expected}")["v"] == value


def test_toml_value_nan() -> None:
    assert math.isnan(tomllib.loads(f"v = {toml_value(math.nan)}")["v"])
