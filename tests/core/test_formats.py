"""The format registry: grammar, refusals, and agreement with the installed ModelOpt."""

from __future__ import annotations

import copy
import itertools
import warnings
from typing import Any

import pytest

from auto_quantize_model.core.format_grammar import CustomFormat, parse_custom, quantizer_extensions
from auto_quantize_model.core.formats import (
    CUSTOM_EXAMPLES,
    CUSTOM_REFUSED_EXAMPLES,
    all_formats,
    check_effective_bits,
    check_formats,
    inert_reason,
    linear_quantizers,
    local_quantizer,
    min_effective_bits,
    resolve_format,
)
from auto_quantize_model.errors import ConfigError
from auto_quantize_model.specs import AutoQuantSpec

# --------------------------------------------------------------------------------------------------
# Pure: grammar, lookup, validation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "canonical", "bits"),
    [
        ("wint8_aint8", "wint8-pc_aint8-tensor", 8.0),
        ("wint8-pc_aint8-token", "wint8-pc_aint8-token", 8.0),
        ("wint4-b128_aint8-token", "wint4-b128_aint8-token", 4.0),
        ("wint4-b64_a16", "wint4-b64_a16", 4.0),
        ("wint4_a16", "wint4-b128_a16", 4.0),
        ("wfp8_afp8", "wfp8-pt_afp8-tensor", 8.0),
        ("wfp8-pc_afp8-token", "wfp8-pc_afp8-token", 8.0),
        ("wint8-b32_afp8", "wint8-b32_afp8-tensor", 8.0),
        ("wint8-pic_a16", "wint8-pic_a16", 8.0),
        ("wint8-b16_aint8", "wint8-b16_aint8-tensor", 8.0),
        ("wint8_aint4", "wint8-pc_aint4-tensor", 8.0),
        ("wint4-pt_aint4-token", "wint4-pt_aint4-token", 4.0),
        ("wfp4_afp4", "wfp4-b16_afp4-b16", 4.5),
        ("wfp4_aint4", "wfp4-b16_aint4-tensor", 4.5),
        ("wfp4-b16_a16", "wfp4-b16_a16", 4.5),
        ("wint4_afp4", "wint4-b128_afp4-b16", 4.0),
    ],
)
def test_custom_names_parse(name: str, canonical: str, bits: float) -> None:
    spec = parse_custom(name)
    assert spec is not None
    assert spec.name == canonical
    assert spec.bits == bits
    info = resolve_format(name)
    assert (info.name, info.kind, info.bits, info.modelopt_name) == (name, "custom", bits, None)


@pytest.mark.parametrize(
    "name",
    [
        "wint3_aint8",
        "wint8_a16-token",
        "wint8_aint8-channel",
        "wint8-b8_aint8",
        "wfp6_a16",
        "wnvfp4_a16",
        "wint8_afp4-b32",
        "int8_aint8",
        "",
    ],
)
def test_names_outside_the_grammar_are_not_custom(name: str) -> None:
    assert parse_custom(name) is None


