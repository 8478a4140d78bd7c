"""The run lifecycle behind ``aqm run`` and ``aqm resume``, and the door to the output commands.

The CLI parses and checks; everything that touches an output folder happens behind one
:class:`RunService` whose collaborators are injected: the pipeline runner, the library import,
the report writer and the text writer. Tests hand in fakes (a runner that fails, a writer whose
disk is full) instead of patching module paths, and never pay for torch. The service runs a
single pipeline itself and hands the rest on with its collaborators: a sweep or a torchrun
worker to :class:`~auto_quantize_model.app.sweep.runs.SweepRuns` (its ``sweeps``), ``report``,
``frontier``, ``export`` and ``diff --output`` to :class:`~auto_quantize_model.app.outputs.OutputCommands`
(its ``outputs``).

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
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from auto_quantize_model.app.defaults import (
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
from auto_quantize_model.app.folders import PIPELINE_FILE, RUN_FILE, aqm_files, output_error
from auto_quantize_model.app.logs import PACKAGE_LOGGER
from auto_quantize_model.app.output_folder import Claim, clean_after_failure, write_file
from auto_quantize_model.app.output_folder import claim as claim_folder
from auto_quantize_model.app.outputs import OutputCommands
from auto_quantize_model.app.run_steps import (
    Recorder,
    RunRequest,
    interrupted_run,
    manifest_of,
    print_summary,
    report_files,
    run_point,
)
from auto_quantize_model.app.runs import RUNNING, Writer, open_run_folder
from auto_quantize_model.app.signals import retold, signals_deferred, sigterm_unwinds

if TYPE_CHECKING:
    from auto_quantize_model.app.export import ExportLoader
    from auto_quantize_model.app.frontier import FrontierMeasurer
    from auto_quantize_model.app.sweep.points import PointSession
    from auto_quantize_model.app.sweep.runs import SweepRuns
    from auto_quantize_model.app.sweep.workers import Worker, WorkerGroup
    from auto_quantize_model.pipeline import Artifacts

log = logging.getLogger(PACKAGE_LOGGER)


def _sweep_session_for(service: RunService) -> Callable[[], PointSession] | None:
    """Sweeps share one loaded model when the service runs real pipelines; a service handed its own
    pipeline runner (a test's fake) runs every sweep point through that runner instead."""
    return new_sweep_session if service.pipeline_runner is run_pipeline else None


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

    @property
    def sweeps(self) -> SweepRuns:
        """Sweeps and torchrun workers, with this service's collaborators.

        Imported here, not at the top: every command builds a service, and ``report`` or ``diff``
        should not load the sweep's modules (pre-flight, the pipeline file reader, the store's
        messages) only to leave them unused.
        """
        from auto_quantize_model.app.sweep.runs import SweepRuns

        return SweepRuns(
            pipeline_runner=self.pipeline_runner,
            library_importer=self.library_importer,
            text_writer=self.text_writer,
            sweep_session=self.sweep_session,
            worker_group=self.worker_group,
        )

    def run(self, request: RunRequest) -> int:
        """Run ``request``; returns the exit code (a sweep with failed points exits 1)."""
        if request.worker is not None:
            return self.sweeps.run_worker(request, request.worker)
        with claim_folder(request.folder, request.command) as claim:
            if request.is_sweep:
                return self.sweeps.run(request, claim)
            return self._single(request, claim)

    def _single(self, request: RunRequest, claim: Claim) -> int:
        from auto_quantize_model.io.pipeline_file import spec_to_toml

        folder, spec = request.folder, request.spec
        run = open_run_folder(folder, spec, force=request.force, created=claim.created)
        effective = for_folder(request.points[0].spec, folder)
        toml = folder / PIPELINE_FILE
        before = frozenset(aqm_files(folder))
        record = Recorder(self.text_writer, run, spec, request.command)
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
                store = run_point(self.pipeline_runner, effective, folder)
                _complete_timings(store, imports)
                extra = self._after(request, folder)
        except BaseException as err:
            kit = [toml, folder / RUN_FILE, *state_files(effective)]
            saved = run.resume or has_search_state(effective)
            stopped = isinstance(err, KeyboardInterrupt)
            if saved or stopped:  # an interrupted run keeps its record, so `aqm resume` takes it up
                clean_after_failure(folder, before, keep=kit)
                record.write_failure(err, [p for p in kit if p.is_file()])
                if isinstance(err, KeyboardInterrupt):
                    raise retold(err, interrupted_run(err, folder, saved=saved)) from None
                log.info("the run folder %s is kept; the same command resumes it", folder)
            else:
                clean_after_failure(folder, before, keep=())
            raise
        with signals_deferred(f"the run in {folder} is complete"):
            written = [toml, *report_files(store), *extra]
            done = record.write_complete(store, written, state_files(effective), imports=imports)
            print_summary(
                folder,
                [*written, done],
                manifest_of(store),
                seconds=time.perf_counter() - started,
                imports=imports,
            )
        return 0

    def _after(self, request: RunRequest, folder: Path) -> list[Path]:
        if request.after is None:
            return []
        try:
            return request.after(folder)
        except OSError as err:
            raise output_error(folder, err) from None


def _complete_timings(store: Artifacts, imports: float) -> None:
    """The report and manifest of a finished pipeline rewritten with every stage's seconds and the
    library imports, the same figures ``run.json`` records (WriteReports cannot time itself)."""
    from auto_quantize_model.artifacts import ReportPaths, RunTimings, StageTiming
    from auto_quantize_model.manifest_records import Manifest
    from auto_quantize_model.render.reports import IMPORTS_STAGE, rewrite_timings

    manifest, paths, timings = store.find(Manifest), store.find(ReportPaths), store.find(RunTimings)
    if manifest is None or paths is None or timings is None:
        return
    stages = [StageTiming(t.stage, round(t.seconds, 3)) for t in timings.stages]  # as run.json rounds them
    rewrite_timings(manifest, paths, (StageTiming(IMPORTS_STAGE, round(imports, 3)), *stages))
