"""WriteReports and ``aqm report``: the manifest, the per-layer tables and plots, on disk.

Files (the previous tool's names, so existing scripts keep finding them):

* ``<scheme>_quant_manifest.json``: the manifest (our schema, strict JSON);
* ``per-layer-sensitivity.json``: the previous tool's shape (``scheme``, ``model``, ``dataset``,
  ``autoquant_state``, ``layer_sensitivity: [{layer, num_bits, sensitivity, size_cost}]``) with
  ``rank``, ``best_format`` and every format's bits/score/cost added to each row;
* ``per-layer-sensitivity.md``: the run's warnings first (settings that could not be honoured,
  figures that could not be measured), then run summary, score health, plots and the ranked table;
* ``plots/*.png|svg`` unless plots are off; ``<scheme>_autoquant_state.pt`` when asked for.

Every table lists groups in manifest order, which is rank order, so ranks agree across the three
files by construction. Every file is written atomically (:mod:`auto_quantize_model.io.atomic`).

Report-only regeneration (:func:`regenerate_reports`) rewrites the JSON/Markdown/plots from a
manifest and never rewrites the manifest itself. For the previous tool's manifests it needs an
output folder other than the manifest's own, because that folder holds the previous tool's
reports under the very same file names and those are the reference we compare against.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from auto_quantize_model.artifacts import Interval, ReportPaths, ValidationReport
from auto_quantize_model.core.experts import experts_markdown
from auto_quantize_model.core.noise import NAN_INTERVAL, noise_sentences, random_weights_notice
from auto_quantize_model.core.proxies import beats
from auto_quantize_model.core.scores import NO_QUANT, coefficient_text, headline_index
from auto_quantize_model.errors import ConfigError, InputError
from auto_quantize_model.io.atomic import atomic_copy, atomic_write_text
from auto_quantize_model.io.convert import dumps_json
from auto_quantize_model.io.manifest import manifest_to_json
from auto_quantize_model.io.manifest_file import MANIFEST_SUFFIX, read_manifest
from auto_quantize_model.manifest_records import Manifest, RankedGroup

log = logging.getLogger("auto_quantize_model")

STATE_SUFFIX = "_autoquant_state.pt"
LAYER_JSON = "per-layer-sensitivity.json"
LAYER_MD = "per-layer-sensitivity.md"
PLOTS_DIR = "plots"
NOT_AVAILABLE = "n/a"
TABLE_ALL_UP_TO = 60
"""Rankings up to this many groups are one table; longer ones show the top :data:`TABLE_TOP`."""
TABLE_TOP = 30
"""Rows shown open in a long ranking (as many as the bar chart draws)."""
TABLE_COLLAPSED_UP_TO = 1000
"""The rest of a ranking up to this many groups follows in a collapsed table; beyond it (split
MoE experts: 6,000+ groups) the JSON and the manifest hold them, a Markdown page would not."""


def manifest_file_name(scheme: str) -> str:
    return f"{scheme}{MANIFEST_SUFFIX}"


def state_file_name(scheme: str) -> str:
    return f"{scheme}{STATE_SUFFIX}"


# --------------------------------------------------------------------------------------------
# Pure rendering


def _or_na(value: object) -> str:
    return NOT_AVAILABLE if value is None or value == "" else str(value)


def _num(value: float | None, spec: str = ".4e") -> str:
    if value is None:
        return NOT_AVAILABLE
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return format(value, spec)


def _bits(value: float | None) -> str:
    return _num(value, ".3f")


def quantized_formats(groups: Sequence[RankedGroup]) -> tuple[str, ...]:
    """Every non-NONE format any group was scored with, in order of first appearance."""
    seen: dict[str, None] = {}
    for group in groups:
        for name in group.formats:
            if name != NO_QUANT:
                seen.setdefault(name, None)
    return tuple(seen)


def padding_fraction(real_tokens: int | None, total_tokens: int) -> float | None:
    if real_tokens is None or total_tokens <= 0:
        return None
    return 1.0 - real_tokens / total_tokens


def layer_row(group: RankedGroup) -> dict[str, Any]:
    """One ``layer_sensitivity`` entry: the previous tool's four keys first, then ours."""
    head = headline_index(group.formats, group.scores)
    return {
        "layer": group.name,
        "num_bits": group.bits[head],
        "sensitivity": group.importance,
        "size_cost": group.costs[head],
        "rank": group.rank,
        "best_format": group.best_format or None,
        "formats": {
            name: {"bits": bits, "score": score, "cost": cost}
            for name, bits, score, cost in zip(
                group.formats, group.bits, group.scores, group.costs, strict=True
            )
        },
    }