def test_custom_quant_cfg_shapes() -> None:
    spec = parse_custom("wint4-b64_aint8-token")
    assert spec is not None
    cfg = spec.quant_cfg()
    assert cfg["algorithm"] == "max"
    assert cfg["quant_cfg"] == [
        {"quantizer_name": "*", "enable": False},
        {
            "quantizer_name": "*weight_quantizer",
            "cfg": {"num_bits": 4, "block_sizes": {-1: 64, "type": "static"}},
        },
        {
            "quantizer_name": "*input_quantizer",
            "cfg": {"num_bits": 8, "axis": None, "type": "dynamic", "block_sizes": {-1: None}},
        },
    ]
    weight_only = parse_custom("wfp8-pc_a16")
    assert weight_only is not None
    entries = weight_only.quant_cfg()["quant_cfg"]
    assert entries[1]["cfg"] == {"num_bits": (4, 3), "axis": 0}
    assert entries[2] == {"quantizer_name": "*input_quantizer", "enable": False}
    # a fresh dict every time: ModelOpt may keep or mutate what it is given
    assert spec.quant_cfg() is not spec.quant_cfg()


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [
        ("INT8_DEFAULT", "INT8_DEFAULT_CFG"),
        ("int8_default_cfg", "INT8_DEFAULT_CFG"),
        ("FP8_DEFAULT_CGF", "FP8_DEFAULT_CFG"),
        ("wint8_aint9", "wint8_aint8"),
        ("wfp8-afp8", "wfp8_afp8"),
        ("wfp8_afp16", "wfp8_a16"),
    ],
)
def test_unknown_name_suggests_closest(typo: str, suggestion: str) -> None:
    with pytest.raises(
        ConfigError, match=rf"unknown quantization format '{typo}'; did you mean '{suggestion}'"
    ):
        resolve_format(typo)


def test_unknown_name_without_anything_close() -> None:
    with pytest.raises(ConfigError, match="unknown quantization format 'zzz'") as err:
        resolve_format("zzz")
    assert "did you mean" not in str(err.value)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("FP8_KV_CFG", "KV-cache preset"),
        ("NVFP4_KV_ROTATE_CFG", "KV-cache preset"),
        ("NVFP4_MLP_ONLY_CFG", "would enable no quantizer while being costed at 4.5 bits"),
        ("MXFP4_MLP_WEIGHT_ONLY_CFG", "would enable no quantizer while being costed at 4 bits"),
        ("NVFP4_EXPERTS_ONLY_CFG", "name modules"),
        ("NVFP4_SVDQUANT_DEFAULT_CFG", "svdquant"),
        ("MAMBA_MOE_FP8_AGGRESSIVE_CFG", "use FP8_DEFAULT_CFG"),
    ],
)
def test_refused_presets_are_refused_with_reason(name: str, reason: str) -> None:
    assert not resolve_format(name).usable
    with pytest.raises(ConfigError, match=rf"format {name} cannot be used for AutoQuant: .*{reason}"):
        check_formats([name], "cuda")


@pytest.mark.parametrize("name", ["NVFP4_DEFAULT_CFG", "MXFP8_DEFAULT_CFG", "W4A8_NVFP4_FP8_CFG"])
def test_cuda_only_formats_refused_on_cpu(name: str) -> None:
    with pytest.raises(ConfigError, match=rf"format {name} needs a CUDA GPU .* this run is on cpu"):
        check_formats(["INT8_DEFAULT_CFG", name], "cpu")
    check_formats(["INT8_DEFAULT_CFG", name], "cuda:0")


