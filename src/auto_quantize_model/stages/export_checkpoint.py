"""The ``ExportCheckpoint`` stage: the mix at one budget as a ModelOpt config, and optionally a checkpoint.

The work is :mod:`auto_quantize_model.backend.exporting`'s (shared with ``aqm export``); the stage
gathers its inputs: the run's scores, and with ``checkpoint`` a fresh copy of the model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import attrs

from auto_quantize_model.artifacts import (
    CalibData,
    CheckpointInputs,
    ExportedMix,
    LanguageModel,
    LoadedModel,
    QuantSearch,
    SensitivityScores,
)
from auto_quantize_model.backend.exporting import (
    EXPORT_FILE,
    choice_at,
    export_mix,
    solve_one,
    summary_line,
)
from auto_quantize_model.errors import ConfigError
from auto_quantize_model.specs import ExportSpec

if TYPE_CHECKING:
    from auto_quantize_model.pipeline import Artifacts

log = logging.getLogger("auto_quantize_model")


@attrs.frozen
class ExportCheckpoint:
    """Write the mix at ``spec.bits`` (the run's budget when None) to ``spec.output_dir``.

    Config only by default: pure, from :class:`SensitivityScores`. With ``spec.checkpoint`` the
    model is loaded again from :attr:`LoadedModel.load_spec` (RunAutoQuant has quantized the one
    in the pipeline in place, and keeping a deep copy from before the search would double the
    memory of every run, export or not), quantized with the config, calibrated on the run's
    batches, exported and read back.
    """

    spec: ExportSpec

    optional: ClassVar[tuple[type, ...]] = (QuantSearch,)
    """Where the pipeline searched, its kernels (``autoquant.kernels``) quantize the checkpoint too."""
    produces: ClassVar[type] = ExportedMix

    @property
    def requires(self) -> tuple[type, ...]:
        base: tuple[type, ...] = (SensitivityScores,)
        return (*base, LoadedModel, LanguageModel, CalibData) if self.spec.checkpoint else base

    def run(self, inputs: Artifacts) -> ExportedMix:
        scores = inputs.get(SensitivityScores)
        if self.spec.output_dir is None:
            raise ConfigError(
                "export.output_dir is not set: give the folder the export goes to (aqm run sets it to "
                "<run folder>/export)"
            )
        budget = self.spec.bits if self.spec.bits is not None else scores.effective_bits_target
        solved = solve_one(scores, budget)
        choices, bits = choice_at(solved, budget, scores.groups)
        checkpoint = None
        if self.spec.checkpoint:
            from auto_quantize_model.backend.models import load
            from auto_quantize_model.core.ct_config import check_checkpoint_format

            check_checkpoint_format(choices, self.spec.format)  # before the unquantized copy is loaded
            loaded = inputs.get(LoadedModel)
            if loaded.load_spec is None:
                raise ConfigError(
                    "export.checkpoint needs the spec the model was loaded from (LoadedModel.load_spec, set "
                    "by LoadModel) to load an unquantized copy; supply a LoadedModel that carries it"
                )
            log.info(
                "export: loading %s again (the run's copy carries AutoQuant's quantizers)", loaded.source
            )
            search = inputs.find(QuantSearch)
            checkpoint = CheckpointInputs(
                load(loaded.load_spec),
                inputs.get(LanguageModel),
                inputs.get(CalibData),
                kernels="extension" if search is None else search.kernels,
            )
        target = Path(self.spec.output_dir)
        mix = export_mix(
            choices,
            target,
            budget=budget,
            effective_bits_lm=bits,
            checkpoint=checkpoint,
            force=(target / EXPORT_FILE).is_file(),  # a previous export of this stage is replaced
            notes=solved.notes,
            checkpoint_format=self.spec.format,
        )
        log.info("%s", summary_line(mix))
        return mix
