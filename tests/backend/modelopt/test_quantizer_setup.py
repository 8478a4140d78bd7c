"""Fused experts' quantizer lists configured once and copied: the same quantizers as ModelOpt builds.

Each test builds ModelOpt's per-recipe quantizers (``QuantRecipeHparam``) for the tiny MoE's fused
experts twice, once as ModelOpt does and once under :func:`fast_fused_experts_setup`, and compares
every quantizer's full ModelOpt state. The whole search with this set-up is compared with
ModelOpt's in ``test_batched_experts.py``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from auto_quantize_model.backend.experts import use_eager_experts  # noqa: E402
from auto_quantize_model.backend.modelopt.patches import registrations_undone  # noqa: E402
from auto_quantize_model.backend.modelopt.quantizer_setup import (  # noqa: E402
    SetupCounts,
    fast_fused_experts_setup,
)
from auto_quantize_model.backend.models import build_builtin  # noqa: E402
from auto_quantize_model.sources import TINY_QWEN3_VL_MOE  # noqa: E402

EXPERTS = 4
LAYERS = 2


def tiny_text_model(split: bool) -> Any:
    """The tiny MoE's text model, experts eager (and split into linear layers if ``split``)."""
    from auto_quantize_model.backend.experts import unfuse_experts

    loaded = build_builtin(TINY_QWEN3_VL_MOE, seed=0, dtype="float32", device="cpu")
    use_eager_experts(loaded.model)
    if split:
        unfuse_experts(loaded.model)
    model: Any = loaded.model
    return model.model.language_model


def recipes_built(
    fast: bool, fmt: Any, split: bool = False
) -> tuple[list[Any], list[Any], SetupCounts | None]:
    """The tiny MoE converted as ``auto_quantize`` converts it, and one recipe hparam per fused
    module (``split``: per quantized linear layer, the experts split into one per projection)."""
    from modelopt.torch.opt.conversion import apply_mode
    from modelopt.torch.quantization import model_quant
    from modelopt.torch.quantization.algorithms import (
        QuantRecipe,
        QuantRecipeHparam,
        _AutoQuantizeBaseSearcher,
    )
    from modelopt.torch.quantization.mode import QuantizeModeRegistry
    from modelopt.torch.quantization.nn import QuantModule
    from modelopt.torch.quantization.plugins.huggingface import _QuantFusedExperts

    text = tiny_text_model(split)
    recipe = QuantRecipe(fmt) if isinstance(fmt, str) else QuantRecipe(fmt, name="CUSTOM")
    with (
        registrations_undone(),  # converting a split MoE registers its block class process-wide
        fast_fused_experts_setup() if fast else contextlib.nullcontext() as counts,
    ):
        text = apply_mode(text, mode="auto_quantize", registry=QuantizeModeRegistry)
        model_quant.set_quantizer_by_cfg(text, [{"quantizer_name": "*", "enable": False}])
        searched = _AutoQuantizeBaseSearcher._is_auto_quantize_module  # what AutoQuant gives a recipe
        kind = QuantModule if split else _QuantFusedExperts
        modules = [m for m in text.modules() if isinstance(m, kind) and searched(m)]
        hparams = [
            QuantRecipeHparam(
                [recipe], quant_modules=[m], score_modules=[m], name="g", quant_module_names=["g"]
            )
            for m in modules
        ]
    return modules, hparams, counts


def quantizers(hparam: Any, module: Any) -> list[tuple[str, str, int, Any]]:
    found = []
    for recipe, by_module in sorted(hparam._all_quantizer_choices.items()):
        for attr, quantizer in by_module[module].items():
            members = list(quantizer) if isinstance(quantizer, torch.nn.ModuleList) else [quantizer]
            found += [(str(recipe), attr, index, member) for index, member in enumerate(members)]
    return found


