"""What both checkpoint exports (ModelOpt's, compressed-tensors) measure their files with.

Each export quantizes a fresh model on the run's calibration batches and compares the held-out
NLL of the model in memory, as written, and as read back; the held-out data, the evaluator and
the calibration forward are the same for both formats, so they are built here once.

The held-out data is of calibration's kind, as for ValidateSensitivity and MeasureFrontier
(:mod:`~auto_quantize_model.backend.vision_holdout`): a run calibrated on captions reads back on
held-out captions, a run calibrated on image + caption pairs on the held-out pairs, loss on the
caption tokens. For pairs, each model measured runs its *own* vision tower and embeddings on the
held-out pictures (once per model): both formats read back the whole Qwen3-VL, vision tower
included (:func:`~auto_quantize_model.backend.modelopt.export.load_exported` from the checkpoint's
tensors, compressed-tensors through ``from_pretrained``), so a checkpoint whose vision weights
were written wrong reads back off, which features computed once from the fresh model would hide.
An image run whose source has no pair beyond calibration's falls back to captions, with a note.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    import torch
    from torch import nn

    from auto_quantize_model.artifacts import CheckpointInputs
    from auto_quantize_model.backend.modelopt.export import Evaluate
    from auto_quantize_model.core.validation import HeldOut

PAIRS = "pairs"
CAPTIONS = "captions"


@attrs.frozen
class HeldOutData:
    """Which data a read-back measured on, as ``export.json`` and the README record it."""

    kind: str
    """:data:`PAIRS` or :data:`CAPTIONS`."""
    samples: int
    tokens: int
    """Tokens scored: every token after a caption's first; for pairs, the caption's tokens."""
    image_tokens: int = 0
    """Image tokens the pairs fed each model (0 for captions)."""

    @property
    def line(self) -> str:
        """``held-out pairs: 8`` or ``held-out captions: 64``."""
        return f"held-out {self.kind}: {self.samples}"

    def describe(self) -> str:
        """The line with what it means, for the README."""
        if self.kind == PAIRS:
            return (
                f"{self.line} (image + caption chat turns, each model through its own vision tower; "
                f"{self.tokens} caption tokens scored, {self.image_tokens} image tokens)"
            )
        return f"{self.line} ({self.tokens} tokens scored)"

    def figures(self) -> dict[str, Any]:
        """The fields of :class:`~auto_quantize_model.artifacts.ExportedMix` that record it."""
        return {
            "held_out": self.kind,
            "held_out_samples": self.samples,
            "held_out_tokens": self.tokens,
            "held_out_image_tokens": self.image_tokens,
        }


@attrs.frozen(eq=False)
class ExportCheck:
    """The held-out data of a checkpoint export, and how to run and calibrate its model."""

    held_out: HeldOut
    head_path: str
    """lm_head's path in the fresh model (the compressed-tensors read-back feeds it 3-D input)."""
    evaluate: Evaluate
    """Held-out NLL of a full model, by the module paths of the fresh one."""
    calibration_step: Any
    """ModelOpt's calibration forward over the run's batches."""
    data: HeldOutData
    """What :attr:`evaluate` measures on, for ``export.json`` and the README."""


def export_check(inputs: CheckpointInputs) -> ExportCheck:
    """The held-out set (data calibration did not see, of its kind) and the evaluator of ``inputs``' model."""
    from auto_quantize_model.backend.lm_forward import calibration_step_for, decoder_and_head
    from auto_quantize_model.backend.modelopt.export import holdout_evaluator
    from auto_quantize_model.core.validation import held_out_set

    fresh, lm, calib = inputs.fresh, inputs.lm, inputs.calib
    decoder_path, head_path = decoder_and_head(lm, fresh.model)
    step = calibration_step_for(lm, fresh.model)
    note = _no_pairs_left(inputs)
    if calib.stats.images is not None and note is None:
        held, evaluate, data = _pairs(inputs, decoder_path, head_path)
        return ExportCheck(held, head_path, evaluate, step, data)
    held = held_out_set(inputs.holdout, calib, fresh.tokenizer)
    if note is not None:
        held = attrs.evolve(held, notes=(note, *held.notes))
    evaluate = holdout_evaluator(held.token_lists, lm.pad_token_id, decoder_path, head_path)
    tokens = sum(len(ids) - 1 for ids in held.token_lists)
    return ExportCheck(held, head_path, evaluate, step, HeldOutData(CAPTIONS, len(held.token_lists), tokens))


def _no_pairs_left(inputs: CheckpointInputs) -> str | None:
    """Why an image run reads back on captions: calibration took every pair; None otherwise."""
    from auto_quantize_model.core.image_pairs import read_pair_source

    stats = inputs.calib.stats
    if stats.images is None:
        return None
    source = read_pair_source(stats.captions_path)
    if len(source.pairs) > stats.samples:
        return None
    return (
        f"the read-back measured held-out captions ({inputs.holdout.holdout_captions}), not pairs: "
        f"calib.images {source.label} has {len(source.pairs)} pairs and calibration used all "
        f"{stats.samples}; add pairs to read back on image + caption turns"
    )


def _pairs(
    inputs: CheckpointInputs, decoder_path: str, head_path: str
) -> tuple[HeldOut, Evaluate, HeldOutData]:
    """Validation's held-out pairs, and an evaluator that builds them with each model's vision tower."""
    from auto_quantize_model.backend.lm_forward import input_device, to_device
    from auto_quantize_model.backend.measure import HeldOutEval
    from auto_quantize_model.backend.vision_holdout import held_out_pairs

    fresh, calib, pad_id = inputs.fresh, inputs.calib, inputs.lm.pad_token_id
    samples = inputs.holdout.holdout_samples
    held, batches = held_out_pairs(calib, fresh, pad_id, samples)
    image_tokens = sum(int(batch["visual_pos_masks"].sum()) for batch in batches)
    data = HeldOutData(PAIRS, len(held.token_lists), sum(map(len, held.token_lists)), image_tokens)
    del batches  # the unquantized model's: each model measured builds its own
    # The last model's batches: the in-memory and exported figures measure the same model twice.
    built: list[tuple[weakref.ref[nn.Module], tuple[dict[str, torch.Tensor], ...]]] = []

    def batches_of(model: nn.Module) -> tuple[dict[str, torch.Tensor], ...]:
        if built and built[0][0]() is model:
            return built[0][1]
        built.clear()
        loaded = attrs.evolve(fresh, model=model, architecture=type(model).__name__)
        own = held_out_pairs(calib, loaded, pad_id, samples)[1]
        built.append((weakref.ref(model), own))
        return own

    def evaluate(model: nn.Module) -> float:
        decoder = model.get_submodule(decoder_path) if decoder_path else model
        device = input_device(decoder)
        moved = tuple(to_device(batch, device) for batch in batches_of(model))
        result, _ = HeldOutEval(decoder, model.get_submodule(head_path), moved).run()
        return result.nll

    return held, evaluate, data
