"""The Validation section of ``per-layer-sensitivity.md``: how well the scores predicted measured damage.

Rendered from the manifest's :class:`~auto_quantize_model.validation_records.ValidationReport` (assembled in
:mod:`auto_quantize_model.core.validation_report`): rank agreement with its noise floor, the
measured groups, the free proxy predictors rated against the same damage and the measured
refinement of the top of the ranking. Plain text in, Markdown lines out; the rest of the report
is :mod:`auto_quantize_model.render.reports`.
"""

from __future__ import annotations

import math
from pathlib import Path

from auto_quantize_model.core.last_position import last_position_text
from auto_quantize_model.core.noise import NAN_INTERVAL, noise_sentences, random_weights_notice
from auto_quantize_model.core.proxies import beats
from auto_quantize_model.core.scores import coefficient_text
from auto_quantize_model.manifest_records import Manifest
from auto_quantize_model.render.cells import NOT_AVAILABLE, number
from auto_quantize_model.validation_records import Interval, ValidationReport


def _cell(text: str) -> str:
    """Text for a Markdown table cell: a bare ``|`` would end the cell."""
    return text.replace("|", "\\|")


def _interval(interval: Interval | None, spec: str = ".3f") -> str:
    """``[low, high]``; ``n/a`` when not computed or NaN."""
    if interval is None or math.isnan(interval.low) or math.isnan(interval.high):
        return NOT_AVAILABLE
    return f"[{number(interval.low, spec)}, {number(interval.high, spec)}]"


def _coefficient(value: float, interval: Interval | None) -> str:
    text = coefficient_text(value)
    return text if interval is None else f"{text} {_interval(interval)}"


def _agreement(report: ValidationReport) -> list[str]:
    """Rank agreement, headline first; with a noise floor, every coefficient with its interval."""
    noise, k = report.noise, report.k
    if noise is None:
        return [
            f"- **Rank agreement (measured ΔNLL):** Spearman {coefficient_text(report.spearman_nll)}, "
            f"Kendall {coefficient_text(report.kendall_nll)}; "
            f"(KL) Spearman {coefficient_text(report.spearman_kl)}, "
            f"Kendall {coefficient_text(report.kendall_kl)}",
            f"- **Top-{k} overlap:** {report.topk_overlap:.2f}",
            "- **Noise floor:** not computed (no per-caption measurements, or validate.bootstrap = 0): "
            "differences between measured values may be noise",
        ]
    by_kl = (
        f"Spearman {_coefficient(report.spearman_kl, noise.spearman_kl)}, "
        f"Kendall {_coefficient(report.kendall_kl, noise.kendall_kl)}, "
        f"top-{k} overlap {noise.topk_overlap_kl:.2f}"
    )
    by_nll = (
        f"Spearman {_coefficient(report.spearman_nll, noise.spearman_nll)}, "
        f"Kendall {_coefficient(report.kendall_nll, noise.kendall_nll)}, "
        f"top-{k} overlap {report.topk_overlap:.2f}"
    )
    lines = (
        [f"- **Headline: predicted score vs measured KL:** {by_kl}", f"- **vs measured ΔNLL:** {by_nll}"]
        if noise.headline == "kl"
        else [f"- **Headline: predicted score vs measured ΔNLL:** {by_nll}", f"- **vs measured KL:** {by_kl}"]
    )
    sentences = noise_sentences(
        [g.name for g in report.groups],
        [g.delta_nll for g in report.groups],
        [g.delta_nll_ci or NAN_INTERVAL for g in report.groups],
        [g.kl_ci or NAN_INTERVAL for g in report.groups],
        noise.confidence,
    )
    return [
        *lines,
        f"- **Why this headline:** {noise.headline_reason}.",
        f"- **Noise floor:** {noise.confidence:.0%} intervals in brackets, from {noise.resamples} bootstrap "
        f"resamples of the held-out captions (seed {noise.seed}, {noise.seconds:.2f} s). The measured order "
        f"of {noise.kl_pairs_resolved} of {noise.pairs} pairs of groups is beyond the noise by KL, "
        f"{noise.nll_pairs_resolved} of {noise.pairs} by ΔNLL.",
        *(f"  - {sentence[:1].upper()}{sentence[1:]}." for sentence in sentences),
    ]


def _measured_table(report: ValidationReport) -> list[str]:
    """The validated groups with their intervals. The group comes first: rows that start with a
    rank and a group name are the ranking's (scripts read the ranked table by that shape)."""
    if not report.groups:
        return []
    noisy = set(report.noise.nll_within_noise) if report.noise is not None else set()
    lines = [
        "",
        "### Measured groups",
        "",
        "Each group quantized alone on the format that sets its importance, everything else unquantized.",
        "",
        "| Group | Rank | Selected as | Format | Score | ΔNLL | ΔNLL interval | KL | KL interval "
        "| ΔNLL vs noise |",
        "| :--- | ---: | :--- | :--- | ---: | ---: | :--- | ---: | :--- | :--- |",
    ]
    for g in report.groups:
        verdict = NOT_AVAILABLE if g.delta_nll_ci is None else "within" if g.name in noisy else "beyond"
        lines.append(
            f"| `{g.name}` | {g.rank or NOT_AVAILABLE} | {g.selection} | {g.format} | "
            f"{number(g.score, '.3e')} | {number(g.delta_nll, '.3e')} | {_interval(g.delta_nll_ci, '.2e')} | "
            f"{number(g.kl_div, '.3e')} | "
            f"{_interval(g.kl_ci, '.2e')} | {verdict} |"
        )
    return lines


