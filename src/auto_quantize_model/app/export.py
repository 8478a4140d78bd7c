"""``aqm export``: the mix of a finished run at one budget, as a ModelOpt config or a checkpoint.

The budget's mix comes from the run folder's manifest through the solver ``aqm frontier`` uses
(:func:`~auto_quantize_model.app.frontier.frontier_of_manifest`, one budget; the run's own budget
when none is given). The config files need nothing else. ``--checkpoint`` rebuilds the run's
model the way ``aqm frontier --measure`` does, from the run's ``pipeline.toml`` (LoadModel,
ExtractLM, BuildCalibLoader; no AutoQuant: the export quantizes a fresh, unquantized model with
the config), then writes and reads back the checkpoint
(:func:`~auto_quantize_model.stages.export_checkpoint.export_mix`).

Everything is read and checked before anything is solved, loaded or written; the folder is
written beside the target under a scratch name and renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import errno
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from auto_quantize_model.app.folders import PIPELINE_FILE
from auto_quantize_model.errors import ConfigError, InputError

if TYPE_CHECKING:
    from auto_quantize_model.app.lock import FolderBusy
    from auto_quantize_model.artifacts import ExportedMix
    from auto_quantize_model.io.manifest import Manifest
    from auto_quantize_model.specs import PipelineSpec
    from auto_quantize_model.stages.export_checkpoint import CheckpointInputs

ExportLoader = Callable[["PipelineSpec"], "CheckpointInputs"]
"""Runs a run's LoadModel, ExtractLM and BuildCalibLoader: a pristine model and its calibration data."""


@attrs.frozen
class ExportRequest:
    """What ``aqm export`` was asked: a run folder, a budget and where to write."""

    source: Path
    output: Path
    bits: str | None = None
    """The budget as ``--bits`` spells it; None takes the run's own budget."""
    checkpoint: bool = False
    force: bool = False
    command: tuple[str, ...] = ()


@attrs.frozen(eq=False)
class ExportJob:
    """A checked request: everything read, nothing solved or written yet."""

    manifest_path: Path
    manifest: Manifest
    budget: float
    target: Path
    pipeline: PipelineSpec | None
    """The run's pipeline (only with ``--checkpoint``)."""
    force: bool = False


_UNLOCKABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
"""Why a lock file cannot be made in a folder that can still be read (someone else's, read-only)."""


@contextlib.contextmanager
def reading_run_folder(source: Path, command: tuple[str, ...] = ()) -> Iterator[None]:
    """Hold the lock ``aqm run`` takes on the run folder behind ``source`` while it is read.

    A run writing the folder (its manifest, its search state) is refused with one line naming it,
    and no run can start there until the export has read what it needs. A folder this user cannot
    write cannot be locked, nor written by this user's runs: there only ``run.json``'s record of a
    live owner refuses. A ``source`` that does not exist is left to :func:`plan_export` to word.
    """
    from auto_quantize_model.app.lock import FolderBusy, FolderLock
    from auto_quantize_model.app.runs import read_run, refuse_live_owner

    folder = source if source.is_dir() else source.parent
    if not folder.is_dir():
        yield
        return
    try:
        lock = FolderLock.acquire(folder, command)
    except FolderBusy as busy:
        raise _busy(busy) from None
    except OSError as err:
        if err.errno not in _UNLOCKABLE:
            raise
        record = read_run(folder)
        if record is not None:
            try:
                refuse_live_owner(folder, record)
            except FolderBusy as busy:
                raise _busy(busy) from None
        yield
        return
    with lock:
        yield


def _busy(busy: FolderBusy) -> InputError:
    who = busy.holder.describe() if busy.holder is not None else "another aqm process"
    return InputError(f"{busy.folder} is in use by {who}; export from it once that has finished (or stop it)")


def parse_bits(text: str) -> float:
    """One effective-bits budget from ``--bits``; a one-line ConfigError naming the flag otherwise."""
    from auto_quantize_model.core.frontier import parse_budgets

    try:
        budgets = parse_budgets(text)
    except ConfigError as err:
        raise ConfigError(f"--bits: {err}") from None
    if len(budgets) != 1:
        raise ConfigError(f"--bits {text!r}: export takes one budget (e.g. --bits 12), got {len(budgets)}")
    return budgets[0]


