"""Export's per-layer ModelOpt config and the files beside it, built and checked on plain data.

Custom formats build their ModelOpt config without ModelOpt; ModelOpt's own exporter is tested in
backend/modelopt/test_export.py.
"""

from __future__ import annotations

import copy
import fnmatch
import subprocess
import sys
from typing import Any

import pytest

from auto_quantize_model.core import export_config as xc
from auto_quantize_model.core.export_choice import (
    GroupChoice,
)
from auto_quantize_model.core.format_grammar import parse_custom
from auto_quantize_model.errors import ConfigError, InputError


def custom_configs(*names: str) -> dict[str, dict[str, Any]]:
    """ModelOpt configs of custom formats, built without ModelOpt."""
    found: dict[str, dict[str, Any]] = {}
    for name in names:
        spec = parse_custom(name)
        assert spec is not None, name
        found[name] = spec.quant_cfg()
    return found


# --------------------------------------------------------------------------------------------------
# What the exporter can write
# --------------------------------------------------------------------------------------------------


def test_every_chosen_format_that_is_refused_names_group_and_reason() -> None:
    choices = [GroupChoice("a", ("a",), "wfp8_a16")]
    with pytest.raises(
        ConfigError, match=r"^group a: format wfp8_a16 cannot be exported: .*records it as FP8"
    ):
        xc.build_export_config(choices, custom_configs("wfp8_a16"))
    with pytest.raises(ConfigError, match="unknown quantization format 'INT9'"):
        xc.build_export_config([GroupChoice("a", ("a",), "INT9")], {})


# --------------------------------------------------------------------------------------------------
# The config
# --------------------------------------------------------------------------------------------------


def test_config_names_every_quantizer_of_every_chosen_layer_exactly() -> None:
    choices = [
        GroupChoice("l.0.qkv", ("l.0.q_proj", "l.0.k_proj", "l.0.v_proj"), "wint8_aint8"),
        GroupChoice("l.0.o_proj", ("l.0.o_proj",), "NONE"),
        GroupChoice("lm_head", ("lm_head",), "wint4-b128_a16"),
    ]
    configs = custom_configs("wint8_aint8", "wint4-b128_a16")
    config = xc.build_export_config(choices, configs)
    entries = config.quant_config["quant_cfg"]
    assert entries[0] == {"quantizer_name": "*", "enable": False}
    assert config.quant_config["algorithm"] == "max"
    by_name = {e["quantizer_name"]: e for e in entries[1:]}
    for module in ("l.0.q_proj", "l.0.k_proj", "l.0.v_proj"):
        assert by_name[f"{module}.weight_quantizer"]["cfg"] == {"num_bits": 8, "axis": 0}
        assert by_name[f"{module}.input_quantizer"]["cfg"] == {"num_bits": 8, "axis": None}
        assert f"{module}.output_quantizer" not in by_name  # the deny-all keeps it off
    assert by_name["l.0.o_proj.*"] == {"quantizer_name": "l.0.o_proj.*", "enable": False}
    assert by_name["lm_head.weight_quantizer"]["cfg"]["block_sizes"] == {-1: 128, "type": "static"}
    assert "lm_head.input_quantizer" not in by_name  # weight-only: the input quantizer stays off
    assert [(x.module, x.format, x.label) for x in config.layers] == [
        ("l.0.q_proj", "wint8_aint8", "W8A8_SQ_PER_CHANNEL"),
        ("l.0.k_proj", "wint8_aint8", "W8A8_SQ_PER_CHANNEL"),
        ("l.0.v_proj", "wint8_aint8", "W8A8_SQ_PER_CHANNEL"),
        ("l.0.o_proj", "NONE", None),
        ("lm_head", "wint4-b128_a16", "W4A16_AWQ"),
    ]
    # Each entry matches exactly its own quantizer, and the config reads back as the choice.
    for pattern in by_name:
        assert fnmatch.fnmatchcase(pattern.replace("*", "weight_quantizer"), pattern)
        assert not fnmatch.fnmatchcase("l.0.q_proj_extra.weight_quantizer", pattern)
    assert xc.config_mismatches(config.quant_config, config, configs, other_modules=["l.1.q_proj"]) == ()


