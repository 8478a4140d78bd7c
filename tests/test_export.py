"""Export: the per-layer ModelOpt config, the Hugging Face checkpoint, and reading both back.

The pure builder and checks are tested on plain data (custom formats build their ModelOpt config
without ModelOpt). The ModelOpt side runs on CPU with the tiny Qwen3-VL: INT8/FP8/INT4 mixes are
quantized, exported by ModelOpt's own exporter and loaded back; NVFP4 needs CUDA (``gpu`` test).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from auto_quantize_model.core import export_config as xc
from auto_quantize_model.core.export_choice import (
    GroupChoice,
    check_fused_siblings,
    choices_at,
    choices_from_groups,
)
from auto_quantize_model.core.export_labels import export_format
from auto_quantize_model.core.format_grammar import parse_custom
from auto_quantize_model.errors import AqmError, ConfigError, InputError
from auto_quantize_model.frontier_records import Frontier, FrontierPoint
from builders import FP8, INT8, fp8, group, int8

LAYERS = "model.language_model.layers"


def custom_configs(*names: str) -> dict[str, dict[str, Any]]:
    """ModelOpt configs of custom formats, built without ModelOpt."""
    found: dict[str, dict[str, Any]] = {}
    for name in names:
        spec = parse_custom(name)
        assert spec is not None, name
        found[name] = spec.quant_cfg()
    return found


def layer_choices(attention: str, mlp: str, head: str, layers: int = 4) -> list[GroupChoice]:
    """ModelOpt's recipe groups of the tiny Qwen3-VL (q/k/v and gate/up together) on three formats;
    odd layers' o_proj stays NONE so every mix has unquantized layers too."""
    choices: list[GroupChoice] = []
    for i in range(layers):
        attn = f"{LAYERS}.{i}.self_attn"
        mlp_path = f"{LAYERS}.{i}.mlp"
        choices += [
            GroupChoice(f"{attn}.q_proj", (f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"), attention),
            GroupChoice(f"{attn}.o_proj", (f"{attn}.o_proj",), "NONE" if i % 2 else attention),
            GroupChoice(f"{mlp_path}.gate_proj", (f"{mlp_path}.gate_proj", f"{mlp_path}.up_proj"), mlp),
            GroupChoice(f"{mlp_path}.down_proj", (f"{mlp_path}.down_proj",), mlp),
        ]
    choices.append(GroupChoice("lm_head", ("lm_head",), head))
    return choices


# --------------------------------------------------------------------------------------------------
# What the exporter can write
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "label", "group_size"),
    [
        ("INT8_DEFAULT_CFG", "W8A8_SQ_PER_CHANNEL", None),
        ("wint8_aint8", "W8A8_SQ_PER_CHANNEL", None),
        ("INT8_SMOOTHQUANT_CFG", "W8A8_SQ_PER_CHANNEL", None),
        ("INT8_WEIGHT_ONLY_CFG", "W8A16", None),
        ("FP8_DEFAULT_CFG", "FP8", None),
        ("wfp8-pc_afp8-token", "FP8_PER_CHANNEL_PER_TOKEN", None),
        ("INT4_AWQ_CFG", "W4A16_AWQ", 128),
        ("wint4-b64_a16", "W4A16_AWQ", 64),
        ("NVFP4_DEFAULT_CFG", "NVFP4", 16),
    ],
)
def test_export_format_gives_the_exporters_per_layer_label(
    name: str, label: str, group_size: int | None
) -> None:
    found = export_format(name)
    assert (found.label, found.group_size, found.refused) == (label, group_size, None)
    assert found.needs_cuda == name.startswith("NVFP4")


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("wint8-pc_aint8-token", "records it as W8A8_SQ_PER_CHANNEL"),  # dynamic acts labelled static
        ("wfp8_a16", "records it as FP8"),  # weight-only labelled W8A8
        ("wint4-b128_aint8-token", "records it as W4A16_AWQ"),  # activations dropped by the label
        ("wint8-pt_aint8", "records it as W8A8_SQ_PER_CHANNEL"),  # per-tensor weights labelled per channel
        ("FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG", "fp8_pb_wo"),
        ("MXFP6_DEFAULT_CFG", "6-bit"),
        ("FP8_KV_CFG", "KV-cache preset"),
    ],
)
def test_formats_the_exporter_would_mislabel_are_refused_with_the_label(name: str, reason: str) -> None:
    found = export_format(name)
    assert found.label is None
    assert found.refused is not None
    assert reason in found.refused


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


