"""``aqm bench``: the padded, packed and per-caption reference layouts, timed and compared on one model.

Why a benchmark inside the package: calibration cost is per step, not per token, so the packed
layout's advantage only shows on a real GPU with a real-sized model, and the claim "same ranking,
fewer steps" needs both halves measured in the same process on the same weights. Everything runs
in one process: a model is loaded afresh for every run (RunAutoQuant mutates it in place), the
previous one is freed first, and a weight checksum proves each reload gave the same weights.

Layouts compared:

* ``padded``: the previous tool's batches (each caption padded to ``seq_len``), built by
  :class:`~auto_quantize_model.stages.build_calib_loader.BuildCalibLoader`;
* ``packed``: the default layout, built the same way;
* ``reference``: one caption per batch, no padding anywhere, so nothing but the caption itself
  reaches the model. It is the ground truth a packed run should reproduce.

Scored captions. ModelOpt scores the *leading* ``num_score_steps`` batches, and a packed batch
holds hundreds of captions. RunAutoQuant therefore takes the fewest leading batches holding
``score_size`` captions and masks the labels of the captions past ``score_size`` in the last one,
so every layout scores exactly the first ``score_size`` captions of the file. A ranking comparison
is only meaningful on the same captions: the tables show how many captions each run scored and
every agreement row says whether the two runs scored the same number (in file order, that means
the same captions). Calibration sees every caption in every layout.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import logging
import math
import platform
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from auto_quantize_model.artifacts import CalibData, CalibStats, LoadedModel, RunTimings, SensitivityScores
from auto_quantize_model.backend.modelopt.plan import leading_steps
from auto_quantize_model.core.batching import (
    BUILTIN_CAPTIONS,
    captions_label,
    captions_sha256,
    check_calib_spec,
    packed_batches,
    pad_token_id,
    parse_captions,
    read_captions,
    tokenize_captions,
    truncate,
)
from auto_quantize_model.core.stats import kendall_tau_b, spearman, top_k_overlap
from auto_quantize_model.errors import AqmError, ConfigError
from auto_quantize_model.specs import AutoQuantSpec, CalibSpec, Dtype, LoadSpec, ReportSpec

if TYPE_CHECKING:
    from torch import nn

    from auto_quantize_model.pipeline import Artifacts, Stage

log = logging.getLogger("auto_quantize_model")

LAYOUTS = ("padded", "packed", "reference")
DEFAULT_MODEL = "builtin:tiny-qwen3-vl"
DEFAULT_SCALING = ("builtin:128", "builtin:512")
STAGE_LABELS: dict[str, str] = {
    "LoadModel": "load",
    "ExtractLM": "extract",
    "BuildCalibLoader": "calib",
    "BuildReferenceCalib": "calib",
    "RunAutoQuant": "autoquant",
    "BuildManifest": "manifest",
    "WriteReports": "reports",
}
"""Short column names for the runner's stage names."""
LAYOUT_STAGES = ("load", "extract", "calib", "autoquant", "manifest")
GIB = 1024**3
NOT_AVAILABLE = "n/a"
_CHUNK = 1 << 24
"""Elements per checksum chunk: bounds the int64 copy to 128 MiB whatever the tensor size."""


# --------------------------------------------------------------------------------------------------
# Results (plain data)
# --------------------------------------------------------------------------------------------------


@attrs.frozen
class ScalingSource:
    """A captions source for the scaling run: a file (or ``builtin``) and how many of its captions."""

    source: str
    captions: int | None = None
    """None means every caption in the file."""


