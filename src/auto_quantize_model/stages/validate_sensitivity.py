"""The ``ValidateSensitivity`` stage: measured ΔNLL and KL of a few groups vs their predicted scores."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, ClassVar

import attrs

from auto_quantize_model.artifacts import (
    CalibData,
    LanguageModel,
    LoadedModel,
    QuantSearch,
    SensitivityScores,
)
from auto_quantize_model.backend.generation import Greedy
from auto_quantize_model.backend.measure import measure
from auto_quantize_model.backend.vision_holdout import held_out_eval
from auto_quantize_model.core.last_position import last_position_text
from auto_quantize_model.core.validation import (
    RefinePlan,
    rank_candidates,
    refine_sets,
    select_groups,
    selection_notes,
)
from auto_quantize_model.core.validation_report import validation_report
from auto_quantize_model.specs import ValidateSpec
from auto_quantize_model.validation_records import ValidationReport

if TYPE_CHECKING:
    from auto_quantize_model.pipeline import Artifacts

log = logging.getLogger("auto_quantize_model")


@attrs.frozen
class ValidateSensitivity:
    """Measured ΔNLL and KL of quantizing top/bottom/random groups alone, vs their scores.

    Needs the :class:`QuantSearch` RunAutoQuant hands on (its model still holds every format's
    calibrated quantizers), so scores read from disk cannot be validated: the wiring check says
    so before anything loads. Mutates that model while it runs and restores it exactly before
    returning, also on failure. ΔNLL is the mean next-token loss over held-out real tokens minus
    the unquantized one; KL is KL(unquantized || quantized) of the next-token distributions,
    averaged over the same tokens. Settings that cannot be honoured in full (``k`` beyond the
    groups, ``holdout_samples`` beyond the held-out text) are logged and recorded in the notes.

    Every figure comes with how far it can be trusted: a bootstrap over the held-out captions
    (``bootstrap`` resamples) gives intervals, names the differences within the noise and picks
    the headline measure; free proxies (weight quantization error, activation range) are rated
    against the same measurements. ``refine = N`` also measures the top N predicted groups (and
    N random controls) and reorders them by measured KL.

    The chosen mix is also compared with the 16-bit model where ΔNLL and KL never look, at each
    caption's last token (KL and top-1 agreement), and by continuing the first ``greedy_samples``
    captions ``greedy_tokens`` tokens greedily with both (``greedy_tokens = 0``: not).
    """

    requires: ClassVar[tuple[type, ...]] = (
        LoadedModel,
        LanguageModel,
        CalibData,
        SensitivityScores,
        QuantSearch,
    )
    optional: ClassVar[tuple[type, ...]] = ()
    produces: ClassVar[type] = ValidationReport
    spec: ValidateSpec = attrs.field(factory=ValidateSpec)

    def run(self, inputs: Artifacts) -> ValidationReport:
        from auto_quantize_model.backend.modelopt.patches import fake_quant_kernels
        from auto_quantize_model.backend.modelopt.recipe_switch import RecipeSwitch

        started = time.perf_counter()
        spec = self.spec
        scores = inputs.get(SensitivityScores)
        candidates, left_out = rank_candidates(scores.groups)
        selection = select_groups(candidates, spec.k, spec.seed)
        held_out, evaluator = held_out_eval(
            spec, inputs.get(CalibData), inputs.get(LoadedModel), inputs.get(LanguageModel)
        )
        short = (*selection_notes(spec.k, len(candidates), selection), *held_out.notes)
        for note in short:
            log.warning("validation: %s", note)

        plan = None
        if spec.refine:
            sets = refine_sets(candidates, spec.refine, spec.seed)
            plan = RefinePlan(candidates, sets, spec.refine)
            if len(sets.top) < spec.refine or len(sets.control) < len(sets.top):
                note = (
                    f"validate.refine = {spec.refine} asks for {spec.refine} top groups and as many "
                    f"controls, but {len(candidates)} group(s) can be validated: measured {len(sets.top)} "
                    f"top and {len(sets.control)} control"
                )
                log.warning("validation: %s", note)
                short = (*short, note)

        search = inputs.get(QuantSearch)
        switch = RecipeSwitch(search.model)
        lm = inputs.get(LanguageModel)
        greedy = None
        if spec.greedy_tokens and inputs.get(CalibData).stats.images is None:
            # an image run's held-out captions continue their pictures: greedy text alone would not
            prompts = held_out.token_lists[: spec.greedy_samples]
            greedy = Greedy(prompts, spec.greedy_tokens, lm.pad_token_id)
        with fake_quant_kernels(search.kernels):
            measurement = measure(
                evaluator,
                switch,
                scores.groups,
                selection,
                spec.additivity,
                extra=() if plan is None else plan.sets.extra(selection),
                proxies=True,
                greedy=greedy,
            )
        report = validation_report(
            measurement,
            held_out,
            spec.k,
            notes=(*left_out, *switch.notes()),
            seconds=0.0,
            resamples=spec.bootstrap,
            seed=spec.seed,
            refine=plan,
            batches=len(evaluator.batches),
        )
        report = attrs.evolve(report, seconds=time.perf_counter() - started, unmet=short)
        noise = report.noise
        log.info(
            "validated %d groups on %d held-out captions (%d tokens): Spearman(score, %s) %.3f, "
            "top-%d overlap %.2f, %.1f s",
            len(report.groups),
            report.holdout_samples,
            report.holdout_tokens,
            "KL" if noise is not None and noise.headline == "kl" else "dNLL",
            report.spearman_kl if noise is not None and noise.headline == "kl" else report.spearman_nll,
            report.k,
            noise.topk_overlap_kl if noise is not None and noise.headline == "kl" else report.topk_overlap,
            report.seconds,
        )
        if report.last_position is not None:
            log.info(
                "validation: chosen mix: %s (%.1f s generating)",
                last_position_text(report.last_position),
                measurement.greedy_seconds,
            )
        if report.refinement is not None:
            refined = report.refinement
            log.info(
                "refinement: top %d re-ordered by measured KL, %d extra pass(es) in %.1f s; top-%d %s",
                refined.n,
                refined.passes,
                refined.seconds,
                refined.k,
                "unchanged" if not refined.entered else f"gains {', '.join(refined.entered)}",
            )
        return report