def _proxy_table(report: ValidationReport) -> list[str]:
    if not report.proxies:
        return []
    noise = report.noise
    lines = [
        "",
        "### Proxy baselines",
        "",
        "Free predictors rated against the same measured damage of the "
        f"{len(report.groups)} validated groups (Spearman over the groups where the proxy is "
        "defined). *AutoQuant lead* is Spearman(AutoQuant, KL) minus Spearman(proxy, KL) on the same "
        "groups and resamples: above 0 throughout, AutoQuant ranks the damage better. Weight errors "
        "come from each format's own weight quantizer (fake quantization); activations are each "
        "group's input on the held-out captions' real tokens, unquantized.",
        "",
        "| Predictor | Groups | Spearman vs KL | Spearman vs ΔNLL | AutoQuant lead (KL) | Verdict |",
        "| :--- | ---: | :--- | :--- | :--- | :--- |",
        f"| **AutoQuant score** | {len(report.groups)} | "
        f"{_coefficient(report.spearman_kl, None if noise is None else noise.spearman_kl)} | "
        f"{_coefficient(report.spearman_nll, None if noise is None else noise.spearman_nll)} | | |",
    ]
    for rating in report.proxies:
        lines.append(
            f"| {_cell(rating.name)} | {rating.groups} | "
            f"{_coefficient(rating.spearman_kl, rating.spearman_kl_ci)} | "
            f"{_coefficient(rating.spearman_nll, rating.spearman_nll_ci)} | "
            f"{_interval(rating.autoquant_lead_kl)} | {beats(rating)} |"
        )
    return lines


def _refinement(report: ValidationReport) -> list[str]:
    refined = report.refinement
    if refined is None:
        return []
    measured = [g for g in refined.groups if g.measured]
    controls = sum(1 for g in measured if g.measured == "control")
    top_k = (
        "unchanged"
        if not refined.entered
        else f"changed: {', '.join(f'`{n}`' for n in refined.entered)} in, "
        f"{', '.join(f'`{n}`' for n in refined.left)} out"
    )
    promoted = (
        "none measured above the least damaging of the top "
        f"{refined.n} (the prediction missed no control group)"
        if not refined.promoted
        else f"{', '.join(f'`{n}`' for n in refined.promoted)} measured above the least damaging of the top "
        f"{refined.n}: the prediction ranked them too low"
    )
    shown = [g for g in refined.groups if g.measured]
    unmeasured = len(refined.groups) - len(shown)
    lines = [
        "",
        "### Measured refinement",
        "",
        f"- **Measured:** the top {refined.n} predicted groups and {controls} random control group(s), each "
        "alone (KL on the same held-out captions)",
        f"- **Cost:** {refined.passes} extra pass(es) over the held-out captions ({refined.forward_batches} "
        f"forward batches) in {refined.seconds:.2f} s; {refined.reused} measurement(s) reused from the "
        "validation above",
        f"- **Top-{refined.k}:** {top_k}",
        (
            f"- **Beyond the noise:** {refined.neighbours_resolved} of {refined.neighbours} neighbouring "
            "pairs of the measured block differ in KL beyond the noise (their interval excludes 0)"
            if report.noise is not None
            else "- **Beyond the noise:** not computed (validate.bootstrap = 0)"
        ),
        f"- **Controls:** {promoted}",
        f"- **Within the top {refined.n}:** Spearman(predicted, KL) "
        f"{coefficient_text(refined.spearman_top_kl)}",
        "- **Order:** the top groups (and any promoted control) by measured KL, ties in predicted order; "
        f"the other {unmeasured} group(s) and the unpromoted controls follow in predicted order.",
        "",
        "| Refined rank | Predicted rank | Group | Measured as | KL | KL interval | ΔNLL |",
        "| ---: | ---: | :--- | :--- | ---: | :--- | ---: |",
    ]
    for g in shown:
        lines.append(
            f"| {g.refined_rank} | {g.predicted_rank} | `{g.name}` | {g.measured} | "
            f"{number(g.kl_div, '.3e')} | {_interval(g.kl_ci, '.2e')} | {number(g.delta_nll, '.3e')} |"
        )
    return lines


def validation_markdown(manifest: Manifest) -> list[str]:
    """The ``## Validation`` section of ``per-layer-sensitivity.md``; nothing without a validation report."""
    report = manifest.validation
    if report is None:
        return []
    source = f" of `{Path(report.holdout_source).name}`" if report.holdout_source else ""
    lines = [
        "",
        "## Validation",
        "",
    ]
    if random_weights_notice(manifest.model.source):
        lines += [
            "> Random weights: the figures below compare a random model's damage with its random scores; "
            "they test the machinery, not AutoQuant.",
            "",
        ]
    lines += [
        f"- **Held-out:** {report.holdout_samples} samples{source}, {report.holdout_tokens} tokens, "
        f"baseline NLL {report.baseline_nll:.4f}",
        *_agreement(report),
        f"- **Additivity:** joint ΔNLL {report.joint_delta_nll:.4g} vs sum of single ΔNLL "
        f"{report.sum_delta_nll:.4g}",
        f"- **AutoQuant's chosen mix:** ΔNLL {report.chosen_delta_nll:.4g}",
        *(
            [f"- **Where a deployed model generates (chosen mix vs 16-bit):** {last_position_text(last)}"]
            if (last := report.last_position) is not None
            else []
        ),
        *(f"- Note: {note}" for note in report.notes),
    ]
    return [*lines, *_measured_table(report), *_proxy_table(report), *_refinement(report)]