def test_duplicates_refused() -> None:
    with pytest.raises(ConfigError, match="format INT8_DEFAULT_CFG is listed twice"):
        check_formats(["INT8_DEFAULT_CFG", "INT8_DEFAULT_CFG"], "cpu")
    with pytest.raises(
        ConfigError, match="format wint8_aint8 quantizes linear layers exactly like INT8_DEFAULT"
    ):
        check_formats(["INT8_DEFAULT_CFG", "wint8_aint8"], "cpu")
    with pytest.raises(
        ConfigError, match="wint8-pc_aint8-tensor quantizes linear layers exactly like wint8_aint8"
    ):
        check_formats(["wint8_aint8", "wint8-pc_aint8-tensor"], "cpu")
    # same quantizers, different calibration: both allowed
    check_formats(["INT8_DEFAULT_CFG", "INT8_SMOOTHQUANT_CFG"], "cpu")


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("wfp4-pt_a16", r"FP4 \(E2M1\) only with block scales.*use wfp4 \(NVFP4, blocks of 16\)"),
        ("wfp4-pc_afp8", "scaled_e4m3 raises NotImplementedError for E2M1"),
        ("wfp4-pic_a16", "only with block scales"),
        ("wfp4-b128_a16", r"ignores the configured block size and always uses 16.*use wfp4 \(= wfp4-b16\)"),
        ("wfp4-b64_afp4", "fp4_fake_quant_block without it"),
        ("wfp4-b32_a16", "blocks of 16 under another name"),
        ("wint8_afp4-tensor", r"FP4 activations exist only as NVFP4 dynamic blocks of 16; use afp4"),
        ("wint4_afp4-token", "NVFP4 dynamic blocks of 16"),
        ("wint8_aint8-b16", r"only as MXINT8 .*MXINT8_DEFAULT_CFG\); use aint8-token"),
        ("wint8_aint4-b16", r"_dynamic_block_quantize_impl raises NotImplementedError; use aint4-token"),
        ("wfp8_afp8-b16", r"only as MXFP8 .*use afp8-token"),
    ],
)
def test_grammar_names_modelopt_cannot_run_are_refused_with_reason(name: str, reason: str) -> None:
    spec = parse_custom(name)
    assert spec is not None, "a refused name still parses, so the user learns why"
    assert resolve_format(name).refused == spec.refused
    for device in ("cpu", "cuda"):
        with pytest.raises(ConfigError, match=rf"format {name} cannot be used for AutoQuant: .*{reason}"):
            check_formats([name], device)
    with pytest.raises(ConfigError, match="cannot be used for AutoQuant"):
        spec.quant_cfg()


@pytest.mark.parametrize(
    ("name", "cuda"),
    [
        ("wfp4_a16", True),
        ("wfp4_aint4-token", True),
        ("wint8-pic_afp4", True),
        ("wint4-b128_aint4-token", False),
        ("wint8-pic_aint4", False),
        ("wfp8-b64_afp8-token", False),
    ],
)
def test_fp4_anywhere_needs_cuda(name: str, cuda: bool) -> None:
    assert resolve_format(name).needs_cuda is cuda
    check_formats([name], "cuda:1")
    if cuda:
        with pytest.raises(ConfigError, match=rf"format {name} needs a CUDA GPU .* this run is on cpu"):
            check_formats([name], "cpu")
    else:
        check_formats([name], "cpu")


def test_formats_are_costed_at_their_weights_bits() -> None:
    """ModelOpt charges the narrowest quantizer; a narrower activation gets a recipe-level override."""
    for name, bits, charge in [
        ("wint8_aint4", 8.0, 4.0),
        ("wfp8_afp4", 8.0, 4.5),
        ("wfp4_aint4-token", 4.5, 4.0),
    ]:
        spec = parse_custom(name)
        assert spec is not None
        assert (spec.bits, spec.modelopt_charge) == (bits, charge)
        assert spec.quant_cfg()["effective_bits"] == bits
        assert f"not ModelOpt's {charge:g}" in resolve_format(name).description
    for name in ("wint4_aint8", "wint8_aint8", "wfp4_afp4", "wint4_afp4", "wfp4_a16"):
        spec = parse_custom(name)
        assert spec is not None
        assert spec.bits == spec.modelopt_charge
        assert "effective_bits" not in spec.quant_cfg(), name
    assert "INT4 activations: experimental" in resolve_format("wint4_aint4").description
    assert "experimental" not in resolve_format("wint4_aint8").description


def test_nvfp4_presets_are_grammar_names() -> None:
    wfp4 = parse_custom("wfp4_afp4")
    assert wfp4 is not None
    assert (
        wfp4.weight_cfg()
        == wfp4.input_cfg()
        == {
            "num_bits": (2, 1),
            "effective_bits": 4.5,
            "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)},
        }
    )
    assert "quantizes like NVFP4_DEFAULT_CFG" in resolve_format("wfp4_afp4").description
    with pytest.raises(ConfigError, match="wfp4_afp4 quantizes linear layers exactly like NVFP4_DEFAULT_CFG"):
        check_formats(["NVFP4_DEFAULT_CFG", "wfp4_afp4"], "cuda")
    with pytest.raises(ConfigError, match="exactly like W4A16_NVFP4_CFG"):
        check_formats(["W4A16_NVFP4_CFG", "wfp4-b16_a16"], "cuda")