def test_fused_siblings_split_across_groups_are_refused_naming_the_group() -> None:
    split = [
        GroupChoice("l.0.q_proj", ("l.0.q_proj",), "wint8_aint8"),
        GroupChoice("l.0.k_proj", ("l.0.k_proj", "l.0.v_proj"), "wfp8_afp8"),
    ]
    with pytest.raises(ConfigError, match=r"^group l\.0\.q_proj: fused siblings q/k/v of l\.0 must share"):
        check_fused_siblings(split)
    gate_only = [GroupChoice("l.0.mlp.gate_proj", ("l.0.mlp.gate_proj",), "wint8_aint8")]
    check_fused_siblings(gate_only)  # alone it splits nothing ...
    with pytest.raises(ConfigError, match=r"l\.0\.mlp\.up_proj \(unlisted: NONE\)"):
        check_fused_siblings(gate_only, known_modules=["l.0.mlp.gate_proj", "l.0.mlp.up_proj"])
    together = [GroupChoice("l.0.mlp.gate_proj", ("l.0.mlp.gate_proj", "l.0.mlp.up_proj"), "wint8_aint8")]
    check_fused_siblings(
        together, known_modules=["l.0.mlp.gate_proj", "l.0.mlp.up_proj", "l.0.mlp.down_proj"]
    )
    experts = [
        GroupChoice("m.mlp.experts.0.gate_proj", ("m.mlp.experts.0.gate_proj",), "wint8_aint8"),
        GroupChoice("m.mlp.experts.1.down_proj", ("m.mlp.experts.1.down_proj",), "NONE"),
    ]
    with pytest.raises(ConfigError, match=r"fused siblings experts of m\.mlp\.experts"):
        check_fused_siblings(experts)


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


def test_choices_come_from_the_runs_groups_or_a_frontier_point() -> None:
    mods = ("l.0.q_proj", "l.0.k_proj")
    groups = [group("l.0.q_proj", int8(1.0), fp8(2.0), module_names=mods), group("l.0.o_proj", fp8(1.0))]
    assert choices_from_groups(groups) == (
        GroupChoice("l.0.q_proj", mods, INT8),
        GroupChoice("l.0.o_proj", ("l.0.o_proj",), FP8),
    )
    assert choices_from_groups(groups, {"l.0.o_proj": "NONE"})[1].format == "NONE"
    with pytest.raises(ConfigError, match=r"format chosen for 'l\.9', which is no recipe group"):
        choices_from_groups(groups, {"l.9": INT8})

    def point(budget: float, formats: tuple[str, ...], reachable: bool = True) -> FrontierPoint:
        return FrontierPoint(budget, budget, formats, budget, budget, 0.0, reachable, True)

    frontier = Frontier(
        method="gradient",
        groups=("l.0.q_proj", "l.0.o_proj"),
        points=(point(7.0, (INT8, INT8), reachable=False), point(12.0, (FP8, "NONE"))),
        format_bits=((INT8, 8.0), (FP8, 8.0), ("NONE", 16.0)),
        min_bits_lm=8.0,
        min_bits_model=8.0,
        lm_weights=2.0,
        other_weights=0.0,
        exact_order=True,
        seconds=0.0,
    )
    chosen = choices_at(frontier, 12.0, groups)
    assert [(c.name, c.module_names, c.format) for c in chosen] == [
        ("l.0.q_proj", mods, FP8),
        ("l.0.o_proj", ("l.0.o_proj",), "NONE"),
    ]
    with pytest.raises(ConfigError, match=r"no point at 9 bits \(solved: 7, 12\)"):
        choices_at(frontier, 9.0, groups)
    with pytest.raises(ConfigError, match="below the cheapest mix"):
        choices_at(frontier, 7.0, groups)
    with pytest.raises(InputError, match=r"frontier group 'l\.0\.o_proj' is not among"):
        choices_at(frontier, 12.0, groups[:1])


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


