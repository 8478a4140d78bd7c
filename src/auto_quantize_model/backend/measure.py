"""Held-out measurement for ValidateSensitivity: the damage AutoQuant only predicted.

AutoQuant's score is a Taylor/Fisher proxy. Validation quantizes a few recipe groups one at a
time (everything else in full precision, through
:class:`~auto_quantize_model.backend.modelopt.recipe_switch.RecipeSwitch`) and measures the real
increase in next-token loss (ΔNLL) and the KL divergence to the unquantized model on captions
calibration never saw, then says how well the predicted ranking matches the measured one.

The predicted side is the manifest's: importance, the format that sets it and the rank (ties in
network order, NaN first) all come from :mod:`auto_quantize_model.core.scores`, so a validated
group's rank is its rank in the manifest. Nothing here imports torch at module level; the pure
helpers (ranking, selection, held-out text, notes) take plain data.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import attrs

from auto_quantize_model.artifacts import ValidatedGroup, ValidationReport
from auto_quantize_model.core import stats
from auto_quantize_model.core.batching import encode, holdout_columns, scorable
from auto_quantize_model.core.captions import caption_file, read_caption_file
from auto_quantize_model.core.scores import (
    has_quantized_format,
    headline_index,
    importance,
    rank_order,
    ranks,
)
from auto_quantize_model.errors import AqmError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from auto_quantize_model.artifacts import CalibData, GroupScore, LanguageModel
    from auto_quantize_model.backend.modelopt.recipe_switch import RecipeSwitch
    from auto_quantize_model.specs import ValidateSpec

log = logging.getLogger("auto_quantize_model")

Selection = Literal["top", "bottom", "random"]


# --------------------------------------------------------------------------------------------
# What to measure (pure)


@attrs.frozen
class Candidate:
    """A recipe group that can be validated: its name, format to measure, importance and rank."""

    name: str
    format: str
    """The format that sets the group's importance (the manifest's headline format)."""
    importance: float
    rank: int
    """The group's rank in the manifest: 1 = most sensitive, over every group."""


def rank_candidates(groups: Sequence[GroupScore]) -> tuple[tuple[Candidate, ...], tuple[str, ...]]:
    """Groups that can be measured, most sensitive first with their manifest ranks, and notes on
    the groups left out.

    Left out: groups with no quantized format (nothing to measure) and groups whose importance
    is NaN (they rank first in the manifest but have no place in a correlation). Their ranks
    still count, so the ranks of the others are the manifest's.
    """
    values = [importance(g.formats, g.scores) for g in groups]
    ranked = ranks(values)
    unquantizable = [g.name for g in groups if not has_quantized_format(g.formats)]
    nan_groups = [
        g.name
        for g, v in zip(groups, values, strict=True)
        if has_quantized_format(g.formats) and math.isnan(v)
    ]
    kept = [
        Candidate(g.name, g.formats[headline_index(g.formats, g.scores)], value, rank)
        for g, value, rank in zip(groups, values, ranked, strict=True)
        if has_quantized_format(g.formats) and not math.isnan(value)
    ]
    notes: list[str] = []
    if unquantizable:
        notes.append(f"{len(unquantizable)} group(s) without a quantized format left out")
    if nan_groups:
        shown = ", ".join(nan_groups[:5]) + (" ..." if len(nan_groups) > 5 else "")
        notes.append(f"{len(nan_groups)} group(s) with NaN scores left out: {shown}")
    if not any(math.isfinite(c.importance) for c in kept):
        raise AqmError(
            f"nothing to validate: none of the {len(groups)} recipe group(s) has a finite score for a "
            f"quantized format ({len(unquantizable)} offer only NONE, {len(nan_groups)} scored NaN, "
            f"{len(kept)} infinite); read the score health in the report before validating"
        )
    return tuple(sorted(kept, key=lambda c: c.rank)), tuple(notes)


