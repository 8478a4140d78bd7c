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

EXPERT_GROUPING_MEANING = {
    "layer": "one group per layer holding all its experts (ModelOpt's fused experts)",
    "expert": "one group per expert (its gate, up and down projections)",
    "projection": "two groups per expert (gate+up, down)",
}
"""What one recipe group of experts stands for, by ``ExtractSpec.experts``."""


@attrs.frozen
class ExtractLM:
    """Pick out the text decoder and lm_head; the full model is kept for ``full_model`` scope.

    Mixture-of-experts models are changed in place: fused experts switch to the ``eager``
    implementation, and are split per expert when ``spec.experts`` asks for it.
    """

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
        if lm.experts:
            log.info(
                "mixture of experts: %d layers of experts (%s), scored %s; routers kept out: %d",
                len(lm.experts),
                lm.experts[0] if len(lm.experts) == 1 else f"{lm.experts[0]} ... {lm.experts[-1]}",
                EXPERT_GROUPING_MEANING[lm.expert_grouping],
                len(lm.routers),
            )
        return lm