def assert_same_quantizers(fmt: Any, split: bool = False) -> SetupCounts:
    theirs_modules, theirs, _ = recipes_built(False, fmt, split)
    ours_modules, ours, counts = recipes_built(True, fmt, split)
    assert counts is not None
    for their_module, their_hparam, our_module, our_hparam in zip(
        theirs_modules, theirs, ours_modules, ours, strict=True
    ):
        expected = quantizers(their_hparam, their_module)
        got = quantizers(our_hparam, our_module)
        assert [key[:3] for key in got] == [key[:3] for key in expected]
        for (recipe, attr, index, want), (_, _, _, have) in zip(expected, got, strict=True):
            assert type(have) is type(want), (recipe, attr, index)
            assert have.get_modelopt_state() == want.get_modelopt_state(), (recipe, attr, index)
            for mine, its in zip(_leaves(have), _leaves(want), strict=True):
                assert type(mine._calibrator) is type(its._calibrator)
                assert vars(mine._calibrator) == vars(its._calibrator)
    return counts


def _leaves(quantizer: Any) -> list[Any]:
    return list(quantizer) if isinstance(quantizer, torch.nn.Sequential) else [quantizer]


@pytest.mark.parametrize(
    "fmt",
    [
        "INT8_DEFAULT_CFG",  # per-channel weights, per-tensor inputs
        "FP8_DEFAULT_CFG",
        "INT4_BLOCKWISE_WEIGHT_ONLY_CFG",  # static blocks, inputs off
        "NVFP4_DEFAULT_CFG",  # dynamic blocks
        "W4A8_AWQ_BETA_CFG",  # two quantizers per weight: ModelOpt's SequentialQuantizer, deep-copied
    ],
)
def test_every_quantizer_equals_what_modelopt_builds(fmt: str) -> None:
    counts = assert_same_quantizers(fmt)
    # per layer, for each list (2): E - 1 copies at conversion and for the model-wide "disable
    # all", and for each recipe (the format and no quantization) E made fresh and E - 1 configured;
    # for each shared input quantizer (2): one made fresh per recipe
    per_list = 2 * (EXPERTS - 1) + 2 * (EXPERTS + EXPERTS - 1)
    assert counts.copied == LAYERS * (2 * per_list + 2 * 2)
    assert not counts.declined


@pytest.mark.parametrize("fmt", ["INT8_DEFAULT_CFG", "W4A8_AWQ_BETA_CFG"])
@pytest.mark.slow  # ModelOpt quantizes the tiny MoE per format: slow tier
def test_split_experts_linear_layers_get_what_modelopt_builds(fmt: str) -> None:
    """Experts split into linear layers: each recipe configures the first layer of a kind and copies it."""
    counts = assert_same_quantizers(fmt, split=True)
    linears = LAYERS * (3 * EXPERTS + 4)  # gate, up, down per expert; q, k, v, o
    # per recipe (the format and no quantization): three quantizers per linear layer made fresh,
    # and those of every linear layer but the first configured by copying
    assert counts.copied == 2 * (3 * linears + 3 * (linears - 1))
    assert not counts.declined


def test_copies_are_independent_quantizers() -> None:
    modules, hparams, _ = recipes_built(True, "INT8_DEFAULT_CFG")
    members = [q for recipe, attr, _, q in quantizers(hparams[0], modules[0]) if "weight" in attr]
    members = [q for q in members if q.is_enabled]
    assert len(members) == 2 * EXPERTS
    assert len({id(q) for q in members}) == len(members)
    assert len({id(q._calibrator) for q in members}) == len(members)
    assert len({id(q._buffers) for q in members}) == len(members)
    members[1]._calibrator.collect(torch.ones(3, 5))
    members[1].load_calib_amax()
    assert float(members[1].amax.max()) == 1.0
    assert members[2].amax is None
    assert members[2]._calibrator.compute_amax() is None