# --------------------------------------------------------------------------------------------------
# With ModelOpt (CPU)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_presets_come_from_modelopt_and_cuda_formats_are_refused_on_cpu() -> None:
    import modelopt.torch.quantization.config as presets

    from auto_quantize_model.backend.modelopt import quant_config as qc

    found = qc.format_configs(["INT8_DEFAULT_CFG", "wfp8_afp8", "NONE"])
    assert found["INT8_DEFAULT_CFG"] == presets.INT8_DEFAULT_CFG
    assert found["INT8_DEFAULT_CFG"] is not presets.INT8_DEFAULT_CFG  # a copy: nothing edits ModelOpt's
    assert set(found) == {"INT8_DEFAULT_CFG", "wfp8_afp8"}
    choices = layer_choices("NVFP4_DEFAULT_CFG", FP8, "NONE")
    with pytest.raises(ConfigError, match=r"^format NVFP4_DEFAULT_CFG cannot be exported on cpu: .*CUDA"):
        qc.prepare_export(choices, device="cpu")
    assert qc.prepare_export(choices, device="cuda:0").needs_cuda == ("NVFP4_DEFAULT_CFG",)


@pytest.mark.slow
def test_written_files_are_accepted_by_modelopt_and_quantize_the_chosen_layers(tmp_path: Path) -> None:
    import modelopt.torch.quantization as mtq

    from auto_quantize_model.backend.modelopt import quant_config as qc
    from auto_quantize_model.backend.models import build_builtin
    from auto_quantize_model.sources import TINY_QWEN3_VL

    model = build_builtin(TINY_QWEN3_VL, seed=0, dtype="float32", device="cpu").model
    choices = layer_choices(INT8, "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "wfp8-pc_afp8-token")
    config = qc.prepare_export(
        choices, vision_prefixes=("model.visual",), known_modules=qc.linear_modules(model)
    )
    files = qc.write_quant_config(config, tmp_path)  # reads both back itself (YAML via load_recipe)
    assert files.layers == len(config.layers) == 4 * 7 + 1
    readme = Path(files.readme_path).read_text(encoding="utf-8")
    assert "quant_recipe.yaml" in readme
    assert "load_exported" not in readme  # no checkpoint in this folder
    from_json = xc.read_quant_config(Path(files.json_path).read_text(encoding="utf-8"))
    mtq.quantize(model, from_json, None)  # weight-only + dynamic formats need no calibration data
    enabled = {
        name
        for name, module in model.named_modules()
        if getattr(getattr(module, "weight_quantizer", None), "is_enabled", False)
    }
    assert enabled == {layer.module for layer in config.quantized}
    head: Any = model.get_submodule("lm_head")
    assert head.input_quantizer.is_enabled
    assert head.input_quantizer.block_sizes == {-1: None}  # one scale per token
    up: Any = model.get_submodule(f"{LAYERS}.0.mlp.up_proj")
    assert up.weight_quantizer.block_sizes == {-1: 128, "type": "static"}
    assert not up.input_quantizer.is_enabled


def tiny_export(
    tmp_path: Path,
    choices: Sequence[GroupChoice],
    *,
    calib_captions: int = 32,
    device: str = "cpu",
    dtype: str = "float32",
) -> tuple[Any, Any, Any, Any]:
    """The tiny model quantized with ``choices`` and exported; returns (config, result, evaluate, lm)."""
    from auto_quantize_model.backend.lm_forward import as_tensors, calibration_step_for
    from auto_quantize_model.backend.locate import extract_language_model
    from auto_quantize_model.backend.modelopt import export as ex
    from auto_quantize_model.backend.modelopt import quant_config as qc
    from auto_quantize_model.backend.models import build_builtin
    from auto_quantize_model.core.batching import encode, holdout_columns, scorable
    from auto_quantize_model.core.captions import read_caption_file
    from auto_quantize_model.data import builtin_captions_path
    from auto_quantize_model.sources import TINY_QWEN3_VL
    from auto_quantize_model.specs import ExtractSpec

    loaded = build_builtin(TINY_QWEN3_VL, seed=0, dtype=dtype, device=device)  # type: ignore[arg-type]
    lm = extract_language_model(loaded.model, loaded.tokenizer, ExtractSpec())
    config = qc.prepare_export(
        choices,
        device=device,
        vision_prefixes=lm.vision_modules,
        known_modules=qc.linear_modules(loaded.model),
    )
    captions = read_caption_file(builtin_captions_path())
    calib = scorable(encode(loaded.tokenizer, captions[:calib_captions]), 64)
    held_out = scorable(encode(loaded.tokenizer, captions[-64:]), 64)
    batches = [as_tensors(c) for c in holdout_columns(calib, lm.pad_token_id)]
    evaluate = ex.holdout_evaluator(held_out, lm.pad_token_id, lm.prefix, lm.head_name)
    out = tmp_path / "export"
    qc.write_quant_config(config, out)
    result = ex.export_checkpoint(
        loaded.model,
        loaded.tokenizer,
        config,
        batches,
        calibration_step_for(lm, loaded.model),
        out,
        evaluate=evaluate,
    )
    return config, result, evaluate, lm


@pytest.mark.slow
def test_int8_fp8_mix_exports_a_mixed_precision_checkpoint_that_reads_back(tmp_path: Path) -> None:
    from auto_quantize_model.backend.modelopt import export as ex

    config, result, evaluate, _ = tiny_export(tmp_path, layer_choices(INT8, FP8, INT8))
    out = Path(result.directory)
    assert result.quant_algo == "MIXED_PRECISION"
    for name in (
        "quant_config.json",
        "quant_recipe.yaml",
        "README.md",
        "config.json",
        "hf_quant_config.json",
        "model.safetensors",
        "tokenizer.json",
    ):
        assert name in result.files, name
    hf_quant = json.loads((out / "hf_quant_config.json").read_text(encoding="utf-8"))
    layers = hf_quant["quantization"]["quantized_layers"]
    assert layers[f"{LAYERS}.0.self_attn.k_proj"] == {"quant_algo": "W8A8_SQ_PER_CHANNEL"}
    assert layers[f"{LAYERS}.2.mlp.up_proj"] == {"quant_algo": "FP8"}
    assert layers["lm_head"] == {"quant_algo": "W8A8_SQ_PER_CHANNEL"}
    assert f"{LAYERS}.1.self_attn.o_proj" not in layers
    assert xc.checkpoint_mismatches(hf_quant, config) == ()
    hf_config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert hf_config["quantization_config"]["quant_algo"] == "MIXED_PRECISION"
    assert hf_config["quantization_config"]["quantized_layers"] == layers
    # The quantized head sits beside the float embedding table: the config must not say "tied".
    assert hf_config["tie_word_embeddings"] is False
    assert hf_config["text_config"]["tie_word_embeddings"] is False
    assert any("tie_word_embeddings false" in note for note in result.notes)
    assert "tie_word_embeddings false" in (out / "README.md").read_text(encoding="utf-8")

    back = ex.read_back_nll(result, evaluate)
    assert math.isfinite(back.in_memory_nll)
    assert back.ok, back
    assert abs(back.difference) < 2e-4  # measured 9e-5 (see READ_BACK_TOLERANCE)

    # A checkpoint with one wrong scale is caught by the same check.
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(broken / "model.safetensors"))
    tensors[f"{LAYERS}.0.mlp.down_proj.weight_scale"] *= 1.5
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    wrong = ex.read_back_nll(ex.CheckpointExport(**{**_fields(result), "directory": str(broken)}), evaluate)
    assert not wrong.ok  # measured 1.9e-3, with every other tensor intact


