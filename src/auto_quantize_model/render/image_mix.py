"""The report's lines on image-conditioned calibration: the mix, and image vs text activation ranges.

The ranges matter for static activation scales (INT8/FP8 with a calibrated max): a scale fitted on
captions alone is the text range, so a layer whose image tokens reach further clips them in
service. The report lists the layers where image tokens reach furthest beyond the text range.
"""

from __future__ import annotations

import statistics

from auto_quantize_model.artifacts import ActivationRange, ImageMix

TOP_RANGES = 8
"""Layers listed in the ranges table, by image/text ratio."""


def _ratio(entry: ActivationRange) -> float:
    if entry.text_absmax > 0:
        return entry.image_absmax / entry.text_absmax
    return float("inf") if entry.image_absmax > 0 else 1.0


def range_lines(ranges: tuple[ActivationRange, ...]) -> list[str]:
    """A summary sentence and a table of the layers with the largest image/text range ratio."""
    if not ranges:
        return []
    ratios = [_ratio(entry) for entry in ranges]
    beyond = sum(1 for ratio in ratios if ratio > 1.0)
    top = sorted(ranges, key=_ratio, reverse=True)[:TOP_RANGES]
    lines = [
        "",
        "### Activation ranges: image vs text tokens",
        "",
        "Largest input magnitude of each linear layer over the calibration batches, unquantized (a "
        "fused MoE experts module has two rows, each one quantizer for all experts: its gate/up input, "
        "and `.down_proj`, the down projection's input over the routed experts). "
        f"In {beyond} of {len(ranges)} layers image tokens reach beyond the text tokens' range (median "
        "image/text ratio "
        f"{statistics.median(ratios):.2f}): there a static activation scale fitted on captions alone would "
        "clip image tokens.",
        "",
        "| layer | image max | text max | image / text |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| `{entry.name}` | {entry.image_absmax:.4g} | {entry.text_absmax:.4g} | {_ratio(entry):.2f} |"
        for entry in top
    ]
    return lines


def image_mix_lines(mix: ImageMix | None) -> list[str]:
    """What share of the LM's tokens were image tokens, of what sizes, and the ranges they reach."""
    if mix is None:
        return []
    total = mix.image_tokens + mix.text_tokens
    share = mix.image_tokens / total if total else 0.0
    sizes = ", ".join(f"{w}x{h} ({n})" for w, h, n in mix.image_sizes[:6])
    more = f" and {len(mix.image_sizes) - 6} more sizes" if len(mix.image_sizes) > 6 else ""
    return [
        f"- **Images:** {mix.pairs} image + caption pairs, prompt {mix.prompt!r}; {mix.image_tokens} image "
        f"tokens and {mix.text_tokens} text tokens ({share:.1%} image), {mix.caption_tokens} caption "
        "tokens scored",
        f"- **Image sizes (pairs):** {sizes}{more}",
        *range_lines(mix.ranges),
    ]