@attrs.frozen
class BenchSettings:
    """Everything ``aqm bench`` was asked to do (the command line, checked)."""

    model: str = DEFAULT_MODEL
    device: str = "auto"
    dtype: Dtype = "auto"
    attn_implementation: str | None = None
    seed: int = 0
    captions: str = BUILTIN_CAPTIONS
    max_samples: int = 512
    seq_len: int = 512
    batch_size: int = 8
    score_size: int = 128
    formats: tuple[str, ...] = ("INT8_DEFAULT_CFG",)
    method: str = "gradient"
    effective_bits: float = 8.0
    layouts: tuple[str, ...] = LAYOUTS
    scaling: tuple[ScalingSource, ...] = ()
    pipeline: bool = True
    plots: bool = True
    top_k: int = 10
    rounds: int = 1
    """Times every layout is run, round-robin; the last round is reported. The first run after
    the warm-up pays for allocator growth and first-use kernels, so speed-up claims want 2."""


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
# Pure helpers
# --------------------------------------------------------------------------------------------------


def reference_calib_data(
    token_lists: Sequence[Sequence[int]],
    seq_len: int,
    *,
    pad_id: int,
    captions_path: str,
    captions_sha256: str,
    max_samples: int | None = None,
) -> CalibData:
    """One caption per batch, each exactly as long as the caption: no padding and no neighbour.

    Each batch is :func:`~auto_quantize_model.core.batching.packed_batches` of a single caption, so it
    carries the same keys and label convention as a packed batch (positions ``0..n-1``, no
    ``attention_mask``, label -100 on the first token, which no position predicts anyway). The
    stats say ``packed``, the closest :data:`~auto_quantize_model.artifacts.Layout` (the layout type
    has no third value); ``batch_size`` 1 and ``total_tokens == real_tokens`` tell it apart.
    """
    cut, truncated = truncate(token_lists, seq_len)
    batches: list[dict[str, Any]] = []
    for ids in cut:
        built, _ = packed_batches([ids], len(ids), 1, pad_id)
        batches.extend(built)
    real = sum(len(ids) for ids in cut)
    stats = CalibStats(
        captions_path=captions_path,
        captions_sha256=captions_sha256,
        layout="packed",
        seq_len=seq_len,
        batch_size=1,
        max_samples=len(cut) if max_samples is None else max_samples,
        samples=len(cut),
        real_tokens=real,
        total_tokens=sum(int(batch["input_ids"].numel()) for batch in batches),
        batches=len(batches),
        truncated_samples=truncated,
    )
    return CalibData(batches=tuple(batches), captions_per_batch=(1,) * len(batches), stats=stats)


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
    """Runner stage names (``RunAutoQuant``) mapped to short column labels (``autoquant``)."""
    return tuple((STAGE_LABELS.get(name, name), seconds) for name, seconds in timings)


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