def _fields(result: Any) -> dict[str, Any]:
    import attrs

    return attrs.asdict(result, recurse=False)


@pytest.mark.slow
def test_one_format_exports_with_exclusions_and_int4_reads_back_exactly(tmp_path: Path) -> None:
    from auto_quantize_model.backend.modelopt import export as ex

    int4 = "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"
    config, result, evaluate, _ = tiny_export(tmp_path, layer_choices(int4, int4, "NONE"))
    hf_quant = json.loads((Path(result.directory) / "hf_quant_config.json").read_text(encoding="utf-8"))
    quantization = hf_quant["quantization"]
    assert (result.quant_algo, quantization["group_size"]) == ("W4A16_AWQ", 128)
    assert any(fnmatch.fnmatchcase("lm_head", p) for p in quantization["exclude_modules"])
    assert xc.checkpoint_mismatches(hf_quant, config) == ()
    assert result.notes == ()  # lm_head is NONE: the embeddings stay tied
    back = ex.read_back_nll(result, evaluate)
    assert abs(back.difference) < 1e-6  # weight-only INT4 dequantizes exactly (measured 4e-9)


@pytest.mark.slow
def test_a_bfloat16_export_reads_back_within_the_16_bit_tolerance(tmp_path: Path) -> None:
    from auto_quantize_model.backend.modelopt import export as ex

    _, result, evaluate, _ = tiny_export(tmp_path, layer_choices(INT8, FP8, "NONE"), dtype="bfloat16")
    back = ex.read_back_nll(result, evaluate)
    assert back.tolerance == ex.READ_BACK_TOLERANCE_16BIT
    assert back.ok, back  # measured 1.5e-4
    assert ex.read_back_tolerance("float32") == ex.READ_BACK_TOLERANCE < ex.READ_BACK_TOLERANCE_16BIT


