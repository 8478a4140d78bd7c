"""The damage where a deployed model generates: each held-out caption's last position, and greedy text.

Two fakes, no ModelOpt. The first is issue 26's finding in miniature: every caption ends with a
token whose activation is ten times any other, and the "quantized" lm_head clips its input to the
range calibrated on the scored positions only. Every scored position is then bit-identical to
the 16-bit model (ΔNLL 0, KL 0), yet at the last position the most likely next token flips: the
last-position check must see what the held-out loss cannot. The second predicts the running sum
of a row's tokens, so a greedy continuation is known by hand and any padding that leaked into a
real position would change it.
"""

from __future__ import annotations

from typing import Any, cast

import pytest
import torch
from torch import nn

from auto_quantize_model.backend.generation import Greedy
from auto_quantize_model.backend.lm_forward import as_tensors
from auto_quantize_model.backend.measure import HeldOutEval, Reference, last_index, measure_mixes
from auto_quantize_model.core.batching import holdout_columns
from auto_quantize_model.core.last_position import last_position

PAD, END, A, B = 0, 10, 11, 12
VOCAB = 13
CAPTIONS = [[1, 2, 3, END], [4, 5, END], [6, 7, 8, 9, 1, END], [2, END], [3, 3, 3, END]]
"""Every caption ends with :data:`END` and it appears nowhere else, as a period does."""


class Embed(nn.Module):
    """A decoder whose hidden state is the token's own vector: ``(t / 10, -t / 20)``, but
    ``(10, 1)`` for :data:`END`, ten times the range of any other position."""

    def forward(self, input_ids: torch.Tensor, **_: Any) -> tuple[torch.Tensor]:
        t = input_ids.float()
        hidden = torch.stack([t / 10, -t / 20], dim=-1)
        hidden[input_ids == END] = torch.tensor([10.0, 1.0])
        return (hidden,)


class ClippingHead(nn.Module):
    """lm_head with weights for A ``(1, 0)`` and B ``(0, 5)``, 0 for every other token.

    ``clip``: the input is clamped to ``[-1, 1]``, the range a static scale calibrated on the scored
    positions holds. At :data:`END` that turns the most likely next token from A (10 vs 5) into B
    (1 vs 5); every other input lies within the range and passes unchanged, bit for bit.
    """

    def __init__(self) -> None:
        super().__init__()
        weight = torch.zeros(VOCAB, 2)
        weight[A] = torch.tensor([1.0, 0.0])
        weight[B] = torch.tensor([0.0, 5.0])
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.clip = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.clamp(-1.0, 1.0) if self.clip else x, self.weight)


class FakeSwitch:
    """RecipeSwitch's part that measure_mixes uses: the chosen model clips, NONE does not."""

    def __init__(self, head: ClippingHead) -> None:
        self.head = head
        self.head.clip = True  # AutoQuant's choice quantizes lm_head
        self.applied: list[dict[int, str]] = []

    def apply(self, mix: dict[int, str]) -> None:
        self.applied.append(dict(mix))
        self.head.clip = any(fmt != "NONE" for fmt in mix.values())

    def restore(self) -> bool:
        self.head.clip = True
        return True


def evaluator(head: nn.Module) -> HeldOutEval:
    batches = tuple(as_tensors(b) for b in holdout_columns(CAPTIONS, PAD, rows=2))
    return HeldOutEval(Embed(), head, batches)


def test_the_last_index_is_each_rows_last_real_token() -> None:
    batch = as_tensors(holdout_columns([[5, 6, 7], [8, 9]], PAD)[0])  # the shorter one first, padded
    assert batch["input_ids"].tolist() == [[8, 9, PAD], [5, 6, 7]]
    assert last_index(batch).tolist() == [1, 5]


def test_damage_at_the_last_position_only_is_missed_by_the_loss_and_seen_by_the_check() -> None:
    head = ClippingHead()
    held_out = evaluator(head)
    baseline, kept = held_out.run(keep=True)
    reference = Reference.of(kept, last=baseline.last_log_probs)
    assert baseline.last_top == (A,) * len(CAPTIONS)

    head.clip = True
    clipped, _ = held_out.run(reference)
    # the held-out loss sees nothing: every scored position is bit-identical
    assert clipped.nll_sum == baseline.nll_sum
    assert clipped.kl_sum == 0.0
    assert clipped.tokens == sum(len(c) - 1 for c in CAPTIONS)
    # the last positions do
    assert clipped.last_top == (B,) * len(CAPTIONS)
    assert all(kl > 1.0 for kl in clipped.last_kl)
    figures = last_position(clipped, baseline)
    assert figures.captions == len(CAPTIONS)
    assert figures.top1 == 0.0
    assert figures.kl == pytest.approx(sum(clipped.last_kl) / len(CAPTIONS))
    assert figures.greedy_tokens == 0  # no generation check asked for

    head.clip = False
    same, _ = held_out.run(reference)
    unchanged = last_position(same, baseline)
    assert (unchanged.kl, unchanged.top1) == (0.0, 1.0)