def parse_scaling_item(text: str) -> ScalingSource:
    """``PATH``, ``PATH:N``, ``builtin`` or ``builtin:N`` (N captions from the start of the file)."""
    source, sep, count = text.rpartition(":")
    if sep and count.isdigit():
        if not source:
            raise ConfigError(f"--scaling-captions {text!r}: a captions file is missing before ':'")
        number = int(count)
        if number <= 0:
            raise ConfigError(f"--scaling-captions {text!r}: the caption count must be > 0")
        return ScalingSource(source, number)
    return ScalingSource(text, None)


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
    s, env = report.settings, report.environment
    lines = [
        f"# aqm bench: {env.model} ({env.architecture}) on {env.device_name} ({env.device}, {env.dtype})",
        "",
        f"versions: python {env.python}, torch {env.torch}, transformers {env.transformers}, "
        f"modelopt {env.modelopt}",
        f"captions: {s.captions} ({s.max_samples} captions, sha256 {report.captions_sha256[:12]}), "
        f"seq_len {s.seq_len}, batch {s.batch_size}; {'+'.join(s.formats)}, {s.method}, "
        f"effective bits {s.effective_bits:g}, score size {s.score_size} captions",
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


# --------------------------------------------------------------------------------------------------
# Torch-side helpers
# --------------------------------------------------------------------------------------------------


def weight_checksum(model: nn.Module) -> str:
    """A hash of every parameter's exact bits, names, shapes and dtypes, computed where they live.

    Values are reinterpreted as integers and summed with position weights in int64, which wraps
    identically in any summation order: equal weights give equal checksums on any device, with
    no copy of an 8 GB model to the host.
    """
    import torch

    views = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        as_int = flat.view(views[flat.element_size()])
        plain = weighted = 0
        for start in range(0, as_int.numel(), _CHUNK):
            chunk = as_int[start : start + _CHUNK].to(torch.int64)
            position = torch.arange(start, start + chunk.numel(), device=chunk.device, dtype=torch.int64)
            plain += int(chunk.sum().item())
            weighted += int((chunk * (position % 65521 + 1)).sum().item())
        digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|{plain}|{weighted}\n".encode())
    return digest.hexdigest()[:16]


def _cuda_index(device: str) -> int:
    return int(device.partition(":")[2] or 0)


@contextlib.contextmanager
def track_peak_gpu_memory(device: str) -> Iterator[list[int]]:
    """Collect the peak allocated memory on ``device`` over the block (append-only list of peaks).

    ModelOpt 0.47 itself calls ``torch.cuda.reset_peak_memory_stats()`` before scoring, which
    would erase the calibration phase's peak: while the block runs, that function first records
    the peak so far. The block's peak is ``max`` of the list. Nothing is recorded on CPU.
    """
    peaks: list[int] = []
    if not device.startswith("cuda"):
        yield peaks
        return
    import torch

    index = _cuda_index(device)
    original = torch.cuda.reset_peak_memory_stats

    def remember_then_reset(target: Any = None) -> None:
        peaks.append(torch.cuda.max_memory_allocated(index))
        original(target)

    torch.cuda.synchronize(index)
    original(index)
    setattr(torch.cuda, "reset_peak_memory_stats", remember_then_reset)  # noqa: B010
    try:
        yield peaks
    finally:
        setattr(torch.cuda, "reset_peak_memory_stats", original)  # noqa: B010
        torch.cuda.synchronize(index)
        peaks.append(torch.cuda.max_memory_allocated(index))


def release_memory(device: str) -> int | None:
    """Collect garbage and return cached CUDA blocks; the bytes still allocated afterwards (None on CPU)."""
    gc.collect()
    if not device.startswith("cuda"):
        return None
    import torch

    torch.cuda.synchronize(_cuda_index(device))
    torch.cuda.empty_cache()
    return int(torch.cuda.memory_allocated(_cuda_index(device)))


def warm_cuda_extensions(formats: Sequence[str]) -> tuple[tuple[str, str, float], ...]:
    """Load (JIT-building on a fresh machine, ~1 min) ModelOpt's CUDA extensions the formats use."""
    from auto_quantize_model.backend.modelopt import import_off_stack
    from auto_quantize_model.backend.modelopt.search import cuda_extension_built

    extensions = import_off_stack("modelopt.torch.quantization.extensions")

    wanted: list[tuple[str, Any]] = [("modelopt_cuda_ext", extensions.get_cuda_ext)]
    if any("FP8" in name.upper() for name in formats):
        wanted.append(("modelopt_cuda_ext_fp8", extensions.get_cuda_ext_fp8))
    if any(tag in name.upper() for name in formats for tag in ("MX", "NVFP4")):
        wanted.append(("modelopt_cuda_ext_mx", extensions.get_cuda_ext_mx))
    found: list[tuple[str, str, float]] = []
    for name, getter in wanted:
        if hasattr(getter, "extension"):
            found.append((name, "already loaded in this process", 0.0))
            continue
        prebuilt = cuda_extension_built(name)
        if not prebuilt:
            log.info(
                "ModelOpt's CUDA extension %s is not built on this machine: building it now "
                "(about a minute, once per machine)",
                name,
            )
        started = time.perf_counter()
        loaded = getter()
        seconds = time.perf_counter() - started
        if loaded is None:
            what = "failed to build or load (ModelOpt falls back to slower code)"
        else:
            what = "prebuilt, loaded" if prebuilt else "JIT-built now"
        found.append((name, what, seconds))
    return tuple(found)


def count_captions(source: str) -> int:
    """Non-blank lines of a captions file (``builtin`` for the bundled one)."""
    from auto_quantize_model.data import builtin_captions_path

    path = builtin_captions_path() if source == BUILTIN_CAPTIONS else Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"captions file {path} cannot be read: {err}") from err
    return len(parse_captions(text.removeprefix("\ufeff")))


