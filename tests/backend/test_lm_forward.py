"""Forward and loss helpers: chunked lm_head losses and where batches and chunks are sent."""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import pytest
import torch
from torch import nn

from auto_quantize_model.backend import lm_forward

if TYPE_CHECKING:
    from torch import nn


# --------------------------------------------------------------------------------------------------
# (c) plumbing across devices, with fakes
# --------------------------------------------------------------------------------------------------


class FakeEmbeddings(nn.Module):
    def __init__(self, device: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(8, 4, device=device))


class FakeDecoder(nn.Module):
    """Embeddings on ``meta`` (as if on another GPU); returns real hidden states on CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = FakeEmbeddings("meta")
        self.seen: list[torch.device] = []

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings

    def forward(self, input_ids: torch.Tensor, **_: Any) -> Any:
        self.seen.append(input_ids.device)
        return SimpleNamespace(last_hidden_state=torch.ones(*input_ids.shape, 4))


class FakeHead(nn.Module):
    """An lm_head whose accelerate-style hook says it runs on ``meta``; records its inputs' device."""

    def __init__(self, hook: Any) -> None:
        super().__init__()
        self._hf_hook = hook
        self.seen: list[torch.device] = []

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.seen.append(hidden.device)
        return torch.zeros(hidden.shape[0], 8, device=hidden.device)


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, -100]])
    return {"input_ids": ids.clamp(min=0), "labels": ids}


def test_batches_go_to_the_embeddings_device() -> None:
    assert lm_forward.input_device(FakeDecoder()) == torch.device("meta")


def test_head_chunks_follow_the_hook_device() -> None:
    decoder = FakeDecoder()
    head = FakeHead(SimpleNamespace(execution_device="meta"))
    logits = lm_forward.selected_logits(decoder, head, _batch())
    assert head.seen == [torch.device("meta")]
    assert logits.device.type == "meta"
    assert logits.shape == (5, 8)  # 3 + 2 positions with a real next token

    wrapped = FakeHead(SimpleNamespace(hooks=(SimpleNamespace(), SimpleNamespace(execution_device=1))))
    assert lm_forward.module_device(wrapped) == torch.device("cuda", 1)  # accelerate's SequentialHook
    assert lm_forward.module_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert lm_forward.module_device(nn.ReLU()) is None


def test_calibration_step_sends_chunks_to_the_head_device() -> None:
    root = lm_forward.TextLM(FakeDecoder(), FakeHead(SimpleNamespace(execution_device="meta")))
    lm: Any = SimpleNamespace(prefix="model", head_name="lm_head", pad_token_id=0)
    lm_forward.calibration_step_for(lm, root)(root, _batch())
    assert root.lm_head.seen == [torch.device("meta")]


class EmbeddingDecoder(nn.Module):
    """A one-layer decoder (embeddings only) with the interface :mod:`lm_forward` expects."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 4)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids: torch.Tensor, **_: Any) -> Any:
        return SimpleNamespace(last_hidden_state=self.embed(input_ids))


def test_chunked_backward_keeps_targets_with_the_logits() -> None:
    """Targets follow the logits chunk by chunk, and the gradient reaches the decoder."""
    decoder = EmbeddingDecoder()
    head = nn.Linear(4, 8)
    total = lm_forward.chunked_loss_backward(decoder, head, _batch(), normalizer=5.0, chunk_tokens=2)
    assert total > 0
    assert decoder.embed.weight.grad is not None
    assert head.weight.grad is not None


# --------------------------------------------------------------------------------------------------
# Chunked lm_head loss
# --------------------------------------------------------------------------------------------------


def test_chunked_loss_backward_matches_one_backward() -> None:
    import torch

    from auto_quantize_model.backend.lm_forward import chunked_loss_backward, selected_logits, target_index

    torch.manual_seed(0)
    decoder = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 8))
    head = torch.nn.Linear(8, 50)

    class Decoder(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, **_: Any) -> Any:
            return (decoder(input_ids),)

    batch = {
        "input_ids": torch.randint(0, 50, (3, 11)),
        "position_ids": torch.arange(11).repeat(3, 1),
        "labels": torch.randint(0, 50, (3, 11)),
    }
    batch["labels"][1, 4:] = -100
    logits = selected_logits(Decoder(), head, batch)
    expected = torch.nn.functional.cross_entropy(logits, target_index(batch)[1], reduction="sum") / 7.0
    expected.backward()  # type: ignore[no-untyped-call]
    want = [p.grad.clone() for p in (*decoder.parameters(), *head.parameters()) if p.grad is not None]
    for p in (*decoder.parameters(), *head.parameters()):
        p.grad = None
    value = chunked_loss_backward(Decoder(), head, batch, normalizer=7.0, chunk_tokens=4)
    got = [p.grad for p in (*decoder.parameters(), *head.parameters()) if p.grad is not None]
    assert value == pytest.approx(float(expected.detach()), rel=1e-6)
    assert len(got) == len(want) == 5  # embedding, linear w+b, head w+b
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
