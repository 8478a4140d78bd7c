"""The CPU speed-ups of the held-out measurement change no number.

Validation's KL no longer calls ``kl_div`` per pass: the reference's exponentials are computed
once and the terms are formed in place. The same operations in the same order give the same
bits, which is checked here against ``torch.nn.functional.kl_div`` on random distributions and on
a whole held-out pass of a tiny Llama. The host allocator setting (:func:`host_memory_kept`)
only changes where tensors live: a pass inside it equals one outside it.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import pytest

from auto_quantize_model.backend import layer_cache
from auto_quantize_model.backend.activations import ActivationRecorder
from auto_quantize_model.backend.host_memory import host_memory_kept
from auto_quantize_model.backend.measure import HeldOutEval, Reference
from auto_quantize_model.core.batching import holdout_columns
from builders import tiny_llama

if TYPE_CHECKING:
    import torch

VOCAB = 96


def distributions(rows: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A reference and a nearby distribution, as float64 log-probabilities ``[rows, vocab]``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    ref = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 3
    near = ref + torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 1e-3
    return torch.log_softmax(ref, -1), torch.log_softmax(near, -1)


@pytest.mark.parametrize(("rows", "vocab"), [(1, 3), (7, VOCAB), (64, 4099)])
@pytest.mark.parametrize("precompute", [True, False])
@pytest.mark.parametrize("in_place", [True, False])
def test_kl_terms_are_bit_identical_to_kl_div(
    rows: int, vocab: int, precompute: bool, in_place: bool
) -> None:
    import torch

    ref, logq = distributions(rows, vocab, seed=rows + vocab)
    want = torch.nn.functional.kl_div(logq, ref, log_target=True, reduction="none").sum(-1)
    reference = Reference.of([ref], precompute=precompute)
    assert (reference.probs[0] is not None) == precompute
    given = logq.clone()
    got = reference.kl_per_position(0, given, in_place=in_place)
    assert torch.equal(got, want)
    assert torch.equal(given, logq) != in_place  # in place overwrites the log-probabilities, else not


def test_exponentials_are_kept_only_within_the_memory_share(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    batches = [distributions(4, 50, seed)[0] for seed in range(3)]
    size = batches[0].numel() * batches[0].element_size()
    # room for two of the three batches' exponentials
    monkeypatch.setattr(
        layer_cache, "free_bytes", lambda device: int(2.5 * size / layer_cache.LAYER_CACHE_SHARE)
    )
    reference = Reference.of(batches)
    assert [p is not None for p in reference.probs] == [True, True, False]
    kept = reference.probs[0]
    assert kept is not None
    assert torch.equal(kept, torch.exp(batches[0]))
    _, logq = distributions(4, 50, seed=9)
    for index, ref in enumerate(batches):
        want = torch.nn.functional.kl_div(logq, ref, log_target=True, reduction="none").sum(-1)
        assert torch.equal(reference.kl_per_position(index, logq.clone(), in_place=True), want)


def evaluator_of(model: Any) -> HeldOutEval:
    from auto_quantize_model.backend.lm_forward import as_tensors

    draw = random.Random(3)
    lists = [[draw.randrange(2, VOCAB) for _ in range(draw.randint(3, 20))] for _ in range(40)]
    batches = tuple(as_tensors(columns) for columns in holdout_columns(lists, pad_id=0))
    return HeldOutEval(model.model, model.lm_head, batches)


def kl_by_kl_div(evaluator: HeldOutEval, reference: list[torch.Tensor]) -> tuple[float, list[float]]:
    """The pass's KL as validation computed it before: ``kl_div`` on every batch."""
    import torch

    from auto_quantize_model.backend.lm_forward import selected_logits, target_index

    total = 0.0
    captions: list[torch.Tensor] = []
    with torch.inference_mode():
        for index, batch in enumerate(evaluator.batches):
            logq = torch.log_softmax(
                selected_logits(evaluator.decoder, evaluator.lm_head, batch).double(), -1
            )
            kl = torch.nn.functional.kl_div(logq, reference[index], log_target=True, reduction="none")
            per_position = kl.sum(-1)
            total += per_position.sum().item()
            flat, _ = target_index(batch)
            rows, length = batch["labels"].shape
            captions.append(per_position.new_zeros(rows).index_add_(0, flat // length, per_position))
    return total, torch.cat(captions).tolist()


@pytest.mark.slow
def test_a_held_out_pass_reports_the_kl_of_kl_div_bit_for_bit() -> None:
    import torch

    model = tiny_llama(VOCAB, layers=2, seed=0)
    evaluator = evaluator_of(model)
    _, kept = evaluator.run(keep=True)
    with torch.no_grad():
        layer = model.model.layers[1].mlp.down_proj
        layer.weight.add_(torch.randn_like(layer.weight) * 1e-2)
    total, per_caption = kl_by_kl_div(evaluator, kept)
    for reference in (kept, Reference.of(kept), Reference.of(kept, precompute=False)):
        result, _ = evaluator.run(reference)
        assert result.kl_sum == total > 0.0
        assert list(result.caption_kl) == per_caption


@pytest.mark.slow
def test_a_pass_with_host_memory_kept_equals_one_without() -> None:
    model = tiny_llama(VOCAB, layers=2, seed=1)
    evaluator = evaluator_of(model)
    plain, kept = evaluator.run(keep=True)
    with host_memory_kept(evaluator.device):
        inside, _ = evaluator.run(kept)
    assert inside.same_as(plain)
    assert inside.caption_nll == plain.caption_nll
    assert inside.kl_sum == 0.0


def test_activation_recorder_counts_real_tokens_only_and_removes_its_hooks() -> None:
    import torch

    linear, head = torch.nn.Linear(4, 3), torch.nn.Linear(4, 2)
    recorder = ActivationRecorder({"layer": [linear], "head": [head]})
    batch = {"labels": torch.tensor([[5, 6, -100], [7, -100, -100]])}
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) - 12.0
    x[0, 2] = 1000.0  # padding: must not count
    with recorder.recording():
        recorder.batch(batch)
        linear(x)
        head(torch.full((5, 4), -2.0))  # lm_head input: scored positions only, nothing to cut
    linear(x)  # hooks are gone
    stats = recorder.result()
    real = x[batch["labels"] != -100].abs()
    assert stats["layer"].count == 12
    assert stats["layer"].max_abs == float(real.max())
    assert stats["layer"].abs_sum == pytest.approx(float(real.sum()))
    assert stats["layer"].rms == pytest.approx(float(real.square().mean().sqrt()))
    assert (stats["head"].count, stats["head"].max_abs, stats["head"].mean_abs) == (20, 2.0, 2.0)
