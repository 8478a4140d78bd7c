"""The ``ExtractLM`` stage."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, ClassVar

import attrs

from auto_quantize_model.artifacts import LanguageModel, LoadedModel
from auto_quantize_model.backend.locate import extract_language_model
from auto_quantize_model.specs import ExtractSpec

if TYPE_CHECKING:
    from auto_quantize_model.pipeline import Artifacts

log = logging.getLogger("auto_quantize_model")


@attrs.frozen
class ExtractLM:
    """Pick out the text decoder and lm_head; the full model is kept for ``full_model`` scope."""

    requires: ClassVar[tuple[type, ...]] = (LoadedModel,)
    optional: ClassVar[tuple[type, ...]] = ()
    produces: ClassVar[type] = LanguageModel
    spec: ExtractSpec = attrs.field(factory=ExtractSpec)

    def run(self, inputs: Artifacts) -> LanguageModel:
        loaded = inputs.get(LoadedModel)
        lm = extract_language_model(loaded.model, loaded.tokenizer, self.spec)
        log.info(
            "language model: %s (%s) + %s; kept out: %s; scope %s",
            lm.prefix or "<root>",
            type(lm.module).__name__,
            lm.head_name,
            ", ".join(lm.vision_modules) or "nothing",
            lm.scope,
        )
        return lm
