"""The batched fused-experts path against ModelOpt's per-expert loop, on ``builtin:tiny-qwen3-vl-moe``.

The tiny MoE (2 layers of 4 fused experts, top-2) uses Qwen3-VL-30B-A3B's transformers classes,
so ModelOpt wraps it exactly as it wraps the real model. On CPU in float32 the batched path
gives ModelOpt's results bit for bit (same rows through the same ``F.linear`` per expert, same
element-wise fake quantization, same accumulation order), so the comparisons are exact.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from typing import Any, Literal

import pytest

torch = pytest.importorskip("torch")

from auto_quantize_model.artifacts import LoadedModel, SensitivityScores  # noqa: E402
from auto_quantize_model.backend.modelopt.batched_experts import (  # noqa: E402
    batched_fused_experts,
    standard_eager_experts,
    unsupported,
)
from auto_quantize_model.backend.modelopt.patches import registrations_undone  # noqa: E402
from auto_quantize_model.backend.models import build_builtin  # noqa: E402
from auto_quantize_model.sources import TINY_QWEN3_VL_MOE  # noqa: E402
from builders import tiny_moe_search  # noqa: E402

LAYERS = 2
EXPERTS = 4


def tiny_moe() -> LoadedModel:
    return build_builtin(TINY_QWEN3_VL_MOE, seed=0, dtype="float32", device="cpu")


def text_model(loaded: LoadedModel) -> Any:
    model: Any = loaded.model
    return model.model.language_model


def token_batches(loaded: LoadedModel, count: int = 2) -> list[Any]:
    generator = torch.Generator().manual_seed(1)
    vocab = int(text_model(loaded).config.vocab_size)
    return [torch.randint(0, vocab, (2, 12), generator=generator) for _ in range(count)]


def quantized(loaded: LoadedModel, config: str, batched: bool) -> tuple[Any, dict[str, int]]:
    """``mtq.quantize`` of the text model (eager experts), calibrated through one path or the other."""
    import modelopt.torch.quantization as mtq

    from auto_quantize_model.backend.experts import use_eager_experts

    use_eager_experts(loaded.model)
    model = text_model(loaded)
    batches = token_batches(loaded)

    def loop(m: Any) -> None:
        for ids in batches:
            m(input_ids=ids)

    with registrations_undone(), batched_fused_experts() if batched else _nothing() as counts:
        mtq.quantize(model, getattr(mtq, config), forward_loop=loop)
    found = {"batched": counts.batched, "fallback": sum(counts.fallback.values())} if counts else {}
    return model, found


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def amaxes(model: Any) -> dict[str, Any]:
    return {name: tensor for name, tensor in model.named_buffers() if name.endswith("_amax")}


def expert_amax_names(model: Any) -> list[str]:
    return [name for name in amaxes(model) if ".mlp.experts." in name]


# --------------------------------------------------------------------------------------------------
# Calibration and quantized forwards, one module at a time (mtq.quantize, no search)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "weight_path"),
    [
        ("INT8_DEFAULT_CFG", "per-channel ranges stacked"),
        ("FP8_DEFAULT_CFG", "per-tensor ranges stacked"),
        ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "each expert's quantizer (static blocks)"),
    ],
)
@pytest.mark.slow  # ModelOpt quantizes the tiny MoE per format: slow tier
def test_calibration_and_quantized_forward_match_modelopts_loop(config: str, weight_path: str) -> None:
    loaded = tiny_moe()
    twin = copy.deepcopy(loaded)
    loop_model, _ = quantized(loaded, config, batched=False)
    batched_model, counts = quantized(twin, config, batched=True)
    # every calibration forward of both layers went the batched way
    assert counts == {"batched": LAYERS * len(token_batches(loaded)), "fallback": 0}
    expected, got = amaxes(loop_model), amaxes(batched_model)
    assert expected.keys() == got.keys()
    names = expert_amax_names(loop_model)
    # both input quantizers and every expert's gate_up and down weight quantizer hold a range
    per_layer = 2 + 2 * EXPERTS if config != "INT4_BLOCKWISE_WEIGHT_ONLY_CFG" else 2 * EXPERTS
    assert len(names) == LAYERS * per_layer, weight_path
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    ids = token_batches(loaded, 3)[-1]
    with torch.no_grad():
        reference = loop_model(input_ids=ids).last_hidden_state
        with batched_fused_experts() as counts_now:
            through_batched = batched_model(input_ids=ids).last_hidden_state
    assert counts_now.batched == LAYERS
    assert not counts_now.fallback
    assert torch.equal(through_batched, reference)
    # and the quantization really acted: disabling every quantizer changes the output
    import modelopt.torch.quantization as mtq

    mtq.disable_quantizer(loop_model, "*")
    with torch.no_grad():
        plain = loop_model(input_ids=ids).last_hidden_state
    assert not torch.equal(plain, reference)


@pytest.mark.parametrize("config", ["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"])
@pytest.mark.parametrize("chunk_elements", [1, 3 * 128 * 128, 1 << 26])
def test_stacked_weights_equal_each_experts_quantizer(config: str, chunk_elements: int) -> None:
    """One expert per call, three (a partial last chunk of one), or all four at once: the same bits."""
    from auto_quantize_model.backend.modelopt.batched_experts import _stacked_fake_quant

    model, _ = quantized(tiny_moe(), config, batched=False)
    experts = model.layers[1].mlp.experts
    for weight, quantizers in (
        (experts.gate_up_proj, experts.gate_up_proj_weight_quantizers),
        (experts.down_proj, experts.down_proj_weight_quantizers),
    ):
        with torch.no_grad():
            each = torch.stack([quantizers[e](weight[e]) for e in range(EXPERTS)])
            stacked = _stacked_fake_quant(weight, quantizers, chunk_elements)
        assert stacked is not None
        assert torch.equal(stacked, each)
        assert not torch.equal(stacked, weight)


def test_gradients_through_the_batched_experts_match_the_loop() -> None:
    """Scoring back-propagates through the experts (quantizers off): the same input gradients."""
    loaded = tiny_moe()
    model, _ = quantized(loaded, "INT8_DEFAULT_CFG", batched=False)
    import modelopt.torch.quantization as mtq

    mtq.disable_quantizer(model, "*")
    ids = token_batches(loaded, 1)[0]

    def input_grad(batched: bool) -> Any:
        embeds = model.embed_tokens(ids).detach().requires_grad_(True)
        with batched_fused_experts() if batched else _nothing():
            out = model(inputs_embeds=embeds).last_hidden_state
        (out.square().sum()).backward()
        return embeds.grad

    loop_grad, batched_grad = input_grad(False), input_grad(True)
    assert float(loop_grad.abs().sum()) > 0
    torch.testing.assert_close(batched_grad, loop_grad, rtol=1e-5, atol=1e-7)


def test_a_range_that_depends_on_row_grouping_runs_modelopts_loop() -> None:
    """A per-tensor dynamic input range would change if rows were quantized together: not batched."""
    loaded = tiny_moe()
    model, _ = quantized(loaded, "INT8_DEFAULT_CFG", batched=False)
    experts = model.layers[0].mlp.experts
    experts.gate_up_proj_input_quantizer._dynamic = True
    ids = token_batches(loaded, 1)[0]
    with torch.no_grad():
        reference = model(input_ids=ids).last_hidden_state
        with batched_fused_experts() as counts:
            got = model(input_ids=ids).last_hidden_state
    assert counts.batched == LAYERS - 1
    assert counts.fallback == {"input quantizer depends on row grouping": 1}
    assert torch.equal(got, reference)


def test_experts_missing_a_full_weight_quantizer_list_are_not_batched() -> None:
    loaded = tiny_moe()
    model, _ = quantized(loaded, "INT8_DEFAULT_CFG", batched=False)
    experts = model.layers[0].mlp.experts
    hidden = torch.zeros(3, experts.gate_up_proj.shape[-1])
    args = (hidden, torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2))
    assert unsupported(experts, args, {}) is None
    down = experts.down_proj_weight_quantizers
    del down[-1]
    assert unsupported(experts, args, {}) == "per-expert weight quantizers missing"
    del experts.down_proj_weight_quantizers
    assert unsupported(experts, args, {}) == "per-expert weight quantizers missing"


def test_only_experts_with_qwen3_vl_moes_eager_forward_are_batched() -> None:
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextExperts

    assert standard_eager_experts(Qwen3VLMoeTextExperts)
    assert standard_eager_experts(MixtralExperts)  # same eager source, character for character

    class Custom(Qwen3VLMoeTextExperts):
        def forward(self, hidden_states: Any, top_k_index: Any, top_k_weights: Any) -> Any:
            return hidden_states

    assert not standard_eager_experts(Custom)


# --------------------------------------------------------------------------------------------------
# The whole search
# --------------------------------------------------------------------------------------------------


def search(
    loaded: LoadedModel,
    path: Literal["batched", "modelopt"],
    formats: tuple[str, ...],
    experts: Literal["layer", "expert"] = "layer",
) -> SensitivityScores:
    scores: SensitivityScores = tiny_moe_search(loaded, experts, formats, path).get(SensitivityScores)
    return scores


def recipe_amaxes(model: Any) -> Iterator[tuple[tuple[str, str, str, int], Any]]:
    """Every experts quantizer's range under every recipe the search calibrated (fused or split)."""
    from modelopt.torch.opt.utils import named_hparams

    names = {id(module): name for name, module in model.named_modules()}
    for name, hparam in named_hparams(model, unique=True):
        if ".mlp.experts" not in name:
            continue
        for recipe, modules in hparam._all_quantizer_choices.items():
            for module, quantizers in modules.items():  # ModelOpt keeps them in a set's order
                for attr, quantizer in quantizers.items():
                    members = list(quantizer) if isinstance(quantizer, torch.nn.ModuleList) else [quantizer]
                    for index, member in enumerate(members):
                        key = (names[id(module)], str(recipe), attr, index)
                        yield key, getattr(member, "_amax", None)