# --------------------------------------------------------------------------------------------------
# The reference layout as a stage
# --------------------------------------------------------------------------------------------------


@attrs.frozen
class BuildReferenceCalib:
    """Like BuildCalibLoader, but one caption per batch with no padding (``spec.layout`` is ignored)."""

    requires: ClassVar[tuple[type, ...]] = (LoadedModel,)
    optional: ClassVar[tuple[type, ...]] = ()
    produces: ClassVar[type] = CalibData
    spec: CalibSpec = attrs.field(factory=CalibSpec)

    def run(self, inputs: Artifacts) -> CalibData:
        check_calib_spec(self.spec)
        tokenizer = inputs.get(LoadedModel).tokenizer
        captions = read_captions(self.spec.captions, self.spec.max_samples)
        return reference_calib_data(
            tokenize_captions(tokenizer, captions),
            self.spec.seq_len,
            pad_id=pad_token_id(tokenizer),
            captions_path=captions_label(self.spec.captions),
            captions_sha256=captions_sha256(captions),
            max_samples=self.spec.max_samples,
        )


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------


def _load_spec(s: BenchSettings) -> LoadSpec:
    return LoadSpec(
        path=s.model, dtype=s.dtype, device=s.device, attn_implementation=s.attn_implementation, seed=s.seed
    )


def _autoquant_spec(s: BenchSettings, score_size: int, state_dir: str) -> AutoQuantSpec:
    """``state_dir``: a fresh folder for ModelOpt's search state (an existing file would be resumed)."""
    method: Any = s.method
    return AutoQuantSpec(
        formats=s.formats,
        method=method,
        effective_bits=s.effective_bits,
        score_size=score_size,
        checkpoint=str(Path(state_dir) / "autoquant_state.pt"),
    )


def _calib_spec(
    s: BenchSettings, layout: str, captions: str | None = None, count: int | None = None
) -> CalibSpec:
    chosen: Any = "packed" if layout == "reference" else layout
    return CalibSpec(
        captions=s.captions if captions is None else captions,
        max_samples=s.max_samples if count is None else count,
        seq_len=s.seq_len,
        batch_size=s.batch_size,
        layout=chosen,
    )


def _calib_stage(spec: CalibSpec, layout: str) -> Stage:
    from auto_quantize_model.stages.build_calib_loader import BuildCalibLoader

    return BuildReferenceCalib(spec) if layout == "reference" else BuildCalibLoader(spec)


def _continue(stages: Sequence[Stage], store: Artifacts | None = None) -> Artifacts:
    from auto_quantize_model.pipeline import Pipeline

    return Pipeline(stages, supplied=() if store is None else tuple(store)).run()