def render_layer_json(manifest: Manifest, *, state_file: str | None = None) -> dict[str, Any]:
    """The ``per-layer-sensitivity.json`` document (plain data; :func:`dumps_json` writes it)."""
    scheme = manifest.scheme
    notice = random_weights_notice(manifest.model.source)
    document: dict[str, Any] = {"notice": notice} if notice else {}
    document |= {
        "scheme": {
            "name": scheme.name,
            "auto_quantize_bits": scheme.effective_bits_target,
            "auto_quantize_method": scheme.method,
            "auto_quantize_score_size": scheme.score_samples,
            "coverage_mode": scheme.scope,
            "quant_formats": list(scheme.formats),
        },
        "model": {
            "id": manifest.model.source,
            "architecture": manifest.model.architecture or None,
            "dtype": manifest.model.dtype or None,
            "device": manifest.model.device or None,
        },
    }
    dataset = manifest.dataset
    if dataset is not None:
        document["dataset"] = {
            "captions_path": dataset.captions_path,
            "captions_sha256": dataset.captions_sha256,
            "max_calib_samples": dataset.max_samples,
            "num_calib_samples": dataset.samples,
            "calib_seq_len": dataset.seq_len,
            "batch_size": dataset.batch_size,
            "num_calib_batches": dataset.batches,
            "layout": dataset.layout,
            "real_tokens": dataset.real_tokens,
            "total_tokens": dataset.total_tokens,
            "padding_fraction": padding_fraction(dataset.real_tokens, dataset.total_tokens),
        }
    document["autoquant_state"] = {
        "constraints": {"effective_bits": scheme.effective_bits_model},
        "score": scheme.total_score,
        "is_satisfied": scheme.satisfied,
        "effective_bits_target": scheme.effective_bits_target,
        "effective_bits_lm": scheme.effective_bits_lm,
        "effective_bits_model": scheme.effective_bits_model,
        "state_file": state_file,
    }
    document["origin"] = manifest.origin
    document["layer_sensitivity"] = [layer_row(group) for group in manifest.groups]
    return document


def _warnings(manifest: Manifest) -> list[str]:
    """A block right under the title: a reader acting on the ranking must see these before it.

    Manifests written before :attr:`ValidationReport.unmet` existed copied every validation note
    into their warnings; those are shown once, in the Validation section.
    """
    notes = () if manifest.validation is None else manifest.validation.notes
    warnings = [warning for warning in manifest.warnings if warning not in notes]
    if not warnings:
        return []
    return [
        "> **Warnings: what this run could not do as asked**",
        ">",
        *(f"> - {warning}" for warning in warnings),
        "",
    ]


def _header(manifest: Manifest) -> list[str]:
    scheme, model = manifest.scheme, manifest.model
    formats = ", ".join(f"`{name}`" for name in scheme.formats)
    lines = [
        f"# Per-layer quantization sensitivity: `{scheme.name}`",
        "",
        *_notice(manifest),
        *_warnings(manifest),
        f"- **Scheme:** `{scheme.name}`: formats {formats}; method `{scheme.method}`; "
        f"scope `{_or_na(scheme.scope)}`",
        f"- **Model:** `{_or_na(model.source)}` ({_or_na(model.architecture)}, dtype {_or_na(model.dtype)}, "
        f"device {_or_na(model.device)})",
    ]
    if manifest.origin == "legacy":
        lines.append(
            "- **Origin:** converted from the previous tool's manifest; facts it did not record show as n/a"
        )
    if manifest.created_at:
        lines.append(f"- **Created:** {manifest.created_at}")
    if manifest.versions:
        lines.append(
            "- **Versions:** " + ", ".join(f"{name} {version}" for name, version in manifest.versions)
        )
    lines += ["", "## Calibration data", ""]
    dataset = manifest.dataset
    if dataset is None:
        lines.append("Not recorded.")
    else:
        padding = padding_fraction(dataset.real_tokens, dataset.total_tokens)
        sha = "" if dataset.captions_sha256 is None else f" (sha256 `{dataset.captions_sha256[:16]}…`)"
        lines += [
            f"- **Captions:** `{dataset.captions_path}`{sha}",
            f"- **Samples:** {dataset.samples} used of {dataset.max_samples} asked, "
            f"{dataset.batches} batches of {dataset.batch_size}, seq_len {dataset.seq_len}, "
            f"layout `{dataset.layout}`",
            f"- **Tokens:** {_or_na(dataset.real_tokens)} real of {dataset.total_tokens} total "
            f"(padding {NOT_AVAILABLE if padding is None else f'{padding:.1%}'})",
        ]
    lines += [
        "",
        "## Search result",
        "",
        f"- **Effective bits:** target {_bits(scheme.effective_bits_target)}, "
        f"language model {_bits(scheme.effective_bits_lm)}, whole model {_bits(scheme.effective_bits_model)}",
        f"- **Total score:** {_num(scheme.total_score)}",
        f"- **Constraint satisfied:** {'yes' if scheme.satisfied else 'no'}",
        f"- **Scoring:** {scheme.score_samples} samples, {_or_na(scheme.score_steps)} score steps, "
        f"{_or_na(scheme.calib_steps)} calibration steps",
    ]
    if manifest.timings:
        total = sum(t.seconds for t in manifest.timings)
        lines += ["", "## Timings", "", "| Stage | Seconds |", "| :--- | ---: |"]
        lines += [f"| {t.stage} | {t.seconds:.2f} |" for t in manifest.timings]
        lines.append(f"| **total** | **{total:.2f}** |")
    return lines