def plan_export(request: ExportRequest) -> ExportJob:
    """Read and check everything ``request`` needs; a problem is one line naming the path or flag."""
    from auto_quantize_model.app.frontier import locate_manifest
    from auto_quantize_model.render.reports import read_manifest
    from auto_quantize_model.stages.export_checkpoint import refuse_taken

    budget = parse_bits(request.bits) if request.bits is not None else None
    manifest_path = locate_manifest(request.source)
    manifest = read_manifest(manifest_path)
    folder = manifest_path.parent
    if budget is None:
        budget = manifest.scheme.effective_bits_target
        if budget is None or not math.isfinite(budget):
            raise InputError(f"{manifest_path} records no effective-bits budget: pass --bits")
    refuse_overlap(request.output, folder)
    refuse_taken(request.output, request.force)
    pipeline = _checkpoint_pipeline(folder, manifest) if request.checkpoint else None
    return ExportJob(manifest_path, manifest, budget, request.output, pipeline, force=request.force)


def refuse_overlap(output: Path, folder: Path) -> None:
    """The export never goes into its source run, inside it, or into a folder that holds it.

    Replacing an earlier export with ``--force`` must never reach the run it is made from, so
    the three cases are refused before anything is read further; paths are compared resolved, so
    ``--output .`` and links name the folders they really are.
    """
    out, run = output.resolve(), folder.resolve()
    if out == run:
        raise ConfigError(f"--output {output} is the run folder {folder} itself; export to a new folder")
    if run in out.parents:
        raise ConfigError(f"--output {output} is inside the run folder {folder}; export elsewhere")
    if out in run.parents:
        raise ConfigError(
            f"--output {output} holds the run folder {folder}; export to a new folder beside it instead"
        )


def _checkpoint_pipeline(folder: Path, manifest: Manifest) -> PipelineSpec:
    from auto_quantize_model.io.pipeline_file import load_pipeline

    if manifest.origin != "aqm":
        raise InputError(
            f"{folder}: --checkpoint needs a run folder of aqm run (its {PIPELINE_FILE}); this manifest is "
            "the previous tool's: export the config without --checkpoint"
        )
    toml = folder / PIPELINE_FILE
    if not toml.is_file():
        raise InputError(
            f"{folder} has no {PIPELINE_FILE}: --checkpoint loads the run's model from it; point it at the "
            "folder aqm run wrote"
        )
    return load_pipeline(toml)


def load_run_model(pipeline: PipelineSpec) -> CheckpointInputs:
    """The run's LoadModel, ExtractLM and BuildCalibLoader, as ``aqm frontier --measure`` runs them.

    AutoQuant is not run: the export quantizes this pristine model itself. Held-out text follows
    the run's ``[validate]`` table (its defaults without one).
    """
    from auto_quantize_model.artifacts import CalibData, LanguageModel, LoadedModel
    from auto_quantize_model.pipeline import Pipeline
    from auto_quantize_model.specs import ValidateSpec
    from auto_quantize_model.stages import STAGES
    from auto_quantize_model.stages.export_checkpoint import CheckpointInputs

    wanted = ("LoadModel", "ExtractLM", "BuildCalibLoader")
    stages = [entry.build(getattr(pipeline, entry.table)) for entry in STAGES if entry.name in wanted]
    with contextlib.redirect_stdout(sys.stderr):  # libraries print progress; stdout is for results
        store = Pipeline(stages).run()
    validate = pipeline.validate or ValidateSpec()
    holdout = ValidateSpec(
        holdout_captions=validate.holdout_captions, holdout_samples=validate.holdout_samples
    )
    return CheckpointInputs(store.get(LoadedModel), store.get(LanguageModel), store.get(CalibData), holdout)


def run_export(job: ExportJob, loader: ExportLoader) -> ExportedMix:
    """Solve the job's budget, then write the config (and, with a pipeline, the checkpoint)."""
    from auto_quantize_model.app.frontier import frontier_of_manifest
    from auto_quantize_model.artifacts import GroupScore
    from auto_quantize_model.io.convert import project
    from auto_quantize_model.specs import FrontierSpec
    from auto_quantize_model.stages.export_checkpoint import choice_at, export_mix

    groups = [project(group, GroupScore) for group in job.manifest.groups]
    solved = frontier_of_manifest(
        job.manifest, FrontierSpec(bits=repr(job.budget), workers=1), job.manifest_path
    )
    choices, bits = choice_at(solved, job.budget, groups)
    checkpoint = loader(job.pipeline) if job.pipeline is not None else None
    with contextlib.redirect_stdout(sys.stderr):
        return export_mix(
            choices,
            job.target,
            budget=job.budget,
            effective_bits_lm=bits,
            checkpoint=checkpoint,
            force=job.force,
            notes=solved.notes,
        )