def test_literal_pattern_matches_only_the_name_itself() -> None:
    name = "blocks[0].attn*?.proj"
    pattern = xc.literal_pattern(name)
    assert fnmatch.fnmatchcase(name, pattern)
    assert not fnmatch.fnmatchcase("blocks0.attnXY.proj", pattern)
    assert xc.literal_pattern("model.layers.0.q_proj") == "model.layers.0.q_proj"


def test_a_quantized_vision_layer_is_refused() -> None:
    choices = [
        GroupChoice("model.visual.blocks.0.attn.qkv", ("model.visual.blocks.0.attn.qkv",), "wint8_aint8")
    ]
    with pytest.raises(ConfigError, match=r"in the vision tower \(model\.visual\).*choose NONE"):
        xc.build_export_config(choices, custom_configs("wint8_aint8"), vision_prefixes=("model.visual",))


def test_calibration_is_the_one_algorithm_of_the_chosen_formats() -> None:
    configs = custom_configs("wint8_aint8")
    configs["INT8_SMOOTHQUANT_CFG"] = {
        **custom_configs("wint8_aint8")["wint8_aint8"],
        "algorithm": "smoothquant",
    }
    configs["INT4_AWQ_CFG"] = {
        **custom_configs("wint4-b128_a16")["wint4-b128_a16"],
        "algorithm": {"method": "awq_lite"},
    }
    configs["NVFP4_FOUR_OVER_SIX_CFG"] = {
        **custom_configs("wint4-b128_a16")["wint4-b128_a16"],
        "algorithm": "mse",
    }
    smooth = xc.build_export_config([GroupChoice("a", ("a",), "INT8_SMOOTHQUANT_CFG")], configs)
    assert (smooth.algorithm, smooth.quant_config["algorithm"]) == ("smoothquant", "smoothquant")
    awq = xc.build_export_config([GroupChoice("a", ("a",), "INT4_AWQ_CFG")], configs)
    assert (awq.algorithm, awq.quant_config["algorithm"]) == ("awq_lite", {"method": "awq_lite"})
    mixed = [GroupChoice("a", ("a",), "wint8_aint8"), GroupChoice("b", ("b",), "INT8_SMOOTHQUANT_CFG")]
    with pytest.raises(
        ConfigError,
        match=r"calibrate differently \(wint8_aint8 with max; INT8_SMOOTHQUANT_CFG "
        r"with smoothquant\).*not supported yet",
    ):
        xc.build_export_config(mixed, configs)
    with pytest.raises(ConfigError, match=r"cannot be exported: it calibrates .* with mse, which export"):
        xc.build_export_config([GroupChoice("a", ("a",), "NVFP4_FOUR_OVER_SIX_CFG")], configs)


