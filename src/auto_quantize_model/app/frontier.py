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

from auto_quantize_model.app.folders import (
    INDEX_NAME,
    MANIFEST_SUFFIX,
    PIPELINE_FILE,
    PLOTS_DIR,
    output_error,
)
from auto_quantize_model.errors import ConfigError, InputError

if TYPE_CHECKING:
    from auto_quantize_model.artifacts import BudgetFrontier, MeasuredFrontier
    from auto_quantize_model.io.manifest import Manifest
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

    manifest_path: Path
    manifest: Manifest
    spec: FrontierSpec
    target: Path
    pipeline: PipelineSpec | None
    """The run's pipeline, pointed at a search state to restore (only when measuring)."""
    state: Path | None
    """The run's search-state file (only when measuring)."""
    plots: bool = True


def locate_manifest(source: Path) -> Path:
    """The one manifest of a run folder, or ``source`` itself when it names a manifest file."""
    if source.is_file():
        return source
    if not source.exists():
        raise InputError(f"{source} does not exist: pass a run folder of aqm run (or a *{MANIFEST_SUFFIX})")
    if not source.is_dir():
        raise InputError(f"{source} is neither a folder nor a file: pass a run folder of aqm run")
    found = sorted(source.glob(f"*{MANIFEST_SUFFIX}"))
    if len(found) == 1:
        return found[0]
    if found:
        names = ", ".join(path.name for path in found)
        raise InputError(f"{source} holds {len(found)} manifests ({names}): pass the one to use")
    if (source / INDEX_NAME).is_file():
        raise InputError(
            f"{source} is a sweep folder: run aqm frontier on one of its points (a subfolder listed in "
            f"{INDEX_NAME})"
        )
    raise InputError(
        f"{source} holds no *{MANIFEST_SUFFIX}: not a finished run folder (an interrupted run finishes "
        f"with aqm resume {source})"
    )


def _run_frontier_table(folder: Path) -> FrontierSpec | None:
    """The ``[frontier]`` table of the run's ``pipeline.toml``, when the run had one."""
    from auto_quantize_model.io.pipeline_file import load_pipeline

    toml = folder / PIPELINE_FILE
    return load_pipeline(toml).frontier if toml.is_file() else None


