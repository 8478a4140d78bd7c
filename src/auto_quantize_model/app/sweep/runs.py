"""The lifecycle of a sweep's folder, in one process or spread over torchrun's workers.

:class:`SweepRuns` is what :meth:`RunService.run <auto_quantize_model.app.run_service.RunService.run>`
hands a sweep or a torchrun worker to. It gets the service's collaborators as fields (the service
builds it in its ``sweeps`` property) rather than the service itself, so this module never imports
the one that dispatches to it; what a single run and a point do alike lives below both, in
:mod:`~auto_quantize_model.app.run_steps`.

A sweep:

1. refuses, resumes or starts its folder (:meth:`SweepRuns.run`): a rerun with the same settings
   goes on with it, other settings are refused naming every changed key, ``--force`` removes
   only the previous run's files;
2. records itself ``running`` in its own ``run.json`` and runs each point in a sub-folder with a
   record of its own: a point an earlier run finished is skipped, an interrupted one resumes;
3. records ``complete``, or ``failed`` naming how many points failed, listing the files of its
   own point folders only (:func:`~auto_quantize_model.app.folders.aqm_files` with ``points``),
   so that ``--force`` later never removes a file it did not write.

Under torchrun (:meth:`SweepRuns.run_worker`) rank 0 holds the folder and its record, every worker
runs its share of the points, and rank 0 writes the index from everyone's results
(:mod:`.workers` carries the messages).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

from auto_quantize_model.app.defaults import PipelineRunner, for_folder, state_files
from auto_quantize_model.app.folders import (
    INDEX_NAME,
    MANIFEST_SUFFIX,
    PIPELINE_FILE,
    RUN_FILE,
    aqm_files,
    check_output_dir,
    is_aqm_pipeline,
    make_folder,
)
from auto_quantize_model.app.lock import Owner
from auto_quantize_model.app.logs import PACKAGE_LOGGER
from auto_quantize_model.app.output_folder import Claim, clean_after_failure, write_file
from auto_quantize_model.app.output_folder import claim as claim_folder
from auto_quantize_model.app.run_steps import (
    Recorder,
    RunRequest,
    manifest_of,
    report_files,
    run_point,
)
from auto_quantize_model.app.runs import (
    COMPLETE,
    FAILED,
    RUNNING,
    RunFolder,
    RunRecord,
    Writer,
    changed_settings,
    failure_reason,
    open_run_folder,
    read_run,
    refuse_live_owner,
    remove_previous_run,
    utc_now,
)
from auto_quantize_model.app.signals import retold, signals_deferred, sigterm_unwinds, what_stopped
from auto_quantize_model.app.sweep.points import (
    PointOutcome,
    PointResult,
    PointSession,
    SweepPoint,
    render_index,
    reuse_order,
    run_sweep,
)
from auto_quantize_model.app.sweep.workers import Worker, WorkerGroup, assign_points, point_problems
from auto_quantize_model.errors import AqmError, ConfigError, InputError
from auto_quantize_model.io.atomic import LinkRefused
from auto_quantize_model.io.manifest_file import read_manifest
from auto_quantize_model.io.pipeline_file import load_pipeline, spec_to_toml
from auto_quantize_model.specs import PipelineSpec

log = logging.getLogger(PACKAGE_LOGGER)


@attrs.frozen
class _OpenSweep:
    """A sweep folder recorded ``running``: its record, and what was there before (for cleaning)."""

    record: Recorder
    before: frozenset[Path]
    points: tuple[str, ...] = ()
    """The sweep's own point folders: the only sub-folders whose files its record may list."""


@attrs.frozen
class SweepRuns:
    """Runs a sweep's points into its folder's sub-folders; every side effect goes through a field."""

    pipeline_runner: PipelineRunner
    """Runs a point when there is no ``sweep_session`` (a test's fake runner)."""
    library_importer: Callable[[], float]
    """Imports torch, transformers and ModelOpt once, before the first point that runs."""
    text_writer: Writer
    sweep_session: Callable[[], PointSession] | None
    """Makes the runner of one sweep's points (it keeps the loaded model, the calibration batches
    and the saved searches the points share); None runs each point through ``pipeline_runner``."""
    worker_group: Callable[[Worker], WorkerGroup]
    """Under torchrun: joins this worker to the others through the rendezvous store."""

    def run(self, request: RunRequest, claim: Claim) -> int:
        """Run a sweep's points into subfolders; a rerun of the same sweep skips finished points.

        Each point keeps its own ``run.json``, so a rerun into the folder (same pipeline, no
        ``--force``) skips points recorded complete with the same settings and resumes an
        interrupted one from its saved search state, like a single run.
        """
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
        record = Recorder(self.text_writer, run, request.spec, request.command, sweep=True)
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
        session = self.sweep_session() if self.sweep_session is not None else None
        imported: list[float] = []

        def import_once() -> None:
            """The libraries, before the first point that runs (a rerun of a finished sweep needs none)."""
            if not imported:
                imported.append(self.library_importer())

        def run_one(point: SweepPoint, point_dir: Path) -> PointOutcome:
            attempted.append(point_dir)
            return self._point(request, point, point_dir, session, import_once)

        try:
            results = run_sweep(
                points,
                request.folder,
                run_one,
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

    def run_worker(self, request: RunRequest, worker: Worker) -> int:
        """This worker's share of a sweep started by torchrun (see :mod:`.workers`).

        Every rank checks the points the same way, so a pre-flight problem is the same one line
        on every rank; rank 0's problems with the folder (busy, other settings) are sent to the
        others, who raise them too. The exit code is rank 0's, on every rank.
        """
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
        """The conversation every rank follows in the same order (a rank that skipped a step would
        wait for the others forever). ``stack`` holds rank 0's lock on the folder to the end."""
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
        record = Recorder(self.text_writer, run, spec, request.command)
        try:
            if not run.resume:
                header = f"{request.header}\nSweep point: {point.label}"
                write_file(self.text_writer, toml, spec_to_toml(spec, header=header))
            record.write(RUNNING, [toml, point_dir / RUN_FILE, *state_files(effective, existing=False)])
        except BaseException:
            clean_after_failure(point_dir, before, keep=())
            raise
        try:
            store = run_point(self.pipeline_runner if session is None else session, effective, point_dir)
        except BaseException as err:
            kit = [toml, point_dir / RUN_FILE, *state_files(effective)]
            clean_after_failure(point_dir, before, keep=kit)
            record.write_failure(err, [p for p in kit if p.is_file()])
            raise
        with signals_deferred(f"sweep point {point_dir} is complete"):
            record.write_complete(store, [toml, *report_files(store)], state_files(effective))
        reuse = "" if session is None else session.reuse_of(point_dir)
        return PointOutcome(manifest_of(store), reuse="resumed" if run.resume and not reuse else reuse)


# --------------------------------------------------------------------------- helpers


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


def _point_names(request: RunRequest) -> tuple[str, ...]:
    return tuple(point.folder for point in request.points)
