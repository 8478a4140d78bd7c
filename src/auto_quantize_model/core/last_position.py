"""What the damage at the held-out captions' last positions is, and how generation agreement counts.

The held-out ΔNLL and KL score every position whose next token lies in the caption, so the last
position of each caption is never scored: it has no target. A deployed model computes every token
it generates from exactly that position, and there a static activation scale calibrated without
it clipped (issue 26: lm_head's input reached 181.6 there against 101.5 elsewhere on
Qwen2.5-0.5B). Three figures close that gap, each comparing the quantized model with the 16-bit
one on the same captions:

* **last-position KL**: KL(16-bit || quantized) of the next-token distribution after the caption,
  averaged over the captions;
* **top-1 agreement**: the share of captions whose most likely next token is the same;
* **greedy agreement**: each of the first ``greedy_samples`` captions is continued by
  ``greedy_tokens`` tokens, greedily, by both models; per caption, the tokens generated before
  the first one that differs, as a share of ``greedy_tokens``; averaged over the captions. Per-step
  matching would count tokens after a divergence, which continue different texts and so compare
  nothing; counting up to the first difference says how long the two models write the same text.
  Its first token is the top-1 check's, on fewer captions.

The torch passes that collect the tokens and per-caption KL are
:mod:`auto_quantize_model.backend.measure` and :mod:`auto_quantize_model.backend.generation`; this
module only counts, so its definitions are tested without a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from auto_quantize_model.validation_records import LastPosition

Continuations = tuple[tuple[int, ...], ...]
"""The tokens generated after each prompt, one tuple per prompt, in prompt order."""


class LastSums(Protocol):
    """What one held-out pass records at the last positions (a
    :class:`~auto_quantize_model.backend.measure.PassResult`, or plain numbers in tests)."""

    @property
    def last_kl(self) -> tuple[float, ...]: ...
    @property
    def last_top(self) -> tuple[int, ...]: ...


def top1_agreement(tokens: Sequence[int], reference: Sequence[int]) -> float:
    """Share of positions whose most likely token is the reference's; NaN with none."""
    if len(tokens) != len(reference):
        raise ValueError(f"{len(tokens)} top-1 tokens against {len(reference)} of the reference")
    if not reference:
        return math.nan
    return sum(a == b for a, b in zip(tokens, reference, strict=True)) / len(reference)


def leading_matches(continuation: Sequence[int], reference: Sequence[int]) -> int:
    """How many tokens of ``continuation`` come before the first one that differs from ``reference``."""
    count = 0
    for a, b in zip(continuation, reference, strict=False):
        if a != b:
            break
        count += 1
    return count


def greedy_agreement(
    continuations: Continuations, reference: Continuations, steps: int
) -> tuple[float, float]:
    """Mean share of leading tokens shared with ``reference``, and the share of identical continuations.

    ``steps`` is the number of tokens each continuation was asked for; NaN, NaN with no prompt.
    """
    if len(continuations) != len(reference):
        raise ValueError(f"{len(continuations)} continuations against {len(reference)} of the reference")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not reference:
        return math.nan, math.nan
    pairs = list(zip(continuations, reference, strict=True))
    shares = [leading_matches(c, r) / steps for c, r in pairs]
    identical = sum(leading_matches(c, r) == steps for c, r in pairs)
    return math.fsum(shares) / len(shares), identical / len(pairs)


def last_position(
    result: LastSums,
    baseline: LastSums,
    *,
    steps: int = 0,
    continuations: Continuations = (),
    reference: Continuations = (),
) -> LastPosition:
    """The figures of one quantized pass against the 16-bit ``baseline`` (same captions, same order).

    ``result.last_kl`` is empty when the pass had no reference distribution: the KL is then NaN.
    ``steps`` = 0: no generation check (the greedy fields stay unset).
    """
    kl = math.fsum(result.last_kl) / len(result.last_kl) if result.last_kl else math.nan
    figures = LastPosition(
        captions=len(baseline.last_top),
        kl=max(kl, 0.0) if not math.isnan(kl) else kl,  # rounding may leave ~-1e-17 for no damage
        top1=top1_agreement(result.last_top, baseline.last_top),
    )
    if steps < 1:
        return figures
    agreement, identical = greedy_agreement(continuations, reference, steps)
    return LastPosition(
        captions=figures.captions,
        kl=figures.kl,
        top1=figures.top1,
        greedy_tokens=steps,
        greedy_captions=len(reference),
        greedy_agreement=agreement,
        greedy_identical=identical,
    )


def last_position_text(figures: LastPosition) -> str:
    """One sentence a newcomer reads right: where it was measured, against what, and what agreed."""
    text = (
        f"KL {figures.kl:.3g} at each held-out caption's last token (the position a deployed model "
        f"generates from, which ΔNLL and KL never score), same most likely next token as the 16-bit "
        f"model on {figures.top1:.0%} of {figures.captions} captions"
    )
    if figures.greedy_tokens < 1:
        return text + "; no generation check (greedy_tokens = 0)"
    identical = round(figures.greedy_identical * figures.greedy_captions)
    return text + (
        f"; greedy agreement {figures.greedy_agreement:.2f}: continuing {figures.greedy_captions} captions "
        f"by {figures.greedy_tokens} tokens each, on average that share of the tokens came before the "
        f"first one differing from the 16-bit model's ({identical} of {figures.greedy_captions} "
        "identical throughout)"
    )
