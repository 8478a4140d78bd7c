"""The search plan's pure parts: steps, name maps, caption segments, the score-size mask, sizes."""

from __future__ import annotations

from auto_quantize_model.backend.modelopt.plan import plan_steps
from auto_quantize_model.specs import AutoQuantSpec

# --------------------------------------------------------------------------------------------------
# Steps, fingerprint, messages
# --------------------------------------------------------------------------------------------------


def test_sizes_beyond_the_data_are_named_not_clamped_silently() -> None:
    steps = plan_steps((4, 4, 4), AutoQuantSpec(score_size=20, calib_size=8))
    assert (steps.calib_steps, steps.calib_samples, steps.score_steps, steps.score_samples) == (2, 8, 3, 12)
    assert steps.unmet == ("autoquant.score_size 20 exceeds the 12 calibration captions; all 12 were used",)
    assert plan_steps((4, 4), AutoQuantSpec(score_size=8)).unmet == ()
