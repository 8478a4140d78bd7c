"""The ``ValidateSensitivity`` stage."""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, ClassVar

import attrs

from auto_quantize_model.artifacts import (
    CalibData,
    LanguageModel,
    LoadedModel,
    SensitivityScores,
    ValidatedGroup,
    ValidationReport,
)
from auto_quantize_model.backend.measure import (
    Candidate,
    HeldOutEval,
    PassResult,
    RecipeSwitch,
    Selection,
    _device_of,
    _to_device,
    correlation_notes,
    holdout_batches,
    load_holdout,
    rank_candidates,
    rank_overlap,
    select_groups,
    tokenize_captions,
)
from auto_quantize_model.core import stats
from auto_quantize_model.errors import AqmError, ConfigError
from auto_quantize_model.pipeline import Artifacts
from auto_quantize_model.specs import ValidateSpec

if TYPE_CHECKING:
    pass

log = logging.getLogger("auto_quantize_model")


@attrs.frozen
class ValidateSensitivity:
    """Measured ΔNLL and KL of quantizing top/bottom/random groups alone, vs their scores.

    Runs after :class:`RunAutoQuant`, on the model it left in memory (GPU when it is there).
    Mutates the model while it runs and restores it exactly before returning, also on failure.
    ΔNLL is the mean next-token loss over held-out real tokens minus the unquantized one; KL is
    KL(unquantized || quantized) of the next-token distributions, averaged over the same tokens.
    """

    requires: ClassVar[tuple[type, ...]] = (LoadedModel, LanguageModel, CalibData, SensitivityScores)
    optional: ClassVar[tuple[type, ...]] = ()
    produces: ClassVar[type] = ValidationReport
    spec: ValidateSpec = attrs.field(factory=ValidateSpec)

    def run(self, inputs: Artifacts) -> ValidationReport:
        started = time.perf_counter()
        spec = self.spec
        if spec.k < 1:
            raise ConfigError(f"validate.k must be >= 1, got {spec.k}")
        if spec.holdout_samples < 1:
            raise ConfigError(f"validate.holdout_samples must be >= 1, got {spec.holdout_samples}")
        scores = inputs.get(SensitivityScores)
        lm = inputs.get(LanguageModel)
        calib = inputs.get(CalibData)
        tokenizer = inputs.get(LoadedModel).tokenizer

        ranked, notes_ = rank_candidates(scores.groups)
        notes = list(notes_)
        if not ranked:
            raise AqmError("ValidateSensitivity: no recipe group has a finite score for a quantized format")
        selection = select_groups(ranked, spec.k, spec.seed)
        groups_by_name = {g.name: g for g in scores.groups}

        texts, skipped, source, more_notes = load_holdout(spec, calib)
        notes.extend(more_notes)
        token_lists = tokenize_captions(tokenizer, texts, calib.stats.seq_len)
        if not token_lists:
            raise AqmError(f"{source}: no held-out caption has 2 or more tokens")
        device = _device_of(lm.module)
        evaluator = HeldOutEval(
            decoder=lm.module,
            lm_head=lm.lm_head,
            batches=tuple(_to_device(b, device) for b in holdout_batches(token_lists, lm.pad_token_id)),
        )

        switch = RecipeSwitch(lm.full_model)
        if not switch.hparams:
            raise AqmError(
                "ValidateSensitivity: the language model carries no AutoQuant search state; run it "
                "after RunAutoQuant in the same pipeline (it reuses the quantizers left in memory)"
            )
        if switch.stuck:
            notes.append(f"{len(switch.stuck)} group(s) with a fixed format stay quantized in the baseline")
        if switch.folded:
            notes.append(
                f"{len(switch.folded)} layer(s) had ModelOpt fold smoothing into their weights; their "
                "unquantized weights were reconstructed to the rounding of the weight dtype"
            )
        if switch.shared:
            notes.append(
                f"folded smoothing also rescaled tensors other modules share ({'; '.join(switch.shared)}), "
                "e.g. tied input embeddings: AutoQuant's chosen model carries that change"
            )
        if switch.fold_skipped:
            notes.append(
                f"{len(switch.fold_skipped)} layer(s) with smoothing could not be unfolded "
                f"(first: {switch.fold_skipped[0]}); their baseline keeps the smoothed weights"
            )
        hparam_ids = {c.name: id(switch.hparam_of(groups_by_name[c.name])) for c in ranked}

        measured: list[tuple[Candidate, Selection, PassResult]] = []
        try:
            chosen_before, _ = evaluator.run()
            switch.apply({})
            baseline, reference = evaluator.run(keep=True)
            for candidate, label in selection.labelled():
                switch.apply({hparam_ids[candidate.name]: candidate.format})
                result, _ = evaluator.run(reference)
                measured.append((candidate, label, result))
                log.debug(
                    "validate %s (%s): dNLL %.6g, KL %.6g",
                    candidate.name,
                    candidate.format,
                    result.nll - baseline.nll,
                    result.kl,
                )
            joint: PassResult | None = None
            if spec.additivity and selection.top:
                switch.apply({hparam_ids[c.name]: c.format for c in selection.top})
                joint, _ = evaluator.run(reference)
            switch.apply({})
            baseline_after, _ = evaluator.run(reference)
            del reference
        finally:
            weights_back = switch.restore()
        chosen_after, _ = evaluator.run()

        restored = (
            weights_back
            and baseline_after.nll_sum == baseline.nll_sum
            and baseline_after.kl_sum == 0.0
            and bool(baseline_after.token_nll.equal(baseline.token_nll))
            and bool(chosen_after.token_nll.equal(chosen_before.token_nll))
        )
        if not restored:
            notes.append("the model did not come back bit-exactly after validation")

        candidates = [c for c, _, _ in measured]
        predicted = [c.importance for c in candidates]
        delta_nll = [(r.nll_sum - baseline.nll_sum) / baseline.tokens for _, _, r in measured]
        kl = [r.kl for _, _, r in measured]
        spearman_nll = stats.spearman(predicted, delta_nll)
        kendall_nll = stats.kendall_tau_b(predicted, delta_nll)
        spearman_kl = stats.spearman(predicted, kl)
        kendall_kl = stats.kendall_tau_b(predicted, kl)
        for what, ys, value in (
            ("Spearman(score, dNLL)", delta_nll, spearman_nll),
            ("Kendall(score, dNLL)", delta_nll, kendall_nll),
            ("Spearman(score, KL)", kl, spearman_kl),
            ("Kendall(score, KL)", kl, kendall_kl),
        ):
            notes.extend(correlation_notes(what, predicted, ys, value))
        k = min(spec.k, len(candidates))
        overlap = rank_overlap(candidates, delta_nll, k)

        top_names = {c.name for c in selection.top}
        sum_delta = (
            math.fsum(d for c, d in zip(candidates, delta_nll, strict=True) if c.name in top_names)
            if joint is not None
            else math.nan
        )
        joint_delta = (joint.nll_sum - baseline.nll_sum) / baseline.tokens if joint is not None else math.nan

        report = ValidationReport(
            groups=tuple(
                ValidatedGroup(
                    name=c.name,
                    format=c.format,
                    score=c.importance,
                    selection=label,
                    delta_nll=d,
                    kl_div=q,
                    rank=c.rank,
                )
                for (c, label, _), d, q in zip(measured, delta_nll, kl, strict=True)
            ),
            baseline_nll=baseline.nll,
            spearman_nll=spearman_nll,
            kendall_nll=kendall_nll,
            spearman_kl=spearman_kl,
            kendall_kl=kendall_kl,
            topk_overlap=overlap,
            k=k,
            joint_delta_nll=joint_delta,
            sum_delta_nll=sum_delta,
            holdout_samples=len(token_lists),
            holdout_tokens=baseline.tokens,
            seconds=time.perf_counter() - started,
            restored_exactly=restored,
            chosen_delta_nll=(chosen_before.nll_sum - baseline.nll_sum) / baseline.tokens,
            holdout_source=source,
            holdout_excluded=skipped,
            notes=tuple(notes),
        )
        log.info(
            "validated %d groups on %d held-out captions (%d tokens): Spearman(score, dNLL) %.3f, "
            "top-%d overlap %.2f, %.1f s",
            len(report.groups),
            report.holdout_samples,
            report.holdout_tokens,
            report.spearman_nll,
            report.k,
            report.topk_overlap,
            report.seconds,
        )
        return report
