"""The benchmark's results as plain data: records, agreement statistics, tables and JSON.

Pure (no torch): the harness fills these records from its runs, and everything here can be
tested, rendered and compared without a model. Tables are Markdown pipe tables padded for the
terminal, so ``aqm bench`` output pastes into BENCHMARKS.md as is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs

from auto_quantize_model.backend.modelopt.plan import leading_steps
from auto_quantize_model.bench.settings import BenchSettings
from auto_quantize_model.core.stats import kendall_tau_b, spearman, top_k_overlap

LAYOUT_STAGES = ("load", "extract", "calib", "autoquant", "manifest")
"""Stage columns of the layout table (a layout run stops after the manifest)."""
GIB = 1024**3
NOT_AVAILABLE = "n/a"


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


@attrs.frozen
class Environment:
    python: str
    torch: str
    transformers: str
    modelopt: str
    device: str
    device_name: str
    dtype: str
    model: str
    architecture: str


@attrs.frozen
class Warmup:
    """The first AutoQuant of the process, kept out of every measured run."""

    extensions: tuple[tuple[str, str, float], ...]
    """(ModelOpt CUDA extension, what happened, seconds): ``prebuilt``, ``built now``, ``failed``..."""
    autoquant_seconds: float
    """Wall time of the tiny warm-up AutoQuant (one caption, one calibration and one score step)."""


@attrs.frozen
class LayoutRun:
    """One load -> AutoQuant -> manifest run, reduced to numbers."""

    layout: str
    stage_seconds: tuple[tuple[str, float], ...]
    """Wall time per stage as the runner measured it (``load``, ``extract``, ``calib``...)."""
    autoquant_seconds: float
    """Inside ``mtq.auto_quantize`` only (the ``autoquant`` stage also moves batches to the device)."""
    peak_gpu_bytes: int | None
    """Peak allocated GPU memory during the AutoQuant stage, weights included; None on CPU."""
    samples: int
    real_tokens: int
    total_tokens: int
    batches: int
    calib_steps: int
    score_steps: int
    calib_captions: int
    score_captions: int
    score_size: int
    """The ``score_size`` RunAutoQuant was given (captions)."""
    calib_forward_steps: int | None
    """Forward steps ModelOpt really ran to calibrate (all formats together), as RunAutoQuant counted."""
    score_forward_steps: int | None
    effective_bits_lm: float
    weight_checksum: str
    leftover_gpu_bytes: int | None
    """GPU memory still allocated after this run's model was freed (should be ~0)."""
    ranking: tuple[tuple[str, float], ...]
    """(recipe group, importance), most sensitive first."""


@attrs.frozen
class Agreement:
    """How alike two runs rank the recipe groups."""

    first: str
    second: str
    groups: int
    spearman: float
    kendall: float
    top_k: int
    top_k_overlap: float
    ratio_spread: float
    """Coefficient of variation of the per-group importance ratio first/second.

    Near 0 means one run is the other up to a global scale (what packed vs reference should give:
    only the loss weighting differs). Rank statistics can stay high while this grows: on the tiny
    model, scoring other captions kept Spearman at 0.99 but raised this from 1% to 12%.
    """
    same_score_captions: bool
    """Whether both runs scored exactly the same captions (otherwise the figures mix two effects)."""


@attrs.frozen
class ScalingPoint:
    source: str
    captions: int
    real_tokens: int
    total_tokens: int
    calib_steps: int
    score_steps: int
    autoquant_seconds: float
    seconds_per_1k_tokens: float
    peak_gpu_bytes: int | None
    weight_checksum: str


@attrs.frozen
class PipelineRun:
    """The six stages through :class:`~auto_quantize_model.pipeline.Pipeline`, like ``aqm run``."""

    stage_seconds: tuple[tuple[str, float], ...]
    wall_seconds: float
    load_seconds: float
    autoquant_seconds: float
    peak_gpu_bytes: int | None
    """Peak allocated GPU memory over the whole run, weights included; None on CPU."""
    files_written: int

    @property
    def wall_without_load(self) -> float:
        return self.wall_seconds - self.load_seconds


@attrs.frozen
class BenchReport:
    settings: BenchSettings
    environment: Environment
    captions_sha256: str
    warmup: Warmup
    layouts: tuple[LayoutRun, ...]
    agreements: tuple[Agreement, ...]
    pipeline: PipelineRun | None
    scaling: tuple[ScalingPoint, ...]
    weight_checksums: tuple[str, ...]
    """Distinct weight checksums over every load (warm-up, layouts, scaling): one means identical."""

    @property
    def checksums_identical(self) -> bool:
        return len(self.weight_checksums) == 1


# --------------------------------------------------------------------------------------------------
# Arithmetic and agreement
# --------------------------------------------------------------------------------------------------


def steps_for(captions_per_batch: Sequence[int], score_size: int | None) -> tuple[int, int, int, int]:
    """``(calib_steps, calib_captions, score_steps, score_captions)`` as RunAutoQuant will use them.

    Calibration uses every batch (``calib_size`` unset, as in the benchmark).
    """
    calib_steps, calib_captions = leading_steps(captions_per_batch, None)
    score_steps, score_captions = leading_steps(captions_per_batch, score_size)
    return calib_steps, calib_captions, score_steps, score_captions