@pytest.mark.slow
def test_search_scores_and_ranges_match_modelopts_loop_and_the_patch_is_undone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from modelopt.torch.quantization.plugins.huggingface import _QuantFusedExperts

    own_forward = vars(_QuantFusedExperts)["forward"]
    formats = ("INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG")
    loop_loaded, batched_loaded = tiny_moe(), tiny_moe()
    loop = search(loop_loaded, "modelopt", formats)
    with caplog.at_level(logging.INFO, logger="auto_quantize_model"):
        batched = search(batched_loaded, "batched", formats)
    # per layer: 2 formats x 2 calibration batches, then per scoring batch (2) the unquantized
    # forward and one per format (no checkpointed recompute on CPU): 4 + 6, in both layers
    assert "MoE fused experts forwards: batched 20, ModelOpt's loop 0" in caplog.text
    assert vars(_QuantFusedExperts)["forward"] is own_forward  # undone after the search
    assert [g.name for g in batched.groups] == [g.name for g in loop.groups]
    for ours, theirs in zip(batched.groups, loop.groups, strict=True):
        assert ours.scores == theirs.scores, ours.name
        assert ours.best_format == theirs.best_format
    expert_groups = [g for g in batched.groups if g.name.endswith(".mlp.experts")]
    assert len(expert_groups) == LAYERS
    assert all(s > 0 for g in expert_groups for s in g.scores[: len(formats)])
    expected = dict(recipe_amaxes(loop_loaded.model))
    got = dict(recipe_amaxes(batched_loaded.model))
    assert expected.keys() == got.keys()
    calibrated = [key for key, value in expected.items() if value is not None]
    # per layer and format: two input ranges and 2 x 4 expert weight ranges
    assert len(calibrated) == LAYERS * len(formats) * (2 + 2 * EXPERTS)
    for key in expected:
        if expected[key] is None:
            assert got[key] is None, key
        else:
            assert torch.equal(expected[key], got[key]), key
    # after the search both models run ModelOpt's loop again, with the formats it chose
    ids = token_batches(loop_loaded, 1)[0]
    with torch.no_grad():
        a = text_model(loop_loaded)(input_ids=ids).last_hidden_state
        b = text_model(batched_loaded)(input_ids=ids).last_hidden_state
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# The grouped GEMM's calling convention (on CUDA in bfloat16 only; checked here with stand-ins)
# --------------------------------------------------------------------------------------------------