def run_layout(s: BenchSettings, layout: str, calib: CalibSpec, score_size: int) -> LayoutRun:
    """Load afresh, build ``layout``'s batches, AutoQuant, rank; the model is freed on return."""
    from auto_quantize_model.io.manifest import Manifest
    from auto_quantize_model.stages.build_manifest import BuildManifest
    from auto_quantize_model.stages.extract_lm import ExtractLM
    from auto_quantize_model.stages.load_model import LoadModel

    log.info("bench: %s layout (%s captions, score size %d)", layout, calib.max_samples, score_size)
    store = _continue([LoadModel(_load_spec(s))])
    loaded = store.get(LoadedModel)
    device = loaded.device
    checksum = weight_checksum(loaded.model)
    store = _continue([ExtractLM(), _calib_stage(calib, layout)], store)
    with (
        tempfile.TemporaryDirectory(prefix="aqm-bench-") as state_dir,
        track_peak_gpu_memory(device) as peaks,
    ):
        store = _continue([_autoquant_stage(s, score_size, state_dir)], store)
    store = _continue([BuildManifest()], store)
    data = store.get(CalibData)
    scores = store.get(SensitivityScores)
    manifest = store.get(Manifest)
    timings = store.get(RunTimings)
    run = LayoutRun(
        layout=layout,
        stage_seconds=stage_seconds([(t.stage, t.seconds) for t in timings.stages]),
        autoquant_seconds=scores.autoquant_seconds,
        peak_gpu_bytes=max(peaks) if peaks else None,
        samples=data.stats.samples,
        real_tokens=data.stats.real_tokens,
        total_tokens=data.stats.total_tokens,
        batches=data.stats.batches,
        calib_steps=scores.calib_steps,
        score_steps=scores.score_steps,
        calib_captions=leading_steps(data.captions_per_batch, None)[1],
        score_captions=scores.score_samples,
        score_size=score_size,
        calib_forward_steps=scores.calib_forward_steps,
        score_forward_steps=scores.score_forward_steps,
        effective_bits_lm=scores.effective_bits_lm,
        weight_checksum=checksum,
        leftover_gpu_bytes=None,
        ranking=tuple((g.name, g.importance) for g in manifest.groups),
    )
    del store, loaded, data, scores, manifest
    return attrs.evolve(run, leftover_gpu_bytes=release_memory(device))


def _autoquant_stage(s: BenchSettings, score_size: int, state_dir: str) -> Stage:
    from auto_quantize_model.stages.run_autoquant import RunAutoQuant

    return RunAutoQuant(_autoquant_spec(s, score_size, state_dir))


def run_pipeline(s: BenchSettings) -> PipelineRun:
    """All six stages in one Pipeline (packed layout), reports into a temporary folder."""
    from auto_quantize_model.artifacts import ReportPaths
    from auto_quantize_model.backend.models import resolve_device
    from auto_quantize_model.pipeline import Pipeline
    from auto_quantize_model.stages.build_calib_loader import BuildCalibLoader
    from auto_quantize_model.stages.build_manifest import BuildManifest
    from auto_quantize_model.stages.extract_lm import ExtractLM
    from auto_quantize_model.stages.load_model import LoadModel
    from auto_quantize_model.stages.write_reports import WriteReports

    device = resolve_device(s.device)
    log.info("bench: whole pipeline (six stages, packed layout)")
    with tempfile.TemporaryDirectory(prefix="aqm-bench-") as out:
        stages: list[Stage] = [
            LoadModel(_load_spec(s)),
            ExtractLM(),
            BuildCalibLoader(_calib_spec(s, "packed")),
            _autoquant_stage(s, s.score_size, out),
            BuildManifest(),
            WriteReports(ReportSpec(output_dir=out, plots=s.plots)),
        ]
        with track_peak_gpu_memory(device) as peaks:
            started = time.perf_counter()
            store = Pipeline(stages).run()
            wall = time.perf_counter() - started
        timings = stage_seconds([(t.stage, t.seconds) for t in store.get(RunTimings).stages])
        run = PipelineRun(
            stage_seconds=timings,
            wall_seconds=wall,
            load_seconds=dict(timings)["load"],
            autoquant_seconds=store.get(SensitivityScores).autoquant_seconds,
            peak_gpu_bytes=max(peaks) if peaks else None,
            files_written=len(store.get(ReportPaths).files),
        )
        del store
    release_memory(device)
    return run