def _cell(text: str) -> str:
    """Text for a Markdown table cell: a bare ``|`` would end the cell."""
    return text.replace("|", "\\|")


def _notice(manifest: Manifest) -> list[str]:
    """The random-weights sentence, right under the title: nothing below means anything without it."""
    notice = random_weights_notice(manifest.model.source)
    return [f"> **{notice}**", ""] if notice else []


def _interval(interval: Interval | None, spec: str = ".3f") -> str:
    """``[low, high]``; ``n/a`` when not computed or NaN."""
    if interval is None or math.isnan(interval.low) or math.isnan(interval.high):
        return NOT_AVAILABLE
    return f"[{_num(interval.low, spec)}, {_num(interval.high, spec)}]"


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
            f"{_num(g.score, '.3e')} | {_num(g.delta_nll, '.3e')} | {_interval(g.delta_nll_ci, '.2e')} | "
            f"{_num(g.kl_div, '.3e')} | "
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
            f"{_num(g.kl_div, '.3e')} | {_interval(g.kl_ci, '.2e')} | {_num(g.delta_nll, '.3e')} |"
        )
    return lines


def _validation(manifest: Manifest) -> list[str]:
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
        *(f"- Note: {note}" for note in report.notes),
    ]
    return [*lines, *_measured_table(report), *_proxy_table(report), *_refinement(report)]


def _table(groups: Sequence[RankedGroup]) -> list[str]:
    formats = quantized_formats(groups)
    lines = [
        "",
        "## Ranked groups",
        "",
        "- **Rank** 1 is the group whose quantization hurts most; ties keep network order.",
        "- **Importance:** the largest AutoQuant score over the quantized formats (higher = more harmful).",
        "- **Score columns:** each format's score for the group (blank where the group was not offered it).",
        "- **Bits / Size cost:** bits and compressed weight size of the format that sets the importance.",
        "- **Best format:** what the effective-bits search chose for the group.",
        "",
    ]
    head = [
        "| Rank | Layer | Best format | Importance | "
        + "".join(f"{name} | " for name in formats)
        + "Bits | Size cost |",
        "| ---: | :--- | :--- | ---: | " + "---: | " * len(formats) + "---: | ---: |",
    ]
    rows = [_table_row(group, formats) for group in groups]
    if len(rows) <= TABLE_ALL_UP_TO:
        return [*lines, *head, *rows]
    rest = f"ranks {TABLE_TOP + 1} to {len(rows)}"
    lines += [f"The {TABLE_TOP} most sensitive of {len(rows)} groups:", "", *head, *rows[:TABLE_TOP], ""]
    if len(rows) <= TABLE_COLLAPSED_UP_TO:
        return [
            *lines,
            f"<details><summary>The others ({rest})</summary>",
            "",
            *head,
            *rows[TABLE_TOP:],
            "",
            "</details>",
        ]
    return [
        *lines,
        f"The others ({rest}) are in `{LAYER_JSON}` (`layer_sensitivity`, in rank order) and in the "
        "manifest: a table that long is more than a Markdown page can usefully show.",
    ]


def _table_row(group: RankedGroup, formats: Sequence[str]) -> str:
    by_format = dict(zip(group.formats, group.scores, strict=True))
    head = headline_index(group.formats, group.scores)
    cells = [
        str(group.rank),
        f"`{group.name}`",
        _or_na(group.best_format),
        _num(group.importance),
        *(_num(by_format[name]) if name in by_format else "" for name in formats),
        format(group.bits[head], "g"),
        _num(group.costs[head], ".3e"),
    ]
    return "| " + " | ".join(cells) + " |"


def render_markdown(manifest: Manifest, *, health_section: str = "", plots_section: str = "") -> str:
    """The whole ``per-layer-sensitivity.md``; the two sections come from the hooks below."""
    lines = _header(manifest)
    if health_section.strip():
        lines += ["", health_section.strip()]
    if plots_section.strip():
        lines += ["", "## Plots", "", plots_section.strip()]
    lines += experts_markdown(manifest.groups)
    lines += format_agreement_section(manifest)
    lines += _validation(manifest)
    lines += _table(manifest.groups)
    return "\n".join(lines) + "\n"