def test_check_formats_accepts_usual_sets() -> None:
    check_formats(["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"], "cpu")
    check_formats(["wint4-b128_aint8-token", "wint8-pc_aint8-token", "W4A8_AWQ_BETA_CFG"], "cpu")
    with pytest.raises(ConfigError, match="no quantization format given"):
        check_formats([], "cpu")


def test_min_effective_bits_and_budget_checks() -> None:
    assert min_effective_bits(["INT8_DEFAULT_CFG", "wint4-b64_a16"]) == 4.0
    assert min_effective_bits(["NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG"]) == 4.5
    check_effective_bits(8.0, ["INT8_DEFAULT_CFG"])
    check_effective_bits(16.0, ["INT8_DEFAULT_CFG"])
    with pytest.raises(
        ConfigError, match=r"effective_bits 6 is below the minimum reachable with these formats \(8:"
    ):
        check_effective_bits(6.0, ["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"])
    for bad in (0.0, -1.0, 16.5, float("nan")):
        with pytest.raises(ConfigError, match=r"effective_bits: must be in \(0, 16\]"):
            AutoQuantSpec(effective_bits=bad)


def test_all_formats_lists_presets_and_examples() -> None:
    formats = all_formats()
    names = [f.name for f in formats]
    assert len(names) == len(set(names))
    assert set(CUSTOM_EXAMPLES) <= set(names)
    assert set(CUSTOM_REFUSED_EXAMPLES) <= set(names)
    assert all(resolve_format(name).usable for name in CUSTOM_EXAMPLES)
    reasons = {resolve_format(name).refused for name in CUSTOM_REFUSED_EXAMPLES}
    assert None not in reasons
    assert len(reasons) == len(CUSTOM_REFUSED_EXAMPLES), "one example per distinct reason"
    for info in formats:
        assert info.bits > 0
        assert (info.modelopt_name is not None) == (info.kind == "preset")
        if info.equivalent is not None:
            spec = parse_custom(info.equivalent)
            assert spec is not None
            assert spec.name == info.equivalent
            assert spec.bits == info.bits


def test_local_quantizer_replays_matching() -> None:
    cfg: list[dict[str, Any]] = [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}},
        {"quantizer_name": "*mlp*input_quantizer", "cfg": {"num_bits": 8}},
        {"quantizer_name": "*", "parent_class": "nn.Embedding", "enable": False},
    ]
    found = linear_quantizers(cfg)
    assert found["weight_quantizer"].enabled
    assert found["weight_quantizer"].cfg == {"num_bits": 8, "axis": 0}
    assert not found["input_quantizer"].enabled
    assert inert_reason(cfg) is None
    mlp_only = {"quantizer_name": "*mlp*weight_quantizer", "cfg": {"num_bits": 4}}
    assert inert_reason([mlp_only]) == "unconfigured"
    assert inert_reason([cfg[0], mlp_only]) == "disabled"
    switched_off = {"quantizer_name": "weight_quantizer", "enable": False}
    toggled = local_quantizer([*cfg, switched_off], "weight_quantizer")
    assert not toggled.enabled
    assert toggled.configured


# --------------------------------------------------------------------------------------------------
# Against the installed ModelOpt
# --------------------------------------------------------------------------------------------------


def _quiet_import() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization.config as mtq_config
    return mtq_config