def reference_grouped_mm(rows: Any, weights: Any, *, offs: Any) -> Any:
    """What torch's grouped GEMM computes: rows ``offs[e-1]:offs[e]`` times ``weights[e]`` ([E, in, out])."""
    out, start = [], 0
    for expert, end in enumerate(offs.tolist()):
        out.append(rows[start:end] @ weights[expert])
        start = end
    return torch.cat(out)


def test_the_grouped_gemm_gets_each_experts_rows_and_weight() -> None:
    from auto_quantize_model.backend.modelopt import batched_experts

    generator = torch.Generator().manual_seed(0)
    sizes = [3, 0, 2, 4]
    rows = torch.randn(sum(sizes), 8, generator=generator)
    weights = torch.randn(len(sizes), 5, 8, generator=generator)  # [E, out, in] as stored
    counts = torch.tensor(sizes)
    looped = batched_experts._per_expert_linear(rows, weights, sizes, counts, None)
    grouped = batched_experts._per_expert_linear(rows, weights, sizes, counts, reference_grouped_mm)
    torch.testing.assert_close(grouped, looped)
    assert looped.shape == (9, 5)
    torch.testing.assert_close(looped[3:5], rows[3:5] @ weights[2].T)


def test_a_grouped_gemm_that_fails_is_replaced_by_the_loop_once(caplog: pytest.LogCaptureFixture) -> None:
    from auto_quantize_model.backend.modelopt import batched_experts

    calls = []

    def refusing(rows: Any, weights: Any, *, offs: Any) -> Any:
        calls.append(1)
        raise RuntimeError("grouped_mm: unsupported layout")

    sizes = [2, 1]
    rows, weights, counts = torch.ones(3, 4), torch.ones(2, 6, 4), torch.tensor(sizes)
    try:
        with caplog.at_level(logging.WARNING, logger="auto_quantize_model"):
            first = batched_experts._per_expert_linear(rows, weights, sizes, counts, refusing)
            second = batched_experts._per_expert_linear(rows, weights, sizes, counts, refusing)
    finally:
        batched_experts._GROUPED_FAILED.clear()
    assert calls == [1]  # not tried again
    assert torch.equal(first, torch.full((3, 6), 4.0))
    assert torch.equal(second, first)
    assert (
        caplog.text.count("grouped GEMM failed for the MoE experts (RuntimeError: grouped_mm: unsupported")
        == 1
    )


