"""Routed-token counts: a fixed-logits router counted by hand, then the tiny MoE's real routers.

The fake decoder calls its router once per forward with fixed logits, so which experts each
token goes to is written down here and counted by hand; padding must never count, and a batch
run again (ModelOpt calibrates once per format, then scores) must not count twice.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from auto_quantize_model.artifacts import LayerRouting, RoutingStats
from auto_quantize_model.backend.models import build_builtin
from auto_quantize_model.backend.routing import RoutingCounter, top_k_experts
from auto_quantize_model.core.batching import IGNORE_INDEX
from auto_quantize_model.pipeline import Artifacts
from auto_quantize_model.sources import TINY_QWEN3_VL_MOE
from auto_quantize_model.specs import ExtractSpec
from auto_quantize_model.stages.extract_lm import ExtractLM
from builders import tiny_moe_search

# Six positions (2 rows x 3): rows [a b pad] and [c pad pad]; real flat positions 0, 1 and 3.
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])
LOGITS = torch.tensor(
    [
        [5.0, 4.0, 0.0, 0.0],  # a -> experts 0, 1
        [0.0, 5.0, 4.0, 0.0],  # b -> 1, 2
        [9.0, 9.0, 9.0, 9.0],  # padding: never counted
        [0.0, 4.0, 0.0, 5.0],  # c -> 3, 1
        [9.0, 0.0, 0.0, 9.0],  # padding
        [9.0, 0.0, 9.0, 0.0],  # padding
    ]
)
HAND_COUNT = (1, 3, 1, 1)  # expert 1 took a, b and c; 0, 2 and 3 one token each


class FixedRouter(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits


class FakeDecoder(nn.Module):
    def __init__(self, router: nn.Module) -> None:
        super().__init__()
        self.router = router

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor]:
        self.router(torch.zeros(input_ids.numel(), 2))
        return (torch.zeros(*input_ids.shape, 2),)


def padded_batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[7, 8, 0], [9, 0, 0]])
    labels = torch.where(MASK.bool(), ids, torch.full_like(ids, IGNORE_INDEX))
    return {"input_ids": ids, "attention_mask": MASK, "labels": labels}


def counter_for(batches: list[dict[str, torch.Tensor]]) -> tuple[RoutingCounter, FakeDecoder]:
    decoder = FakeDecoder(FixedRouter(LOGITS))
    counter = RoutingCounter(decoder, [(3, "layers.3.mlp.experts", decoder.router, 2, 4)], batches, pad_id=0)
    return counter, decoder


def test_routed_tokens_match_a_hand_count_and_skip_padding() -> None:
    batch = padded_batch()
    counter, decoder = counter_for([batch])
    with counter.installed():
        decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        decoder(input_ids=batch["input_ids"])  # the next format's calibration pass: not again
    assert counter.stats() == RoutingStats(
        real_tokens=3, batches=1, layers=(LayerRouting(3, "layers.3.mlp.experts", 2, HAND_COUNT),)
    )
    # Hooks are gone after the block: a later forward counts nothing.
    decoder(input_ids=batch["input_ids"])
    assert counter.stats() == RoutingStats(3, 1, (LayerRouting(3, "layers.3.mlp.experts", 2, HAND_COUNT),))


def test_a_batch_never_run_leaves_no_counts_rather_than_partial_ones() -> None:
    first, second = padded_batch(), padded_batch()
    counter, decoder = counter_for([first, second])
    with counter.installed():
        decoder(input_ids=first["input_ids"])
        decoder(input_ids=torch.tensor([[1, 2, 3], [4, 5, 6]]))  # not a calibration batch: ignored
    assert not counter.complete
    assert counter.stats() is None
    counter.count_now([second])  # the pass of its own, as for a restored search
    stats = counter.stats()
    assert stats is not None
    assert stats.real_tokens == 6
    assert stats.layers[0].tokens == tuple(2 * count for count in HAND_COUNT)


def test_routers_returning_indices_are_read_as_their_top_k() -> None:
    indices = torch.tensor([[2, 0, 3], [1, 3, 0]])  # widened to 3 for calibration: first 2 count
    chosen = top_k_experts((torch.zeros(2, 4), torch.zeros(2, 3), indices), 2)
    assert chosen.tolist() == [[2, 0], [1, 3]]
    assert top_k_experts(LOGITS[:2], 2).tolist() == [[0, 1], [1, 2]]


def test_tiny_moe_routing_matches_the_routers_own_arithmetic() -> None:
    """The tiny MoE's two routers, counted by the hooks and recomputed from their inputs."""
    loaded = build_builtin(TINY_QWEN3_VL_MOE, seed=0, dtype="float32", device="cpu")
    lm = ExtractLM(ExtractSpec()).run(Artifacts.of([loaded]))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, lm.pad_token_id, lm.pad_token_id, lm.pad_token_id]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, IGNORE_INDEX)}
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: Any) -> None:
            inputs.setdefault(name, args[0].detach())

        return hook

    handles = [
        lm.full_model.get_submodule(name).register_forward_hook(keep_input(name)) for name in lm.routers
    ]
    counter = RoutingCounter.for_lm(lm, [batch])
    assert counter is not None
    counter.count_now([batch])
    for handle in handles:
        handle.remove()
    stats = counter.stats()
    assert stats is not None
    assert (stats.real_tokens, stats.batches) == (9, 1)
    assert [layer.layer for layer in stats.layers] == [0, 1]
    real = mask.reshape(-1).bool()
    for layer, router in zip(stats.layers, lm.routers, strict=True):
        weight = lm.full_model.get_submodule(router).weight
        assert isinstance(weight, torch.Tensor)
        chosen = torch.topk(inputs[router] @ weight.T, 2, dim=-1).indices[real]
        by_hand = [int((chosen == expert).sum()) for expert in range(4)]
        assert layer.tokens == tuple(by_hand)
        assert sum(layer.tokens) == 2 * 9
        assert layer.name == router.removesuffix(".gate") + ".experts"


