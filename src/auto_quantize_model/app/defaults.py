"""The real collaborators of :class:`~auto_quantize_model.app.run_service.RunService`.

Each is the one place that reaches a heavy part of the package (the pipeline, the report writer,
the frontier measurer, the export loader, the benchmark, torchrun's store) from the run
lifecycle. The service holds them as fields so that tests hand in fakes instead of patching
module paths; everything here imports what it needs when it is called, so ``aqm --help`` and the
folder checks never pay for torch.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import importlib
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from auto_quantize_model.app.logs import PACKAGE_LOGGER
from auto_quantize_model.app.runs import is_out_of_memory, out_of_memory_error
from auto_quantize_model.errors import StageError

if TYPE_CHECKING:
    from auto_quantize_model.app.sweep.points import PointSession
    from auto_quantize_model.app.sweep.workers import Worker, WorkerGroup
    from auto_quantize_model.artifacts import BudgetFrontier, CheckpointInputs, MeasuredFrontier, ReportPaths
    from auto_quantize_model.pipeline import Artifacts
    from auto_quantize_model.specs import FrontierSpec, PipelineSpec

log = logging.getLogger(PACKAGE_LOGGER)

PipelineRunner = Callable[["PipelineSpec", Path], "Artifacts"]
"""Runs a spec (already pointed at the folder's search state) with reports going to the folder."""
ReportWriter = Callable[[Path, "Path | None"], "ReportPaths"]
"""``aqm report``: regenerate the reports of a manifest into a folder (None: the manifest's)."""
AfterRun = Callable[[Path], list[Path]]
"""Writes extra files once a run succeeded (the legacy driver's report aliases); returns them."""

HEAVY_LIBRARIES = ("torch", "transformers", "modelopt.torch.quantization")

OMP_WAIT_POLICY = ("OMP_WAIT_POLICY", "PASSIVE")
"""The default of ``aqm``'s processes (a value in the environment wins): OpenMP threads waiting for
work sleep rather than spin. torch runs each operator of the tiny model on both threads of the
2-core machine, and a spinning thread takes the core the working one needs whenever another
process is busy: at load 11 the tiny default's RunAutoQuant took 4.5 CPU s (11-30 s wall) with
spinning threads and 0.4 CPU s (0.7 s) without, ValidateSensitivity 5.5 and 0.3 CPU s. The
manifest is bit-identical: the same threads split the same work, only their idling differs."""


# --------------------------------------------------------------------------- default collaborators


def idle_threads_sleep() -> None:
    """Set :data:`OMP_WAIT_POLICY` unless the environment has one; only before torch is loaded, since
    OpenMP reads it once, when torch loads it (later it would change nothing but the environment)."""
    if "torch" not in sys.modules:
        os.environ.setdefault(*OMP_WAIT_POLICY)


def freeze_heap_at_exit() -> None:
    """At exit, hide every object still alive from the garbage collector (:func:`gc.freeze`).

    Why: once torch, transformers and ModelOpt are loaded, the interpreter's last collections at
    shutdown walk millions of objects, to free memory the operating system takes back anyway:
    1.3 of the 1.5 CPU seconds such a process spends exiting on the 2-core machine. Exit handlers
    run first (registered after the libraries', this one runs before theirs, which it does not
    affect), and frozen objects are still released by reference counting as modules are torn
    down; only objects in reference cycles are left unfinalized, which Python never promised for
    objects alive at exit. Registered once, however often it is called.
    """
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)


def import_libraries(names: Sequence[str] = HEAVY_LIBRARIES) -> float:
    """Import torch, transformers and ModelOpt before the first stage; seconds spent (0 if loaded).

    They would otherwise be imported inside LoadModel and RunAutoQuant, and their 16-21 s in a
    fresh process on the lent H100 image (more than the six stages there) would read as stage
    time. Imported here, the stage timings are the work itself and the import cost is reported on
    its own line. A library that fails to import is left for its stage to report as a one-line
    error.

    Three settings apply to this process only, chosen for start-up and exit and changing no
    result: ModelOpt is imported with its ``@torch.compile`` function undecorated (unused by a
    run; see :func:`~auto_quantize_model.backend.modelopt.compile_decorators_off`), OpenMP's
    idle threads sleep instead of spinning (:data:`OMP_WAIT_POLICY`), and once torch is loaded
    the exit skips the garbage collector's passes over the libraries (:func:`freeze_heap_at_exit`).
    """
    missing = [name for name in names if name not in sys.modules]
    if not missing:
        return 0.0
    from auto_quantize_model.backend.modelopt import compile_decorators_off, import_off_stack

    if "torch" in missing:
        idle_threads_sleep()
    started = time.perf_counter()
    imported: list[str] = []
    for name in missing:
        try:
            if name.startswith("modelopt"):
                with compile_decorators_off():  # ModelOpt on its own thread, like RunAutoQuant
                    import_off_stack(name)
            else:
                importlib.import_module(name)
        except ImportError:
            continue
        imported.append(name)
    seconds = time.perf_counter() - started
    if "torch" in imported:
        freeze_heap_at_exit()
    if imported:
        log.info("imported %s in %.1f s", ", ".join(imported), seconds)
    return seconds