def plan_frontier(request: FrontierRequest) -> FrontierJob:
    """Read and check everything ``request`` needs; a problem is one line naming the path or flag."""
    from auto_quantize_model.core.frontier import parse_budgets
    from auto_quantize_model.io.manifest import check_solvable
    from auto_quantize_model.render.reports import read_manifest
    from auto_quantize_model.specs import FrontierSpec

    manifest_path = locate_manifest(request.source)
    manifest = read_manifest(manifest_path)
    check_solvable(manifest, manifest_path)  # measured or not, the search runs on these scores
    folder = manifest_path.parent
    table = _run_frontier_table(folder) if manifest.origin == "aqm" else None
    bits = request.bits if request.bits is not None else (table.bits if table is not None else None)
    if bits is None:
        raise ConfigError(
            f"{folder}: no budgets given and its {PIPELINE_FILE} has no [frontier] bits; pass --bits "
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
    target = request.output if request.output is not None else folder
    if target.exists() and not target.is_dir():
        raise InputError(f"--output {target} exists and is not a folder")
    pipeline, state = (None, None)
    if request.measure:
        pipeline, state = _measurable_run(folder, manifest)
    return FrontierJob(manifest_path, manifest, spec, target, pipeline, state, plots=request.plots)


def _measurable_run(folder: Path, manifest: Manifest) -> tuple[PipelineSpec, Path]:
    """The run's pipeline and search-state file, or why the run cannot be measured."""
    from auto_quantize_model.backend.modelopt.checkpoint import STATE_FILE, checkpoint_file
    from auto_quantize_model.io.pipeline_file import load_pipeline

    if manifest.origin != "aqm":
        raise InputError(
            f"{folder}: --measure needs a run folder of aqm run (its {PIPELINE_FILE} and search state); "
            "this manifest is the previous tool's: solve without --measure"
        )
    toml = folder / PIPELINE_FILE
    if not toml.is_file():
        raise InputError(
            f"{folder} has no {PIPELINE_FILE}: --measure re-runs the run's pipeline; point it at the folder "
            "aqm run wrote"
        )
    pipeline = load_pipeline(toml)
    checkpoint = pipeline.autoquant.checkpoint
    state = Path(checkpoint_file(checkpoint)) if checkpoint is not None else folder / STATE_FILE
    if not state.is_file():
        raise InputError(
            f"{state} does not exist: --measure restores the run's saved search state; run the pipeline "
            f"again (aqm run {toml} --output NEW_FOLDER) to make one"
        )
    return pipeline, state


# --------------------------------------------------------------------------------------------------
# Solving and measuring
# --------------------------------------------------------------------------------------------------


def frontier_of_manifest(manifest: Manifest, spec: FrontierSpec, where: Path) -> BudgetFrontier:
    """The frontier of a manifest: its groups, ModelOpt's order and fixed groups, no model.

    The manifest is checked before anything is solved (:func:`check_solvable`: a NaN score is
    named here, not by the solver's traceback); ``aqm export`` relies on that too. ``where``
    names the manifest in every error.
    """
    from auto_quantize_model.artifacts import GroupScore
    from auto_quantize_model.core.frontier import parse_budgets
    from auto_quantize_model.core.frontier_points import search_method, search_space, solve_budgets
    from auto_quantize_model.io.convert import project
    from auto_quantize_model.io.manifest import check_solvable

    check_solvable(manifest, where)
    groups = [project(group, GroupScore) for group in manifest.groups]
    try:
        space, notes = search_space(
            groups,
            search_method(manifest.scheme.method, str(where)),
            order=manifest.search_order,
            fixed=manifest.fixed_groups,
            groups_in_order=False,
        )
    except InputError as err:
        message = str(err)
        raise InputError(message if message.startswith(str(where)) else f"{where}: {message}") from None
    if manifest.origin == "legacy":
        notes = (
            *notes,
            "the previous tool's manifest does not say which groups belong to the language model: "
            "budgets are bits over every costed weight, as its own auto_quantize_bits were",
        )
    budgets = parse_budgets(spec.bits)
    _announce(len(budgets), len(space.rows), space.method, spec.workers)
    return solve_budgets(
        space,
        budgets,
        run_budget=manifest.scheme.effective_bits_target,
        run_choice=groups,
        workers=spec.workers,
        notes=notes,
    )


def _announce(budgets: int, rows: int, method: str, workers: int | None) -> None:
    if method != "gradient":
        log.info("frontier: %d budget(s) over %d groups (kl_div bisection, no solver)", budgets, rows)
        return
    from auto_quantize_model.core.frontier import solver_processes

    processes = solver_processes(rows, budgets, workers)
    log.info(
        "frontier: %d budget(s) over %d groups: one CBC solve each (about 0.25 s per budget on one core), "
        "%d process(es)",
        budgets,
        rows,
        processes,
    )


def measure_run(pipeline: PipelineSpec, spec: FrontierSpec) -> tuple[BudgetFrontier, MeasuredFrontier]:
    """The run's stages up to RunAutoQuant (its search state restored), SolveBudgets, MeasureFrontier.

    ``pipeline.autoquant.checkpoint`` must name the search state to restore: a copy, so that
    nothing of the run folder is touched.
    """
    from auto_quantize_model.artifacts import BudgetFrontier, MeasuredFrontier
    from auto_quantize_model.pipeline import Pipeline
    from auto_quantize_model.stages import STAGES
    from auto_quantize_model.stages.measure_frontier import MeasureFrontier
    from auto_quantize_model.stages.solve_budgets import SolveBudgets

    stages = []
    for entry in STAGES:
        if not entry.optional and entry.runs_in(pipeline):
            stages.append(entry.build(getattr(pipeline, entry.table)))
        if entry.name == "RunAutoQuant":
            break
    stages += [SolveBudgets(spec), MeasureFrontier(spec)]
    with contextlib.redirect_stdout(sys.stderr):  # ModelOpt prints progress; stdout is for results
        store = Pipeline(stages).run()
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
        return frontier_of_manifest(job.manifest, job.spec, job.manifest_path), None
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
            title=job.manifest.scheme.name,
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
