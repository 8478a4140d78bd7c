"""compressed-tensors schemes of the ModelOpt formats: the mapping, the refusals, the plan by format."""

from __future__ import annotations

from typing import Any

import pytest

from auto_quantize_model.core import ct_config as cc
from auto_quantize_model.core.export_choice import GroupChoice
from auto_quantize_model.core.export_config import build_export_config
from auto_quantize_model.core.scores import NO_QUANT
from auto_quantize_model.errors import ConfigError

CT = "compressed-tensors"


# --------------------------------------------------------------------------------------------------
# Which formats map, and to what
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "weights", "inputs", "packing"),
    [
        ("INT8_DEFAULT_CFG", ("int", 8, "channel", None), ("int", "tensor", False), "int-quantized"),
        ("wint8-pc_aint8-token", ("int", 8, "channel", None), ("int", "token", True), "int-quantized"),
        ("INT8_WEIGHT_ONLY_CFG", ("int", 8, "channel", None), None, "pack-quantized"),
        ("FP8_DEFAULT_CFG", ("float", 8, "tensor", None), ("float", "tensor", False), "float-quantized"),
        (
            "FP8_PER_CHANNEL_PER_TOKEN_CFG",
            ("float", 8, "channel", None),
            ("float", "token", True),
            "float-quantized",
        ),
        ("wfp8_a16", ("float", 8, "tensor", None), None, "naive-quantized"),
        ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", ("int", 4, "group", 128), None, "pack-quantized"),
        ("wint4-b128_a16", ("int", 4, "group", 128), None, "pack-quantized"),
        ("wint4-b32_a16", ("int", 4, "group", 32), None, "pack-quantized"),
        # NVFP4: FP8 block scales of 16 under a global scale; W4A4's input blocks are dynamic
        (
            "NVFP4_DEFAULT_CFG",
            ("float", 4, "tensor_group", 16),
            ("float", "tensor_group", "local"),
            "nvfp4-pack-quantized",
        ),
        (
            "wfp4_afp4",
            ("float", 4, "tensor_group", 16),
            ("float", "tensor_group", "local"),
            "nvfp4-pack-quantized",
        ),
        ("W4A16_NVFP4_CFG", ("float", 4, "tensor_group", 16), None, "nvfp4-pack-quantized"),
        ("wfp4_a16", ("float", 4, "tensor_group", 16), None, "nvfp4-pack-quantized"),
    ],
)
def test_each_written_format_has_its_scheme(
    name: str, weights: tuple[Any, ...], inputs: tuple[Any, ...] | None, packing: str
) -> None:
    found = cc.ct_format(name)
    assert found.refused is None
    assert found.scheme is not None
    w = found.scheme.weights
    assert (w.type, w.num_bits, w.strategy, w.group_size, w.dynamic) == (*weights, False)
    assert w.as_dict().get("scale_dtype") == (None if w.strategy != "tensor_group" else "torch.float8_e4m3fn")
    a = found.scheme.inputs
    assert (None if a is None else (a.type, a.strategy, a.dynamic)) == inputs
    assert found.scheme.compression == packing