@pytest.mark.slow
def test_export_refuses_a_used_folder_and_a_quantized_model(tmp_path: Path) -> None:
    from auto_quantize_model.backend.modelopt import export as ex
    from auto_quantize_model.backend.modelopt import quant_config as qc
    from auto_quantize_model.backend.models import build_builtin
    from auto_quantize_model.sources import TINY_QWEN3_VL

    loaded = build_builtin(TINY_QWEN3_VL, seed=0, dtype="float32", device="cpu")
    config = qc.prepare_export(layer_choices(INT8, INT8, "NONE"))
    used = tmp_path / "used"
    used.mkdir()
    (used / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(
        ConfigError, match=r"already holds a checkpoint \(config\.json\); choose an empty folder"
    ):
        ex.export_checkpoint(loaded.model, None, config, [{}], lambda m, b: None, used)
    with pytest.raises(ConfigError, match="needs data"):
        ex.export_checkpoint(loaded.model, None, config, [], lambda m, b: None, tmp_path / "new")
    import modelopt.torch.quantization as mtq

    mtq.quantize(loaded.model, copy.deepcopy(qc.format_configs([INT8])[INT8]), None)
    with pytest.raises(ConfigError, match="already carries ModelOpt quantizers"):
        ex.export_checkpoint(loaded.model, None, config, [{}], lambda m, b: None, tmp_path / "new")
    with pytest.raises(InputError, match=r"has no config\.json"):
        ex.load_exported(tmp_path / "new")
    with pytest.raises(AqmError, match="pass evaluate="):
        ex.read_back_nll(
            ex.CheckpointExport(str(tmp_path), (), "FP8", math.nan, math.nan, 0.0, 0.0), lambda m: 0.0
        )


@pytest.mark.slow
def test_the_runs_own_choice_gives_modelopts_get_auto_quantize_config(tmp_path: Path) -> None:
    """Our config and ModelOpt's ``get_auto_quantize_config`` of the same search quantize alike."""
    import modelopt.torch.quantization as mtq
    import torch

    from auto_quantize_model.artifacts import LanguageModel, SensitivityScores
    from auto_quantize_model.backend.modelopt import quant_config as qc
    from auto_quantize_model.backend.modelopt.plan import textlm_name_map
    from auto_quantize_model.pipeline import Pipeline
    from auto_quantize_model.specs import AutoQuantSpec, CalibSpec, ExtractSpec, LoadSpec
    from auto_quantize_model.stages.build_calib_loader import BuildCalibLoader
    from auto_quantize_model.stages.extract_lm import ExtractLM
    from auto_quantize_model.stages.load_model import LoadModel
    from auto_quantize_model.stages.run_autoquant import RunAutoQuant

    state_path = tmp_path / "state.pt"
    store = Pipeline(
        [
            LoadModel(LoadSpec(path="builtin:tiny-qwen3-vl", device="cpu")),
            ExtractLM(ExtractSpec()),
            BuildCalibLoader(CalibSpec(max_samples=32, seq_len=64, batch_size=4)),
            RunAutoQuant(
                AutoQuantSpec(
                    formats=(INT8, FP8), effective_bits=11.0, score_size=16, checkpoint=str(state_path)
                )
            ),
        ]
    ).run()
    scores = store.get(SensitivityScores)
    lm = store.get(LanguageModel)
    chosen = {g.best_format for g in scores.groups}
    assert "NONE" in chosen
    assert chosen & {INT8, FP8}  # a real mix of quantized and unquantized groups
    config = qc.prepare_export(choices_from_groups(scores.groups))

    # The state file is written after scoring, before the search: ModelOpt re-solves it for the
    # run's budget (in language_model scope the constraint is the LM budget itself).
    state = torch.load(state_path, weights_only=False)
    theirs = mtq.get_auto_quantize_config(state, {"effective_bits": scores.effective_bits_target})
    full_name = textlm_name_map(lm.prefix, lm.head_name)
    for entry in theirs["quant_cfg"]:
        module, _, attr = entry["quantizer_name"].rpartition(".")
        if module:
            entry["quantizer_name"] = f"{full_name(module)}.{attr}"
    configs = qc.format_configs([INT8, FP8])
    # ModelOpt leaves out attributes at their defaults (axis None): compare through its schema.
    problems = xc.config_mismatches(theirs, config, configs, canonical=qc.modelopt_canonical)
    assert problems == (), problems[:3]
    assert xc.config_mismatches(theirs, config, configs) != ()  # ... which the plain spelling cannot
    assert xc.config_mismatches(config.quant_config, config, configs) == ()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize(
    ("attention", "mlp", "head", "dtype"),
    [
        ("NVFP4_DEFAULT_CFG", FP8, "NONE", "bfloat16"),
        ("NVFP4_DEFAULT_CFG", FP8, "NONE", "float32"),
        ("W4A16_NVFP4_CFG", INT8, INT8, "bfloat16"),
        ("wfp4_afp4", FP8, "NONE", "bfloat16"),  # the grammar's NVFP4 spellings: same labels
        ("wfp4_afp8", INT8, "NONE", "bfloat16"),  # W4A8_NVFP4_FP8, group 16
    ],
)
def test_nvfp4_mixes_export_and_read_back_on_cuda(
    tmp_path: Path, attention: str, mlp: str, head: str, dtype: str
) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from auto_quantize_model.backend.modelopt import export as ex

    config, result, evaluate, _ = tiny_export(
        tmp_path, layer_choices(attention, mlp, head), device="cuda", dtype=dtype
    )
    hf_quant = json.loads((Path(result.directory) / "hf_quant_config.json").read_text(encoding="utf-8"))
    layers = hf_quant["quantization"]["quantized_layers"]
    assert result.quant_algo == "MIXED_PRECISION"
    assert layers[f"{LAYERS}.0.self_attn.q_proj"]["quant_algo"] == export_format(attention).label
    assert layers[f"{LAYERS}.0.self_attn.q_proj"]["group_size"] == 16
    assert xc.checkpoint_mismatches(hf_quant, config) == ()
    back = ex.read_back_nll(result, evaluate, device="cuda")
    print(f"{attention} + {mlp} + head {head} ({dtype}): {back}, difference {back.difference:.3g}")
    assert back.ok, back


def test_an_awq_alpha_step_exports_like_its_preset() -> None:
    import attrs

    from auto_quantize_model.backend.modelopt import quant_config as qc

    coarse = "W4A8_AWQ_BETA_CFG:alpha_step=0.25"
    preset = export_format("W4A8_AWQ_BETA_CFG")
    assert attrs.evolve(export_format(coarse), name="W4A8_AWQ_BETA_CFG") == preset
    configs = qc.format_configs([coarse, "W4A8_AWQ_BETA_CFG"])
    assert configs[coarse]["algorithm"] == {"method": "awq_lite", "alpha_step": 0.25}
    assert configs[coarse]["quant_cfg"] == configs["W4A8_AWQ_BETA_CFG"]["quant_cfg"]
    assert xc.algorithm_method(configs[coarse]["algorithm"]) == "awq_lite"
