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
import contextlib
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from auto_quantize_model.app.defaults import (
    AfterRun,
    PipelineRunner,
    ReportWriter,
    for_folder,
    has_search_state,
    import_libraries,
    join_workers,
    load_for_export,
    measure_frontier,
    new_sweep_session,
    regenerate_reports,
    run_bench,
    run_pipeline,
    state_files,
    write_text,
)
from auto_quantize_model.app.folders import (
    INDEX_NAME,
    PIPELINE_FILE,
    RUN_FILE,
    OutputError,
    aqm_files,
    check_output_dir,
    describe_os_error,
    is_aqm_pipeline,
    make_folder,
    output_error,
    pipeline_header,
    relative_names,
)
from auto_quantize_model.app.lock import Owner
from auto_quantize_model.app.logs import PACKAGE_LOGGER
from auto_quantize_model.app.output_folder import Claim, clean_after_failure, write_file
from auto_quantize_model.app.output_folder import claim as claim_folder
from auto_quantize_model.app.outputs import OutputCommands
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
    open_run_folder,
    read_run,
    refuse_live_owner,
    remove_previous_run,
    run_record,
    utc_now,
    write_run,
)
from auto_quantize_model.app.signals import retold, signals_deferred, sigterm_unwinds, what_stopped
from auto_quantize_model.errors import InputError, StageError
from auto_quantize_model.io.atomic import LinkRefused

if TYPE_CHECKING:
    from auto_quantize_model.app.export import ExportLoader
    from auto_quantize_model.app.frontier import FrontierMeasurer
    from auto_quantize_model.app.sweep.points import PointOutcome, PointResult, PointSession, SweepPoint
    from auto_quantize_model.app.sweep.workers import Worker, WorkerGroup
    from auto_quantize_model.manifest_records import Manifest
    from auto_quantize_model.pipeline import Artifacts
    from auto_quantize_model.specs import PipelineSpec

log = logging.getLogger(PACKAGE_LOGGER)

# --------------------------------------------------------------------------- sweeps share a model


def _sweep_session_for(service: RunService) -> Callable[[], PointSession] | None:
    """Sweeps share one loaded model when the service runs real pipelines; a service handed its own
    pipeline runner (a test's fake) runs every sweep point through that runner instead."""
    return new_sweep_session if service.pipeline_runner is run_pipeline else None


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

    @classmethod
    def of(
        cls,
        spec: PipelineSpec,
        folder: Path,
        *,
        source: str,
        overrides: Sequence[str] = (),
        force: bool = False,
        command: Sequence[str] = (),
        worker: Worker | None = None,
        after: AfterRun | None = None,
    ) -> RunRequest:
        """The request to run ``spec`` (from ``source``, with ``--set`` ``overrides``) into ``folder``:
        its sweep expanded into points, the ``pipeline.toml`` header written the one way."""
        from auto_quantize_model.app.sweep.points import expand_sweep

        return cls(
            spec,
            expand_sweep(spec, source=source),
            folder,
            header=pipeline_header(source, overrides),
            title=source,
            force=force,
            command=tuple(command),
            after=after,
            worker=worker,
        )