def test_the_schemes_are_what_compressed_tensors_itself_packs_that_way() -> None:
    """compressed-tensors infers the same packing for each scheme as the one written in its group."""
    import torch
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import NVFP4, NVFP4A16

    names = ("INT8_DEFAULT_CFG", "INT8_WEIGHT_ONLY_CFG", "FP8_DEFAULT_CFG", "wfp8_a16", "wint4-b64_a16")
    for name in (*names, "NVFP4_DEFAULT_CFG", "W4A16_NVFP4_CFG"):
        scheme = cc.ct_format(name).scheme
        assert scheme is not None
        spelled = scheme.as_dict(["layer"])
        spelled.pop("format")
        inferred = infer_module_format(torch.nn.Linear, QuantizationScheme.model_validate(spelled))
        assert inferred.value == scheme.compression, name
    # NVFP4 as compressed-tensors' own presets spell it (what vLLM's NVFP4 schemes recognise),
    # apart from the input observer, which only calibration with llm-compressor reads.
    ours = {
        key: QuantizationScheme.model_validate(cc.ct_format(key).scheme.as_dict(["layer"]))  # type: ignore[union-attr]
        for key in ("NVFP4_DEFAULT_CFG", "W4A16_NVFP4_CFG")
    }
    assert ours["NVFP4_DEFAULT_CFG"].weights == NVFP4["weights"]
    theirs = NVFP4["input_activations"].model_copy(update={"observer": None})
    assert ours["NVFP4_DEFAULT_CFG"].input_activations.model_copy(update={"observer": None}) == theirs
    assert ours["W4A16_NVFP4_CFG"].weights == NVFP4A16["weights"]
    assert ours["W4A16_NVFP4_CFG"].input_activations is None


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        (
            "INT4_AWQ_CFG",
            "awq_lite calibration scales each layer's input by a per-input-channel pre_quant_scale",
        ),
        ("INT8_SMOOTHQUANT_CFG", "smoothquant calibration scales each layer's input"),
        (
            "wfp4_afp8",
            "NVFP4 weights with FP8 E4M3 per tensor, static activations have no compressed-tensors "
            "scheme an engine runs (vLLM's NVFP4 schemes are W4A4 and W4A16: use NVFP4_DEFAULT_CFG or "
            "W4A16_NVFP4_CFG)",
        ),
        ("wfp4_aint8", "NVFP4 weights with INT8 per tensor, static activations have no compressed-tensors"),
        ("W4A8_NVFP4_FP8_CFG", "has no compressed-tensors scheme this export writes"),
        ("NVFP4_AWQ_LITE_CFG", "awq_lite calibration"),
        ("wint8-pic_a16", "never per input channel"),
        ("FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG", "FP8 E4M3 in 128x128 blocks; activations 16-bit"),
        ("MXFP8_DEFAULT_CFG", "has no compressed-tensors scheme this export writes"),
        ("wint4-b128_aint8-token", "are not among the compressed-tensors schemes this export writes"),
        ("FP8_KV_CFG", "KV-cache preset"),
    ],
)
def test_formats_compressed_tensors_cannot_hold_are_refused_with_the_reason(name: str, reason: str) -> None:
    found = cc.ct_format(name)
    assert found.scheme is None
    assert found.refused is not None
    assert reason in found.refused


def test_a_refused_choice_is_one_line_naming_group_format_and_what_to_use() -> None:
    choices = (
        GroupChoice("g0", ("a.q_proj",), "INT8_DEFAULT_CFG"),
        GroupChoice("g1", ("a.down_proj",), "INT4_AWQ_CFG"),
    )
    with pytest.raises(ConfigError) as caught:
        cc.check_ct_choices(choices)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(
        "group g1: format INT4_AWQ_CFG cannot be exported as compressed-tensors: its awq_lite"
    )
    assert "export it with --format modelopt, or choose a run whose formats it writes" in text
    assert "wint4-b128_a16" in text
    # A format neither exporter takes does not point at --format modelopt.
    with pytest.raises(ConfigError, match=r"^group g: format MXFP4_DEFAULT_CFG .*; choose a run") as other:
        cc.check_ct_choices((GroupChoice("g", ("m",), "MXFP4_DEFAULT_CFG"),))
    assert "--format modelopt" not in str(other.value)
    cc.check_ct_choices((*choices[:1], GroupChoice("g2", ("b",), NO_QUANT)))  # INT8 and NONE pass


@pytest.mark.parametrize(
    ("name", "taken"),
    [
        ("INT8_DEFAULT_CFG", ("modelopt", CT)),
        ("INT4_AWQ_CFG", ("modelopt",)),
        ("wfp8_a16", (CT,)),  # ModelOpt's exporter would record it as FP8 W8A8
        ("wint8-pc_aint8-token", (CT,)),
        ("MXFP4_DEFAULT_CFG", ()),
        ("NVFP4_DEFAULT_CFG", ("modelopt", CT)),
        ("W4A16_NVFP4_CFG", ("modelopt", CT)),
        ("wfp4_afp8", ("modelopt",)),
        ("W4A8_NVFP4_FP8_CFG", ()),
    ],
)
def test_the_formats_export_column(name: str, taken: tuple[str, ...]) -> None:
    assert cc.export_formats_of(name) == taken