def test_a_config_that_names_one_expert_is_left_to_modelopt() -> None:
    """A pattern matching expert 1's quantizers only: copies of expert 0's would be wrong, so ModelOpt
    configures every one."""
    import modelopt.torch.quantization as mtq

    off_for_one: dict[str, Any] = {"quantizer_name": "*weight_quantizers.1", "enable": False}
    fmt: dict[str, Any] = {"quant_cfg": [*mtq.INT8_DEFAULT_CFG["quant_cfg"], off_for_one], "algorithm": "max"}
    counts = assert_same_quantizers(fmt)
    assert counts.declined == {"config pattern names expert indices": 2 * LAYERS}  # its recipe, each list
    modules, hparams, _ = recipes_built(True, fmt)
    enabled = {
        (attr, index): q.is_enabled
        for recipe, attr, index, q in quantizers(hparams[0], modules[0])
        if recipe.startswith("CUSTOM") and "weight" in attr
    }
    assert enabled[("gate_up_proj_weight_quantizers", 1)] is False
    assert enabled[("gate_up_proj_weight_quantizers", 2)] is True


def test_the_patches_are_undone() -> None:
    from modelopt.torch.quantization import algorithms, model_quant
    from modelopt.torch.quantization.plugins.huggingface import _QuantFusedExperts

    before = (
        vars(_QuantFusedExperts)["_setup"],
        algorithms._make_fresh_quantizer_for_attr,
        algorithms.set_quantizer_by_cfg,
        model_quant.set_quantizer_by_cfg,
    )
    with fast_fused_experts_setup():
        assert algorithms.set_quantizer_by_cfg is not before[2]
    after = (
        vars(_QuantFusedExperts)["_setup"],
        algorithms._make_fresh_quantizer_for_attr,
        algorithms.set_quantizer_by_cfg,
        model_quant.set_quantizer_by_cfg,
    )
    assert after == before


def converted_quantizers(fast: bool, split: bool) -> tuple[dict[str, tuple[Any, ...]], SetupCounts | None]:
    """Every quantizer of the tiny MoE right after ``auto_quantize``'s conversion: type, ModelOpt state
    and calibrator, by name."""
    from modelopt.torch.opt.conversion import apply_mode
    from modelopt.torch.quantization.mode import QuantizeModeRegistry
    from modelopt.torch.quantization.nn import TensorQuantizer

    text = tiny_text_model(split)
    with registrations_undone(), fast_fused_experts_setup() if fast else contextlib.nullcontext() as counts:
        text = apply_mode(text, mode="auto_quantize", registry=QuantizeModeRegistry)
    found = {
        name: (
            type(q),
            q.get_modelopt_state(),
            type(q._calibrator),
            vars(q._calibrator) if q._calibrator else None,
        )
        for name, q in text.named_modules()
        if isinstance(q, TensorQuantizer)
    }
    return found, counts


@pytest.mark.parametrize("split", [False, True])
def test_quantizers_built_from_a_template_equal_modelopts_own(split: bool) -> None:
    from modelopt.torch.quantization.nn import TensorQuantizer

    theirs, _ = converted_quantizers(False, split)
    ours, counts = converted_quantizers(True, split)
    assert ours.keys() == theirs.keys()
    for name, state in theirs.items():
        assert ours[name] == state, name
    assert counts is not None
    linears = [name for name in ours if name.endswith(".weight_quantizer")]
    assert len(linears) > (LAYERS * 3 * EXPERTS if split else 0)  # each split expert's three too
    assert counts.initialised >= 3 * len(linears)  # at least input, weight and output of each
    # a quantizer built with an amax or in calibration mode is ModelOpt's own __init__ again
    with fast_fused_experts_setup() as again:
        TensorQuantizer(amax=torch.tensor(1.0))
        TensorQuantizer(if_calib=True)
        first, second = TensorQuantizer(), TensorQuantizer()
    assert again.initialised == 2
    assert first is not second
    assert first._calibrator is not second._calibrator
