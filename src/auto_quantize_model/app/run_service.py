"""The run lifecycle behind ``aqm run``, ``aqm resume``, ``aqm report`` and ``diff --output``.

The CLI parses and checks; everything that touches an output folder happens here, in one
:class:`RunService` whose collaborators are injected: the pipeline runner, the library import,
the report writer and the text writer. Tests hand in fakes (a runner that fails, a writer whose
disk is full) instead of patching module paths, and never pay for torch.

A run, single or sweep:

1. makes its folder (a path problem is one line: :mod:`folders`) and takes the folder's lock
   (a live owner is named and the run refused: :mod:`lock`);
2. decides fresh, resume or refuse (:func:`runs.open_run_folder`); ``--force`` first removes
   the previous run's files, and only those;
3. writes ``pipeline.toml`` and ``run.json`` (``running``, owner, files), runs, and records
   ``complete`` with every file written;
4. on failure removes what this attempt wrote, except the search state and its bookkeeping when
   there is one to resume from (then ``run.json`` says ``failed: <reason>``). A failure to write
   that record (a full disk) is logged and never hides the original error.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import importlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import attrs

from auto_quantize_model.app.folders import (
    INDEX_NAME,
    PIPELINE_FILE,
    RUN_FILE,
    OutputError,
    aqm_files,
    check_output_dir,
    describe_os_error,
    file_above,
    is_aqm_pipeline,
    make_folder,
    os_reason,
    output_error,
    relative_names,
    remove_files,
    remove_made,
)
from auto_quantize_model.app.lock import FolderLock, Owner
from auto_quantize_model.app.logs import PACKAGE_LOGGER
from auto_quantize_model.app.runs import (
    COMPLETE,
    FAILED,
    RUNNING,
    ForwardSteps,
    RunFolder,
    RunRecord,
    Writer,
    changed_settings,
    failure_reason,
    is_out_of_memory,
    open_run_folder,
    out_of_memory_error,
    read_run,
    refuse_live_owner,
    remove_previous_run,
    run_record,
    utc_now,
    write_run,
)
from auto_quantize_model.errors import InputError, StageError

if TYPE_CHECKING:
    from auto_quantize_model.app.distributed import Worker, WorkerGroup
    from auto_quantize_model.app.export import ExportLoader, ExportRequest
    from auto_quantize_model.app.frontier import FrontierMeasurer, FrontierRequest
    from auto_quantize_model.app.sweep import PointOutcome, PointResult, PointSession, SweepPoint
    from auto_quantize_model.artifacts import BudgetFrontier, ExportedMix, MeasuredFrontier, ReportPaths
    from auto_quantize_model.io.manifest import Manifest
    from auto_quantize_model.pipeline import Artifacts
    from auto_quantize_model.specs import FrontierSpec, PipelineSpec
    from auto_quantize_model.stages.export_checkpoint import CheckpointInputs

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


class Terminated(KeyboardInterrupt):
    """SIGTERM during a run: unwinds like Ctrl-C, so the record and the lock are settled."""

    exit_code = 143


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
    """The runner of a sweep's points that loads the model once (see :mod:`.sweep_runner`)."""
    from auto_quantize_model.app.sweep_runner import SweepSession

    return SweepSession()


def _sweep_session_for(service: RunService) -> Callable[[], PointSession] | None:
    """Sweeps share one loaded model when the service runs real pipelines; a service handed its own
    pipeline runner (a test's fake) runs every sweep point through that runner instead."""
    return new_sweep_session if service.pipeline_runner is run_pipeline else None


def join_workers(worker: Worker) -> WorkerGroup:
    from auto_quantize_model.app.distributed import WorkerGroup

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


def state_files(spec: PipelineSpec) -> list[Path]:
    """ModelOpt's search state of ``spec`` and the files kept beside it (existing ones)."""
    from auto_quantize_model.backend.modelopt.checkpoint import StateFiles

    if spec.autoquant.checkpoint is None:
        return []
    return [
        path for path in StateFiles.for_checkpoint(spec.autoquant.checkpoint).all_files() if path.is_file()
    ]