@pytest.mark.slow
def test_preset_table_matches_modelopt() -> None:
    """Every ModelOpt preset is in the table with ModelOpt's cost, calibration and the CUDA extensions
    its linear quantizers call, and the refusals are proven."""
    mtq_config = _quiet_import()
    from modelopt.torch.quantization.algorithms import QuantRecipe

    presets = {f.name: f for f in all_formats() if f.kind == "preset"}
    assert set(presets) == set(mtq_config.choices)
    for name, info in presets.items():
        raw = getattr(mtq_config, name)
        assert QuantRecipe(name).compression * 16 == pytest.approx(info.bits), name
        algo = raw.get("algorithm")
        assert (algo["method"] if isinstance(algo, dict) else algo) == info.algorithm, name
        linear = linear_quantizers(raw["quant_cfg"])
        called = quantizer_extensions([q.cfg for q in linear.values() if q.enabled])
        assert info.cuda_extensions == (called if info.refused is None else ()), name
        reason = inert_reason(raw["quant_cfg"])
        if "KV-cache" in (info.refused or ""):
            assert reason == "unconfigured", name
        elif "name modules" in (info.refused or ""):
            assert reason == "disabled", name
        else:
            assert reason is None, name
        if info.refused is not None and "Mamba-MoE" in info.refused:
            same_as = info.refused.rsplit(" ", 1)[-1]
            assert linear_quantizers(raw["quant_cfg"]) == linear_quantizers(
                getattr(mtq_config, same_as)["quant_cfg"]
            )
        if info.equivalent is not None:
            spec = parse_custom(info.equivalent)
            assert spec is not None
            ours = spec.quant_cfg()
            assert linear_quantizers(ours["quant_cfg"]) == linear_quantizers(raw["quant_cfg"]), name
            assert ours["algorithm"] == algo, name


@pytest.mark.slow
def test_local_quantizer_agrees_with_modelopt_application() -> None:
    """Apply every preset to one layer the way auto_quantize does and compare with the pure replay."""
    mtq_config = _quiet_import()
    import torch
    from modelopt.torch.quantization.conversion import set_quantizer_by_cfg
    from modelopt.torch.quantization.nn import QuantModuleRegistry, SequentialQuantizer, TensorQuantizer

    layer = QuantModuleRegistry.convert(torch.nn.Linear(32, 32))
    for name in sorted(mtq_config.choices):
        raw = getattr(mtq_config, name)
        for attr in ("weight_quantizer", "input_quantizer", "output_quantizer"):
            setattr(layer, attr, TensorQuantizer())
        set_quantizer_by_cfg(layer, copy.deepcopy(raw["quant_cfg"]))
        for local, expected in linear_quantizers(raw["quant_cfg"]).items():
            quantizer = getattr(layer, local)
            if isinstance(quantizer, SequentialQuantizer):
                enabled = any(q.is_enabled for q in quantizer)
                assert isinstance(expected.cfg, list), name
            else:
                enabled = quantizer.is_enabled
                if expected.configured and enabled:
                    assert quantizer.num_bits == expected.cfg["num_bits"], (name, local)
            assert enabled == expected.enabled, (name, local)


def _grammar_names() -> list[str]:
    """Every name the grammar spells out in full (defaults are other spellings of these)."""
    names = []
    for weight, granularity in itertools.product(
        ("fp4", "int4", "int8", "fp8"), ("pt", "pc", "pic", "b16", "b32", "b64", "b128")
    ):
        acts = ["a16"] + [
            f"a{act}-{g}" for act in ("fp4", "fp8", "int8", "int4") for g in ("tensor", "token", "b16")
        ]
        names += [f"w{weight}-{granularity}_{act}" for act in acts]
    return names


def _all_custom_specs(*, cuda: bool) -> list[CustomFormat]:
    """The accepted grammar combinations that need CUDA (``cuda``) or run on CPU (not ``cuda``)."""
    specs = []
    for name in _grammar_names():
        spec = parse_custom(name)
        assert spec is not None, name
        assert spec.name == name
        if spec.refused is None and spec.needs_cuda == cuda:
            specs.append(spec)
    return specs


