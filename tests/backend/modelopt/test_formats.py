"""ModelOpt configs of the formats: preset names as names, custom formats and options as dicts."""

from __future__ import annotations

import pytest

from auto_quantize_model.backend.modelopt.formats import modelopt_config

# --------------------------------------------------------------------------------------------------
# Against the installed ModelOpt
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_modelopt_config_returns_names_for_presets_and_dicts_for_custom() -> None:
    assert modelopt_config("FP8_DEFAULT_CFG") == "FP8_DEFAULT_CFG"
    custom = modelopt_config("wint8_aint8")
    assert isinstance(custom, dict)
    assert custom["quant_cfg"][1]["cfg"] == {"num_bits": 8, "axis": 0}


# --------------------------------------------------------------------------------------------------
# On a CUDA device (the GPU machine; skipped elsewhere)
# --------------------------------------------------------------------------------------------------


def test_awq_alpha_step_config_is_the_preset_with_its_step() -> None:
    import modelopt.torch.quantization.config as mtq_config

    assert modelopt_config("W4A8_AWQ_BETA_CFG") == "W4A8_AWQ_BETA_CFG"
    config = modelopt_config("W4A8_AWQ_BETA_CFG:alpha_step=0.25")
    assert isinstance(config, dict)
    preset = mtq_config.W4A8_AWQ_BETA_CFG
    assert config["algorithm"] == {"method": "awq_lite", "alpha_step": 0.25}
    assert config["quant_cfg"] == preset["quant_cfg"]
    assert preset["algorithm"] == "awq_lite"  # ModelOpt's own preset untouched
    # ModelOpt accepts it, and its own algorithm config reads the step back
    parsed = mtq_config.QuantizeConfig(**config)
    assert mtq_config.AWQLiteCalibConfig(**parsed.algorithm).alpha_step == 0.25
