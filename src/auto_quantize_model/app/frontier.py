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

Points measured earlier (the manifest's ``[frontier] measure``, or a ``frontier.json`` that
``--measure`` wrote into the run folder) are kept: a later solve writes them again, a later
measurement is merged with them, and they feed the damage model (predicted KL per budget).
``--max-kl K`` answers with the cheapest mix whose predicted KL stays within K
(:meth:`~auto_quantize_model.app.run_folder.FinishedRun.bounded`); with ``--measure`` that mix
is measured as well and the answer says whether the bound held.

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
from auto_quantize_model.core.damage import merge_measured, with_measurement
from auto_quantize_model.core.frontier_points import measured_budgets
from auto_quantize_model.errors import ConfigError, InputError

if TYPE_CHECKING:
    from auto_quantize_model.artifacts import BudgetFrontier, MeasuredFrontier
    from auto_quantize_model.core.damage import BoundChoice, DamageModel
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
    max_kl: float | None = None
    """``--max-kl``: choose the cheapest mix whose predicted KL (upper end) is at most this."""


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
    max_kl: float | None = None
    stored: MeasuredFrontier | None = None
    """Points the run folder holds from earlier measurements (None: none, or none readable)."""


@attrs.frozen(eq=False)
class FrontierOutcome:
    """What a frontier job found: the solve, the measured points, the damage model, the answer."""

    frontier: BudgetFrontier
    measured: MeasuredFrontier | None = None
    damage: DamageModel | None = None
    bound: BoundChoice | None = None
    notes: tuple[str, ...] = ()
    """What kept the damage model out or left points aside, one sentence each."""


@attrs.frozen
class FrontierWritten:
    """The files ``aqm frontier`` wrote and, with ``--max-kl``, its answer in a few lines."""

    paths: tuple[Path, ...]
    answer: tuple[str, ...] = ()


def plan_frontier(request: FrontierRequest) -> FrontierJob:
    """Read and check everything ``request`` needs; a problem is one line naming the path or flag.

    Called with the source folder's lock held (:func:`~auto_quantize_model.app.run_folder.reading`).
    """
    from auto_quantize_model.io.manifest import check_solvable
    from auto_quantize_model.spec_values import parse_budgets
    from auto_quantize_model.specs import FrontierSpec

    run = FinishedRun.open(request.source)
    check_solvable(run.manifest, run.manifest_path)  # measured or not, the search runs on these scores
    stored, _ = run.stored_measurements(strict=request.max_kl is not None)
    table = run.frontier_table()
    bits = request.bits if request.bits is not None else (table.bits if table is not None else None)
    if bits is None and request.max_kl is not None:
        if stored is None:
            run.damage_model(None)  # the refusal that says how to get measured points
        bits = run.candidate_bits(None, stored)
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
    return FrontierJob(
        run, spec, target, pipeline, state, plots=request.plots, max_kl=request.max_kl, stored=stored
    )


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


def solve_job(job: FrontierJob, measurer: FrontierMeasurer) -> FrontierOutcome:
    """The frontier of ``job``: from the manifest, or measured on the run's model; with the points
    measured earlier kept, the damage model fitted and, with ``--max-kl``, the answer."""
    if job.max_kl is not None:
        return _bounded(job, job.max_kl, measurer)
    stored, notes = _checked(job)
    if job.pipeline is None or job.state is None:
        budget_frontier, measured = job.run.frontier(job.spec), _carried(stored)
    else:
        budget_frontier, new = _measure(job, job.spec, measurer)
        measured = new if stored is None else merge_measured(stored, new)
    damage, why = _fitted(job, measured)
    return FrontierOutcome(budget_frontier, measured, damage, notes=(*notes, *why))