def test_grammar_counts() -> None:
    """28 weight layouts x 13 activation choices; the accepted ones are what aqm formats promises."""
    names = _grammar_names()
    accepted = [n for n in names if resolve_format(n).usable]
    assert len(names) == 4 * 7 * 13
    assert len(_all_custom_specs(cuda=False)) == 3 * 7 * (1 + 3 * 2)
    assert len(_all_custom_specs(cuda=True)) == 3 * 7 * 1 + 1 * (1 + 3 * 2 + 1)
    assert len(accepted) == len(_all_custom_specs(cuda=False)) + len(_all_custom_specs(cuda=True))


def _quantize_one(cfg: dict[str, Any]) -> tuple[Any, Any, Any]:
    """Quantize a two-layer model with ``cfg`` on CPU; (model, input, unquantized output)."""
    import torch
    from modelopt.torch.quantization import quantize

    torch.manual_seed(0)
    x = torch.randn(2, 5, 128)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 32))
    reference = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize(model, cfg, lambda m: m(x))
    return model, x, reference


def _quantize_and_run(cfg: dict[str, Any]) -> Any:
    """The quantized output: FP4 weights fail while calibrating, FP4 activations only collect their
    amax then and fail at the first quantized forward."""
    model, x, _ = _quantize_one(cfg)
    return model(x)


@pytest.mark.slow
def test_every_custom_format_quantizes_on_cpu() -> None:
    """Each CPU grammar combination builds a valid config, costs what we say, and really quantizes."""
    _quiet_import()
    import torch
    from modelopt.torch.quantization.algorithms import QuantRecipe
    from modelopt.torch.quantization.nn import TensorQuantizer

    for spec in _all_custom_specs(cuda=False):
        assert QuantRecipe(spec.quant_cfg(), name=spec.name).compression * 16 == spec.bits, spec.name
        model, x, reference = _quantize_one(spec.quant_cfg())
        out = model(x)
        assert torch.isfinite(out).all(), spec.name
        assert not torch.equal(out, reference), spec.name
        layer: Any = model[0]
        weight_q = layer.weight_quantizer
        assert isinstance(weight_q, TensorQuantizer)
        assert weight_q.is_enabled, spec.name
        assert weight_q.num_bits == spec.weight_cfg()["num_bits"], spec.name
        if spec.weight_granularity == "pc":
            assert (weight_q.axis, weight_q.amax.numel()) == (0, 64), spec.name
        elif spec.weight_granularity == "pic":
            assert (weight_q.axis, tuple(weight_q.amax.shape)) == (1, (1, 128)), spec.name
        elif spec.weight_granularity == "pt":
            assert (weight_q.axis, weight_q.amax.numel()) == (None, 1), spec.name
        else:
            block = int(spec.weight_granularity[1:])
            assert (weight_q.block_sizes or {}).get(-1) == block, spec.name
            assert weight_q.amax.numel() == 64 * 128 // block, spec.name
        input_q = layer.input_quantizer
        assert input_q.is_enabled == (spec.activation != "16"), spec.name
        if spec.activation != "16":
            assert input_q.num_bits == (spec.input_cfg() or {})["num_bits"], spec.name
            if spec.activation_granularity == "token":
                # dynamic, one scale per (batch, position): reduced over the hidden dimension only
                assert (input_q._dynamic, input_q.axis) == (True, (0, 1)), spec.name
            else:
                assert (input_q._dynamic, input_q.amax.numel()) == (False, 1), spec.name


@pytest.mark.slow
def test_cuda_only_custom_formats_build_and_fail_on_cpu_as_said() -> None:
    """FP4 formats are valid ModelOpt configs, costed as we say, and ModelOpt refuses them on CPU."""
    _quiet_import()
    from modelopt.torch.quantization.algorithms import QuantRecipe
    from modelopt.torch.quantization.config import QuantizeConfig

    for spec in _all_custom_specs(cuda=True):
        QuantizeConfig(**spec.quant_cfg())
        assert QuantRecipe(spec.quant_cfg(), name=spec.name).compression * 16 == spec.bits, spec.name
        with pytest.raises(AssertionError, match="must be a CUDA tensor"):
            _quantize_and_run(spec.quant_cfg())