def seconds_per_1k_tokens(seconds: float, real_tokens: int) -> float:
    return math.nan if real_tokens <= 0 else 1000.0 * seconds / real_tokens


def speedup(slow: float, fast: float) -> float:
    """How many times faster ``fast`` is than ``slow``; NaN when either is not a positive time."""
    if not (slow > 0 and fast > 0):
        return math.nan
    return slow / fast


def stage_seconds(timings: Sequence[tuple[str, float]]) -> tuple[tuple[str, float], ...]:
    """Runner stage names (``RunAutoQuant``) mapped to the registry's short labels (``autoquant``).

    The reference layout's stage gets the calibration stage's label: it stands in for it.
    """
    from auto_quantize_model.stages import STAGE_LABELS

    labels = {**STAGE_LABELS, "BuildReferenceCalib": STAGE_LABELS["BuildCalibLoader"]}
    return tuple((labels.get(name, name), seconds) for name, seconds in timings)


def ratio_spread(first: Sequence[float], second: Sequence[float]) -> float:
    """Coefficient of variation (population) of ``first[i] / second[i]``; NaN if a ratio is undefined."""
    if len(first) != len(second):
        raise ValueError(f"ratio spread needs paired values, got {len(first)} and {len(second)}")
    pairs = list(zip(first, second, strict=True))
    if len(pairs) < 2 or any(not (math.isfinite(a) and math.isfinite(b) and b != 0) for a, b in pairs):
        return math.nan
    ratios = [a / b for a, b in pairs]
    mean = math.fsum(ratios) / len(ratios)
    if mean == 0:
        return math.nan
    variance = math.fsum((r - mean) ** 2 for r in ratios) / len(ratios)
    return math.sqrt(variance) / abs(mean)


def agreement(first: LayoutRun, second: LayoutRun, k: int = 10) -> Agreement:
    """Spearman, Kendall τ-b and top-``k`` overlap of two runs' per-group importances.

    Only groups both runs scored are compared (normally all of them: same model, same formats).
    """
    a = dict(first.ranking)
    b = dict(second.ranking)
    common = [name for name, _ in first.ranking if name in b]
    x = [a[name] for name in common]
    y = [b[name] for name in common]
    order_a = [name for name, _ in first.ranking if name in b]
    order_b = [name for name, _ in second.ranking if name in a]
    same = first.score_captions == second.score_captions and first.samples == second.samples
    return Agreement(
        first=first.layout,
        second=second.layout,
        groups=len(common),
        spearman=spearman(x, y),
        kendall=kendall_tau_b(x, y),
        top_k=k,
        top_k_overlap=top_k_overlap(order_a, order_b, k),
        ratio_spread=ratio_spread(x, y),
        same_score_captions=same,
    )


AGREEMENT_PAIRS = (("packed", "reference"), ("padded", "reference"), ("padded", "packed"))


def agreements(runs: Sequence[LayoutRun], k: int = 10) -> tuple[Agreement, ...]:
    """The pairs the issue asks about, for whichever of them were run."""
    by_layout = {run.layout: run for run in runs}
    return tuple(
        agreement(by_layout[a], by_layout[b], k)
        for a, b in AGREEMENT_PAIRS
        if a in by_layout and b in by_layout
    )


# --------------------------------------------------------------------------------------------------
# Tables and JSON
# --------------------------------------------------------------------------------------------------


def format_gib(value: int | None) -> str:
    return NOT_AVAILABLE if value is None else f"{value / GIB:.2f} GiB"


