"""The ``MeasureFrontier`` stage: a few frontier mixes applied to the model and measured."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, ClassVar

import attrs

from auto_quantize_model.artifacts import (
    BudgetFrontier,
    CalibData,
    LanguageModel,
    LoadedModel,
    MeasuredFrontier,
    MeasuredPoint,
    QuantSearch,
    SensitivityScores,
)
from auto_quantize_model.backend.generation import Greedy
from auto_quantize_model.backend.measure import measure_mixes
from auto_quantize_model.backend.vision_holdout import held_out_eval
from auto_quantize_model.core.frontier_points import measured_budgets, measured_frontier
from auto_quantize_model.core.scores import NO_QUANT
from auto_quantize_model.errors import AqmError, ConfigError
from auto_quantize_model.specs import FrontierSpec, ValidateSpec

if TYPE_CHECKING:
    from auto_quantize_model.pipeline import Artifacts

log = logging.getLogger("auto_quantize_model")


@attrs.frozen
class MeasureFrontier:
    """Apply the mix of ``spec.measure`` frontier budgets and measure ΔNLL and KL on held-out text.

    The budgets are spread over the frontier's range, one per distinct mix. Each mix is set on
    the searched model through ModelOpt's recipe switches (:class:`QuantSearch`: every format's
    quantizers are calibrated already, so nothing is calibrated again) and measured against the
    unquantized model with ValidateSensitivity's held-out evaluation, its last positions and its
    generation check included (``spec.greedy_tokens``). The model is put back exactly afterwards,
    also on failure, and that is checked (:attr:`MeasuredFrontier.restored_exactly`).
    """

    requires: ClassVar[tuple[type, ...]] = (
        LoadedModel,
        LanguageModel,
        CalibData,
        SensitivityScores,
        QuantSearch,
        BudgetFrontier,
    )
    optional: ClassVar[tuple[type, ...]] = ()
    produces: ClassVar[type] = MeasuredFrontier
    spec: FrontierSpec

    def run(self, inputs: Artifacts) -> MeasuredFrontier:
        from auto_quantize_model.backend.modelopt.patches import fake_quant_kernels
        from auto_quantize_model.backend.modelopt.recipe_switch import RecipeSwitch

        started = time.perf_counter()
        spec = self.spec
        if spec.measure < 1:
            raise ConfigError("frontier.measure is 0: MeasureFrontier needs at least one budget to measure")
        frontier = inputs.get(BudgetFrontier).frontier
        points = measured_budgets(frontier, spec.measure)
        if not points:
            raise AqmError(
                "no frontier budget is reachable: there is no mix to measure (raise frontier.bits)"
            )
        notes: list[str] = []
        if len(points) < spec.measure:
            notes.append(
                f"frontier.measure = {spec.measure} asked, {len(points)} measured: the frontier holds "
                f"{len(points)} distinct reachable mix(es)"
            )
        holdout_spec = ValidateSpec(
            holdout_captions=spec.holdout_captions, holdout_samples=spec.holdout_samples
        )
        calib, loaded, lm = inputs.get(CalibData), inputs.get(LoadedModel), inputs.get(LanguageModel)
        held_out, evaluator = held_out_eval(holdout_spec, calib, loaded, lm, "frontier")
        notes += [note.replace("validate.", "frontier.") for note in held_out.notes]

        search = inputs.get(QuantSearch)
        switch = RecipeSwitch(search.model)
        by_name = {group.name: group for group in inputs.get(SensitivityScores).groups}
        missing = [name for name in frontier.groups if name not in by_name]
        if missing:
            raise AqmError(
                f"frontier group {missing[0]} is not among the scored groups: the BudgetFrontier and the "
                "searched model must come from the same RunAutoQuant"
            )
        hparams = [id(switch.hparam_of(by_name[name])) for name in frontier.groups]
        mixes = [dict(zip(hparams, point.formats, strict=True)) for point in points]
        log.info(
            "frontier: measuring %d mix(es) at %s LM bits on %d held-out captions",
            len(points),
            ", ".join(f"{p.effective_bits_lm:.3f}" for p in points),
            len(held_out.token_lists),
        )
        lm = inputs.get(LanguageModel)
        greedy = None
        if spec.greedy_tokens and inputs.get(CalibData).stats.images is None:
            # an image run's held-out captions continue their pictures: greedy text alone would not
            greedy = Greedy(held_out.token_lists[: spec.greedy_samples], spec.greedy_tokens, lm.pad_token_id)
        with fake_quant_kernels(search.kernels):
            passes = measure_mixes(evaluator, switch, mixes, greedy=greedy, greedy_mixes=True)
        measured = [
            MeasuredPoint(
                budget=point.budget,
                effective_bits_lm=point.effective_bits_lm,
                predicted_score=point.total_score,
                delta_nll=passes.delta_nll(result),
                kl_div=result.kl,
                quantized_groups=sum(fmt != NO_QUANT for fmt in point.formats),
                last_position=passes.mix_last_position(index),
            )
            for index, (point, result) in enumerate(zip(points, passes.mixes, strict=True))
        ]
        report = measured_frontier(
            measured,
            baseline_nll=passes.baseline.nll,
            chosen_delta_nll=passes.delta_nll(passes.chosen),
            holdout_samples=len(held_out.token_lists),
            holdout_tokens=passes.baseline.tokens,
            holdout_source=held_out.source,
            restored_exactly=passes.restored,
            seconds=time.perf_counter() - started,
            notes=(*notes, *switch.notes()),
        )
        for note in report.notes:
            log.warning("frontier: %s", note)
        log.info(
            "frontier: measured %d point(s) in %.1f s; Spearman(predicted, dNLL) %.3f; %d measured "
            "non-monotone step(s); %.1f s of it generating greedily",
            len(report.points),
            report.seconds,
            report.spearman_nll,
            sum(p.non_monotone for p in report.points),
            passes.greedy_seconds,
        )
        return report
