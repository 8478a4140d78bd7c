"""``aqm frontier``: the budget frontier of a finished run, from its folder.

Two ways, one set of files (``frontier.md``, ``frontier.json``, ``plots/frontier-*``):

* from the manifest alone (ours, or the previous tool's): its groups, costs, scores, ModelOpt's
  group order and fixed groups are all the search needs, so hundreds of budgets take seconds on
  a CPU with no model (the gradient method runs CBC once per budget, about 0.25 s each on one
  core, spread over the available CPUs);
* with ``--measure K``: the run's ``pipeline.toml`` stages up to RunAutoQuant run again from a
  copy of the run's saved search state (calibration and scores are restored, only the search
  runs), then SolveBudgets and MeasureFrontier, as a pipeline with ``[frontier] measure = K``
  would. The run folder itself is only read.

Everything is read and checked before anything is solved, loaded or written; the files are
rendered into a scratch folder and moved into place only once all of them exist.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from auto_quantize_model.app.folders import PIPELINE_FILE, PLOTS_DIR, output_error
from auto_quantize_model.app.run_folder import FinishedRun
from auto_quantize_model.errors import ConfigError, InputError

if TYPE_CHECKING:
    from auto_quantize_model.artifacts import BudgetFrontier, MeasuredFrontier
    from auto_quantize_model.specs import FrontierSpec, PipelineSpec

log = logging.getLogger("auto_quantize_model")

FrontierMeasurer = Callable[["PipelineSpec", "FrontierSpec"], "tuple[BudgetFrontier, MeasuredFrontier]"]
"""Runs a run's stages up to RunAutoQuant, then SolveBudgets and MeasureFrontier."""


@attrs.frozen
class FrontierRequest:
    """What ``aqm frontier`` was asked: a run folder (or a manifest file) and the budgets."""

    source: Path
    bits: str | None = None
    """Budgets as ``--bits`` spells them; None takes the run's ``[frontier] bits``."""
    output: Path | None = None
    """Where the files go; None: the manifest's folder."""
    measure: int = 0
    workers: int | None = None
    plots: bool = True
    command: tuple[str, ...] = ()


@attrs.frozen(eq=False)
class FrontierJob:
    """A checked request: everything read, nothing solved or written yet."""

    run: FinishedRun
    spec: FrontierSpec
    target: Path
    pipeline: PipelineSpec | None
    """The run's pipeline, pointed at a search state to restore (only when measuring)."""
    state: Path | None
    """The run's search-state file (only when measuring)."""
    plots: bool = True


def plan_frontier(request: FrontierRequest) -> FrontierJob:
    """Read and check everything ``request`` needs; a problem is one line naming the path or flag.

    Called with the source folder's lock held (:func:`~auto_quantize_model.app.run_folder.reading`).
    """
    from auto_quantize_model.io.manifest import check_solvable
    from auto_quantize_model.specs import FrontierSpec, parse_budgets

    run = FinishedRun.open(request.source)
    check_solvable(run.manifest, run.manifest_path)  # measured or not, the search runs on these scores
    table = run.frontier_table()
    bits = request.bits if request.bits is not None else (table.bits if table is not None else None)
    if bits is None:
        raise ConfigError(
            f"{run.folder}: no budgets given and its {PIPELINE_FILE} has no [frontier] bits; pass --bits "
            "(e.g. --bits 4.5:8:0.25)"
        )
    try:
        parse_budgets(bits)
    except ConfigError as err:
        raise ConfigError(f"--bits: {err}") from None
    base = table if table is not None else FrontierSpec(bits=bits)
    spec = attrs.evolve(
        base,
        bits=bits,
        measure=request.measure,
        workers=request.workers if request.workers is not None else base.workers,
    )
    target = request.output if request.output is not None else run.folder
    if target.exists() and not target.is_dir():
        raise InputError(f"--output {target} exists and is not a folder")
    pipeline, state = (None, None)
    if request.measure:
        pipeline = run.pipeline("--measure")
        state = run.search_state(pipeline, "--measure")
    return FrontierJob(run, spec, target, pipeline, state, plots=request.plots)


# --------------------------------------------------------------------------------------------------
# Solving and measuring
# --------------------------------------------------------------------------------------------------


def measure_run(pipeline: PipelineSpec, spec: FrontierSpec) -> tuple[BudgetFrontier, MeasuredFrontier]:
    """The run's stages up to RunAutoQuant (its search state restored), SolveBudgets, MeasureFrontier.

    ``pipeline.autoquant.checkpoint`` must name the search state to restore: a copy, so that
    nothing of the run folder is touched.
    """
    from auto_quantize_model.artifacts import BudgetFrontier, MeasuredFrontier
    from auto_quantize_model.stages import partial_pipeline
    from auto_quantize_model.stages.measure_frontier import MeasureFrontier
    from auto_quantize_model.stages.solve_budgets import SolveBudgets

    pipeline_run = partial_pipeline(
        pipeline, through="RunAutoQuant", then=(SolveBudgets(spec), MeasureFrontier(spec))
    )
    with contextlib.redirect_stdout(sys.stderr):  # ModelOpt prints progress; stdout is for results
        store = pipeline_run.run()
    return store.get(BudgetFrontier), store.get(MeasuredFrontier)


@contextlib.contextmanager
def copied_state(state: Path) -> Iterator[Path]:
    """A scratch copy of a search state and the records beside it; the run's files stay untouched."""
    from auto_quantize_model.backend.modelopt.checkpoint import StateFiles

    with tempfile.TemporaryDirectory(prefix="aqm-frontier-state-") as scratch:
        for path in StateFiles(state).unit():
            if path.is_file():
                shutil.copy2(path, Path(scratch) / path.name)
        yield Path(scratch) / state.name


def solve_job(job: FrontierJob, measurer: FrontierMeasurer) -> tuple[BudgetFrontier, MeasuredFrontier | None]:
    """The frontier of ``job``: from the manifest, or measured on the run's model."""
    if job.pipeline is None or job.state is None:
        return job.run.frontier(job.spec), None
    with copied_state(job.state) as copy:
        pipeline = attrs.evolve(
            job.pipeline, autoquant=attrs.evolve(job.pipeline.autoquant, checkpoint=str(copy))
        )
        return measurer(pipeline, job.spec)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def write_job(
    job: FrontierJob, budget_frontier: BudgetFrontier, measured: MeasuredFrontier | None
) -> tuple[Path, ...]:
    """Render every file into a scratch folder inside the target, then move them into place.

    A failure while rendering leaves the target as it was; OS errors are one line naming the path.
    """
    from auto_quantize_model.render.frontier import write_budget_frontier

    target = job.target
    try:
        target.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".aqm-frontier-", dir=target))
    except OSError as err:
        raise output_error(target, err) from None
    try:
        staged = write_budget_frontier(
            budget_frontier,
            scratch,
            title=job.run.manifest.scheme.name,
            measured=measured,
            plots=job.plots,
            plots_dir=scratch / PLOTS_DIR,
        )
        placed = []
        for path in staged:
            final = target / path.relative_to(scratch)
            final.parent.mkdir(parents=True, exist_ok=True)
            path.replace(final)
            placed.append(final)
    except OSError as err:
        raise output_error(target, err) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return tuple(placed)
