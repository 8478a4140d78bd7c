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

import contextlib
import gc
import hashlib
import logging
import platform
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from auto_quantize_model.artifacts import CalibData, CalibStats, LoadedModel, RunTimings, SensitivityScores
from auto_quantize_model.backend.modelopt.plan import leading_steps
from auto_quantize_model.bench.results import (
    BenchReport,
    Environment,
    LayoutRun,
    PipelineRun,
    ScalingPoint,
    Warmup,
    agreements,
    seconds_per_1k_tokens,
    stage_seconds,
)
from auto_quantize_model.bench.settings import BenchSettings
from auto_quantize_model.core.batching import (
    check_calib_spec,
    packed_columns,
    pad_token_id,
    tokenize_captions,
    truncate,
)
from auto_quantize_model.core.captions import (
    captions_label,
    captions_sha256,
    read_caption_file,
    read_captions,
)
from auto_quantize_model.core.formats import cuda_extensions
from auto_quantize_model.specs import AutoQuantSpec, CalibSpec, ReportSpec

if TYPE_CHECKING:
    from torch import nn

    from auto_quantize_model.pipeline import Artifacts, Stage

log = logging.getLogger("auto_quantize_model")

_CHUNK = 1 << 24
"""Elements per checksum chunk: bounds the int64 copy to 128 MiB whatever the tensor size."""


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


def count_captions(source: str) -> int:
    """Captions in a file (``builtin`` for the bundled one), read as calibration reads them."""
    return len(read_caption_file(source))


# --------------------------------------------------------------------------------------------------
# The reference layout as a stage
# --------------------------------------------------------------------------------------------------


def reference_calib_data(
    token_lists: Sequence[Sequence[int]],
    seq_len: int,
    *,
    pad_id: int,
    captions_path: str,
    captions_sha256: str,
    max_samples: int | None = None,
    captions: Sequence[str] = (),
) -> CalibData:
    """One caption per batch, each exactly as long as the caption: no padding and no neighbour.

    Each batch is :func:`~auto_quantize_model.core.batching.packed_columns` of a single caption,
    so it carries the same keys and label convention as a packed batch (positions ``0..n-1``, no
    ``attention_mask``, label -100 on the first token, which no position predicts anyway). The
    stats say ``packed``, the closest :data:`~auto_quantize_model.artifacts.Layout` (the layout type
    has no third value); ``batch_size`` 1 and ``total_tokens == real_tokens`` tell it apart.
    """
    from auto_quantize_model.backend.lm_forward import as_tensors

    cut, truncated = truncate(token_lists, seq_len)
    columns = [packed_columns([ids], len(ids), 1, pad_id)[0][0] for ids in cut]
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
        total_tokens=real,
        batches=len(columns),
        truncated_samples=truncated,
    )
    return CalibData(
        batches=tuple(as_tensors(batch) for batch in columns),
        captions_per_batch=(1,) * len(columns),
        stats=stats,
        captions=tuple(captions),
    )


@attrs.frozen
class BuildReferenceCalib:
    """Like BuildCalibLoader, but one caption per batch with no padding (``spec.layout`` is ignored).

    The same caption reader, tokenizer call and pad id as the calibration stage, so the only
    difference between a packed run and this reference is how the captions are laid out.
    """

    requires: ClassVar[tuple[type, ...]] = (LoadedModel,)
    optional: ClassVar[tuple[type, ...]] = ()
    produces: ClassVar[type] = CalibData
    spec: CalibSpec = attrs.field(factory=CalibSpec)

    def run(self, inputs: Artifacts) -> CalibData:
        check_calib_spec(self.spec)
        loaded = inputs.get(LoadedModel)
        captions = read_captions(self.spec.captions, self.spec.max_samples)
        return reference_calib_data(
            tokenize_captions(loaded.tokenizer, captions),
            self.spec.seq_len,
            pad_id=pad_token_id(loaded.tokenizer, getattr(loaded.model, "config", None)),
            captions_path=captions_label(self.spec.captions),
            captions_sha256=captions_sha256(captions),
            max_samples=self.spec.max_samples,
            captions=captions,
        )


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------


def _autoquant_spec(s: BenchSettings, score_size: int, state_dir: str) -> AutoQuantSpec:
    """``state_dir``: a fresh folder for ModelOpt's search state (an existing file would be resumed)."""
    from auto_quantize_model.backend.modelopt.checkpoint import STATE_FILE

    return attrs.evolve(s.autoquant, score_size=score_size, checkpoint=str(Path(state_dir) / STATE_FILE))


def _calib_spec(
    s: BenchSettings, layout: str, captions: str | None = None, count: int | None = None
) -> CalibSpec:
    """The settings' calibration spec in ``layout`` (``reference`` builds on the packed spec)."""
    chosen: Any = "packed" if layout == "reference" else layout
    return attrs.evolve(
        s.calib,
        layout=chosen,
        captions=s.calib.captions if captions is None else captions,
        max_samples=s.calib.max_samples if count is None else count,
    )


def _calib_stage(spec: CalibSpec, layout: str) -> Stage:
    from auto_quantize_model.stages.build_calib_loader import BuildCalibLoader

    return BuildReferenceCalib(spec) if layout == "reference" else BuildCalibLoader(spec)


