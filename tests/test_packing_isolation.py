"""Proof that packed calibration sees every caption exactly as if it ran alone.

A tiny Qwen3-VL text decoder (mrope, random weights from a fixed seed, fp32) runs captions three
ways: alone (one caption per batch, no padding anywhere: the reference), packed, and padded. Per
caption, the logits at every scored position and the loss must agree to 1e-5. The packed layout
passes no attention mask and relies on transformers deriving a block-diagonal causal mask from
restarting ``position_ids``; if a transformers version stops doing that, captions of a row attend
to each other and these tests fail (the negative control shows by how much).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import pytest
import torch
from torch import nn
from transformers.models.qwen3_vl import Qwen3VLTextConfig, Qwen3VLTextModel

from auto_quantize_model.backend.lm_forward import next_token_loss, selected_logits
from auto_quantize_model.specs import CalibSpec
from auto_quantize_model.stages.build_calib_loader import make_calib_data
from builders import TINY_HIDDEN, tiny_qwen3_vl_text

pytestmark = pytest.mark.slow

VOCAB = 101
HIDDEN = TINY_HIDDEN
SEQ_LEN = 16
TOL = 1e-5
# Lengths chosen so rows hold several captions, a caption fills a whole row (16), single-token
# captions occur (nothing to score) and the last batches need row padding.
LENGTHS = (5, 1, 9, 3, 16, 7, 2, 12, 4, 6, 1, 8, 3)

Batch = dict[str, torch.Tensor]


def _layout(
    layout: Literal["packed", "padded"],
    caps: Sequence[Sequence[int]],
    seq_len: int,
    batch_size: int,
    pad_id: int,
) -> tuple[list[Batch], list[int]]:
    """Batches exactly as BuildCalibLoader hands them on (pure rows made int64 tensors)."""
    spec = CalibSpec(max_samples=len(caps), seq_len=seq_len, batch_size=batch_size, layout=layout)
    data = make_calib_data(caps, spec, pad_id=pad_id, captions_path="test", captions_sha256="")
    return list(data.batches), list(data.captions_per_batch)


def packed_batches(
    caps: Sequence[Sequence[int]], seq_len: int, batch_size: int, pad_id: int
) -> tuple[list[Batch], list[int]]:
    return _layout("packed", caps, seq_len, batch_size, pad_id)


def padded_batches(
    caps: Sequence[Sequence[int]], seq_len: int, batch_size: int, pad_id: int
) -> tuple[list[Batch], list[int]]:
    return _layout("padded", caps, seq_len, batch_size, pad_id)


def tiny_lm(attn_implementation: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    config = Qwen3VLTextConfig(**tiny_qwen3_vl_text(VOCAB, max_positions=64))
    config._attn_implementation = attn_implementation
    decoder = Qwen3VLTextModel(config)
    decoder.train(False)
    assert decoder.config._attn_implementation == attn_implementation
    head = nn.Linear(HIDDEN, VOCAB, bias=False)
    return decoder, head


def captions() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in LENGTHS]


def alone(caption: Sequence[int]) -> Batch:
    """The reference: one caption, no padding, no mask, positions 0..n-1 (built without calib.py)."""
    ids = torch.tensor([list(caption)], dtype=torch.int64)
    return {"input_ids": ids, "position_ids": torch.arange(len(caption))[None], "labels": ids.clone()}


def run(decoder: nn.Module, head: nn.Module, batches: Sequence[Batch]) -> tuple[torch.Tensor, float]:
    """Selected logits of all batches in order, and the summed next-token CE over them."""
    logits: list[torch.Tensor] = []
    summed = 0.0
    with torch.no_grad():
        for batch in batches:
            out = selected_logits(decoder, head, batch)
            logits.append(out)
            if out.shape[0]:
                summed += float(next_token_loss(out, batch)) * out.shape[0]
    return torch.cat(logits), summed


def per_caption(logits: torch.Tensor, caps: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Split row-ordered selected logits back into captions: caption i owns len(i) - 1 positions."""
    return list(torch.split(logits, [len(c) - 1 for c in caps]))


def caption_losses(logits: torch.Tensor, caps: Sequence[Sequence[int]]) -> list[float]:
    losses = []
    for chunk, cap in zip(per_caption(logits, caps), caps, strict=True):
        if len(cap) > 1:
            target = torch.tensor(list(cap[1:]))
            losses.append(float(nn.functional.cross_entropy(chunk, target, reduction="sum")))
    return losses


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request: pytest.FixtureRequest) -> tuple[nn.Module, nn.Module]:
    return tiny_lm(request.param)