@attrs.frozen
class _OpenSweep:
    """A sweep folder recorded ``running``: its record, and what was there before (for cleaning)."""

    record: _Recorder
    before: frozenset[Path]
    points: tuple[str, ...] = ()
    """The sweep's own point folders: the only sub-folders whose files its record may list."""


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

    @property
    def outputs(self) -> OutputCommands:
        """``report``, ``frontier``, ``export`` and ``diff --output``, with this service's collaborators."""
        return OutputCommands(
            report_writer=self.report_writer,
            frontier_measurer=self.frontier_measurer,
            export_loader=self.export_loader,
            text_writer=self.text_writer,
        )

    # ------------------------------------------------------------- runs

    def run(self, request: RunRequest) -> int:
        """Run ``request``; returns the exit code (a sweep with failed points exits 1)."""
        if request.worker is not None:
            return self._distributed(request, request.worker)
        with claim_folder(request.folder, request.command) as claim:
            if request.is_sweep:
                return self._sweep(request, claim)
            return self._single(request, claim)

    def _single(self, request: RunRequest, claim: Claim) -> int:
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
                write_file(self.text_writer, toml, spec_to_toml(spec, header=request.header))
            record.write(RUNNING, [toml, folder / RUN_FILE, *state_files(effective, existing=False)])
        except BaseException:
            clean_after_failure(folder, before, keep=())
            raise
        started = time.perf_counter()
        try:
            with sigterm_unwinds():
                imports = self.library_importer()
                store = self._run_point(effective, folder)
                extra = self._after(request, folder)
        except BaseException as err:
            kit = [toml, folder / RUN_FILE, *state_files(effective)]
            saved = run.resume or has_search_state(effective)
            stopped = isinstance(err, KeyboardInterrupt)
            if saved or stopped:  # an interrupted run keeps its record, so `aqm resume` takes it up
                clean_after_failure(folder, before, keep=kit)
                record.write_failure(err, [p for p in kit if p.is_file()])
                if isinstance(err, KeyboardInterrupt):
                    raise retold(err, _interrupted_run(err, folder, saved=saved)) from None
                log.info("the run folder %s is kept; the same command resumes it", folder)
            else:
                clean_after_failure(folder, before, keep=())
            raise
        with signals_deferred(f"the run in {folder} is complete"):
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

    def _sweep(self, request: RunRequest, claim: Claim) -> int:
        """Run a sweep's points into subfolders; a rerun of the same sweep skips finished points.

        Each point keeps its own ``run.json``, so a rerun into the folder (same pipeline, no
        ``--force``) skips points recorded complete with the same settings and resumes an
        interrupted one from its saved search state, like a single run.
        """
        from auto_quantize_model.app.sweep.points import reuse_order

        sweep = self._open_sweep(request, claim)
        attempted: list[Path] = []
        started = time.perf_counter()
        try:
            with sigterm_unwinds():
                results, _ = self._run_points(request, reuse_order(request.points), attempted, index=True)
        except BaseException as err:
            folder = request.folder
            stopped = isinstance(err, KeyboardInterrupt)
            self._sweep_failed(sweep, err, ran=stopped or bool(attempted) or (folder / INDEX_NAME).is_file())
            if isinstance(err, KeyboardInterrupt):
                raise retold(
                    err,
                    f"{what_stopped(err)}: the sweep in {folder} is recorded as stopped; "
                    f"`aqm resume {folder}` goes on with it (finished points are skipped, an interrupted one "
                    "resumes)",
                ) from None
            raise
        return self._finish_sweep(request, sweep, results, started)

    def _open_sweep(self, request: RunRequest, claim: Claim) -> _OpenSweep:
        """Decide fresh, resume or refuse for the sweep folder and record it ``running``."""
        from auto_quantize_model.io.pipeline_file import spec_to_toml

        folder = request.folder
        resume = False
        previous: RunRecord | None = None
        if not claim.created:
            previous = _read_previous(folder)
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
                write_file(self.text_writer, toml, spec_to_toml(request.spec, header=request.header))
            record.write(RUNNING, [toml, folder / RUN_FILE])
        except BaseException:
            clean_after_failure(folder, before, keep=())
            raise
        return _OpenSweep(record, before, _point_names(request))

    def _sweep_failed(self, sweep: _OpenSweep, err: BaseException, *, ran: bool) -> None:
        """Record the sweep failed when a point may have left a resume kit; else remove what it wrote."""
        folder = sweep.record.run.path
        if ran:
            sweep.record.write_failure(err, aqm_files(folder, points=sweep.points))
        else:
            clean_after_failure(folder, sweep.before, keep=())

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
        from auto_quantize_model.app.sweep.points import run_sweep

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
            write_file(self.text_writer, folder / INDEX_NAME, index_text)
        failed = [r for r in results if not r.ok]
        status = f"{FAILED}: {len(failed)} of {len(results)} sweep points failed" if failed else COMPLETE
        with signals_deferred(f"the sweep in {folder} is recorded {status}"):
            files = [*aqm_files(folder, points=_point_names(request)), folder / RUN_FILE]
            sweep.record.write(status, files)
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
        """This worker's share of a sweep started by torchrun (see :mod:`.sweep.workers`).

        Every rank checks the points the same way, so a pre-flight problem is the same one line
        on every rank; rank 0's problems with the folder (busy, other settings) are sent to the
        others, who raise them too. The exit code is rank 0's, on every rank.
        """
        from auto_quantize_model.app.sweep.workers import point_problems
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
        from auto_quantize_model.app.sweep.points import render_index, reuse_order
        from auto_quantize_model.app.sweep.workers import assign_points
        from auto_quantize_model.errors import AqmError

        worker, folder = group.worker, request.folder
        sweep: _OpenSweep | None = None
        problem: AqmError | None = None
        if worker.leader:
            try:
                sweep = self._open_sweep(request, stack.enter_context(claim_folder(folder, request.command)))
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
        from auto_quantize_model.app.sweep.points import PointOutcome
        from auto_quantize_model.io.pipeline_file import spec_to_toml

        spec = _point_spec(point, point_dir)
        effective = for_folder(spec, point_dir)
        done = _finished_point(point_dir, spec)
        if done is not None:
            if session is not None:
                session.remember(effective)
            return done
        before_run()
        if point_dir.is_symlink():
            raise LinkRefused(
                f"sweep point folder {point_dir} is a symbolic link; aqm writes no point through a link: "
                "remove the link, then rerun the sweep"
            )
        made = make_folder(point_dir)
        run = open_run_folder(point_dir, spec, force=False, created=bool(made) and made[-1] == point_dir)
        toml = point_dir / PIPELINE_FILE
        before = frozenset(aqm_files(point_dir))
        record = _Recorder(self, run, spec, request.command)
        try:
            if not run.resume:
                header = f"{request.header}\nSweep point: {point.label}"
                write_file(self.text_writer, toml, spec_to_toml(spec, header=header))
            record.write(RUNNING, [toml, point_dir / RUN_FILE, *state_files(effective, existing=False)])
        except BaseException:
            clean_after_failure(point_dir, before, keep=())
            raise
        try:
            store = self._run_point(effective, point_dir, session)
        except BaseException as err:
            kit = [toml, point_dir / RUN_FILE, *state_files(effective)]
            clean_after_failure(point_dir, before, keep=kit)
            record.write_failure(err, [p for p in kit if p.is_file()])
            raise
        with signals_deferred(f"sweep point {point_dir} is complete"):
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
    from auto_quantize_model.app.sweep.points import PointOutcome
    from auto_quantize_model.io.manifest_file import read_manifest
    from auto_quantize_model.io.pipeline_file import load_pipeline

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


def _read_previous(folder: Path) -> RunRecord | None:
    """The sweep folder's record; a corrupt one is refused, ``--force`` or not (only it says what is ours)."""
    return read_run(folder)


def _interrupted_run(err: KeyboardInterrupt, folder: Path, *, saved: bool) -> str:
    """What a stopped run left, and how to go on: the line the CLI prints."""
    if saved:
        return (
            f"{what_stopped(err)}: {folder} keeps the saved calibration and scores; `aqm resume {folder}` "
            "goes on from them"
        )
    return (
        f"{what_stopped(err)}: nothing computed was kept in {folder} (no calibration had been saved yet); "
        f"`aqm resume {folder}` starts the run again"
    )


def _point_names(request: RunRequest) -> tuple[str, ...]:
    return tuple(point.folder for point in request.points)


def _report_files(store: Artifacts) -> list[Path]:
    from auto_quantize_model.artifacts import ReportPaths

    paths = store.find(ReportPaths)
    return [] if paths is None else [Path(name) for name in paths.files]


def _manifest_of(store: Artifacts) -> Manifest | None:
    from auto_quantize_model.manifest_records import Manifest

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
