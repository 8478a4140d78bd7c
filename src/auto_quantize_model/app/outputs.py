"""The commands that write from a finished run: ``aqm report``, ``frontier``, ``export``, ``diff --output``.

They share the run service's collaborators (report writer, frontier measurer, export loader,
text writer) but none of its run lifecycle, so they live apart from it. The data-safety rules of
issue 21 hold here as in a run: a file in an ``--output`` folder is overwritten only when an
earlier aqm output there recorded it (:data:`~auto_quantize_model.app.folders.OUTPUTS_RECORD`,
or the folder's ``run.json``), and a failure leaves no new file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from auto_quantize_model.app.defaults import (
    ReportWriter,
    load_for_export,
    measure_frontier,
    regenerate_reports,
    write_text,
)
from auto_quantize_model.app.folders import (
    OUTPUTS_RECORD,
    PLOT_SUFFIXES,
    PLOTS_DIR,
    OutputError,
    aqm_files,
    file_above,
    make_folder,
    output_error,
    outputs_record,
    refuse_foreign_files,
    remove_made,
)
from auto_quantize_model.app.output_folder import claim, clean_after_failure, write_file
from auto_quantize_model.app.run_folder import reading
from auto_quantize_model.app.runs import Writer

if TYPE_CHECKING:
    from auto_quantize_model.app.export import ExportLoader, ExportRequest
    from auto_quantize_model.app.frontier import (
        FrontierJob,
        FrontierMeasurer,
        FrontierRequest,
        FrontierWritten,
    )
    from auto_quantize_model.artifacts import ExportedMix, ReportPaths


@attrs.frozen
class OutputCommands:
    """Writes reports, frontiers, exports and single result files; every side effect through a field."""

    report_writer: ReportWriter = regenerate_reports
    frontier_measurer: FrontierMeasurer = measure_frontier
    """``aqm frontier --measure``: the run's stages up to RunAutoQuant, SolveBudgets, MeasureFrontier."""
    export_loader: ExportLoader = load_for_export
    """``aqm export --checkpoint``: the run's LoadModel, ExtractLM and BuildCalibLoader (no AutoQuant)."""
    text_writer: Writer = write_text

    def report(self, manifest: Path, output: Path | None) -> ReportPaths:
        """``aqm report``: regenerate reports; an OS failure leaves no new file and reads as one line."""
        target = output if output is not None else manifest.parent
        own = output is None or _same_folder(output, manifest.parent)
        made = make_folder(output) if output is not None else []
        try:
            if not own:
                refuse_foreign_files(target, _report_names())
            before = frozenset(aqm_files(target))
            try:
                paths = self.report_writer(manifest, output)
                if not own:
                    record = outputs_record(target, map(Path, paths.files))
                    write_file(self.text_writer, target / OUTPUTS_RECORD, record)
            except OSError as err:
                clean_after_failure(target, before, keep=())
                raise output_error(target, err) from None
            return paths
        finally:
            remove_made(made)

    def frontier(self, request: FrontierRequest) -> FrontierWritten:
        """``aqm frontier``: a run's budget frontier (measured points too with ``--measure``).

        Everything is read and checked first, with the run folder's lock held (as ``aqm export``
        holds it), so no run can write the folder meanwhile; a separate ``--output`` folder is
        locked as well while the frontier is solved (and measured), and its files are put in
        place only once all of them are written.
        """
        from auto_quantize_model.app.frontier import plan_frontier

        source = request.source if request.source.is_dir() else request.source.parent
        if request.output is None or _same_folder(request.output, source):
            with claim(source, request.command):  # the run folder itself: one lock, ours
                return self._frontier_into(plan_frontier(request), own=True)
        with reading(request.source, request.command, "solve a frontier from"):
            job = plan_frontier(request)
            refuse_foreign_files(job.target, _frontier_names())
            with claim(job.target, request.command):
                return self._frontier_into(job, own=False)

    def _frontier_into(self, job: FrontierJob, *, own: bool) -> FrontierWritten:
        from auto_quantize_model.app.frontier import solve_job, write_job

        written = write_job(job, solve_job(job, self.frontier_measurer))
        if not own:
            record = outputs_record(job.target, written.paths)
            write_file(self.text_writer, job.target / OUTPUTS_RECORD, record)
        return written

    def export(self, request: ExportRequest) -> ExportedMix:
        """``aqm export``: a run's mix at one budget as a ModelOpt config (and checkpoint).

        Everything is read and checked first; the folder is written under a scratch name beside
        the target and moved into place once complete. The run folder is locked meanwhile, as
        ``aqm run`` locks it: an export from a folder a run is writing is refused.
        """
        from auto_quantize_model.app.export import plan_export, run_export

        with reading(request.source, request.command, "export from"):  # the lock aqm run takes
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
            return write_file(self.text_writer, path, text)
        except BaseException:
            remove_made(made)
            raise


def _same_folder(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _report_names() -> list[str]:
    """Every file ``aqm report`` may write into an output folder (the manifest is never rewritten)."""
    from auto_quantize_model.render import plots, reports

    stems = (plots.HEATMAP_STEM, plots.TOP_STEM, plots.SCATTER_STEM, plots.EXPERTS_STEM)
    pictures = [f"{PLOTS_DIR}/{stem}{suffix}" for stem in stems for suffix in PLOT_SUFFIXES]
    return [reports.LAYER_JSON, reports.LAYER_MD, *pictures]


def _frontier_names() -> list[str]:
    """Every file ``aqm frontier`` may write into an output folder."""
    from auto_quantize_model.render import frontier, frontier_figures

    stems = frontier_figures.STEMS
    pictures = [f"{PLOTS_DIR}/{stem}{suffix}" for stem in stems for suffix in PLOT_SUFFIXES]
    return [frontier.MARKDOWN_FILE, frontier.JSON_FILE, *pictures]