def _fmt(value: float, spec: str = ".2f") -> str:
    return NOT_AVAILABLE if math.isnan(value) else format(value, spec)


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown pipe table, columns padded for the terminal (pastes into BENCHMARKS.md as is)."""
    widths = [len(h) for h in headers]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells for {len(headers)} columns: {row!r}")
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.ljust(w) for cell, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def layout_table(runs: Sequence[LayoutRun]) -> str:
    headers = [
        "layout",
        *(f"{stage} s" for stage in LAYOUT_STAGES),
        "AutoQuant s",
        "peak GPU",
        "real tokens",
        "total tokens",
        "padding",
        "batches",
        "calib steps",
        "score steps",
        "scored captions",
    ]
    rows = []
    for run in runs:
        seconds = dict(run.stage_seconds)
        padding = 1.0 - run.real_tokens / run.total_tokens if run.total_tokens else math.nan
        rows.append(
            [
                run.layout,
                *(_fmt(seconds.get(stage, math.nan)) for stage in LAYOUT_STAGES),
                _fmt(run.autoquant_seconds),
                format_gib(run.peak_gpu_bytes),
                str(run.real_tokens),
                str(run.total_tokens),
                _fmt(100.0 * padding, ".1f") + "%",
                str(run.batches),
                str(run.calib_steps),
                str(run.score_steps),
                f"{run.score_captions} (asked {run.score_size})",
            ]
        )
    return render_table(headers, rows)


def agreement_table(found: Sequence[Agreement]) -> str:
    rows = [
        [
            f"{a.first} vs {a.second}",
            str(a.groups),
            _fmt(a.spearman, ".4f"),
            _fmt(a.kendall, ".4f"),
            _fmt(a.top_k_overlap, ".2f"),
            _fmt(100.0 * a.ratio_spread, ".1f") + ("%" if math.isfinite(a.ratio_spread) else ""),
            "yes" if a.same_score_captions else "no",
        ]
        for a in found
    ]
    k = found[0].top_k if found else 10
    headers = [
        "pair",
        "groups",
        "Spearman",
        "Kendall τ-b",
        f"top-{k} overlap",
        "importance ratio spread",
        "same scored captions",
    ]
    return render_table(headers, rows)


def scaling_table(points: Sequence[ScalingPoint]) -> str:
    rows = [
        [
            p.source,
            str(p.captions),
            str(p.real_tokens),
            str(p.total_tokens),
            str(p.calib_steps),
            str(p.score_steps),
            _fmt(p.autoquant_seconds),
            _fmt(p.seconds_per_1k_tokens, ".3f"),
            format_gib(p.peak_gpu_bytes),
        ]
        for p in points
    ]
    headers = [
        "captions file",
        "captions",
        "real tokens",
        "total tokens",
        "calib steps",
        "score steps",
        "AutoQuant s",
        "s per 1k real tokens",
        "peak GPU",
    ]
    return render_table(headers, rows)


def pipeline_lines(run: PipelineRun) -> list[str]:
    stages = ", ".join(f"{label} {seconds:.2f} s" for label, seconds in run.stage_seconds)
    return [
        f"whole pipeline (six stages, packed): {run.wall_seconds:.2f} s including the model load, "
        f"{run.wall_without_load:.2f} s excluding it (load {run.load_seconds:.2f} s); "
        f"AutoQuant {run.autoquant_seconds:.2f} s; peak GPU {format_gib(run.peak_gpu_bytes)}; "
        f"{run.files_written} files written",
        f"  stages: {stages}",
    ]


def render_report(report: BenchReport) -> str:
    """The whole human-readable result (stdout of ``aqm bench``)."""
    calib, search, env = report.settings.calib, report.settings.autoquant, report.environment
    lines = [
        f"# aqm bench: {env.model} ({env.architecture}) on {env.device_name} ({env.device}, {env.dtype})",
        "",
        f"versions: python {env.python}, torch {env.torch}, transformers {env.transformers}, "
        f"modelopt {env.modelopt}",
        f"captions: {calib.captions} ({calib.max_samples} captions, sha256 {report.captions_sha256[:12]}), "
        f"seq_len {calib.seq_len}, batch {calib.batch_size}; {'+'.join(search.formats)}, {search.method}, "
        f"effective bits {search.effective_bits:g}, score size {search.score_size} captions",
    ]
    if report.warmup.extensions:
        for name, what, seconds in report.warmup.extensions:
            lines.append(f"ModelOpt CUDA extension {name}: {what} ({seconds:.1f} s)")
    else:
        lines.append("ModelOpt CUDA extension: not used (CPU run)")
    lines.append(
        f"warm-up AutoQuant (one caption, not measured below): {report.warmup.autoquant_seconds:.2f} s"
    )
    lines.append(
        f"weights: {'identical' if report.checksums_identical else 'DIFFERENT'} on every load "
        f"(checksum {', '.join(report.weight_checksums) or NOT_AVAILABLE})"
    )
    leftovers = [run.leftover_gpu_bytes for run in report.layouts if run.leftover_gpu_bytes is not None]
    if leftovers:
        lines.append(
            f"GPU memory still allocated after freeing a run's model: at most {format_gib(max(leftovers))}"
        )
    if report.layouts:
        lines += ["", "## Layouts", "", layout_table(report.layouts)]
        by_layout = {run.layout: run for run in report.layouts}
        if "padded" in by_layout and "packed" in by_layout:
            ratio = speedup(by_layout["padded"].autoquant_seconds, by_layout["packed"].autoquant_seconds)
            lines += ["", f"AutoQuant speed-up, packed vs padded: {_fmt(ratio)}x"]
    if report.agreements:
        lines += ["", "## Per-layer importance agreement", "", agreement_table(report.agreements)]
    if report.pipeline is not None:
        lines += ["", "## Whole pipeline", "", *pipeline_lines(report.pipeline)]
    if report.scaling:
        lines += ["", "## Scaling (packed)", "", scaling_table(report.scaling)]
    return "\n".join(lines) + "\n"


def report_to_dict(report: BenchReport) -> dict[str, Any]:
    """Every number of the report as plain JSON data (the ``--json`` file)."""
    data = attrs.asdict(report)
    data["checksums_identical"] = report.checksums_identical
    if report.pipeline is not None:
        data["pipeline"]["wall_without_load"] = report.pipeline.wall_without_load
    by_layout = {run.layout: run for run in report.layouts}
    if "padded" in by_layout and "packed" in by_layout:
        data["packed_speedup_vs_padded"] = speedup(
            by_layout["padded"].autoquant_seconds, by_layout["packed"].autoquant_seconds
        )
    return data
