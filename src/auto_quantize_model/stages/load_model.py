"""The ``LoadModel`` stage."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, ClassVar

import attrs

from auto_quantize_model.artifacts import LoadedModel
from auto_quantize_model.backend.models import load
from auto_quantize_model.specs import LoadSpec

if TYPE_CHECKING:
    from auto_quantize_model.pipeline import Artifacts

log = logging.getLogger("auto_quantize_model")


@attrs.frozen
class LoadModel:
    """Load a model and its tokenizer (GPU stage: weights go to ``spec.device``)."""

    requires: ClassVar[tuple[type, ...]] = ()
    optional: ClassVar[tuple[type, ...]] = ()
    produces: ClassVar[type] = LoadedModel
    spec: LoadSpec
    """Required: there is no sensible default model (``LoadSpec("builtin:tiny-qwen3-vl")`` for a try)."""

    def run(self, inputs: Artifacts) -> LoadedModel:
        loaded = load(self.spec)
        log.info(
            "loaded %s (%s) as %s on %s", self.spec.path, loaded.architecture, loaded.dtype, loaded.device
        )
        return attrs.evolve(loaded, load_spec=self.spec)
