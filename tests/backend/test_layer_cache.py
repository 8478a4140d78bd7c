"""The held-out layer cache: replaying the baseline's early layers changes no measured number.

Every pass of :func:`measure_mixes` is run twice on the same searched model, once replaying the
cached layer outputs and once running the whole decoder, and every quantity validation reports
(the sums, each token's NLL, each caption's NLL and KL) must be equal bit for bit: the replayed
layers hand on exactly the tensors the baseline pass produced, and the layers that run get the
same inputs, weights and arguments.
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import attrs
import pytest

from auto_quantize_model.backend import layer_cache
from auto_quantize_model.backend.layer_cache import LayerCache
from auto_quantize_model.backend.measure import (
    HeldOutEval,
    MixPasses,
    PassResult,
    changed_modules,
    measure_mixes,
)
from auto_quantize_model.core.batching import holdout_columns
from auto_quantize_model.core.scores import NO_QUANT
from builders import search_text_lm, tiny_llama, tiny_qwen3_vl

if TYPE_CHECKING:
    from torch import nn

    from auto_quantize_model.backend.modelopt.recipe_switch import RecipeSwitch

VOCAB = 96


def token_lists(count: int, seed: int) -> list[list[int]]:
    draw = random.Random(seed)
    return [[draw.randrange(2, VOCAB) for _ in range(draw.randint(3, 20))] for _ in range(count)]


@attrs.frozen(eq=False)
class Searched:
    """A tiny model after ModelOpt's AutoQuant, with what measuring it needs."""

    model: nn.Module
    decoder: nn.Module
    head: nn.Module
    switch: RecipeSwitch
    batches: tuple[dict[str, Any], ...]

    def evaluator(self, cache: bool) -> HeldOutEval:
        return HeldOutEval(
            self.decoder, self.head, self.batches, LayerCache(self.decoder, self.head) if cache else None
        )

    def singles(self) -> list[dict[int, str]]:
        """Each group alone on its first quantized format, in network order."""
        return [
            {id(h): next(name for name in self.switch.recipes[id(h)] if name != NO_QUANT)}
            for h in self.switch.hparams
            if id(h) not in self.switch.stuck_ids
        ]


def searched(kind: str, formats: list[str]) -> Searched:
    from auto_quantize_model.backend.lm_forward import as_tensors
    from auto_quantize_model.backend.modelopt.recipe_switch import RecipeSwitch

    if kind == "llama":
        model = tiny_llama(VOCAB, layers=3)
        decoder, head = model.model, model.lm_head
    else:
        model = tiny_qwen3_vl(vocab_size=VOCAB + 8, max_positions=64, vision_depth=1, first_special_id=VOCAB)
        decoder, head = model.model.language_model, model.lm_head
    calib = [as_tensors(b) for b in holdout_columns(token_lists(12, seed=1), pad_id=0, rows=6)]
    search_text_lm(decoder, head, formats, calib)
    held = tuple(as_tensors(b) for b in holdout_columns(token_lists(20, seed=2), pad_id=0, rows=8))
    return Searched(model, decoder, head, RecipeSwitch(model), held)


@pytest.fixture(scope="module", params=["llama", "qwen3_vl"])
def int8(request: pytest.FixtureRequest) -> Searched:
    pytest.importorskip("modelopt.torch.quantization")
    return searched(cast(str, request.param), ["INT8_DEFAULT_CFG"])


def assert_same(a: PassResult, b: PassResult) -> None:
    assert a.same_as(b)
    assert a.tokens == b.tokens
    assert a.kl_sum == b.kl_sum or (math.isnan(a.kl_sum) and math.isnan(b.kl_sum))
    assert a.caption_nll == b.caption_nll
    assert a.caption_kl == b.caption_kl
    assert a.caption_tokens == b.caption_tokens


def with_zero_kl(recorded: PassResult) -> PassResult:
    """A pass recorded without a reference, as a pass against itself reads: KL exactly 0."""
    return attrs.evolve(recorded, kl_sum=0.0, caption_kl=(0.0,) * len(recorded.caption_tokens))


def assert_same_passes(cached: MixPasses, full: MixPasses) -> None:
    assert cached.restored
    assert full.restored
    assert_same(cached.chosen, full.chosen)
    assert_same(cached.baseline, full.baseline)
    assert len(cached.mixes) == len(full.mixes)
    for a, b in zip(cached.mixes, full.mixes, strict=True):
        assert_same(a, b)


@pytest.mark.slow
def test_replayed_layers_give_bit_identical_measurements(int8: Searched) -> None:
    singles = int8.singles()
    joint = {key: fmt for mix in singles[1::2] for key, fmt in mix.items()}
    mixes = [*singles, joint, {}]
    cached = measure_mixes(int8.evaluator(cache=True), int8.switch, mixes)
    full = measure_mixes(int8.evaluator(cache=False), int8.switch, mixes)
    assert_same_passes(cached, full)
    assert any(r.kl_sum > 0.0 for r in cached.mixes)  # the groups do change the output
    assert cached.mixes[-1].kl_sum == 0.0  # nothing switched: the baseline again


