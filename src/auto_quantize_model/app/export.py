"""``aqm export``: the mix of a finished run at one budget, as a ModelOpt config or a checkpoint.

The run folder is opened through the seam ``aqm frontier`` uses too
(:class:`~auto_quantize_model.app.run_folder.FinishedRun`: its lock held while reading, the
manifest checked, the budget solved from the manifest alone; the run's own budget when none is
given). The config files need nothing else. ``--checkpoint`` rebuilds the run's model from its
``pipeline.toml`` (LoadModel, ExtractLM, BuildCalibLoader; no AutoQuant: the export quantizes a
fresh, unquantized model with the config), then writes and reads back the checkpoint
(:func:`~auto_quantize_model.backend.exporting.export_mix`).

Everything is read and checked before anything is solved, loaded or written; the folder is
written beside the target under a scratch name and moved into place when complete.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from auto_quantize_model.app.run_folder import FinishedRun
from auto_quantize_model.errors import ConfigError, InputError

if TYPE_CHECKING:
    from auto_quantize_model.artifacts import CheckpointInputs, ExportedMix
    from auto_quantize_model.specs import PipelineSpec

log = logging.getLogger("auto_quantize_model")

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
    format: str = "modelopt"
    """The checkpoint format: ``modelopt`` or ``compressed-tensors`` (which needs ``checkpoint``)."""
    max_kl: float | None = None
    """``--max-kl``: the budget is the cheapest whose predicted KL is at most this (``bits`` then
    names the budgets to choose among)."""


@attrs.frozen(eq=False)
class ExportJob:
    """A checked request: everything read, nothing solved or written yet."""

    run: FinishedRun
    budget: float
    target: Path
    pipeline: PipelineSpec | None
    """The run's pipeline (only with ``--checkpoint``)."""
    force: bool = False
    format: str = "modelopt"
    notes: tuple[str, ...] = ()
    """Why this budget (``--max-kl``'s answer), recorded in ``export.json``."""


def parse_bits(text: str) -> float:
    """One effective-bits budget from ``--bits``; a one-line ConfigError naming the flag otherwise."""
    from auto_quantize_model.spec_values import parse_budgets

    try:
        budgets = parse_budgets(text)
    except ConfigError as err:
        raise ConfigError(f"--bits: {err}") from None
    if len(budgets) != 1:
        raise ConfigError(f"--bits {text!r}: export takes one budget (e.g. --bits 12), got {len(budgets)}")
    return budgets[0]


def plan_export(request: ExportRequest) -> ExportJob:
    """Read and check everything ``request`` needs; a problem is one line naming the path or flag.

    Called with the source folder's lock held (:func:`~auto_quantize_model.app.run_folder.reading`).
    """
    from auto_quantize_model.backend.exporting import refuse_taken
    from auto_quantize_model.core.ct_config import COMPRESSED_TENSORS
    from auto_quantize_model.spec_values import EXPORT_FORMATS

    if request.format not in EXPORT_FORMATS:
        raise ConfigError(f"--format {request.format}: choose one of {', '.join(EXPORT_FORMATS)}")
    if request.format == COMPRESSED_TENSORS and not request.checkpoint:
        raise ConfigError(
            "--format compressed-tensors writes a checkpoint (the weights are the format): add --checkpoint"
        )
    bounded = request.max_kl is not None
    budget = parse_bits(request.bits) if request.bits is not None and not bounded else None
    run = FinishedRun.open(request.source)
    refuse_overlap(request.output, run.folder)
    refuse_taken(request.output, request.force)
    notes: tuple[str, ...] = ()
    if request.max_kl is not None:
        choice = run.bounded(request.max_kl, request.bits, workers=1)[3]
        budget, notes = choice.point.budget, choice.lines()
        for line in notes:
            log.info("export: %s", line)
    if budget is None:
        budget = run.manifest.scheme.effective_bits_target
        if budget is None or not math.isfinite(budget):
            raise InputError(f"{run.manifest_path} records no effective-bits budget: pass --bits")
    pipeline = run.pipeline("--checkpoint") if request.checkpoint else None
    return ExportJob(
        run, budget, request.output, pipeline, force=request.force, format=request.format, notes=notes
    )


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


def load_run_model(pipeline: PipelineSpec) -> CheckpointInputs:
    """The run's LoadModel, ExtractLM and BuildCalibLoader, as ``aqm frontier --measure`` runs them.

    AutoQuant is not run: the export quantizes this pristine model itself. Held-out text follows
    the run's ``[validate]`` table (its defaults without one).
    """
    from auto_quantize_model.artifacts import CalibData, CheckpointInputs, LanguageModel, LoadedModel
    from auto_quantize_model.specs import ValidateSpec
    from auto_quantize_model.stages import partial_pipeline

    with contextlib.redirect_stdout(sys.stderr):  # libraries print progress; stdout is for results
        store = partial_pipeline(pipeline, through="BuildCalibLoader").run()
    validate = pipeline.validate or ValidateSpec()
    holdout = ValidateSpec(
        holdout_captions=validate.holdout_captions, holdout_samples=validate.holdout_samples
    )
    return CheckpointInputs(
        store.get(LoadedModel),
        store.get(LanguageModel),
        store.get(CalibData),
        holdout,
        kernels=pipeline.autoquant.kernels,
    )


def run_export(job: ExportJob, loader: ExportLoader) -> ExportedMix:
    """Solve the job's budget, then write the config (and, with a pipeline, the checkpoint)."""
    from auto_quantize_model.artifacts import GroupScore
    from auto_quantize_model.backend.exporting import choice_at, export_mix
    from auto_quantize_model.io.convert import project
    from auto_quantize_model.specs import FrontierSpec

    groups = [project(group, GroupScore) for group in job.run.manifest.groups]
    solved = job.run.frontier(FrontierSpec(bits=repr(job.budget), workers=1))
    choices, bits = choice_at(solved, job.budget, groups)
    if job.pipeline is not None:  # a checkpoint (compressed-tensors always is one)
        from auto_quantize_model.core.ct_config import check_checkpoint_format

        check_checkpoint_format(choices, job.format)  # before the model is loaded
    checkpoint = loader(job.pipeline) if job.pipeline is not None else None
    with contextlib.redirect_stdout(sys.stderr):
        return export_mix(
            choices,
            job.target,
            budget=job.budget,
            effective_bits_lm=bits,
            checkpoint=checkpoint,
            force=job.force,
            notes=(*job.notes, *solved.notes),
            checkpoint_format=job.format,
        )