def _bounded(job: FrontierJob, max_kl: float, measurer: FrontierMeasurer) -> FrontierOutcome:
    """``--max-kl``: choose from the stored points (no model); with ``--measure K``, measure the
    chosen mix and K - 1 others spread over the range in one pass, and say whether the bound held.

    The damage model shown is the one the choice was made with: the new points join the fit
    the next time the folder is read.
    """
    budget_frontier, stored, damage, choice = job.run.bounded(max_kl, job.spec.bits, job.spec.workers)
    if job.pipeline is None or job.state is None:
        return FrontierOutcome(budget_frontier, _carried(stored), damage, choice)
    others = measured_budgets(budget_frontier.frontier, job.spec.measure - 1) if job.spec.measure > 1 else ()
    budgets = sorted({choice.point.budget, *(p.budget for p in others)})
    # MeasureFrontier measures every distinct mix when asked for at least as many as there are;
    # the solve adds the run's own budget, hence one more than listed
    spec = attrs.evolve(job.spec, bits=",".join(repr(b) for b in budgets), measure=len(budgets) + 1)
    _, new = _measure(job, spec, measurer)
    checked = with_measurement(choice, new.points)
    notes = [
        f"the damage model shown is the one the choice was made with ({len(damage.points)} point(s)); "
        "the points measured now join its fit the next time this folder is read"
    ]
    if checked.measured_kl is None:
        notes.append("the chosen mix was not among the points measured: the bound is not checked")
    for line in checked.lines()[-1:] if checked.measured_kl is not None else ():
        (log.info if checked.held else log.warning)("frontier: %s", line)
    return FrontierOutcome(budget_frontier, merge_measured(stored, new), damage, checked, tuple(notes))


def _measure(
    job: FrontierJob, spec: FrontierSpec, measurer: FrontierMeasurer
) -> tuple[BudgetFrontier, MeasuredFrontier]:
    assert job.pipeline is not None
    assert job.state is not None
    with copied_state(job.state) as copy:
        pipeline = attrs.evolve(
            job.pipeline, autoquant=attrs.evolve(job.pipeline.autoquant, checkpoint=str(copy))
        )
        return measurer(pipeline, spec)


def _checked(job: FrontierJob) -> tuple[MeasuredFrontier | None, tuple[str, ...]]:
    """The stored points when they belong to this run's scores; else none, and why."""
    if job.stored is None:
        return None, ()
    try:
        job.run.check_measured(job.stored)
    except InputError as err:
        log.warning("frontier: %s", err)
        return None, (f"points measured earlier were left out: {err}",)
    return job.stored, ()


def _carried(stored: MeasuredFrontier | None) -> MeasuredFrontier | None:
    """Points measured earlier, marked as such where they are shown again."""
    if stored is None:
        return None
    note = "these points were measured earlier (not again by this command) and are kept with the frontier"
    return stored if note in stored.notes else attrs.evolve(stored, notes=(*stored.notes, note))


def _fitted(
    job: FrontierJob, measured: MeasuredFrontier | None
) -> tuple[DamageModel | None, tuple[str, ...]]:
    from auto_quantize_model.core.damage import fit_or_why

    return fit_or_why(measured, job.run.additivity())


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def write_job(job: FrontierJob, outcome: FrontierOutcome) -> FrontierWritten:
    """Render every file into a scratch folder inside the target, then move them into place.

    A failure while rendering leaves the target as it was; OS errors are one line naming the path.
    """
    from auto_quantize_model.core.noise import random_weights_banner
    from auto_quantize_model.render.frontier import write_budget_frontier

    target = job.target
    try:
        target.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".aqm-frontier-", dir=target))
    except OSError as err:
        raise output_error(target, err) from None
    try:
        staged = write_budget_frontier(
            outcome.frontier,
            scratch,
            title=job.run.manifest.scheme.name,
            measured=outcome.measured,
            plots=job.plots,
            plots_dir=scratch / PLOTS_DIR,
            damage=outcome.damage,
            bound=outcome.bound,
            notes=outcome.notes,
            banner=random_weights_banner(job.run.manifest.model.source),
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
    answer = outcome.bound.lines() if outcome.bound is not None else ()
    return FrontierWritten(tuple(placed), answer)