@pytest.mark.slow
def test_split_experts_search_with_copied_quantizers_matches_modelopts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``experts = "expert"``: no fused module to batch, but the quantizer set-up is copied."""
    formats = ("INT8_DEFAULT_CFG",)
    loop_loaded, fast_loaded = tiny_moe(), tiny_moe()
    loop = search(loop_loaded, "modelopt", formats, experts="expert")
    with caplog.at_level(logging.INFO, logger="auto_quantize_model"):
        fast = search(fast_loaded, "batched", formats, experts="expert")
    assert "MoE fused experts quantizer set-up: " in caplog.text
    assert "lists left to ModelOpt" not in caplog.text
    # calibration and scoring (2 layers x 2 batches each) batched, none through ModelOpt's linears
    assert "MoE split experts forwards: batched calibration 4, batched scoring 4, per-expert loop 0" in (
        caplog.text
    )
    assert len([g for g in fast.groups if ".experts." in g.name]) == LAYERS * EXPERTS
    for ours, theirs in zip(fast.groups, loop.groups, strict=True):
        assert ours.name == theirs.name
        assert ours.scores == theirs.scores, ours.name
    expected = dict(recipe_amaxes(loop_loaded.model))
    got = dict(recipe_amaxes(fast_loaded.model))
    assert expected.keys() == got.keys()
    assert len([v for v in expected.values() if v is not None]) == LAYERS * EXPERTS * 3 * 2
    for key, value in expected.items():
        assert (value is None and got[key] is None) or torch.equal(value, got[key]), key


@pytest.mark.slow
def test_split_experts_scoring_under_reentrant_checkpointing_matches_modelopts(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU's scoring path on CPU: each decoder layer runs once without gradients, then again
    during backward, where the score hooks are registered and fire."""
    from auto_quantize_model.backend.modelopt import patches

    monkeypatch.setattr(patches, "CHECKPOINT_ON_CPU", True)
    formats = ("INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG")
    loop_loaded, fast_loaded = tiny_moe(), tiny_moe()
    loop = search(loop_loaded, "modelopt", formats, experts="expert")
    with caplog.at_level(logging.INFO, logger="auto_quantize_model"):
        fast = search(fast_loaded, "batched", formats, experts="expert")
    # calibration: 2 layers x 2 batches x 2 formats; scoring: 2 layers x 2 batches, twice each
    assert "MoE split experts forwards: batched calibration 8, batched scoring 8, per-expert loop 0" in (
        caplog.text
    )
    expert_groups = [g for g in fast.groups if ".experts." in g.name]
    assert len(expert_groups) == LAYERS * EXPERTS
    assert any(s > 0 for g in expert_groups for s in g.scores[: len(formats)])
    for ours, theirs in zip(fast.groups, loop.groups, strict=True):
        assert ours.name == theirs.name
        assert ours.scores == theirs.scores, ours.name