def has_search_state(spec: PipelineSpec) -> bool:
    """Whether ModelOpt saved a search state to resume from (its side files alone are not one)."""
    from auto_quantize_model.backend.modelopt.checkpoint import checkpoint_file

    checkpoint = spec.autoquant.checkpoint
    return checkpoint is not None and Path(checkpoint_file(checkpoint)).is_file()


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` while a run works (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated("terminated (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


# --------------------------------------------------------------------------- requests


@attrs.frozen
class RunRequest:
    """A checked pipeline to run into ``folder``: one point, or a sweep's points."""

    spec: PipelineSpec
    """As the user wrote it (with overrides): what ``pipeline.toml`` keeps."""
    points: tuple[SweepPoint, ...]
    folder: Path
    header: str
    """Comment lines on top of ``pipeline.toml`` (source, overrides, how to repeat)."""
    title: str = ""
    force: bool = False
    command: tuple[str, ...] = ()
    after: AfterRun | None = None
    worker: Worker | None = None
    """This process's place among torchrun's workers (None: a plain, single-process run)."""

    @property
    def is_sweep(self) -> bool:
        return len(self.points) > 1 or bool(self.points[0].settings)


@attrs.frozen
class _OpenSweep:
    """A sweep folder recorded ``running``: its record, and what was there before (for cleaning)."""

    record: _Recorder
    before: frozenset[Path]


@attrs.frozen
class _Claim:
    """A folder made (as far as needed) and locked for one command."""

    folder: Path
    made: tuple[Path, ...]
    lock: FolderLock

    @property
    def created(self) -> bool:
        return bool(self.made) and self.made[-1] == self.folder


# --------------------------------------------------------------------------- the service


@attrs.frozen
class RunService:
    """Runs pipelines into folders and writes reports; every side effect goes through a collaborator."""

    pipeline_runner: PipelineRunner = run_pipeline
    library_importer: Callable[[], float] = import_libraries
    report_writer: ReportWriter = regenerate_reports
    text_writer: Writer = write_text
    bench_runner: Callable[[argparse.Namespace], int] = run_bench
    """``aqm bench``: the benchmark harness, given the parsed flags."""
    frontier_measurer: FrontierMeasurer = measure_frontier
    """``aqm frontier --measure``: the run's stages up to RunAutoQuant, SolveBudgets, MeasureFrontier."""
    export_loader: ExportLoader = load_for_export
    """``aqm export --checkpoint``: the run's LoadModel, ExtractLM and BuildCalibLoader (no AutoQuant)."""
    sweep_session: Callable[[], PointSession] | None = attrs.field(
        default=attrs.Factory(_sweep_session_for, takes_self=True)
    )
    """Makes the runner of one sweep's points (it keeps the loaded model, the calibration batches
    and the saved searches the points share); None runs each point through ``pipeline_runner``."""
    worker_group: Callable[[Worker], WorkerGroup] = join_workers
    """Under torchrun: joins this worker to the others through the rendezvous store."""

    # ------------------------------------------------------------- runs

    def run(self, request: RunRequest) -> int:
        """Run ``request``; returns the exit code (a sweep with failed points exits 1)."""
        if request.worker is not None:
            return self._distributed(request, request.worker)
        with self._claim(request.folder, request.command) as claim:
            if request.is_sweep:
                return self._sweep(request, claim)
            return self._single(request, claim)

    @contextlib.contextmanager
    def _claim(self, folder: Path, command: Sequence[str]) -> Iterator[_Claim]:
        made = make_folder(folder)
        try:
            lock = FolderLock.acquire(folder, tuple(command))
        except OSError as err:
            remove_made(made)
            raise OutputError(f"cannot write in output folder {folder}: {os_reason(err)}") from None
        except BaseException:
            remove_made(made)
            raise
        try:
            with lock:
                yield _Claim(folder, tuple(made), lock)
        finally:
            remove_made(made)  # only the empty ones: a run that wrote nothing leaves nothing

    def _write(self, path: Path, text: str) -> Path:
        try:
            return self.text_writer(path, text)
        except OSError as err:
            raise output_error(path, err) from None

    def _single(self, request: RunRequest, claim: _Claim) -> int:
        from auto_quantize_model.io.pipeline_file import spec_to_toml

        folder, spec = request.folder, request.spec
        run = open_run_folder(folder, spec, force=request.force, created=claim.created)
        effective = for_folder(request.points[0].spec, folder)
        toml = folder / PIPELINE_FILE
        before = frozenset(aqm_files(folder))
        record = _Recorder(self, run, spec, request.command)
        try:
            if run.resume:
                log.info(
                    "resuming the interrupted run in %s (saved calibration and scores are reused)", folder
                )
            else:
                self._write(toml, spec_to_toml(spec, header=request.header))
            record.write(RUNNING, [toml, folder / RUN_FILE])
        except BaseException:
            self._clean_after_failure(folder, before, keep=())
            raise
        started = time.perf_counter()
        try:
            with sigterm_unwinds():
                imports = self.library_importer()
                store = self._run_point(effective, folder)
                extra = self._after(request, folder)
        except BaseException as err:
            kit = [toml, folder / RUN_FILE, *state_files(effective)]
            if run.resume or has_search_state(effective):
                self._clean_after_failure(folder, before, keep=kit)
                record.write_failure(err, [p for p in kit if p.is_file()])
                if not isinstance(err, KeyboardInterrupt):
                    log.info("the run folder %s is kept; the same command resumes it", folder)
            else:
                self._clean_after_failure(folder, before, keep=())
            raise
        written = [toml, *_report_files(store), *extra]
        files = [*written, *(p for p in state_files(effective) if p not in written), folder / RUN_FILE]
        manifest = _manifest_of(store)
        done = record.write(
            COMPLETE,
            files,
            device=manifest.model.device if manifest is not None else None,
            forward_steps=_forward_steps(store),
            seconds=(("library_imports", round(imports, 3)), *_stage_seconds(store)),
        )
        _print_summary(folder, [*written, done], time.perf_counter() - started, manifest, imports)
        return 0

    def _after(self, request: RunRequest, folder: Path) -> list[Path]:
        if request.after is None:
            return []
        try:
            return request.after(folder)
        except OSError as err:
            raise output_error(folder, err) from None

    def _run_point(self, spec: PipelineSpec, folder: Path, runner: PipelineRunner | None = None) -> Artifacts:
        """Run one point; an OS error inside a stage becomes one line naming the path and reason."""
        try:
            return (self.pipeline_runner if runner is None else runner)(spec, folder)
        except StageError as err:
            if isinstance(err.cause, OSError):
                raise StageError(err.stage, OutputError(describe_os_error(err.cause, folder))) from err
            raise

    def _clean_after_failure(self, folder: Path, before: frozenset[Path], keep: Sequence[Path]) -> None:
        """Remove the files of aqm's that this attempt added, except ``keep``; never anything else."""
        doomed = [p for p in aqm_files(folder) if p not in before and p not in keep]
        stuck = remove_files(folder, doomed)
        for path in stuck:
            log.warning("could not remove %s after the failure", path)

    def _sweep(self, request: RunRequest, claim: _Claim) -> int:
        """Run a sweep's points into subfolders; a rerun of the same sweep skips finished points.

        Each point keeps its own ``run.json``, so a rerun into the folder (same pipeline, no
        ``--force``) skips points recorded complete with the same settings and resumes an
        interrupted one from its saved search state, like a single run.
        """
        from auto_quantize_model.app.sweep import reuse_order

        sweep = self._open_sweep(request, claim)
        attempted: list[Path] = []
        started = time.perf_counter()
        try:
            with sigterm_unwinds():
                results, _ = self._run_points(request, reuse_order(request.points), attempted, index=True)
        except BaseException as err:
            folder = request.folder
            self._sweep_failed(sweep, err, ran=bool(attempted) or (folder / INDEX_NAME).is_file())
            raise
        return self._finish_sweep(request, sweep, results, started)

    def _open_sweep(self, request: RunRequest, claim: _Claim) -> _OpenSweep:
        """Decide fresh, resume or refuse for the sweep folder and record it ``running``."""
        from auto_quantize_model.io.pipeline_file import spec_to_toml

        folder = request.folder
        resume = False
        previous: RunRecord | None = None
        if not claim.created:
            previous = _read_previous(folder, request.force)
            if previous is not None:
                refuse_live_owner(folder, previous)
            if request.force:
                remove_previous_run(folder, previous)
                check_output_dir(folder, True)
            elif previous is not None and previous.sweep:
                _check_same_sweep(folder, request.spec)
                resume = True
            else:
                check_output_dir(folder, False)
        run = RunFolder(
            folder,
            created=claim.created,
            resume=resume,
            started_at=utc_now(),
            previous=previous if resume else None,
        )
        record = _Recorder(self, run, request.spec, request.command, sweep=True)
        toml = folder / PIPELINE_FILE
        before = frozenset(aqm_files(folder))
        try:
            if resume:
                log.info("sweep in %s: finished points are skipped, an interrupted one resumes", folder)
            else:
                self._write(toml, spec_to_toml(request.spec, header=request.header))
            record.write(RUNNING, [toml, folder / RUN_FILE])
        except BaseException:
            self._clean_after_failure(folder, before, keep=())
            raise
        return _OpenSweep(record, before)

    def _sweep_failed(self, sweep: _OpenSweep, err: BaseException, *, ran: bool) -> None:
        """Record the sweep failed when a point may have left a resume kit; else remove what it wrote."""
        folder = sweep.record.run.path
        if ran:
            sweep.record.write_failure(err, aqm_files(folder))
        else:
            self._clean_after_failure(folder, sweep.before, keep=())

    def _run_points(
        self,
        request: RunRequest,
        points: Sequence[SweepPoint],
        attempted: list[Path],
        *,
        index: bool,
        worker: int | None = None,
    ) -> tuple[tuple[PointResult, ...], list[str]]:
        """Run ``points`` with one session (one model load); their results and the session's notes.

        ``index``: rewrite ``sweep-index.md`` after each point (a worker of a spread sweep does
        not: rank 0 writes it once from everyone's results). ``attempted`` collects the folders
        of the points that started, for the caller's failure bookkeeping.
        """
        from auto_quantize_model.app.sweep import run_sweep

        session = self.sweep_session() if self.sweep_session is not None else None
        imported: list[float] = []

        def import_once() -> None:
            """The libraries, before the first point that runs (a rerun of a finished sweep needs none)."""
            if not imported:
                imported.append(self.library_importer())

        def run_point(point: SweepPoint, point_dir: Path) -> PointOutcome:
            attempted.append(point_dir)
            return self._point(request, point, point_dir, session, import_once)

        try:
            results = run_sweep(
                points,
                request.folder,
                run_point,
                title=request.title,
                notes=None if session is None else session.notes,
                write_index=index,
            )
            notes = [] if session is None else session.notes()
        finally:
            if session is not None:
                session.close()
        if worker is not None:
            results = tuple(attrs.evolve(result, worker=worker) for result in results)
        return results, notes

    def _finish_sweep(
        self,
        request: RunRequest,
        sweep: _OpenSweep,
        results: Sequence[PointResult],
        started: float,
        index_text: str | None = None,
    ) -> int:
        """Record the sweep complete (or failed, naming how many points failed) and print its table."""
        folder = request.folder
        if index_text is not None:
            self._write(folder / INDEX_NAME, index_text)
        failed = [r for r in results if not r.ok]
        status = f"{FAILED}: {len(failed)} of {len(results)} sweep points failed" if failed else COMPLETE
        sweep.record.write(status, [*aqm_files(folder), folder / RUN_FILE])
        print(f"aqm: sweep done in {time.perf_counter() - started:.1f} s; index: {folder / INDEX_NAME}")
        for result in results:
            by = "" if result.worker is None else f"  [worker {result.worker}]"
            print(f"  {result.status:<8} {result.point.folder}  ({result.seconds:.1f} s){by}")
        if failed:
            print(
                f"aqm: error: {len(failed)} of {len(results)} sweep points failed; see {folder / INDEX_NAME}",
                file=sys.stderr,
            )
            return 1
        return 0

    # ------------------------------------------------------------- a sweep spread over torchrun's workers

    def _distributed(self, request: RunRequest, worker: Worker) -> int:
        """This worker's share of a sweep started by torchrun (see :mod:`.distributed`).

        Every rank checks the points the same way, so a pre-flight problem is the same one line
        on every rank; rank 0's problems with the folder (busy, other settings) are sent to the
        others, who raise them too. The exit code is rank 0's, on every rank.
        """
        from auto_quantize_model.app.distributed import point_problems
        from auto_quantize_model.errors import ConfigError

        if not request.is_sweep:
            raise ConfigError(
                f"{request.title or 'the pipeline'} has no [sweep] table: torchrun spreads a sweep's points "
                "over its workers; run a single pipeline with plain `aqm run`"
            )
        point_problems(request.points, request.title or "pipeline")
        group = self.worker_group(worker)
        group.rerun = (
            f"rerun `{' '.join(request.command)}` (under torchrun with any number of workers, or without) "
            "to finish the sweep: finished points are skipped"
        )
        try:
            with contextlib.ExitStack() as stack:
                return self._as_worker(request, group, stack)
        finally:
            group.close()

    def _as_worker(self, request: RunRequest, group: WorkerGroup, stack: contextlib.ExitStack) -> int:
        from auto_quantize_model.app.distributed import assign_points
        from auto_quantize_model.app.sweep import render_index, reuse_order
        from auto_quantize_model.errors import AqmError

        worker, folder = group.worker, request.folder
        sweep: _OpenSweep | None = None
        problem: AqmError | None = None
        if worker.leader:
            try:
                sweep = self._open_sweep(request, stack.enter_context(self._claim(folder, request.command)))
            except AqmError as err:
                problem = err
        group.agree(problem, "opening the sweep folder")
        ordered = reuse_order(request.points)
        attempted: list[Path] = []
        points_started = False
        started = time.perf_counter()
        try:
            token = group.broadcast(
                None if sweep is None else _folder_token(sweep),
                tuple[str, Owner] | None,
                "checking the sweep folder",
            )
            group.agree(
                None if worker.leader else _shared_folder_problem(folder, token), "checking the folder"
            )
            owners = group.share_assignment(
                assign_points(ordered, worker.world_size, self._still_to_run(folder))
                if worker.leader
                else (),
                len(ordered),
            )
            mine = [point for point, owner in zip(ordered, owners, strict=True) if owner == worker.rank]
            log.info("%d of the sweep's %d points are this worker's", len(mine), len(ordered))
            group.start_heartbeat()
            points_started = True
            try:
                with sigterm_unwinds():
                    results, notes = self._run_points(
                        request, mine, attempted, index=False, worker=worker.rank
                    )
            except BaseException as err:
                group.failed(failure_reason(err))
                raise
            group.done()
            with sigterm_unwinds():
                group.wait_for_others()
            gathered = group.gather_results(results, notes, ordered)
        except BaseException as err:
            if sweep is not None:
                self._sweep_failed(sweep, err, ran=points_started)
            raise
        code = 0
        if sweep is not None:
            by_folder = {result.point.folder: result for found, _ in gathered for result in found}
            merged = [by_folder[point.folder] for point in ordered]
            lines = [f"Worker {rank}: {line}" for rank, (_, said) in enumerate(gathered) for line in said]
            lines.insert(0, f"Spread over {worker.world_size} torchrun workers.")
            text = render_index(merged, total=len(ordered), title=request.title, notes=lines)
            code = self._finish_sweep(request, sweep, merged, started, index_text=text)
        return group.broadcast(code, int, "finishing")

    def _still_to_run(self, folder: Path) -> Callable[[SweepPoint], bool]:
        """Whether a point has work left (an earlier run did not finish it), for the assignment."""
        from auto_quantize_model.errors import AqmError

        def to_run(point: SweepPoint) -> bool:
            point_dir = folder / point.folder
            try:
                return _finished_point(point_dir, _point_spec(point, point_dir)) is None
            except AqmError:
                return True  # its own run will say what is wrong

        return to_run

    def _point(
        self,
        request: RunRequest,
        point: SweepPoint,
        point_dir: Path,
        session: PointSession | None,
        before_run: Callable[[], None],
    ) -> PointOutcome:
        """One sweep point in its folder, with its own ``run.json``: skipped when an earlier run
        finished it with the same settings, resumed when one was interrupted, else run fresh.

        A failed point keeps its ``pipeline.toml``, its ``run.json`` (``failed: <reason>``) and any
        search state, so the next run of the sweep resumes it.
        """
        from auto_quantize_model.app.sweep import PointOutcome
        from auto_quantize_model.io.pipeline_file import spec_to_toml

        spec = _point_spec(point, point_dir)
        effective = for_folder(spec, point_dir)
        done = _finished_point(point_dir, spec)
        if done is not None:
            if session is not None:
                session.remember(effective)
            return done
        before_run()
        made = make_folder(point_dir)
        run = open_run_folder(point_dir, spec, force=False, created=bool(made) and made[-1] == point_dir)
        toml = point_dir / PIPELINE_FILE
        before = frozenset(aqm_files(point_dir))
        record = _Recorder(self, run, spec, request.command)
        try:
            if not run.resume:
                self._write(toml, spec_to_toml(spec, header=f"{request.header}\nSweep point: {point.label}"))
            record.write(RUNNING, [toml, point_dir / RUN_FILE])
        except BaseException:
            self._clean_after_failure(point_dir, before, keep=())
            raise
        try:
            store = self._run_point(effective, point_dir, session)
        except BaseException as err:
            kit = [toml, point_dir / RUN_FILE, *state_files(effective)]
            self._clean_after_failure(point_dir, before, keep=kit)
            record.write_failure(err, [p for p in kit if p.is_file()])
            raise
        written = [toml, *_report_files(store)]
        files = [*written, *(p for p in state_files(effective) if p not in written), point_dir / RUN_FILE]
        manifest = _manifest_of(store)
        record.write(
            COMPLETE,
            files,
            device=manifest.model.device if manifest is not None else None,
            forward_steps=_forward_steps(store),
            seconds=_stage_seconds(store),
        )
        reuse = "" if session is None else session.reuse_of(point_dir)
        return PointOutcome(manifest, reuse="resumed" if run.resume and not reuse else reuse)

    # ------------------------------------------------------------- reports and other outputs

    def report(self, manifest: Path, output: Path | None) -> ReportPaths:
        """``aqm report``: regenerate reports; an OS failure leaves no new file and reads as one line."""
        target = output if output is not None else manifest.parent
        made = make_folder(output) if output is not None else []
        before = frozenset(aqm_files(target))
        try:
            return self.report_writer(manifest, output)
        except OSError as err:
            self._clean_after_failure(target, before, keep=())
            raise output_error(target, err) from None
        finally:
            remove_made(made)

    def frontier(self, request: FrontierRequest) -> tuple[Path, ...]:
        """``aqm frontier``: a run's budget frontier (measured points too with ``--measure``).

        Everything is read and checked first; the target folder is locked while the frontier is
        solved (and measured) and its files are put in place only once all of them are written.
        """
        from auto_quantize_model.app.frontier import plan_frontier, solve_job, write_job

        job = plan_frontier(request)
        with self._claim(job.target, request.command):
            frontier, measured = solve_job(job, self.frontier_measurer)
            return write_job(job, frontier, measured)

    def export(self, request: ExportRequest) -> ExportedMix:
        """``aqm export``: a run's mix at one budget as a ModelOpt config (and checkpoint).

        Everything is read and checked first; the folder is written under a scratch name beside
        the target and renamed into place once complete. The run folder is locked meanwhile, as
        ``aqm run`` locks it: an export from a folder a run is writing is refused.
        """
        from auto_quantize_model.app.export import plan_export, reading_run_folder, run_export

        with reading_run_folder(request.source, request.command):  # the lock aqm run takes
            job = plan_export(request)
            try:
                return run_export(job, self.export_loader)
            except OSError as err:
                raise output_error(job.target, err) from None

    def write_output(self, path: Path, text: str) -> Path:
        """Write one result file (``aqm diff --output``), refusing a folder and naming OS failures."""
        if path.is_dir():
            raise OutputError(f"--output {path} is a folder; name a file in it, e.g. {path / 'diff.md'}")
        blocker = file_above(path)
        if blocker is not None:
            raise OutputError(f"cannot write {path}: {blocker} is a file, not a folder")
        made = make_folder(path.parent)
        try:
            return self._write(path, text)
        except BaseException:
            remove_made(made)
            raise


# --------------------------------------------------------------------------- helpers


@attrs.frozen
class _Recorder:
    """Writes one run's ``run.json`` as it moves from running to complete or failed."""

    service: RunService
    run: RunFolder
    spec: PipelineSpec
    command: Sequence[str]
    sweep: bool = False

    def write(
        self,
        status: str,
        files: Sequence[Path],
        *,
        device: str | None = None,
        forward_steps: ForwardSteps | None = None,
        seconds: tuple[tuple[str, float], ...] | None = None,
    ) -> Path:
        record: RunRecord = run_record(
            self.run,
            self.spec,
            status,
            command=self.command,
            files=relative_names(self.run.path, files),
            device=device,
            forward_steps=forward_steps,
            seconds=seconds,
        )
        if self.sweep:
            record = attrs.evolve(record, sweep=True)
        try:
            return write_run(self.run.path, record, self.service.text_writer)
        except OSError as err:
            raise output_error(self.run.path / RUN_FILE, err) from None

    def write_failure(self, err: BaseException, files: Sequence[Path]) -> None:
        """Record ``failed: <reason>``; if even that cannot be written, say so and let ``err`` go on."""
        try:
            self.write(f"{FAILED}: {failure_reason(err)}", files)
        except Exception as secondary:
            log.error(
                "could not record the failure in %s (%s); the next run will find it interrupted",
                self.run.path / RUN_FILE,
                secondary,
            )


def _point_spec(point: SweepPoint, point_dir: Path) -> PipelineSpec:
    """The point's spec with its search state in its own folder: points never share one."""
    spec = point.spec
    if spec.autoquant.checkpoint is not None:
        name = Path(spec.autoquant.checkpoint).name
        spec = attrs.evolve(spec, autoquant=attrs.evolve(spec.autoquant, checkpoint=str(point_dir / name)))
    return spec


def _folder_token(sweep: _OpenSweep) -> tuple[str, Owner]:
    """What rank 0 wrote into the sweep's ``run.json``, for the others to find (a shared folder)."""
    return sweep.record.run.started_at, Owner.me()


def _shared_folder_problem(folder: Path, token: tuple[str, Owner] | None) -> InputError | None:
    """None when ``folder`` holds the ``run.json`` rank 0 just wrote; else why this worker cannot go on."""
    try:
        record = read_run(folder)
    except InputError as err:
        return err
    if token is None or record is None or (record.started_at, record.owner) != token:
        return InputError(
            f"output folder {folder} does not hold the run.json rank 0 wrote there: every worker must see "
            "the same folder; put --output on a file system all hosts share"
        )
    return None


def _check_same_sweep(folder: Path, spec: PipelineSpec) -> None:
    """Refuse to continue a sweep folder under other settings, naming every changed key."""
    from auto_quantize_model.io.pipeline_file import load_pipeline

    toml = folder / PIPELINE_FILE
    if not toml.is_file() or not is_aqm_pipeline(toml):
        raise InputError(
            f"output folder {folder} holds a sweep without its {PIPELINE_FILE}; pass --force to start over"
        )
    changed = changed_settings(load_pipeline(toml), spec)
    if changed:
        raise InputError(
            f"output folder {folder} holds a sweep with other settings ({'; '.join(changed)}); rerun "
            "with the same settings to go on with it, pass --force to start over, or choose another --output"
        )


def _finished_point(folder: Path, spec: PipelineSpec) -> PointOutcome | None:
    """The outcome of a point an earlier run finished with exactly ``spec``; None otherwise."""
    from auto_quantize_model.app.folders import MANIFEST_SUFFIX
    from auto_quantize_model.app.sweep import PointOutcome
    from auto_quantize_model.io.pipeline_file import load_pipeline
    from auto_quantize_model.render.reports import read_manifest

    record = read_run(folder)
    toml = folder / PIPELINE_FILE
    if record is None or record.status != COMPLETE or not toml.is_file():
        return None
    if changed_settings(load_pipeline(toml), spec):
        return None  # a complete run of other settings: open_run_folder refuses to overwrite it
    manifests = [name for name in record.files if name.endswith(MANIFEST_SUFFIX)]
    manifest = read_manifest(folder / manifests[0]) if manifests else None
    seconds = sum(value for _, value in record.seconds) if record.seconds else None
    return PointOutcome(manifest, earlier=True, seconds=seconds)


def _read_previous(folder: Path, force: bool) -> RunRecord | None:
    from auto_quantize_model.errors import InputError

    try:
        return read_run(folder)
    except InputError:
        if force:
            return None
        raise


def _report_files(store: Artifacts) -> list[Path]:
    from auto_quantize_model.artifacts import ReportPaths

    paths = store.find(ReportPaths)
    return [] if paths is None else [Path(name) for name in paths.files]


def _manifest_of(store: Artifacts) -> Manifest | None:
    from auto_quantize_model.io.manifest import Manifest

    return store.find(Manifest)


def _forward_steps(store: Artifacts) -> ForwardSteps | None:
    from auto_quantize_model.artifacts import SensitivityScores

    scores = store.find(SensitivityScores)
    if scores is None or scores.calib_forward_steps is None:
        return None
    return ForwardSteps(calibration=scores.calib_forward_steps, scoring=scores.score_forward_steps or 0)


def _stage_seconds(store: Artifacts) -> tuple[tuple[str, float], ...]:
    from auto_quantize_model.artifacts import RunTimings

    timings = store.find(RunTimings)
    return tuple((t.stage, round(t.seconds, 3)) for t in (timings.stages if timings else ()))


def _print_summary(
    folder: Path, files: Sequence[Path], seconds: float, manifest: Manifest | None, imports: float = 0.0
) -> None:
    split = f" (importing libraries {imports:.1f} s, the stages {seconds - imports:.1f} s)" if imports else ""
    print(f"aqm: done in {seconds:.1f} s{split}; {len(files)} files in {folder}:")
    for path in files:
        print(f"  {path}")
    if manifest is not None:
        scheme = manifest.scheme
        print(
            f"aqm: scheme {scheme.name}: effective bits {scheme.effective_bits_lm:.3f} "
            f"(target {scheme.effective_bits_target:g}), {len(manifest.groups)} groups ranked"
        )
        for group in manifest.groups[:5]:
            print(f"  #{group.rank} {group.name} (importance {group.importance:.4g})")


def print_summary(folder: Path, files: Sequence[Path], manifest: Manifest | None = None) -> None:
    """The file list of a command that ran no pipeline (``--report-only``)."""
    _print_summary(folder, files, 0.0, manifest)