_E2M1_PER_TENSOR = {"num_bits": (2, 1), "axis": None}
_NOT_E4M3 = "Only support E=4 & M=3"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "weight", "inputs", "error"),
    [
        ("wfp4-pt_a16", _E2M1_PER_TENSOR, None, _NOT_E4M3),
        ("wfp4-pc_a16", {"num_bits": (2, 1), "axis": 0}, None, _NOT_E4M3),
        ("wfp4-pic_a16", {"num_bits": (2, 1), "axis": 1}, None, _NOT_E4M3),
        ("wint8_afp4-tensor", {"num_bits": 8, "axis": 0}, _E2M1_PER_TENSOR, _NOT_E4M3),
        (
            "wint8_afp4-token",
            {"num_bits": 8, "axis": 0},
            {"num_bits": (2, 1), "axis": None, "type": "dynamic", "block_sizes": {-1: None}},
            _NOT_E4M3,
        ),
        (
            "wint8_aint4-b16",
            {"num_bits": 8, "axis": 0},
            {"num_bits": 4, "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}},
            "Unsupported num_bits: 4",
        ),
    ],
)
def test_refusals_hold_in_the_installed_modelopt(
    name: str, weight: dict[str, Any], inputs: dict[str, Any] | None, error: str
) -> None:
    """What a refused name would mean, handed to ModelOpt as such, fails there as the reason says."""
    _quiet_import()
    assert resolve_format(name).refused is not None
    entries: list[dict[str, Any]] = [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "cfg": weight},
        {"quantizer_name": "*input_quantizer", **({"enable": False} if inputs is None else {"cfg": inputs})},
    ]
    with pytest.raises((NotImplementedError, AssertionError), match=error):
        _quantize_and_run({"quant_cfg": entries, "algorithm": "max"})


@pytest.mark.slow
def test_fp4_block_size_reason_holds_in_the_installed_modelopt() -> None:
    """On Hopper with triton the FP4 kernel is called without the configured block size (read, not run:
    the kernel needs a GPU); if a ModelOpt upgrade passes it, wfp4-b32/b64/b128 can be offered."""
    import importlib.util
    import inspect
    from pathlib import Path

    _quiet_import()
    from modelopt.torch.quantization import tensor_quant

    source = inspect.getsource(tensor_quant._dynamic_block_quantize_impl)
    assert "triton_kernel.fp4_fake_quant_block(inputs, amax)" in source
    # the kernel module imports triton, absent on CPU machines: read its text
    kernel = importlib.util.find_spec("modelopt.torch.kernels.quantization.gemm.fp4_kernel_hopper")
    assert kernel is not None
    assert kernel.origin is not None
    assert "    block_size: int = 16," in Path(kernel.origin).read_text(encoding="utf-8")
    assert "fp4_fake_quant_block without it" in (resolve_format("wfp4-b64_a16").refused or "")


# --------------------------------------------------------------------------------------------------
# On a CUDA device (the GPU machine; skipped elsewhere)
# --------------------------------------------------------------------------------------------------


def _cuda() -> Any:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch


def _quantize_on_cuda(cfg: dict[str, Any], seed: int = 0) -> tuple[Any, Any]:
    """(quantized output, unquantized output) of a two-layer bf16 model on CUDA."""
    torch = _cuda()
    from modelopt.torch.quantization import quantize

    torch.manual_seed(seed)
    x = torch.randn(2, 5, 128, device="cuda", dtype=torch.bfloat16)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 32)).to("cuda", torch.bfloat16)
    reference = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize(model, cfg, lambda m: m(x))
    return model(x), reference


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("cuda_only", [True, False], ids=["cuda-only", "cpu-and-cuda"])
def test_every_custom_format_quantizes_on_cuda(cuda_only: bool) -> None:
    torch = _cuda()
    _quiet_import()
    for spec in _all_custom_specs(cuda=cuda_only):
        out, reference = _quantize_on_cuda(spec.quant_cfg())
        assert torch.isfinite(out).all(), spec.name
        assert not torch.equal(out, reference), spec.name


