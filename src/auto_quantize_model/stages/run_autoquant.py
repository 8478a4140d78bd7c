"""The ``RunAutoQuant`` stage: ModelOpt's AutoQuant on the language model, reduced to plain scores.

The stage only orchestrates; everything that touches ModelOpt lives behind
:mod:`auto_quantize_model.backend.modelopt` (the plan, the patched call, the resume protocol, the
reading of the search state).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from auto_quantize_model.artifacts import (
    CalibData,
    LanguageModel,
    LoadedModel,
    QuantSearch,
    SensitivityScores,
)
from auto_quantize_model.backend.modelopt import import_modelopt
from auto_quantize_model.backend.modelopt.checkpoint import (
    SearchCheckpoint,
    model_fingerprint,
    search_settings,
)
from auto_quantize_model.backend.modelopt.patches import fake_quant_kernels
from auto_quantize_model.backend.modelopt.plan import (
    SearchPlan,
    Steps,
    check_request,
    plan_search,
    plan_steps,
)
from auto_quantize_model.backend.modelopt.search import cuda_extension_built, run_search, search_data
from auto_quantize_model.backend.modelopt.state import quantized_in_place, review_search, scores_from_state
from auto_quantize_model.errors import AqmError
from auto_quantize_model.specs import AutoQuantSpec

if TYPE_CHECKING:
    from auto_quantize_model.artifacts import RoutingStats
    from auto_quantize_model.backend.routing import RoutingCounter
    from auto_quantize_model.pipeline import Artifacts

log = logging.getLogger("auto_quantize_model")


def _restorable(state: str | None) -> bool:
    """A saved search state is there to restore: its calibration pass may never run."""
    return state is not None and Path(state).is_file()


def _routing_stats(routing: RoutingCounter | None) -> RoutingStats | None:
    if routing is None:
        return None
    stats = routing.stats()
    if stats is None:
        log.warning(
            "MoE routing: not every router saw every calibration batch (%d call(s) did not match "
            "their batch); routed-token counts are left out of the manifest and the rare-expert rule "
            "applies to no expert",
            routing.mismatched,
        )
    else:
        rare = sum(1 for layer in stats.layers for count in layer.tokens if count == 0)
        log.info(
            "MoE routing: %d real tokens over %d batch(es) counted in %d layer(s); %d expert(s) got none",
            stats.real_tokens,
            stats.batches,
            len(stats.layers),
            rare,
        )
    return stats


@attrs.frozen
class RunAutoQuant:
    """Score every LM recipe group with ModelOpt AutoQuant (GPU stage; also runs on CPU).

    Mutates the model in place: ModelOpt's quantizers and per-group recipe choices stay on the
    modules, set to the formats the search picked, and are handed on as :class:`QuantSearch`
    (ValidateSensitivity switches them). A model that already carries quantizers (a previous run
    in this process) is refused. Each module's train/eval flag and gradient checkpointing come
    back as they were, whatever ModelOpt switched on.
    """

    requires: ClassVar[tuple[type, ...]] = (LanguageModel, CalibData)
    optional: ClassVar[tuple[type, ...]] = (LoadedModel,)
    produces: ClassVar[tuple[type, ...]] = (SensitivityScores, QuantSearch)
    spec: AutoQuantSpec = attrs.field(factory=AutoQuantSpec)
    auto_quantize: Callable[..., tuple[Any, dict[str, Any]]] | None = attrs.field(default=None, kw_only=True)
    """Stands in for ``mtq.auto_quantize`` (tests inject a fake); None calls ModelOpt's."""

    def run(self, inputs: Artifacts) -> tuple[SensitivityScores, QuantSearch]:
        from auto_quantize_model.backend.lm_forward import input_device
        from auto_quantize_model.backend.routing import RoutingCounter

        lm, calib, spec = inputs.get(LanguageModel), inputs.get(CalibData), self.spec
        device = input_device(lm.module)
        check_request(spec, calib, device.type)
        steps = plan_steps(calib.captions_per_batch, spec)
        for sentence in steps.unmet:
            log.warning("%s (the scores describe less text than asked for)", sentence)
        mtq = import_modelopt("modelopt.torch.quantization")
        if quantized_in_place(lm.full_model):
            raise AqmError(
                "the model already carries ModelOpt quantizers: a previous RunAutoQuant quantized it in "
                "place; load it again (or pass copy.deepcopy(model) to each run) to search it once more"
            )
        plan = plan_search(lm, spec)
        checkpoint = SearchCheckpoint.open(
            spec.checkpoint,
            lambda: search_settings(
                spec, lm.scope, calib.stats, steps, model_fingerprint(lm.full_model, inputs.find(LoadedModel))
            ),
        )
        data = search_data(lm, calib, steps, spec.score_size)
        self._announce(lm, plan, steps, data.score_samples, device.type, str(device))
        search = mtq.auto_quantize if self.auto_quantize is None else self.auto_quantize
        kernels = fake_quant_kernels(spec.kernels)
        routing = RoutingCounter.for_lm(lm, data.batches[: steps.calib_steps])
        with kernels, routing.installed() if routing is not None else contextlib.nullcontext():
            if routing is not None and _restorable(checkpoint.modelopt_path):
                routing.count_now(data.batches[: steps.calib_steps])  # no calibration pass may run
            outcome = run_search(search, lm, plan, data, steps, spec, checkpoint)
        reading = scores_from_state(
            outcome.state,
            plan.name_map,
            plan.is_lm,
            outcome.raw,
            formats=tuple(spec.formats),
            method=spec.method,
            scope=lm.scope,
            effective_bits_target=spec.effective_bits,
            calib_steps=steps.calib_steps,
            score_steps=steps.score_steps,
            score_samples=data.score_samples,
            autoquant_seconds=outcome.seconds,
            state_path=checkpoint.modelopt_path,
            calib_forward_steps=outcome.calib_forward_steps,
            score_forward_steps=outcome.score_forward_steps,
            warnings=steps.unmet,
        )
        review_search(reading, spec.allow_nonfinite, plan.other_weights, (plan.cost_model, plan.expert_ratio))
        scores = attrs.evolve(
            reading.scores,
            routing=_routing_stats(routing),
            rare_expert_tokens=spec.rare_expert_tokens,
            cost_model=spec.cost_model,
        )
        log.info(
            "AutoQuant: %d LM groups scored in %.1f s; effective bits %.3f (LM), %.3f (all costed weights)",
            len(scores.groups),
            outcome.seconds,
            scores.effective_bits_lm,
            scores.effective_bits_model,
        )
        return scores, QuantSearch(
            model=lm.full_model, formats=tuple(spec.formats), method=spec.method, kernels=spec.kernels
        )

    def _announce(
        self, lm: LanguageModel, plan: SearchPlan, steps: Steps, scored: int, device_type: str, device: str
    ) -> None:
        spec = self.spec
        if device_type == "cuda" and spec.kernels == "pytorch":
            log.info("fake quantization in plain PyTorch (autoquant.kernels = pytorch): no CUDA extension")
        elif device_type == "cuda" and not cuda_extension_built():
            log.info(
                "ModelOpt's CUDA extensions are not built on this machine yet (or their cache is "
                "unreadable): their first use JIT-builds them, once per machine: about two minutes "
                "for INT8 and FP8 on an H200 (INT8 59 s, FP8 67 s), 80 s more for MX formats. "
                'autoquant.kernels = "pytorch" skips the build (as fast on an H200; scores within ~2%)'
            )
        log.info(
            "AutoQuant: %s on %s (%s scope), %s, effective bits %g over the LM%s; calibration %d batch(es) "
            "/ %d captions, scoring %d batch(es) / %d captions",
            "+".join(spec.formats),
            device,
            lm.scope,
            spec.method,
            spec.effective_bits,
            f" (constraint {plan.constraint:.4f} over the whole model)" if plan.other_weights else "",
            steps.calib_steps,
            steps.calib_samples,
            steps.score_steps,
            scored,
        )
