"""WriteReports and ``aqm report``: the manifest, the per-layer tables and plots, on disk.

Files (the previous tool's names, so existing scripts keep finding them):

* ``<scheme>_quant_manifest.json``: the manifest (our schema, strict JSON);
* ``per-layer-sensitivity.json``: the previous tool's shape (``scheme``, ``model``, ``dataset``,
  ``autoquant_state``, ``layer_sensitivity: [{layer, num_bits, sensitivity, size_cost}]``) with
  ``rank``, ``best_format`` and every format's bits/score/cost added to each row;
* ``per-layer-sensitivity.md``: the run's warnings first (settings that could not be honoured,
  figures that could not be measured), then run summary, score health, plots, the validation
  (:mod:`auto_quantize_model.render.validation`) and the ranked table;
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
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from auto_quantize_model.artifacts import GroupScore, ReportPaths, StageTiming
from auto_quantize_model.core.experts import experts_markdown, routed_tokens
from auto_quantize_model.core.noise import random_weights_notice
from auto_quantize_model.core.routing import RareRule, apply_rare_rule, chosen_bits, group_shares
from auto_quantize_model.core.scores import NO_QUANT, headline_index
from auto_quantize_model.errors import ConfigError, InputError
from auto_quantize_model.io.atomic import atomic_copy, atomic_write_text
from auto_quantize_model.io.convert import dumps_json, project
from auto_quantize_model.io.manifest import manifest_to_json
from auto_quantize_model.io.manifest_file import MANIFEST_SUFFIX, read_manifest
from auto_quantize_model.manifest_records import Manifest, RankedGroup
from auto_quantize_model.render.cells import NOT_AVAILABLE, number
from auto_quantize_model.render.image_mix import image_mix_lines
from auto_quantize_model.render.validation import validation_markdown

log = logging.getLogger("auto_quantize_model")

STATE_SUFFIX = "_autoquant_state.pt"
LAYER_JSON = "per-layer-sensitivity.json"
LAYER_MD = "per-layer-sensitivity.md"
PLOTS_DIR = "plots"
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


def _bits(value: float | None) -> str:
    return number(value, ".3f")


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
        if dataset.images is not None:
            document["dataset"]["images"] = attrs.asdict(dataset.images)
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
    tokens = routed_tokens(manifest.groups, manifest.routing)
    document["layer_sensitivity"] = [
        layer_row(group) | ({"routed_tokens": tokens[group.name]} if group.name in tokens else {})
        for group in manifest.groups
    ]
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
            f"- **{'Image pairs' if dataset.images else 'Captions'}:** `{dataset.captions_path}`{sha}",
            f"- **Samples:** {dataset.samples} used of {dataset.max_samples} asked, "
            f"{dataset.batches} batches of {dataset.batch_size}, seq_len {dataset.seq_len}, "
            f"layout `{dataset.layout}`",
            f"- **Tokens:** {_or_na(dataset.real_tokens)} real of {dataset.total_tokens} total "
            f"(padding {NOT_AVAILABLE if padding is None else f'{padding:.1%}'})",
            *image_mix_lines(dataset.images),
        ]
    lines += [
        "",
        "## Search result",
        "",
        f"- **Effective bits:** target {_bits(scheme.effective_bits_target)}, "
        f"language model {_bits(scheme.effective_bits_lm)}, whole model {_bits(scheme.effective_bits_model)}",
        f"- **Total score:** {number(scheme.total_score)}",
        f"- **Constraint satisfied:** {'yes' if scheme.satisfied else 'no'}",
        f"- **Scoring:** {scheme.score_samples} samples, {_or_na(scheme.score_steps)} score steps, "
        f"{_or_na(scheme.calib_steps)} calibration steps",
        *_moe_lines(manifest),
    ]
    return [*lines, *_timings(manifest)]


def _score_groups(manifest: Manifest) -> tuple[GroupScore, ...]:
    return tuple(project(group, GroupScore) for group in manifest.groups)


def rare_rule_of(manifest: Manifest) -> RareRule:
    """The solver's rare-expert rule as it applies to this run's groups."""
    _, rule = apply_rare_rule(_score_groups(manifest), manifest.routing, manifest.scheme.rare_expert_tokens)
    return rule


def _moe_lines(manifest: Manifest) -> list[str]:
    """MoE runs: the choice's bits under both cost models and what the rare-expert rule did."""
    if manifest.routing is None:
        return []
    scheme, groups = manifest.scheme, _score_groups(manifest)
    fixed = sum(group.weights for group in manifest.fixed_groups if group.lm)
    active = chosen_bits(groups, fixed, group_shares(groups, manifest.routing))
    rule = rare_rule_of(manifest)
    rule_text = (
        f"expert groups routed fewer than {scheme.rare_expert_tokens} calibration tokens take the mean "
        "scores of their layer's other experts (same part) in aqm's solver (frontier, export); "
        f"applied to {len(rule.applied)} expert group(s)"
        + (f", {len(rule.kept)} kept their own (no well-routed peer)" if rule.kept else "")
        if scheme.rare_expert_tokens
        else "off (autoquant.rare_expert_tokens = 0)"
    )
    return [
        "- **Effective bits by cost model (LM, the run's choice):** "
        f"storage {_bits(scheme.effective_bits_lm)} "
        f"(every expert's weights), active {_bits(active)} (each layer's top-k of its experts, the weights a "
        f"token uses); aqm's solver budgets count `{scheme.cost_model}`",
        f"- **Rare-expert rule:** {rule_text}",
    ]