@pytest.mark.gpu
@pytest.mark.slow
def test_fp4_block_size_is_ignored_on_hopper_with_triton() -> None:
    """The fact behind refusing wfp4-b32/b64/b128: on compute capability 8.9+ with triton, FP4 weights
    in blocks of 32 or 64 fake-quantize exactly like blocks of 16."""
    torch = _cuda()
    pytest.importorskip("triton")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("the triton FP4 kernel is used from compute capability 8.9 on")
    _quiet_import()

    def weights_in_blocks(block: int) -> dict[str, Any]:
        cfg = {"num_bits": (2, 1), "block_sizes": {-1: block, "type": "dynamic", "scale_bits": (4, 3)}}
        entries = [
            {"quantizer_name": "*", "enable": False},
            {"quantizer_name": "*weight_quantizer", "cfg": cfg},
        ]
        return {"quant_cfg": entries, "algorithm": "max"}

    sixteen, _ = _quantize_on_cuda(weights_in_blocks(16))
    for block in (32, 64):
        other, _ = _quantize_on_cuda(weights_in_blocks(block))
        assert torch.equal(other, sixteen), block


def test_awq_alpha_step_option_on_awq_lite_presets() -> None:
    info = resolve_format("W4A8_AWQ_BETA_CFG:alpha_step=0.25")
    base = resolve_format("W4A8_AWQ_BETA_CFG")
    assert (info.alpha_step, info.base_name) == (0.25, "W4A8_AWQ_BETA_CFG")
    assert info.modelopt_name == "W4A8_AWQ_BETA_CFG"
    assert (info.bits, info.weights, info.activations, info.algorithm) == (
        base.bits,
        base.weights,
        base.activations,
        "awq_lite",
    )
    assert "5 alphas" in info.description
    # a coarser grid is another calibration: listing both is no duplicate
    check_formats(["W4A8_AWQ_BETA_CFG", "W4A8_AWQ_BETA_CFG:alpha_step=0.25"], "cpu")
    with pytest.raises(ConfigError, match="listed twice"):
        check_formats(["INT4_AWQ_CFG:alpha_step=0.5", "INT4_AWQ_CFG:alpha_step=0.5"], "cpu")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("INT8_DEFAULT_CFG:alpha_step=0.5", "AWQ-lite setting and INT8_DEFAULT_CFG calibrates with max"),
        ("wint4-b128_afp8:alpha_step=0.5", "calibrates with max"),
        ("NVFP4_AWQ_CLIP_CFG:alpha_step=0.5", "calibrates with awq_clip"),
        ("W4A8_AWQ_BETA_CFG:alpha_step=0.3", r"alpha_step=0.3 must be a step in \(0, 1\] that divides 1"),
        ("W4A8_AWQ_BETA_CFG:alpha_step=0", "must be a step"),
        ("W4A8_AWQ_BETA_CFG:alpha_step=1.5", "must be a step"),
        ("W4A8_AWQ_BETA_CFG:alpha_step=nan", "must be a step"),
        ("W4A8_AWQ_BETA_CFG:alpha_step=", "must be a step"),
        ("W4A8_AWQ_BETA_CFG:steps=4", "unknown option 'steps=4'"),
        ("W4A8_AWQ_BETA_CFG:alpha_step=0.5:alpha_step=0.5", "must be a step"),
        ("NO_SUCH_CFG:alpha_step=0.5", "unknown quantization format 'NO_SUCH_CFG'"),
    ],
)
def test_bad_format_options_are_refused_naming_the_format(name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_format(name)