def warm_up(s: BenchSettings) -> tuple[Warmup, LoadedModel, str]:
    """Build the CUDA extensions and run one tiny AutoQuant, so measured runs start warm.

    Returns the (now mutated) loaded model for its tokenizer, and its pristine weight checksum.
    """
    from auto_quantize_model.stages.extract_lm import ExtractLM
    from auto_quantize_model.stages.load_model import LoadModel

    store = _continue([LoadModel(_load_spec(s))])
    loaded = store.get(LoadedModel)
    checksum = weight_checksum(loaded.model)
    extensions = warm_cuda_extensions(s.formats) if loaded.device.startswith("cuda") else ()
    captions = read_captions(s.captions, 1)
    tiny = reference_calib_data(
        tokenize_captions(loaded.tokenizer, captions),
        s.seq_len,
        pad_id=pad_token_id(loaded.tokenizer),
        captions_path=captions_label(s.captions),
        captions_sha256=captions_sha256(captions),
    )
    log.info("bench: warm-up AutoQuant (one caption; not measured)")
    with tempfile.TemporaryDirectory(prefix="aqm-bench-") as state_dir:
        started = time.perf_counter()
        _continue([ExtractLM(), _autoquant_stage(s, 1, state_dir)], store.with_(tiny))
        seconds = time.perf_counter() - started
    return Warmup(extensions=extensions, autoquant_seconds=seconds), loaded, checksum


def environment(s: BenchSettings, loaded: LoadedModel) -> Environment:
    import importlib.metadata

    import torch
    import transformers

    try:
        modelopt_version = importlib.metadata.version("nvidia-modelopt")
    except importlib.metadata.PackageNotFoundError:
        modelopt_version = "not installed"
    device = loaded.device
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(_cuda_index(device))
    else:
        name = f"CPU ({platform.processor() or platform.machine()})"
    return Environment(
        python=platform.python_version(),
        torch=str(torch.__version__),
        transformers=str(transformers.__version__),
        modelopt=modelopt_version,
        device=device,
        device_name=name or "cpu",
        dtype=loaded.dtype,
        model=s.model,
        architecture=loaded.architecture,
    )