@pytest.fixture(scope="module")
def reference(model: tuple[nn.Module, nn.Module]) -> tuple[torch.Tensor, float]:
    decoder, head = model
    return run(decoder, head, [alone(c) for c in captions()])


def test_packed_batches_really_pack() -> None:
    caps = captions()
    batches, counts = packed_batches(caps, SEQ_LEN, 2, 0)
    assert sum(counts) == len(caps)
    assert len(batches) < len(caps)
    assert any((b["position_ids"][:, 1:] == 0).any() for b in batches), "no row holds two captions"
    assert sum(b["input_ids"].numel() for b in batches) > sum(LENGTHS), "no row padding"


def test_packed_logits_and_losses_match_single_runs(
    model: tuple[nn.Module, nn.Module], reference: tuple[torch.Tensor, float]
) -> None:
    decoder, head = model
    caps = captions()
    ref_logits, ref_sum = reference
    packed, _ = packed_batches(caps, SEQ_LEN, 2, 0)
    logits, summed = run(decoder, head, packed)
    assert logits.shape == ref_logits.shape == (sum(LENGTHS) - len(LENGTHS), VOCAB)
    for got, want in zip(per_caption(logits, caps), per_caption(ref_logits, caps), strict=True):
        assert got.shape == want.shape
        assert got.numel() == 0 or (got - want).abs().max().item() <= TOL
    assert (logits - ref_logits).abs().max().item() <= TOL
    got_losses, want_losses = caption_losses(logits, caps), caption_losses(ref_logits, caps)
    assert got_losses == pytest.approx(want_losses, abs=TOL)
    assert summed == pytest.approx(sum(want_losses), abs=1e-4)
    assert summed == pytest.approx(ref_sum, abs=1e-4)


def test_padded_logits_match_single_runs(
    model: tuple[nn.Module, nn.Module], reference: tuple[torch.Tensor, float]
) -> None:
    decoder, head = model
    caps = captions()
    ref_logits, ref_sum = reference
    padded, _ = padded_batches(caps, SEQ_LEN, 3, 0)
    logits, summed = run(decoder, head, padded)
    assert logits.shape == ref_logits.shape
    assert (logits - ref_logits).abs().max().item() <= TOL
    assert summed == pytest.approx(ref_sum, abs=1e-4)


def test_negative_control_without_packed_mask_leaks(
    model: tuple[nn.Module, nn.Module], reference: tuple[torch.Tensor, float]
) -> None:
    """An all-ones attention_mask turns off transformers' packed-sequence detection: the same
    packed rows then attend across captions, and the comparison above must see it."""
    decoder, head = model
    packed, _ = packed_batches(captions(), SEQ_LEN, 2, 0)
    leaky = [{**b, "attention_mask": torch.ones_like(b["input_ids"])} for b in packed]
    logits, _ = run(decoder, head, leaky)
    assert (logits - reference[0]).abs().max().item() > 1e3 * TOL


def test_flash_attention_gets_packed_rows_as_one_row() -> None:
    """Flash attention splits packed captions only within a single row: rows are joined for it."""
    from types import SimpleNamespace

    from auto_quantize_model.backend.lm_forward import decoder_hidden

    seen: list[tuple[int, ...]] = []

    class Recorder(torch.nn.Module):
        def __init__(self, implementation: str) -> None:
            super().__init__()
            self.config = SimpleNamespace(_attn_implementation=implementation)
            self.embed = torch.nn.Embedding(20, 3)

        def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, **_: object) -> object:
            seen.append(tuple(input_ids.shape))
            assert position_ids.shape == input_ids.shape
            return SimpleNamespace(last_hidden_state=self.embed(input_ids) + position_ids[..., None])

    batch = {
        "input_ids": torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]]),
        "position_ids": torch.tensor([[0, 1, 0, 1], [0, 1, 0, 1]]),
        "labels": torch.tensor([[-100, 2, -100, 4], [-100, 6, -100, -100]]),
    }
    flash = Recorder("flash_attention_2")
    sdpa = Recorder("sdpa")
    sdpa.embed.load_state_dict(flash.embed.state_dict())
    joined = decoder_hidden(flash, batch)
    rows = decoder_hidden(sdpa, batch)
    assert seen == [(1, 8), (2, 4)]
    torch.testing.assert_close(joined, rows)
