"""What both checkpoint exports (ModelOpt's, compressed-tensors) measure their files with.

Each export quantizes a fresh model on the run's calibration batches and compares the held-out
NLL of the model in memory, as written, and as read back; the held-out text, the evaluator and
the calibration forward are the same for both formats, so they are built here once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from auto_quantize_model.artifacts import CheckpointInputs
    from auto_quantize_model.backend.modelopt.export import Evaluate
    from auto_quantize_model.core.validation import HeldOut


@attrs.frozen(eq=False)
class ExportCheck:
    """The held-out captions of a checkpoint export, and how to run and calibrate its model."""

    held_out: HeldOut
    head_path: str
    """lm_head's path in the fresh model (the compressed-tensors read-back feeds it 3-D input)."""
    evaluate: Evaluate
    """Held-out NLL of a full model, by the module paths of the fresh one."""
    calibration_step: Any
    """ModelOpt's calibration forward over the run's batches."""


def export_check(inputs: CheckpointInputs) -> ExportCheck:
    """The held-out set (captions calibration did not see) and the evaluator of ``inputs``' model."""
    from auto_quantize_model.backend.lm_forward import calibration_step_for, decoder_and_head
    from auto_quantize_model.backend.modelopt.export import holdout_evaluator
    from auto_quantize_model.core.validation import held_out_set

    fresh, lm = inputs.fresh, inputs.lm
    held_out = held_out_set(inputs.holdout, inputs.calib, fresh.tokenizer)
    decoder_path, head_path = decoder_and_head(lm, fresh.model)
    evaluate = holdout_evaluator(held_out.token_lists, lm.pad_token_id, decoder_path, head_path)
    return ExportCheck(held_out, head_path, evaluate, calibration_step_for(lm, fresh.model))