def run_bench(s: BenchSettings) -> BenchReport:
    """Warm-up, the layouts, the whole pipeline and the scaling runs, in that order."""
    warmup, loaded, first_checksum = warm_up(s)
    env = environment(s, loaded)
    device = loaded.device
    del loaded
    release_memory(device)
    captions = read_captions(s.captions, s.max_samples)

    latest: dict[str, LayoutRun] = {}
    for round_index in range(1, s.rounds + 1):
        for layout in s.layouts:
            run = run_layout(s, layout, _calib_spec(s, layout), s.score_size)
            if layout in latest:
                log.info(
                    "bench: %s AutoQuant %.2f s in round %d (was %.2f s)",
                    layout,
                    run.autoquant_seconds,
                    round_index,
                    latest[layout].autoquant_seconds,
                )
            latest[layout] = run
    runs = [latest[layout] for layout in s.layouts]
    scored = {run.layout: run.score_captions for run in runs}
    if len(set(scored.values())) > 1:
        log.warning(
            "bench: the layouts scored different numbers of captions (%s): their rankings mix two effects",
            ", ".join(f"{layout} {count}" for layout, count in scored.items()),
        )

    pipeline = run_pipeline(s) if s.pipeline else None

    points: list[ScalingPoint] = []
    for item in s.scaling:
        count = item.captions if item.captions is not None else count_captions(item.source)
        run = run_layout(s, "packed", _calib_spec(s, "packed", item.source, count), s.score_size)
        points.append(
            ScalingPoint(
                source=captions_label(item.source),
                captions=run.samples,
                real_tokens=run.real_tokens,
                total_tokens=run.total_tokens,
                calib_steps=run.calib_steps,
                score_steps=run.score_steps,
                autoquant_seconds=run.autoquant_seconds,
                seconds_per_1k_tokens=seconds_per_1k_tokens(run.autoquant_seconds, run.real_tokens),
                peak_gpu_bytes=run.peak_gpu_bytes,
                weight_checksum=run.weight_checksum,
            )
        )
    checksums = [first_checksum, *(r.weight_checksum for r in runs), *(p.weight_checksum for p in points)]
    return BenchReport(
        settings=s,
        environment=env,
        captions_sha256=captions_sha256(captions),
        warmup=warmup,
        layouts=tuple(runs),
        agreements=agreements(runs, s.top_k),
        pipeline=pipeline,
        scaling=tuple(points),
        weight_checksums=tuple(dict.fromkeys(checksums)),
    )


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aqm bench",
        description="Time the padded, packed and one-caption-per-batch reference calibration layouts on "
        "one model, compare their per-layer rankings, time the whole pipeline and a scaling run.",
    )
    add = parser.add_argument
    add(
        "--model",
        default=DEFAULT_MODEL,
        help="checkpoint directory, builtin:tiny-qwen3-vl or config:qwen3-vl-4b",
    )
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    add("--attn-implementation", default=None, help="sdpa, eager... (default: transformers' choice)")
    add("--seed", type=int, default=0, help="seed of the random weights of builtin:/config: models")
    add("--captions", default=BUILTIN_CAPTIONS, help="captions file, one per line (default: bundled)")
    add("--max-samples", type=_positive_int, default=512)
    add("--seq-len", type=_positive_int, default=512)
    add("--batch-size", type=_positive_int, default=8)
    add("--score-size", type=_positive_int, default=128, help="captions to score (see the module notes)")
    add("--formats", nargs="+", default=["INT8_DEFAULT_CFG"], help="format names (space or comma separated)")
    add("--effective-bits", type=float, default=8.0)
    add("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    add(
        "--scaling-captions",
        nargs="+",
        default=list(DEFAULT_SCALING),
        metavar="PATH[:N]",
        help="captions files for the packed scaling run, optionally with a caption count "
        "(default: builtin:128 builtin:512)",
    )
    add("--skip-scaling", action="store_true")
    add("--skip-pipeline", action="store_true", help="do not time the whole six-stage pipeline")
    add("--no-plots", action="store_true", help="whole-pipeline run without plots (faster reports)")
    add("--top-k", type=_positive_int, default=10)
    add(
        "--rounds",
        type=_positive_int,
        default=1,
        help="run the layouts round-robin this many times and report the last round (2 removes "
        "first-run effects from the speed-up)",
    )
    add("--json", type=Path, default=None, metavar="OUT.json", help="also write every number here")
    return parser


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    formats = tuple(part for item in args.formats for part in item.split(",") if part)
    if not formats:
        raise ConfigError("--formats: give at least one format name")
    layouts = tuple(dict.fromkeys(args.layouts))
    scaling = () if args.skip_scaling else tuple(parse_scaling_item(item) for item in args.scaling_captions)
    return BenchSettings(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        attn_implementation=args.attn_implementation,
        seed=args.seed,
        captions=args.captions,
        max_samples=args.max_samples,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        score_size=args.score_size,
        formats=formats,
        effective_bits=args.effective_bits,
        layouts=layouts,
        scaling=scaling,
        pipeline=not args.skip_pipeline,
        plots=not args.no_plots,
        top_k=args.top_k,
        rounds=args.rounds,
    )


def _ensure_logging() -> None:
    from auto_quantize_model.app.logs import configure_logging

    configure_logging()


def main(argv: Sequence[str] | None = None) -> int:
    """``aqm bench``: prints the tables on stdout (progress on stderr); 0 on success."""
    args = build_parser().parse_args(argv)
    _ensure_logging()
    try:
        settings = settings_from_args(args)
        with contextlib.redirect_stdout(sys.stderr):  # ModelOpt prints progress; stdout is for results
            report = run_bench(settings)
        text = render_report(report)
        if args.json is not None:
            from auto_quantize_model.io.atomic import atomic_write_text, dumps_json

            atomic_write_text(args.json, dumps_json(report_to_dict(report)))
    except AqmError as err:
        print(f"aqm bench: error: {err}", file=sys.stderr)
        return err.exit_code
    sys.stdout.write(text)
    if args.json is not None:
        sys.stdout.write(f"\nnumbers written to {args.json}\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