@pytest.mark.slow
def test_a_group_starts_at_its_own_layer_and_the_head_replays_every_layer(int8: Searched) -> None:
    cache = LayerCache(int8.decoder, int8.head)
    layers = len(cache.layers)
    assert layers > 1
    starts = {}
    for mix in int8.singles():
        (key,) = mix
        names = [name for name, h in int8.switch.by_module.items() if id(h) == key]
        starts[names[0]] = cache.start(changed_modules(int8.switch, mix))
    for name, start in starts.items():
        if name.endswith("lm_head"):
            assert start == layers
        else:
            assert f"layers.{start}." in name
    assert set(starts.values()) == {*range(layers), layers}
    assert cache.start([int8.decoder.get_submodule("embed_tokens")]) == 0


@pytest.mark.slow
def test_replay_skips_the_work_of_the_layers_before_the_start(int8: Searched) -> None:
    evaluator = int8.evaluator(cache=True)
    assert evaluator.cache is not None
    layers = evaluator.cache.layers
    calls = [0] * len(layers)
    handles = [
        layer.get_submodule("mlp").register_forward_pre_hook(
            lambda *_, i=i: calls.__setitem__(i, calls[i] + 1)
        )
        for i, layer in enumerate(layers)
    ]
    try:
        int8.switch.apply({})
        baseline, reference = evaluator.run(keep=True, record=True)
        assert evaluator.cache.ready
        calls[:] = [0] * len(layers)
        again, _ = evaluator.run(reference, start=2)
    finally:
        for handle in handles:
            handle.remove()
        evaluator.cache.clear()
        int8.switch.restore()
    batches = len(int8.batches)
    assert calls == [0, 0] + [batches] * (len(layers) - 2)
    assert_same(again, with_zero_kl(baseline))
    assert all("forward" not in layer.__dict__ for layer in layers)


@pytest.mark.slow
def test_a_cache_over_its_memory_share_is_dropped_and_every_pass_runs_in_full(
    int8: Searched, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    mixes = int8.singles()[-2:]
    full = measure_mixes(int8.evaluator(cache=False), int8.switch, mixes)
    monkeypatch.setattr(layer_cache, "LAYER_CACHE_SHARE", 1e-12)
    evaluator = int8.evaluator(cache=True)
    with caplog.at_level("INFO", logger="auto_quantize_model"):
        dropped = measure_mixes(evaluator, int8.switch, mixes)
    assert evaluator.cache is not None
    assert "free memory" in evaluator.cache.off
    assert "held-out layer cache off" in caplog.text
    assert_same_passes(dropped, full)


def test_replay_puts_back_a_forward_another_library_installed() -> None:
    """accelerate's device hooks live in the instance's ``forward``; replay must leave them there."""
    import torch

    model = tiny_llama(VOCAB, layers=3)
    layer = model.model.layers[0]
    wrapped = layer.forward
    layer.forward = lambda *args, **kwargs: wrapped(*args, **kwargs)
    installed = layer.forward
    batch = {key: torch.tensor(value) for key, value in holdout_columns(token_lists(4, 3), 0)[0].items()}
    evaluator = HeldOutEval(model.model, model.lm_head, (batch,), LayerCache(model.model, model.lm_head))
    recorded, reference = evaluator.run(keep=True, record=True)
    replayed, _ = evaluator.run(reference, start=3)
    assert layer.__dict__["forward"] is installed
    assert "forward" not in model.model.layers[1].__dict__
    assert_same(replayed, with_zero_kl(recorded))


def test_folded_smoothing_on_a_tied_head_changes_the_embedding_so_nothing_is_replayed() -> None:
    model = tiny_llama(VOCAB, layers=3)
    decoder, head = model.model, model.lm_head
    assert head.weight is decoder.embed_tokens.weight
    hparam, other = object(), object()
    switch = SimpleNamespace(
        root=model,
        by_module={"lm_head": hparam, "model.layers.2.mlp.down_proj": other},
        folded={"lm_head": (head.weight, hparam, None, None)},
    )
    cache = LayerCache(decoder, head)
    fake = cast("RecipeSwitch", switch)
    tied = changed_modules(fake, {id(hparam): "INT8_SMOOTHQUANT_CFG"})
    assert decoder.embed_tokens in tied
    assert cache.start(tied) == 0
    assert cache.start(changed_modules(fake, {id(other): "INT8_DEFAULT_CFG"})) == 2
    assert cache.start(changed_modules(fake, {id(hparam): NO_QUANT, id(other): NO_QUANT})) == 3


def test_a_decoder_without_a_layer_list_has_the_cache_off() -> None:
    import torch

    decoder = torch.nn.Sequential(torch.nn.Linear(2, 2))
    cache = LayerCache(decoder, torch.nn.Linear(2, 2))
    assert "no ``layers`` list" in cache.off
    with cache.recording(batches=1) as batch:
        batch(0)
        decoder(torch.zeros(1, 2))
    assert not cache.ready
    assert not cache.outputs
