"""Effective bits, the model constraint and unquantized weights in ModelOpt's cost units (core/bits.py)."""

from __future__ import annotations

import pytest

from auto_quantize_model.core.bits import effective_bits, model_constraint, unquantized_weights
from auto_quantize_model.errors import InputError
from builders import NONE, group, int8

# --------------------------------------------------------------------------------------------------
# The model constraint
# --------------------------------------------------------------------------------------------------


def test_model_constraint_holds_the_lm_at_its_target() -> None:
    lm, vision = 300, 100
    constraint = model_constraint(6.0, lm, vision)
    assert constraint == pytest.approx(8.5)
    # the LM at exactly 6 bits and the vision at 16 spend exactly the whole-model budget
    assert (6.0 * lm + 16.0 * vision) / (lm + vision) == pytest.approx(constraint)
    assert model_constraint(6.0, lm, 0) == 6.0
    assert model_constraint(16.0, lm, vision) == 16.0


# --------------------------------------------------------------------------------------------------
# In ModelOpt's cost units
# --------------------------------------------------------------------------------------------------


def test_model_constraint_is_the_same_float_for_the_runs_counts_and_the_frontiers() -> None:
    # RunAutoQuant passes integer weight counts, the frontier floats: the budgets must agree exactly
    for bits, lm, other in ((11.0, 106_496, 0), (12.0, 106_496, 113_152), (4.25, 3_000_000_017, 400_000_001)):
        assert model_constraint(bits, float(lm), float(other)) == model_constraint(bits, lm, other)
    assert model_constraint(8.0, 3, 1) == 10.0  # 3 LM weights at 8 bits and 1 vision weight at 16
    with pytest.raises(InputError, match="no weights"):
        model_constraint(8.0, 0.0, 0.0)


def test_unquantized_weights_and_effective_bits_follow_modelopts_cost_units() -> None:
    with_none = group("a", int8(1.0), NONE, costs=(50.0, 120.0))
    assert unquantized_weights(with_none) == 120.0  # the NONE cost, not the 100 INT8's cost implies
    without_none = group("b", int8(1.0), costs=(50.0,))
    assert unquantized_weights(without_none) == 100.0  # 50 at 8 bits is 100 weights
    assert effective_bits(50.0, 100.0) == 8.0
    assert effective_bits(62.5, 200.0) == 5.0