def test_plan_groups_by_format_with_exact_names_and_ignores_the_rest() -> None:
    from compressed_tensors.quantization import QuantizationConfig

    linears = ("vis.fc", "l0.q_proj", "l0.k_proj", "l0.v_proj", "l0.o_proj", "l0.down_proj", "lm_head")
    choices = (
        GroupChoice("qkv", ("l0.q_proj", "l0.k_proj", "l0.v_proj"), "FP8_DEFAULT_CFG"),
        GroupChoice("o", ("l0.o_proj",), NO_QUANT),
        GroupChoice("down", ("l0.down_proj",), "wint4-b128_a16"),
        GroupChoice("head", ("lm_head",), "FP8_DEFAULT_CFG"),
    )
    configs: dict[str, dict[str, Any]] = {
        "FP8_DEFAULT_CFG": {
            "quant_cfg": [
                {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": (4, 3), "axis": None}},
                {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": (4, 3), "axis": None}},
            ],
            "algorithm": "max",
        },
        "wint4-b128_a16": {
            "quant_cfg": [
                {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 4, "block_sizes": {-1: 128}}},
                {"quantizer_name": "*input_quantizer", "enable": False},
            ],
            "algorithm": "max",
        },
    }
    config = build_export_config(choices, configs, known_modules=linears, exportable=cc.ct_export_format)
    plan = cc.plan_ct(config, linears)
    assert [(g.format, g.modules) for g in plan.groups] == [
        ("FP8_DEFAULT_CFG", ("l0.q_proj", "l0.k_proj", "l0.v_proj", "lm_head")),
        ("wint4-b128_a16", ("l0.down_proj",)),
    ]
    assert plan.ignore == ("vis.fc", "l0.o_proj")
    assert plan.compression == "mixed-precision"
    parsed = QuantizationConfig.model_validate(plan.quantization_config())
    assert set(parsed.config_groups) == {"FP8_DEFAULT_CFG", "wint4-b128_a16"}
    assert parsed.config_groups["wint4-b128_a16"].weights.group_size == 128
    assert parsed.config_groups["FP8_DEFAULT_CFG"].format == "float-quantized"
    assert parsed.ignore == ["vis.fc", "l0.o_proj"]
    # compressed-tensors' own matcher picks exactly the chosen modules for each group.
    from compressed_tensors.utils.match import match_name

    for group in parsed.config_groups.values():
        for name in linears:
            assert any(match_name(name, t) for t in group.targets) == (name in group.targets)


# --------------------------------------------------------------------------------------------------
# The export folder's README
# --------------------------------------------------------------------------------------------------


def readme_of(*formats: str) -> str:
    groups = []
    for i, name in enumerate(formats):
        scheme = cc.ct_format(name).scheme
        assert scheme is not None
        groups.append(cc.CtGroup(name, scheme, (f"l{i}.q_proj",)))
    plan = cc.CtPlan(tuple(groups), ("lm_head",))
    return cc.ct_readme_text(plan, model_class="AutoModelForCausalLM", checked=("Read back with X.",))


def test_the_readme_says_how_to_serve_and_load_and_claims_no_run_it_did_not_make() -> None:
    text = readme_of("INT8_DEFAULT_CFG", "wint4-b64_a16")
    assert "```\nvllm serve THIS_FOLDER\n```" in text
    assert "## Serve with vLLM (not run here)" in text
    assert "vllm-project/vllm#22468" in text  # per-group formats: what format: mixed-precision needs
    assert "vLLM was not run on this folder by auto-quantize-model." in text
    assert 'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")  # needs compressed-tensors' in text
    assert "## Checked by auto-quantize-model\n\n- Read back with X." in text
    assert "NVFP4" not in text
    assert "bfloat16" not in text


def test_an_nvfp4_readme_names_vllms_schemes_and_the_bfloat16_load() -> None:
    text = readme_of("NVFP4_DEFAULT_CFG", "W4A16_NVFP4_CFG", "FP8_DEFAULT_CFG")
    nvfp4 = "NVFP4 (FP4 E2M1, FP8 scales per block of 16 under a global scale)"
    assert f"| `NVFP4_DEFAULT_CFG` | 1 | {nvfp4} | {nvfp4[:-1]}, blocks dynamic) |" in text
    assert f"| `W4A16_NVFP4_CFG` | 1 | {nvfp4} | 16-bit |" in text
    assert "CompressedTensorsW4A4Fp4, CompressedTensorsW4A16Fp4" in text
    assert "whether a given vLLM runs them on an older GPU was not checked here" in text
    assert 'from_pretrained("THIS_FOLDER", dtype=torch.bfloat16)' in text
    assert "import torch\nfrom transformers import AutoModelForCausalLM" in text
    assert "`weight_packed` (two FP4 codes a byte)" in text