def run_pipeline(spec: PipelineSpec, folder: Path) -> Artifacts:
    """Run ``spec`` into ``folder``; running out of GPU memory becomes a one-line error."""
    from auto_quantize_model.stages import build_pipeline

    try:
        # ModelOpt prints progress on stdout; stdout is for results (the summary), so route it away
        with contextlib.redirect_stdout(sys.stderr):
            return build_pipeline(spec, folder).run()
    except StageError as err:
        if is_out_of_memory(err.cause):
            raise out_of_memory_error(err.stage, spec) from err
        raise


def new_sweep_session() -> PointSession:
    """The runner of a sweep's points that loads the model once (see :mod:`.sweep.session`)."""
    from auto_quantize_model.app.sweep.session import SweepSession

    return SweepSession()


def join_workers(worker: Worker) -> WorkerGroup:
    from auto_quantize_model.app.sweep.workers import WorkerGroup

    return WorkerGroup.join(worker)


def regenerate_reports(manifest: Path, output: Path | None) -> ReportPaths:
    from auto_quantize_model.render.reports import regenerate_reports as regenerate

    return regenerate(manifest, output)


def measure_frontier(pipeline: PipelineSpec, spec: FrontierSpec) -> tuple[BudgetFrontier, MeasuredFrontier]:
    from auto_quantize_model.app.frontier import measure_run

    return measure_run(pipeline, spec)


def load_for_export(pipeline: PipelineSpec) -> CheckpointInputs:
    from auto_quantize_model.app.export import load_run_model

    return load_run_model(pipeline)


def run_bench(args: argparse.Namespace) -> int:
    from auto_quantize_model.bench.command import run_bench_command

    return run_bench_command(args)


def write_text(path: Path, text: str) -> Path:
    from auto_quantize_model.io.atomic import atomic_write_text

    return atomic_write_text(path, text)


def state_file_in(folder: Path) -> Path:
    from auto_quantize_model.backend.modelopt.checkpoint import STATE_FILE

    return folder / STATE_FILE


def for_folder(spec: PipelineSpec, folder: Path) -> PipelineSpec:
    """The spec as run in ``folder``: ModelOpt's search state is always saved there.

    The checkpoint goes into the run folder (never shared between runs), so rerunning into the
    same folder resumes; ``pipeline.toml`` keeps the spec as the user wrote it, so repeating it
    into a new folder starts a fresh search.
    """
    if spec.autoquant.checkpoint is None:
        autoquant = attrs.evolve(spec.autoquant, checkpoint=str(state_file_in(folder)))
        return attrs.evolve(spec, autoquant=autoquant)
    return spec


def state_files(spec: PipelineSpec, *, existing: bool = True) -> list[Path]:
    """ModelOpt's search state of ``spec`` and the files kept beside it (``existing``: those there now).

    A ``running`` record lists them all before they exist, so that ``--force`` after a kill removes
    a half-finished search rather than letting the new run resume from it.
    """
    from auto_quantize_model.backend.modelopt.checkpoint import StateFiles

    if spec.autoquant.checkpoint is None:
        return []
    files = StateFiles.for_checkpoint(spec.autoquant.checkpoint).all_files()
    return [path for path in files if path.is_file() or not existing]


def has_search_state(spec: PipelineSpec) -> bool:
    """Whether ModelOpt saved a search state to resume from (its side files alone are not one)."""
    from auto_quantize_model.backend.modelopt.checkpoint import checkpoint_file

    checkpoint = spec.autoquant.checkpoint
    return checkpoint is not None and Path(checkpoint_file(checkpoint)).is_file()