def test_measure_mixes_checks_the_chosen_model_and_each_mix_where_it_generates() -> None:
    head = ClippingHead()
    switch = FakeSwitch(head)
    prompts = tuple(tuple(c) for c in CAPTIONS[:3])
    greedy = Greedy(prompts, steps=3, pad_id=PAD)
    for greedy_mixes in (False, True):
        passes = measure_mixes(
            evaluator(head),
            cast(Any, switch),
            [{1: "INT8"}, {1: "NONE"}],
            greedy=greedy,
            greedy_mixes=greedy_mixes,
        )
        assert passes.restored
        assert passes.delta_nll(passes.chosen) == 0.0
        assert [m.kl for m in passes.mixes] == [0.0, 0.0]
        assert passes.baseline_greedy == ((A, A, A),) * 3  # A's own vector (1.1, -0.55) picks A again
        clipped, unclipped = passes.mix_last_position(0), passes.mix_last_position(1)
        assert (clipped.top1, unclipped.top1, unclipped.kl) == (0.0, 1.0, 0.0)
        assert clipped.kl > 1.0
        chosen = passes.chosen_last_position()
        assert chosen is not None
        assert chosen.top1 == 0.0
        assert chosen.kl == pytest.approx(clipped.kl)
        if greedy_mixes:  # the frontier: each mix generates, the chosen model does not
            assert passes.mix_greedy[0] == ((B, A, A),) * 3
            assert (clipped.greedy_agreement, clipped.greedy_identical) == (0.0, 0.0)
            assert (unclipped.greedy_agreement, unclipped.greedy_identical) == (1.0, 1.0)
            assert (chosen.greedy_tokens, passes.chosen_greedy) == (0, ())
        else:  # validation: the chosen model generates
            assert passes.chosen_greedy == ((B, A, A),) * 3
            assert (chosen.greedy_tokens, chosen.greedy_captions, chosen.greedy_agreement) == (3, 3, 0.0)
            assert clipped.greedy_tokens == 0
    assert switch.applied[:3] == [{}, {1: "INT8"}, {1: "NONE"}]
    assert head.clip  # put back as AutoQuant chose it


class RunningSum(nn.Module):
    """A decoder whose hidden state at position t is the sum of the row's tokens up to t (causal)."""

    def forward(self, input_ids: torch.Tensor, **_: Any) -> tuple[torch.Tensor]:
        return (input_ids.double().cumsum(dim=1)[..., None],)


class SumHead(nn.Module):
    """The next token is the running sum modulo 50; ``flip``: a 20 comes out as 21."""

    def __init__(self, flip: bool = False) -> None:
        super().__init__()
        self.flip = flip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        token = x[:, 0].long() % 50
        if self.flip:
            token = torch.where(token == 20, 21, token)
        return nn.functional.one_hot(token, 50).float()


PROMPTS = ((1, 2), (5,), (3, 4, 5, 6), (20,))
"""The sum doubles with each token: (1, 2) goes on 3, 6, 12, 24; (5,) 5, 10, 20, 40; (3, 4, 5, 6)
18, 36, 22 (72 mod 50), 44; (20,) 20, 40, 30, 10."""


def test_greedy_continues_each_prompt_as_if_it_were_alone() -> None:
    want = ((3, 6, 12, 24), (5, 10, 20, 40), (18, 36, 22, 44), (20, 40, 30, 10))
    for rows in (1, 2, 16):  # one prompt per call, chunks of two, all four in one padded batch
        greedy = Greedy(PROMPTS, steps=4, pad_id=7, rows=rows)
        assert greedy.run(RunningSum(), SumHead(), torch.device("cpu")) == want


def test_greedy_agreement_is_one_for_identical_models_and_counts_up_to_the_first_difference() -> None:
    greedy = Greedy(PROMPTS, steps=4, pad_id=0)
    reference = greedy.run(RunningSum(), SumHead(), torch.device("cpu"))
    same = greedy.run(RunningSum(), SumHead(), torch.device("cpu"))
    flipped = greedy.run(RunningSum(), SumHead(flip=True), torch.device("cpu"))
    # (5,): 5, 10, then 21 for 20 and 41 after it; (20,): a different first token; the others never hit 20
    assert flipped == ((3, 6, 12, 24), (5, 10, 21, 41), (18, 36, 22, 44), (21, 41, 32, 14))

    class Sums:
        def __init__(self, top: tuple[int, ...]) -> None:
            self.last_top, self.last_kl = top, (0.0,) * len(top)

    base = Sums(tuple(r[0] for r in reference))
    agree = last_position(base, base, steps=4, continuations=same, reference=reference)
    assert (agree.greedy_agreement, agree.greedy_identical, agree.greedy_captions) == (1.0, 1.0, 4)
    differ = last_position(
        Sums(tuple(f[0] for f in flipped)), base, steps=4, continuations=flipped, reference=reference
    )
    assert differ.greedy_agreement == (1 + 2 / 4 + 1 + 0) / 4
    assert differ.greedy_identical == 2 / 4
    assert differ.top1 == 3 / 4  # the first generated token is the top-1 check


def test_a_greedy_plan_refuses_what_generates_nothing() -> None:
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        Greedy(PROMPTS, steps=0, pad_id=0)
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        Greedy(((1,), ()), steps=2, pad_id=0)
