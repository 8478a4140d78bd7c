"""Held-out data for ValidateSensitivity and MeasureFrontier, of the same kind as calibration.

A run calibrated on captions measures on held-out captions (``validate.holdout_captions``); a run
calibrated on image + caption pairs measures on held-out pairs: the pairs of the same source
after the ``calib.max_samples`` that calibration took, up to ``holdout_samples`` of them, each the
same chat turn, through the same processor and vision tower (run once per batch here too), one
pair per row so that per-sample sums (the bootstrap's unit) are per-row sums as for captions.
``holdout_captions`` is not read for such a run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from auto_quantize_model.artifacts import CalibData, LanguageModel, LoadedModel
from auto_quantize_model.backend.measure import HeldOutEval
from auto_quantize_model.core.batching import IGNORE_INDEX, ROWS_PER_BATCH
from auto_quantize_model.core.image_pairs import check_pairs, pairs_sha256, read_pair_source, take_pairs
from auto_quantize_model.core.validation import HeldOut, held_out_set
from auto_quantize_model.errors import ConfigError
from auto_quantize_model.specs import CalibSpec, ValidateSpec

if TYPE_CHECKING:
    import torch


def held_out_pairs(
    calib: CalibData, loaded: LoadedModel, pad_id: int, holdout_samples: int, table: str = "validate"
) -> tuple[HeldOut, tuple[dict[str, torch.Tensor], ...]]:
    """The pairs after calibration's, as held-out batches (one pair a row); fewer than asked is noted."""
    from auto_quantize_model.backend.vision_calib import image_calib_data

    stats = calib.stats
    source = read_pair_source(stats.captions_path)
    left = len(source.pairs) - stats.samples
    if left < 1:
        raise ConfigError(
            f"{table}: calib.images {source.label} has {len(source.pairs)} pairs and calibration uses all "
            f"{stats.samples}, so none is left to measure on; add pairs or lower calib.max_samples"
        )
    count = min(holdout_samples, left)
    pairs = check_pairs(take_pairs(source, count, skip=stats.samples))
    spec = CalibSpec(
        images=stats.captions_path,
        max_samples=count,
        seq_len=stats.seq_len,
        batch_size=ROWS_PER_BATCH,
        layout="padded",
    )
    data = image_calib_data(
        loaded, pairs, spec, pad_id=pad_id, label=source.label, sha256=pairs_sha256(pairs), ranges=False
    )
    scored = tuple(
        tuple(label for label in row if label != IGNORE_INDEX)
        for batch in data.batches
        for row in batch["labels"].tolist()
    )
    notes: tuple[str, ...] = ()
    if count < holdout_samples:
        notes = (
            f"{table}.holdout_samples = {holdout_samples} asked, {count} used: {source.label} has {count} "
            "pair(s) calibration did not use",
        )
    held = HeldOut(tuple(pair.text for pair in pairs), scored, stats.samples, source.label, notes)
    return held, data.batches


def held_out_eval(
    spec: ValidateSpec, calib: CalibData, loaded: LoadedModel, lm: LanguageModel, table: str = "validate"
) -> tuple[HeldOut, HeldOutEval]:
    """Held-out data matching calibration's kind, and the evaluator that runs it."""
    from auto_quantize_model.backend.lm_forward import input_device, to_device

    if calib.stats.images is None:
        held = held_out_set(spec, calib, loaded.tokenizer)
        return held, HeldOutEval.on(lm, held.token_lists)
    held, batches = held_out_pairs(calib, loaded, lm.pad_token_id, spec.holdout_samples, table)
    device = input_device(lm.module)
    evaluator = HeldOutEval.on(lm, ())
    return held, attrs.evolve(evaluator, batches=tuple(to_device(batch, device) for batch in batches))