@pytest.mark.parametrize("grouping", ["expert"])
def test_split_experts_route_as_the_fused_ones(grouping: Any) -> None:
    """Splitting the experts (extract.experts = expert) leaves the routers and their counts alone."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    counts = []
    for experts in ("layer", grouping):
        loaded = build_builtin(TINY_QWEN3_VL_MOE, seed=0, dtype="float32", device="cpu")
        lm = ExtractLM(ExtractSpec(experts=experts)).run(Artifacts.of([loaded]))
        counter = RoutingCounter.for_lm(lm, [batch])
        assert counter is not None
        counter.count_now([batch])
        counts.append(counter.stats())
    assert counts[0] is not None
    assert counts[0] == counts[1]


@pytest.mark.slow
def test_autoquant_records_the_routing_of_its_first_calibration_pass() -> None:
    """The real search on CPU: the counts taken while ModelOpt calibrates (twice: two formats) and
    scores equal one plain pass of the unquantized model over the same batches."""
    from auto_quantize_model.artifacts import CalibData, LanguageModel, SensitivityScores

    store = tiny_moe_search(
        build_builtin(TINY_QWEN3_VL_MOE, seed=0, dtype="float32", device="cpu"), experts="expert"
    )
    routing = store.get(SensitivityScores).routing
    calib = store.get(CalibData)
    assert routing is not None
    assert routing.real_tokens == calib.stats.real_tokens
    assert routing.batches == len(calib.batches)
    fresh = ExtractLM(ExtractSpec(experts="expert")).run(
        Artifacts.of([build_builtin(TINY_QWEN3_VL_MOE, seed=0, dtype="float32", device="cpu")])
    )
    assert isinstance(fresh, LanguageModel)
    plain = RoutingCounter.for_lm(fresh, list(calib.batches))
    assert plain is not None
    plain.count_now(list(calib.batches))
    assert plain.stats() == routing
