"""The pipeline file's schema (specs.py): ranges, forms and defaults checked when a spec is made."""

from __future__ import annotations

import pytest

from auto_quantize_model.specs import AutoQuantSpec, SpecError

# --------------------------------------------------------------------------- structuring


def test_a_string_is_not_a_tuple_of_formats() -> None:
    with pytest.raises(
        SpecError, match=r"AutoQuantSpec\.formats: expected a tuple of format names, got the str"
    ):
        AutoQuantSpec(formats="INT8_DEFAULT_CFG")
    with pytest.raises(SpecError, match=r"AutoQuantSpec\.disabled_layers: expected a tuple"):
        AutoQuantSpec(disabled_layers="*lm_head*")
    spec = AutoQuantSpec(formats=["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"], disabled_layers=["*lm_head*"])
    assert spec.formats == ("INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG")
    assert spec.disabled_layers == ("*lm_head*",)