def split_quantized(loaded: LoadedModel, config: str, batched: bool) -> tuple[Any, Any, Any]:
    """``mtq.quantize`` of the text model with its experts split, calibrated through one path or the
    other; returns the model, the split-calibration counts (None for the loop) and the output of a
    calibration-mode forward (quantizers collecting, nothing quantized)."""
    import modelopt.torch.quantization as mtq

    from auto_quantize_model.backend.experts import unfuse_experts, use_eager_experts
    from auto_quantize_model.backend.modelopt.split_calibration import batched_split_experts

    use_eager_experts(loaded.model)
    unfuse_experts(loaded.model)
    model = text_model(loaded)
    batches = token_batches(loaded)
    outputs: list[Any] = []

    def loop(m: Any) -> None:
        for ids in batches:
            outputs.append(m(input_ids=ids).last_hidden_state)

    with registrations_undone(), batched_split_experts() if batched else _nothing() as counts:
        mtq.quantize(model, getattr(mtq, config), forward_loop=loop)
    return model, counts, torch.cat(outputs)


def quantizer_states(model: Any) -> dict[str, tuple[Any, ...]]:
    """Every quantizer's range (if any) and the input dtype it recorded."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {
        name: (getattr(module, "_amax", None), getattr(module, "_input_dtype", None))
        for name, module in model.named_modules()
        if isinstance(module, TensorQuantizer)
    }


@pytest.mark.parametrize(
    ("config", "batched_forwards"),
    [
        ("INT8_DEFAULT_CFG", LAYERS * 2),
        ("FP8_DEFAULT_CFG", LAYERS * 2),
        ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", 0),
    ],
)
@pytest.mark.slow
def test_split_experts_calibrate_batched_to_the_same_ranges_dtypes_and_outputs(
    config: str, batched_forwards: int
) -> None:
    from auto_quantize_model.backend.experts import UnfusedExperts

    own_forward = vars(UnfusedExperts)["forward"]
    loaded = tiny_moe()
    twin = copy.deepcopy(loaded)
    loop_model, _, loop_out = split_quantized(loaded, config, batched=False)
    batched_model, counts, batched_out = split_quantized(twin, config, batched=True)
    assert vars(UnfusedExperts)["forward"] is own_forward  # undone
    assert counts.batched == batched_forwards
    if not batched_forwards:  # INT4 weights in static blocks: the loop, with its reason
        assert dict(counts.fallback) == {"a weight quantizer quantizes or has no range yet": LAYERS * 2}
    assert torch.equal(batched_out, loop_out)
    expected, got = quantizer_states(loop_model), quantizer_states(batched_model)
    assert expected.keys() == got.keys()
    ranged = [name for name, (amax, _) in expected.items() if amax is not None and ".experts." in name]
    assert len(ranged) >= LAYERS * EXPERTS * 3  # every expert projection's weight at least
    for name, (amax, dtype) in expected.items():
        other_amax, other_dtype = got[name]
        assert dtype == other_dtype, name
        assert (amax is None and other_amax is None) or torch.equal(amax, other_amax), name


def test_split_calibration_merges_ranges_like_modelopts_collect_and_defers_bad_values_to_it() -> None:
    from modelopt.torch.quantization.calib import MaxCalibrator

    from auto_quantize_model.backend.modelopt.split_calibration import _merge

    fresh, held = MaxCalibrator(), MaxCalibrator()
    held._calib_amax = torch.tensor(2.0)
    _merge([(fresh, torch.tensor(1.5)), (held, torch.tensor(1.0)), (fresh, torch.tensor(0.5))])
    assert torch.equal(fresh._calib_amax, torch.tensor(1.5))
    assert torch.equal(held._calib_amax, torch.tensor(2.0))
    twin = MaxCalibrator()
    twin.collect(torch.tensor([1.5]))
    assert twin._calib_amax.shape == fresh._calib_amax.shape  # 0-d, as collect leaves it
    with pytest.raises(AssertionError, match="nan"):
        _merge([(MaxCalibrator(), torch.tensor(float("nan")))])