def _continue(stages: Sequence[Stage], store: Artifacts | None = None) -> Artifacts:
    from auto_quantize_model.pipeline import Pipeline

    return Pipeline(stages, supplied=() if store is None else tuple(store)).run()


def run_layout(s: BenchSettings, layout: str, calib: CalibSpec, score_size: int) -> LayoutRun:
    """Load afresh, build ``layout``'s batches, AutoQuant, rank; the model is freed on return."""
    from auto_quantize_model.manifest_records import Manifest
    from auto_quantize_model.stages.build_manifest import BuildManifest
    from auto_quantize_model.stages.extract_lm import ExtractLM
    from auto_quantize_model.stages.load_model import LoadModel

    log.info("bench: %s layout (%s captions, score size %d)", layout, calib.max_samples, score_size)
    store = _continue([LoadModel(s.load)])
    loaded = store.get(LoadedModel)
    device = loaded.device
    checksum = weight_checksum(loaded.model)
    store = _continue([ExtractLM(s.extract), _calib_stage(calib, layout)], store)
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
    from auto_quantize_model.backend.devices import resolve_device
    from auto_quantize_model.pipeline import Pipeline
    from auto_quantize_model.stages.build_calib_loader import BuildCalibLoader
    from auto_quantize_model.stages.build_manifest import BuildManifest
    from auto_quantize_model.stages.extract_lm import ExtractLM
    from auto_quantize_model.stages.load_model import LoadModel
    from auto_quantize_model.stages.write_reports import WriteReports

    device = resolve_device(s.load.device)
    log.info("bench: whole pipeline (six stages, packed layout)")
    with tempfile.TemporaryDirectory(prefix="aqm-bench-") as out:
        stages: list[Stage] = [
            LoadModel(s.load),
            ExtractLM(),
            BuildCalibLoader(_calib_spec(s, "packed")),
            _autoquant_stage(s, s.autoquant.score_size, out),
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


def builds_extensions(device: str, s: BenchSettings) -> bool:
    """Whether the warm-up should build ModelOpt's CUDA extensions: only where the runs will use them.

    With ``autoquant.kernels = "pytorch"`` no measured run loads them, and building them anyway cost
    204 s of a fresh H200's time (MX included) before the first case.
    """
    return device.startswith("cuda") and s.autoquant.kernels == "extension"


def warm_up(s: BenchSettings) -> tuple[Warmup, LoadedModel, str]:
    """Build the CUDA extensions and run one tiny AutoQuant, so measured runs start warm.

    Returns the (now mutated) loaded model for its tokenizer, and its pristine weight checksum.
    """
    from auto_quantize_model.backend.modelopt.search import warm_cuda_extensions
    from auto_quantize_model.stages.extract_lm import ExtractLM
    from auto_quantize_model.stages.load_model import LoadModel

    store = _continue([LoadModel(s.load)])
    loaded = store.get(LoadedModel)
    checksum = weight_checksum(loaded.model)
    extensions = (
        warm_cuda_extensions(cuda_extensions(s.autoquant.formats))
        if builds_extensions(loaded.device, s)
        else ()
    )
    captions = read_captions(s.calib.captions, 1)
    tiny = reference_calib_data(
        tokenize_captions(loaded.tokenizer, captions),
        s.calib.seq_len,
        pad_id=pad_token_id(loaded.tokenizer, getattr(loaded.model, "config", None)),
        captions_path=captions_label(s.calib.captions),
        captions_sha256=captions_sha256(captions),
    )
    log.info("bench: warm-up AutoQuant (one caption; not measured)")
    with tempfile.TemporaryDirectory(prefix="aqm-bench-") as state_dir:
        started = time.perf_counter()
        _continue([ExtractLM(), _autoquant_stage(s, 1, state_dir)], store.with_(tiny))
        seconds = time.perf_counter() - started
    return Warmup(extensions=extensions, autoquant_seconds=seconds), loaded, checksum


def environment(s: BenchSettings, loaded: LoadedModel) -> Environment:
    from auto_quantize_model.io.manifest import installed_versions

    versions = dict(installed_versions())
    device = loaded.device
    if device.startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name(_cuda_index(device))
    else:
        name = f"CPU ({platform.processor() or platform.machine()})"
    return Environment(
        python=versions["python"],
        torch=versions["torch"],
        transformers=versions["transformers"],
        modelopt=versions["modelopt"],
        device=device,
        device_name=name or "cpu",
        dtype=loaded.dtype,
        model=s.load.path,
        architecture=loaded.architecture,
    )


def run_bench(s: BenchSettings) -> BenchReport:
    """Warm-up, the layouts, the whole pipeline and the scaling runs, in that order."""
    warmup, loaded, first_checksum = warm_up(s)
    env = environment(s, loaded)
    device = loaded.device
    del loaded
    release_memory(device)
    captions = read_captions(s.calib.captions, s.calib.max_samples)

    latest: dict[str, LayoutRun] = {}
    for round_index in range(1, s.rounds + 1):
        for layout in s.layouts:
            run = run_layout(s, layout, _calib_spec(s, layout), s.autoquant.score_size)
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
        run = run_layout(s, "packed", _calib_spec(s, "packed", item.source, count), s.autoquant.score_size)
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