@pytest.mark.parametrize(
    ("choices", "message"),
    [
        ([], "holds no recipe group"),
        ([GroupChoice("a", ("a",), "NONE")], "every group of the choice is NONE"),
        (
            [GroupChoice("a", ("a",), "wint8_aint8"), GroupChoice("a", ("b",), "NONE")],
            "group a is chosen twice",
        ),
        (
            [GroupChoice("a", ("x",), "wint8_aint8"), GroupChoice("b", ("x",), "NONE")],
            "module x is in groups a and b",
        ),
        ([GroupChoice("a", (), "wint8_aint8")], "group a lists no module"),
        ([GroupChoice("a", ("a",), "wfp8_afp8")], "no ModelOpt config was given for format wfp8_afp8"),
    ],
)
def test_malformed_choices_are_refused(choices: list[GroupChoice], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        xc.build_export_config(choices, custom_configs("wint8_aint8"))


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def small_config() -> tuple[xc.ExportConfig, dict[str, dict[str, Any]]]:
    configs = custom_configs("wint8_aint8", "wint4-b128_a16", "wfp8-pc_afp8-token")
    choices = [
        GroupChoice("l.0.q_proj", ("l.0.q_proj", "l.0.k_proj", "l.0.v_proj"), "wint8_aint8"),
        GroupChoice("l.0.mlp.down_proj", ("l.0.mlp.down_proj",), "wfp8-pc_afp8-token"),
        GroupChoice("l.0.o_proj", ("l.0.o_proj",), "NONE"),
        GroupChoice("lm_head", ("lm_head",), "wint4-b128_a16"),
    ]
    return xc.build_export_config(choices, configs), configs


def test_json_reads_back_with_integer_block_keys_and_as_the_choice() -> None:
    config, configs = small_config()
    text = xc.quant_config_json(config)
    assert '"-1": 128' in text  # what JSON can hold ...
    parsed = xc.read_quant_config(text)
    head = next(e for e in parsed["quant_cfg"] if e["quantizer_name"] == "lm_head.weight_quantizer")
    assert head["cfg"]["block_sizes"] == {-1: 128, "type": "static"}  # ... and what ModelOpt needs
    down = next(e for e in parsed["quant_cfg"] if e["quantizer_name"] == "l.0.mlp.down_proj.input_quantizer")
    assert down["cfg"]["block_sizes"] == {-1: None}
    assert xc.config_mismatches(parsed, config, configs) == ()


def test_a_tampered_config_is_reported_quantizer_by_quantizer() -> None:
    config, configs = small_config()
    parsed = xc.read_quant_config(xc.quant_config_json(config))
    for entry in parsed["quant_cfg"]:
        if entry["quantizer_name"] == "l.0.k_proj.weight_quantizer":
            entry["cfg"] = {"num_bits": 4, "axis": 0}
    parsed["quant_cfg"].append({"quantizer_name": "l.0.o_proj.input_quantizer", "cfg": {"num_bits": 8}})
    parsed["quant_cfg"].append({"quantizer_name": "l.0.mlp.down_proj.input_quantizer", "enable": False})
    problems = xc.config_mismatches(parsed, config, configs, other_modules=["l.1.q_proj"])
    assert len(problems) == 3
    assert problems[0].startswith('l.0.k_proj.weight_quantizer is configured {"axis": 0, "num_bits": 4}')
    assert (
        problems[1]
        == "l.0.mlp.down_proj.input_quantizer is disabled, but wfp8-pc_afp8-token has it the other way"
    )
    assert problems[2] == "l.0.o_proj.input_quantizer is enabled, but l.0.o_proj is NONE"
    parsed["algorithm"] = "smoothquant"
    assert xc.config_mismatches(parsed, config, configs)[0] == "algorithm is 'smoothquant', expected 'max'"


@pytest.mark.parametrize(
    ("text", "message"), [("{", "not JSON"), ('{"algorithm": "max"}', "'quant_cfg' list")]
)
def test_unreadable_quant_config_json_is_an_input_error(text: str, message: str) -> None:
    with pytest.raises(InputError, match=f"^q.json: .*{message}"):
        xc.read_quant_config(text, "q.json")


def test_recipe_yaml_is_modelopts_ptq_recipe_shape() -> None:
    yaml: Any = pytest.importorskip("yaml")
    config, _ = small_config()
    text = xc.recipe_yaml(config, description="it's a test")
    recipe = yaml.safe_load(text)
    assert recipe["metadata"] == {"recipe_type": "ptq", "description": "it's a test"}
    assert recipe["quantize"]["algorithm"] == "max"
    assert recipe["quantize"]["quant_cfg"] == xc.json_ready(config.quant_config["quant_cfg"])
    head = next(
        e for e in recipe["quantize"]["quant_cfg"] if e["quantizer_name"] == "lm_head.weight_quantizer"
    )
    assert head["cfg"]["block_sizes"] == {-1: 128, "type": "static"}  # YAML keeps the integer key


# --------------------------------------------------------------------------------------------------
# The checkpoint's record
# --------------------------------------------------------------------------------------------------


def test_mixed_precision_record_must_list_exactly_the_chosen_layers() -> None:
    config, _ = small_config()
    layers = {
        "l.0.q_proj": {"quant_algo": "W8A8_SQ_PER_CHANNEL"},
        "l.0.k_proj": {"quant_algo": "W8A8_SQ_PER_CHANNEL"},
        "l.0.v_proj": {"quant_algo": "W8A8_SQ_PER_CHANNEL"},
        "l.0.mlp.down_proj": {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN"},
        "lm_head": {"quant_algo": "W4A16_AWQ", "group_size": 128, "pre_quant_scale": True},
    }
    record: dict[str, Any] = {"quantization": {"quant_algo": "MIXED_PRECISION", "quantized_layers": layers}}
    assert xc.checkpoint_mismatches(record, config) == ()
    bad = copy.deepcopy(record)
    bad_layers: dict[str, Any] = bad["quantization"]["quantized_layers"]
    bad_layers["l.0.v_proj"] = {"quant_algo": "FP8"}
    bad_layers["lm_head"]["group_size"] = 64
    bad_layers["l.0.o_proj"] = {"quant_algo": "FP8"}
    bad_layers["l.7.o_proj"] = {"quant_algo": "FP8"}
    del bad_layers["l.0.k_proj"]
    assert xc.checkpoint_mismatches(bad, config) == (
        "l.0.k_proj (wint8_aint8) is missing from quantized_layers",
        "l.0.v_proj is recorded as FP8, wint8_aint8 is W8A8_SQ_PER_CHANNEL",
        "l.0.o_proj is recorded as FP8, but it is NONE",
        "lm_head has group_size 64, wint4-b128_a16 uses 128",
        "l.7.o_proj is recorded as quantized but was not chosen",
    )


def test_single_format_record_must_exclude_exactly_the_none_layers() -> None:
    configs = custom_configs("wint8_aint8")
    choices = [
        GroupChoice("m.layers.0.q_proj", ("m.layers.0.q_proj",), "wint8_aint8"),
        GroupChoice("m.layers.0.o_proj", ("m.layers.0.o_proj",), "NONE"),
        GroupChoice("lm_head", ("lm_head",), "NONE"),
    ]
    config = xc.build_export_config(choices, configs)
    good = {
        "quantization": {"quant_algo": "W8A8_SQ_PER_CHANNEL", "exclude_modules": ["m.layers.0.o*", "lm_head"]}
    }
    assert xc.checkpoint_mismatches(good, config) == ()
    bad = {"quantization": {"quant_algo": "FP8", "exclude_modules": ["m.layers.0.*"]}}
    assert xc.checkpoint_mismatches(bad, config) == (
        "quant_algo is 'FP8', the chosen formats are ['W8A8_SQ_PER_CHANNEL']",
        "m.layers.0.q_proj (wint8_aint8) is in exclude_modules",
        "lm_head is NONE but not in exclude_modules",
    )
    assert xc.checkpoint_mismatches({}, config) == ("hf_quant_config.json has no 'quantization' section",)


def test_readme_says_what_each_file_is_and_how_to_load_it() -> None:
    config, _ = small_config()
    text = xc.readme_text(config, checkpoint=True, notes=("lm_head untied",))
    for needle in (
        "quant_config.json",
        "quant_recipe.yaml",
        "hf_quant_config.json",
        "load_exported",
        "read_quant_config",
        "load_recipe",
        "mtq.quantize",
        "TensorRT-LLM",
        "- lm_head untied",
        "| `wint8_aint8` | 1 | W8A8_SQ_PER_CHANNEL |",
        "| `NONE` | 1 | not quantized |",
    ):
        assert needle in text, needle
    config_only = xc.readme_text(config, checkpoint=False)
    assert "load_exported" not in config_only
    assert "hf_quant_config.json" not in config_only


def test_the_pure_module_imports_no_torch_or_modelopt() -> None:
    code = (
        "import sys, auto_quantize_model.core.export_config\n"
        "print(sorted(m for m in ('torch', 'transformers', 'modelopt') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