def format_agreement_section(manifest: Manifest) -> list[str]:
    """The section on groups sensitive under every format vs only some (two or more formats): the
    manifest's own summary, or one made from its groups when it has none (manifests written before it)."""
    from auto_quantize_model.core.format_agreement import format_agreement, format_agreement_markdown

    summary = manifest.format_agreement
    if summary is None:
        summary = format_agreement(manifest.groups, order=manifest.scheme.formats)
    return format_agreement_markdown(summary)


# --------------------------------------------------------------------------------------------
# Hooks into sibling modules, imported when called: plots pulls in matplotlib (slow), and
# ``aqm report``/``aqm diff`` readers should not pay for it unless they write pictures.


def health_markdown(groups: Sequence[RankedGroup]) -> str:
    """HOOK: the score-health section (:mod:`auto_quantize_model.core.health`).

    No groups is said plainly: "All 0 groups passed every check" would read as a clean bill of
    health for a ranking of nothing. Readers refuse such manifests (:func:`read_manifest`); this
    keeps a manifest made in memory from saying otherwise.
    """
    from auto_quantize_model.core.health import render_health_markdown, score_health

    if not groups:
        return "## Score health\n\nThe manifest ranks no group: there are no scores to check.\n"
    return render_health_markdown(score_health(groups))


def make_plots(manifest: Manifest, directory: Path) -> tuple[Path, ...]:
    """HOOK: PNG + SVG plots into ``directory`` (:func:`auto_quantize_model.render.plots.write_plots`)."""
    from auto_quantize_model.render.plots import write_plots

    return write_plots(manifest, directory)


def plots_markdown(manifest: Manifest, paths: Sequence[Path], relative_to: Path) -> str:
    """HOOK: Markdown embedding the PNGs among ``paths`` (links relative to the report), then why
    any plot of ``manifest`` is absent, so a missing picture is explained rather than just missing."""
    from auto_quantize_model.render.plots import missing_plots, render_plots_markdown

    return render_plots_markdown(paths, relative_to, missing_plots(manifest))


# --------------------------------------------------------------------------------------------
# Writing


def write_reports(
    manifest: Manifest,
    output_dir: str | os.PathLike[str],
    *,
    write_manifest: bool = True,
    plots: bool = True,
    state_path: str | os.PathLike[str] | None = None,
) -> ReportPaths:
    """Write every report file for ``manifest`` into ``output_dir`` (created if needed).

    ``state_path``: ModelOpt's search-state file to copy in as ``<scheme>_autoquant_state.pt``.
    """
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    scheme = manifest.scheme.name
    if write_manifest:
        written.append(atomic_write_text(directory / manifest_file_name(scheme), manifest_to_json(manifest)))
    state_file: str | None = None
    if state_path is not None:
        source, target = Path(state_path), directory / state_file_name(scheme)
        if not source.is_file():
            raise InputError(f"AutoQuant state file {source} does not exist: nothing to save")
        if source.resolve() != target.resolve():
            atomic_copy(source, target)
        written.append(target)
        state_file = target.name
    layer_json = render_layer_json(manifest, state_file=state_file)
    written.append(atomic_write_text(directory / LAYER_JSON, dumps_json(layer_json)))
    plot_paths = make_plots(manifest, directory / PLOTS_DIR) if plots else ()
    written.extend(plot_paths)
    markdown = render_markdown(
        manifest,
        health_section=health_markdown(manifest.groups),
        plots_section=plots_markdown(manifest, plot_paths, directory) if plots else "",
    )
    written.append(atomic_write_text(directory / LAYER_MD, markdown))
    return ReportPaths(directory=str(directory), files=tuple(str(p) for p in written))


def regenerate_reports(
    manifest_path: str | os.PathLike[str],
    output_dir: str | os.PathLike[str] | None = None,
    *,
    plots: bool = True,
) -> ReportPaths:
    """Rewrite JSON/Markdown/plots from a manifest (``aqm report``); the manifest is never rewritten.

    Our manifests default to their own folder. The previous tool's manifests need an
    ``output_dir`` that is not their folder, so their original reports are never overwritten.
    """
    source = Path(manifest_path)
    manifest = read_manifest(source)
    if output_dir is None:
        if manifest.origin == "legacy":
            raise ConfigError(
                f"{source} is a manifest of the previous tool; its folder holds that tool's reports "
                "under the same names: pass an output folder (--output DIR)"
            )
        target = source.parent
    else:
        target = Path(output_dir)
        if manifest.origin == "legacy" and target.resolve() == source.parent.resolve():
            raise ConfigError(
                f"{target} holds the previous tool's reports for {source.name}; "
                "choose another output folder so they are not overwritten"
            )
    return write_reports(manifest, target, write_manifest=False, plots=plots)