@attrs.frozen
class GroupSelection:
    """Which candidates get measured; the three parts are disjoint and each in rank order."""

    top: tuple[Candidate, ...]
    bottom: tuple[Candidate, ...]
    random: tuple[Candidate, ...]

    def labelled(self) -> tuple[tuple[Candidate, Selection], ...]:
        top: tuple[tuple[Candidate, Selection], ...] = tuple((c, "top") for c in self.top)
        random_: tuple[tuple[Candidate, Selection], ...] = tuple((c, "random") for c in self.random)
        bottom: tuple[tuple[Candidate, Selection], ...] = tuple((c, "bottom") for c in self.bottom)
        return top + random_ + bottom


def select_groups(ranked: Sequence[Candidate], k: int, seed: int) -> GroupSelection:
    """The ``k`` most and ``k`` least important candidates and ``k`` random others.

    ``ranked`` must be most important first. With fewer than ``3 k`` candidates the top is
    filled first, then the bottom, then the random draw from what is left in between. The random
    draw depends only on ``seed`` and the ranking, so a rerun measures the same groups.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    top = tuple(ranked[:k])
    rest = list(ranked[len(top) :])
    n_bottom = min(k, len(rest))
    bottom = tuple(rest[len(rest) - n_bottom :])
    middle = rest[: len(rest) - n_bottom]
    drawn = random.Random(seed).sample(middle, min(k, len(middle)))
    return GroupSelection(top=top, bottom=bottom, random=tuple(sorted(drawn, key=lambda c: c.rank)))


def selection_notes(k: int, candidates: int, selection: GroupSelection) -> tuple[str, ...]:
    """What ``validate.k`` asked for and what could be measured, when the groups fall short."""
    if candidates >= 3 * k:
        return ()
    note = (
        f"validate.k = {k} asks for {k} top, {k} bottom and {k} random groups, but only {candidates} "
        f"group(s) can be validated: measured {len(selection.top)} top, {len(selection.bottom)} bottom "
        f"and {len(selection.random)} random"
    )
    if k > candidates:
        note += f"; the top-k overlap uses k = {candidates}"
    return (note,)


# --------------------------------------------------------------------------------------------
# Held-out text


def holdout_captions(
    candidates: Sequence[str], calibration: Sequence[str], limit: int, source: str
) -> tuple[tuple[str, ...], int]:
    """The first ``limit`` candidate captions never used for calibration, and how many were skipped.

    Captions compare by their stripped text. Raises an :class:`AqmError` naming ``source`` when
    nothing is left: validating on calibration text would only measure memorisation.
    """
    seen = {caption.strip() for caption in calibration}
    fresh = [caption for caption in candidates if caption.strip() not in seen]
    skipped = len(candidates) - len(fresh)
    if not fresh:
        raise AqmError(
            f"{source}: no held-out captions left ({len(candidates)} caption(s), all used for "
            "calibration); point validate.holdout_captions at other text or calibrate on fewer samples"
        )
    return tuple(fresh[:limit]), skipped


@attrs.frozen
class HeldOut:
    """The held-out captions validation measures on, as token ids, and where they came from."""

    texts: tuple[str, ...]
    token_lists: tuple[tuple[int, ...], ...]
    """One per text that has at least 2 tokens (cut to the calibration ``seq_len``)."""
    skipped: int
    """Captions of the source skipped because calibration used them."""
    source: str
    notes: tuple[str, ...]


def held_out_set(spec: ValidateSpec, calib: CalibData, tokenizer: Any) -> HeldOut:
    """The first ``spec.holdout_samples`` captions of ``spec.holdout_captions`` that calibration
    did not see (its texts travel in :attr:`CalibData.captions`), tokenised."""
    if len(calib.captions) != calib.stats.samples:
        raise AqmError(
            f"the calibration data carries {len(calib.captions)} caption text(s) for {calib.stats.samples} "
            "calibration samples, so held-out text cannot be told from calibration text; build it with "
            "BuildCalibLoader (or pass captions= to make_calib_data)"
        )
    source = str(caption_file(spec.holdout_captions))
    texts, skipped = holdout_captions(
        read_caption_file(spec.holdout_captions), calib.captions, spec.holdout_samples, source
    )
    token_lists = tuple(tuple(ids) for ids in scorable(encode(tokenizer, texts), calib.stats.seq_len))
    if not token_lists:
        raise AqmError(f"{source}: no held-out caption has 2 or more tokens")
    notes: tuple[str, ...] = ()
    if len(token_lists) < spec.holdout_samples:
        short = len(texts) - len(token_lists)
        notes = (
            f"validate.holdout_samples = {spec.holdout_samples} asked, {len(token_lists)} used: {source} "
            f"has {len(texts)} caption(s) calibration did not use"
            + (f", {short} of them shorter than 2 tokens" if short else ""),
        )
    return HeldOut(texts, token_lists, skipped, source, notes)


# --------------------------------------------------------------------------------------------
# Measuring


@attrs.frozen(eq=False)
class PassResult:
    """One forward pass over every held-out batch."""

    nll_sum: float
    kl_sum: float
    """Summed KL(unquantized || this model); NaN when there was no reference yet."""
    tokens: int
    token_nll: torch.Tensor
    """Per-token NLL on CPU, in batch order: the fingerprint for the bit-exact restore checks."""

    @property
    def nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def kl(self) -> float:
        return self.kl_sum / self.tokens

    def same_as(self, other: PassResult) -> bool:
        return self.nll_sum == other.nll_sum and bool(self.token_nll.equal(other.token_nll))


@attrs.frozen(eq=False)
class HeldOutEval:
    """Runs the decoder and lm_head over the held-out batches.

    Log-probabilities are float64. In float32 the rounding of the softmax normaliser alone shifts
    every log-probability of a position by ~1e-7 * |log-sum-exp|, which is the size of the KL of
    a lightly quantized layer (it even came out negative). The unquantized ones are kept for the
    KL terms: ``[tokens, vocab]`` float64, about 1.9 GB for 1,600 tokens of a 152k vocabulary, on
    the model's device. A KL that rounding pushes below zero (~1e-16) is reported as 0.
    """

    decoder: nn.Module
    lm_head: nn.Module
    batches: tuple[dict[str, torch.Tensor], ...]

    @classmethod
    def on(cls, lm: LanguageModel, token_lists: Sequence[Sequence[int]]) -> HeldOutEval:
        """Held-out batches padded with the model's pad id, on the decoder's input device."""
        from auto_quantize_model.backend.lm_forward import as_tensors, input_device, to_device

        device = input_device(lm.module)
        batches = holdout_columns(token_lists, lm.pad_token_id)
        return cls(lm.module, lm.lm_head, tuple(to_device(as_tensors(b), device) for b in batches))

    def run(
        self, reference: Sequence[torch.Tensor] | None = None, keep: bool = False
    ) -> tuple[PassResult, list[torch.Tensor]]:
        import torch

        from auto_quantize_model.backend.lm_forward import selected_logits, target_index

        nll_sum = 0.0
        kl_sum = 0.0
        tokens = 0
        token_nll: list[torch.Tensor] = []
        kept: list[torch.Tensor] = []
        with torch.inference_mode():
            for index, batch in enumerate(self.batches):
                logits = selected_logits(self.decoder, self.lm_head, batch)
                logq = torch.log_softmax(logits.double(), dim=-1)
                _, targets = target_index(batch)
                nll = -logq.gather(1, targets.to(logq.device)[:, None]).squeeze(1)
                nll_sum += nll.sum().item()
                tokens += int(nll.numel())
                token_nll.append(nll.cpu())
                if reference is not None:
                    kl = torch.nn.functional.kl_div(logq, reference[index], log_target=True, reduction="sum")
                    kl_sum += kl.item()
                if keep:
                    kept.append(logq)
        result = PassResult(
            nll_sum=nll_sum,
            kl_sum=max(kl_sum, 0.0) if reference is not None else math.nan,
            tokens=tokens,
            token_nll=torch.cat(token_nll),
        )
        return result, kept


@attrs.frozen(eq=False)
class MixPasses:
    """Held-out passes of several mixes (groups on chosen formats, all others unquantized)."""

    chosen: PassResult
    """The model as AutoQuant chose it, before anything was switched."""
    baseline: PassResult
    """Every group unquantized (groups with a fixed format stay on it)."""
    mixes: tuple[PassResult, ...]
    """One per mix, in the order given, each with its KL to the baseline."""
    restored: bool
    """Switches, folded weights, the baseline and the chosen model all came back bit for bit."""

    def delta_nll(self, result: PassResult) -> float:
        return (result.nll_sum - self.baseline.nll_sum) / self.baseline.tokens


def measure_mixes(
    evaluator: HeldOutEval, switch: RecipeSwitch, mixes: Sequence[Mapping[int, str]]
) -> MixPasses:
    """Measure each mix (hparam ``id`` -> format; every other group on NONE), then put the model back.

    The one measuring loop of validation and of the budget frontier. The model is restored in a
    ``finally``, and the restore is checked: the weights bit for bit, the baseline pass and the
    chosen model's pass identical to before.
    """
    results: list[PassResult] = []
    try:
        chosen_before, _ = evaluator.run()
        switch.apply({})
        baseline, reference = evaluator.run(keep=True)
        for mix in mixes:
            switch.apply(mix)
            result, _ = evaluator.run(reference)
            results.append(result)
        switch.apply({})
        baseline_after, _ = evaluator.run(reference)
        del reference
    finally:
        weights_back = switch.restore()
    chosen_after, _ = evaluator.run()
    restored = (
        weights_back
        and baseline_after.same_as(baseline)
        and baseline_after.kl_sum == 0.0
        and chosen_after.same_as(chosen_before)
    )
    return MixPasses(chosen_before, baseline, tuple(results), restored)


@attrs.frozen(eq=False)
class Measurement:
    """Every pass of one validation: the baseline, each group alone, the top groups together."""

    baseline: PassResult
    """Every group unquantized (groups with a fixed format stay on it)."""
    single: tuple[tuple[Candidate, Selection, PassResult], ...]
    joint: PassResult | None
    """The top groups quantized together (additivity), when asked for."""
    chosen: PassResult
    """The model as AutoQuant chose it, before validation touched it."""
    restored: bool
    """Switches, folded weights, the baseline and the chosen model all came back bit for bit."""

    def delta_nll(self, result: PassResult) -> float:
        return (result.nll_sum - self.baseline.nll_sum) / self.baseline.tokens


def measure(
    evaluator: HeldOutEval,
    switch: RecipeSwitch,
    groups: Sequence[GroupScore],
    selection: GroupSelection,
    additivity: bool,
) -> Measurement:
    """Measure each selected group alone (and the top ones together), then put the model back
    (:func:`measure_mixes`)."""
    by_name = {g.name: g for g in groups}
    hparam_ids = {c.name: id(switch.hparam_of(by_name[c.name])) for c, _ in selection.labelled()}
    labelled = selection.labelled()
    mixes: list[dict[int, str]] = [{hparam_ids[c.name]: c.format} for c, _ in labelled]
    with_joint = additivity and bool(selection.top)
    if with_joint:
        mixes.append({hparam_ids[c.name]: c.format for c in selection.top})
    passes = measure_mixes(evaluator, switch, mixes)
    single = tuple(
        (candidate, label, result)
        for (candidate, label), result in zip(labelled, passes.mixes[: len(labelled)], strict=True)
    )
    for candidate, _, result in single:
        log.debug(
            "validate %s (%s): NLL %.6g, KL %.6g", candidate.name, candidate.format, result.nll, result.kl
        )
    joint = passes.mixes[-1] if with_joint else None
    return Measurement(passes.baseline, single, joint, passes.chosen, passes.restored)


# --------------------------------------------------------------------------------------------
# The report


def correlation_notes(label: str, xs: Sequence[float], ys: Sequence[float], value: float) -> tuple[str, ...]:
    """Why a correlation came out NaN, in words a report can show."""
    if not math.isnan(value):
        return ()
    if len(xs) < 2:
        why = f"fewer than 2 measured groups ({len(xs)})"
    elif any(math.isnan(v) for v in (*xs, *ys)):
        why = "a NaN among the values"
    elif len(set(xs)) == 1:
        why = "the predicted scores are all equal"
    elif len(set(ys)) == 1:
        why = "the measured values are all equal"
    else:
        why = "no untied pair"
    return (f"{label} is NaN: {why}",)


def rank_overlap(candidates: Sequence[Candidate], measured: Sequence[float], k: int) -> float:
    """Share of the top ``k`` by predicted importance that are also top ``k`` by measured damage.

    Both sides are ordered by the manifest's rule (:func:`~auto_quantize_model.core.scores.rank_order`):
    ``candidates`` by their rank, the measured values descending with NaN first and ties in rank order.
    """
    predicted = [c.name for c in sorted(candidates, key=lambda c: c.rank)]
    by_rank = sorted(zip(candidates, measured, strict=True), key=lambda pair: pair[0].rank)
    order = rank_order([value for _, value in by_rank])
    return stats.top_k_overlap(predicted, [by_rank[i][0].name for i in order], k)


def validation_report(
    measurement: Measurement,
    held_out: HeldOut,
    k: int,
    notes: Sequence[str],
    seconds: float,
) -> ValidationReport:
    """The report: rank agreement, top-k overlap, additivity, and every note on what fell short."""
    candidates = [c for c, _, _ in measurement.single]
    predicted = [c.importance for c in candidates]
    delta_nll = [measurement.delta_nll(r) for _, _, r in measurement.single]
    kl = [r.kl for _, _, r in measurement.single]
    notes = list(notes)
    if not measurement.restored:
        notes.append("the model did not come back bit-exactly after validation")
    correlations: dict[str, float] = {}
    for what, ys, measure_ in (
        ("Spearman(score, dNLL)", delta_nll, stats.spearman),
        ("Kendall(score, dNLL)", delta_nll, stats.kendall_tau_b),
        ("Spearman(score, KL)", kl, stats.spearman),
        ("Kendall(score, KL)", kl, stats.kendall_tau_b),
    ):
        correlations[what] = measure_(predicted, ys)
        notes.extend(correlation_notes(what, predicted, ys, correlations[what]))
    top = {c.name for c, label, _ in measurement.single if label == "top"}
    joint = measurement.joint
    k_used = min(k, len(candidates))
    return ValidationReport(
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
            for (c, label, _), d, q in zip(measurement.single, delta_nll, kl, strict=True)
        ),
        baseline_nll=measurement.baseline.nll,
        spearman_nll=correlations["Spearman(score, dNLL)"],
        kendall_nll=correlations["Kendall(score, dNLL)"],
        spearman_kl=correlations["Spearman(score, KL)"],
        kendall_kl=correlations["Kendall(score, KL)"],
        topk_overlap=rank_overlap(candidates, delta_nll, k_used),
        k=k_used,
        joint_delta_nll=measurement.delta_nll(joint) if joint is not None else math.nan,
        sum_delta_nll=(
            math.fsum(d for c, d in zip(candidates, delta_nll, strict=True) if c.name in top)
            if joint is not None
            else math.nan
        ),
        holdout_samples=len(held_out.token_lists),
        holdout_tokens=measurement.baseline.tokens,
        seconds=seconds,
        restored_exactly=measurement.restored,
        chosen_delta_nll=measurement.delta_nll(measurement.chosen),
        holdout_source=held_out.source,
        holdout_excluded=held_out.skipped,
        notes=tuple(notes),
    )
