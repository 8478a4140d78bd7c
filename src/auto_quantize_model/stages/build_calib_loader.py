"""The ``BuildCalibLoader`` stage."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, ClassVar

import attrs

from auto_quantize_model.artifacts import CalibData, LoadedModel
from auto_quantize_model.core.batching import (
    captions_label,
    captions_sha256,
    check_calib_spec,
    make_calib_data,
    pad_token_id,
    read_captions,
    tokenize_captions,
)
from auto_quantize_model.specs import CalibSpec

if TYPE_CHECKING:
    from auto_quantize_model.pipeline import Artifacts

log = logging.getLogger("auto_quantize_model")


@attrs.frozen
class BuildCalibLoader:
    """Captions file -> :class:`CalibData`; only the loaded model's tokenizer is used."""

    requires: ClassVar[tuple[type, ...]] = (LoadedModel,)
    optional: ClassVar[tuple[type, ...]] = ()
    produces: ClassVar[type] = CalibData
    spec: CalibSpec = attrs.field(factory=CalibSpec)

    def run(self, inputs: Artifacts) -> CalibData:
        spec = self.spec
        check_calib_spec(spec)
        tokenizer = inputs.get(LoadedModel).tokenizer
        captions = read_captions(spec.captions, spec.max_samples)
        token_lists = tokenize_captions(tokenizer, captions)
        data = make_calib_data(
            token_lists,
            spec,
            pad_id=pad_token_id(tokenizer),
            captions_path=captions_label(spec.captions),
            captions_sha256=captions_sha256(captions),
        )
        stats = data.stats
        log.info(
            "calibration: %d captions, %d real tokens in %d (%.1f%% padding), %d %s batches%s",
            stats.samples,
            stats.real_tokens,
            stats.total_tokens,
            100.0 * stats.padding_fraction,
            stats.batches,
            stats.layout,
            f", {stats.truncated_samples} captions cut to {stats.seq_len} tokens"
            if stats.truncated_samples
            else "",
        )
        return data