IMPORTS_STAGE = "library_imports"
"""The first timing of a complete record: importing torch, transformers and ModelOpt (``run.json``'s name)."""


def _timings(manifest: Manifest) -> list[str]:
    """The timings table and what it covers: a run's complete record adds up to the command's wall
    time (``run.json``'s ``seconds``); an older or in-process record covers the stages before the
    manifest was built, and says so."""
    timings = manifest.timings
    if not timings:
        return []
    total = sum(t.seconds for t in timings)
    if timings[0].stage == IMPORTS_STAGE:
        about = (
            "The one-off import of torch, transformers and ModelOpt, then every stage of the run: the total "
            "is the command's wall time as `run.json` records it (`seconds`); only starting Python and "
            "writing `run.json` itself fall outside it."
        )
    else:
        about = (
            "The stages that ran before this manifest was built. Not in it: importing the libraries, "
            "building the manifest and writing the reports (a run folder's `run.json` has them all)."
        )
    lines = ["", "## Timings", "", about, "", "| Stage | Seconds |", "| :--- | ---: |"]
    lines += [f"| {t.stage} | {t.seconds:.2f} |" for t in timings]
    lines.append(f"| **total** | **{total:.2f}** |")
    return lines


def rewrite_timings(manifest: Manifest, paths: ReportPaths, timings: Sequence[StageTiming]) -> Manifest:
    """The manifest and Markdown report among ``paths`` written again with complete ``timings``.

    WriteReports cannot time itself, nor see the library imports before the pipeline; the run
    service calls this once the pipeline is done, so the report's table and the manifest hold
    the same seconds as ``run.json``. Only the manifest and the Markdown are rewritten (each
    atomically); plots and the JSON report hold no timings.
    """
    complete = attrs.evolve(manifest, timings=tuple(timings))
    files = [Path(name) for name in paths.files]
    directory = Path(paths.directory)
    own = directory / manifest_file_name(manifest.scheme.name)
    if own in files:
        atomic_write_text(own, manifest_to_json(complete))
    markdown = directory / LAYER_MD
    if markdown in files:
        had_plots = "\n## Plots\n" in markdown.read_text(encoding="utf-8")
        pictures = [f for f in files if f.parent == directory / PLOTS_DIR]
        text = render_markdown(
            complete,
            health_section=health_markdown(complete.groups),
            plots_section=plots_markdown(complete, pictures, directory) if had_plots else "",
        )
        atomic_write_text(markdown, text)
    return complete


def _notice(manifest: Manifest) -> list[str]:
    """The random-weights sentence, right under the title: nothing below means anything without it."""
    notice = random_weights_notice(manifest.model.source)
    return [f"> **{notice}**", ""] if notice else []


def _table(groups: Sequence[RankedGroup]) -> list[str]:
    formats = quantized_formats(groups)
    lines = [
        "",
        "## Ranked groups",
        "",
        "- **Rank** 1 is the group whose quantization hurts most; ties keep network order.",
        "- **Importance:** the largest AutoQuant score over the quantized formats (higher = more harmful).",
        "- **Layer:** a recipe group, named after its first module. A group of several modules that must "
        "share one format (the fused q/k/v projections, gate/up) lists the others after the name "
        "(`+ k_proj, v_proj`); all of them take the group's format.",
        "- **Score columns:** each format's score for the group (blank where the group was not offered it).",
        "- **Bits / Size cost:** bits per weight and weight size of the format that sets the importance. "
        "The size cost is the group's weights x bits / 16: its size counted in 16-bit weights (x 2 for "
        "bytes), the unit ModelOpt's effective-bits search budgets in.",
        f"- **Best format:** what the effective-bits search chose for the group; `{NO_QUANT}` means left "
        "unquantized, at 16 bits.",
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


def layer_cell(group: RankedGroup) -> str:
    """The group's name and, for a fused group, the other modules it stands for (by their last part).

    ModelOpt names a group after its first module; a manifest that names it otherwise (the
    previous tool's) still gets every module after the first listed."""
    if len(group.module_names) < 2:
        return f"`{group.name}`"
    others = [name for name in group.module_names if name != group.name]
    if len(others) == len(group.module_names):
        others = others[1:]
    return f"`{group.name}` + {', '.join(name.rsplit('.', 1)[-1] for name in others)}"


def _table_row(group: RankedGroup, formats: Sequence[str]) -> str:
    by_format = dict(zip(group.formats, group.scores, strict=True))
    head = headline_index(group.formats, group.scores)
    cells = [
        str(group.rank),
        layer_cell(group),
        _or_na(group.best_format),
        number(group.importance),
        *(number(by_format[name]) if name in by_format else "" for name in formats),
        format(group.bits[head], "g"),
        number(group.costs[head], ".3e"),
    ]
    return "| " + " | ".join(cells) + " |"


def render_markdown(manifest: Manifest, *, health_section: str = "", plots_section: str = "") -> str:
    """The whole ``per-layer-sensitivity.md``; the two sections come from the hooks below."""
    lines = _header(manifest)
    if health_section.strip():
        lines += ["", health_section.strip()]
    if plots_section.strip():
        lines += ["", "## Plots", "", plots_section.strip()]
    lines += experts_markdown(manifest.groups, manifest.routing, rare_rule_of(manifest).applied)
    lines += format_agreement_section(manifest)
    lines += validation_markdown(manifest)
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
