"""What validation measures, on which text, and the record the torch passes hand back.

The pure half of ValidateSensitivity's input side: which recipe groups to measure (the manifest's
ranking, top/bottom/random, the refinement's top N and control set), the held-out captions
calibration never saw, and :class:`Measurement`, the sums every pass leaves behind. The passes
themselves run in :mod:`auto_quantize_model.backend.measure`; what the sums say (correlations,
bootstrap, proxies, refinement) is :mod:`auto_quantize_model.core.validation_report`. The two
core modules are split by job: this one decides before any forward pass, that one reads after
the last, and each stays small enough to read in one sitting.

The predicted side is the manifest's: importance, the format that sets it and the rank (ties in
network order, NaN first) all come from :mod:`auto_quantize_model.core.scores`, so a validated
group's rank is its rank in the manifest. No torch here, not even inside a function: a pass
result is seen through :class:`PassSums`, the plain numbers the report reads.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

import attrs

from auto_quantize_model.core.batching import encode, scorable
from auto_quantize_model.core.captions import caption_file, read_caption_file
from auto_quantize_model.core.scores import has_quantized_format, headline_index, importance, ranks
from auto_quantize_model.errors import AqmError

if TYPE_CHECKING:
    from auto_quantize_model.artifacts import CalibData, GroupScore
    from auto_quantize_model.core.proxies import ActivationStats, WeightStats
    from auto_quantize_model.specs import ValidateSpec
    from auto_quantize_model.validation_records import LastPosition

Selection = Literal["top", "bottom", "random"]


# --------------------------------------------------------------------------------------------
# What to measure


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


@attrs.frozen
class RefineSets:
    """What the measured refinement measures: the top N predicted groups and a control set."""

    top: tuple[Candidate, ...]
    control: tuple[Candidate, ...]
    """As many groups as :attr:`top`, drawn at random from the rest (fewer when the rest is short)."""

    def extra(self, selection: GroupSelection) -> tuple[Candidate, ...]:
        """The groups of these sets that the validation's own selection does not measure anyway."""
        measured = {c.name for c, _ in selection.labelled()}
        return tuple(c for c in (*self.top, *self.control) if c.name not in measured)


def refine_sets(ranked: Sequence[Candidate], n: int, seed: int) -> RefineSets:
    """The top ``n`` of ``ranked`` (most important first) and a seeded random control set of the same size.

    The control set is what tells a real gain from reshuffling: a control group that measures
    above the least damaging of the top N is one the prediction ranked too low. Its draw has its
    own stream (seeded by ``seed``), so turning refinement on changes nothing else.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    top = tuple(ranked[:n])
    rest = list(ranked[len(top) :])
    drawn = random.Random(f"refine:{seed}").sample(rest, min(len(top), len(rest)))
    return RefineSets(top=top, control=tuple(sorted(drawn, key=lambda c: c.rank)))


@attrs.frozen
class RefinePlan:
    """What the stage asked the refinement for: every candidate, the sets, ``validate.refine``."""

    candidates: tuple[Candidate, ...]
    sets: RefineSets
    n: int


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
# What the passes hand back


class PassSums(Protocol):
    """The numbers of one held-out pass that the report reads.

    :class:`~auto_quantize_model.backend.measure.PassResult` is one; it also carries its
    per-token NLL as a tensor for the restore checks, which this side never looks at.
    """

    @property
    def nll_sum(self) -> float: ...
    @property
    def tokens(self) -> int: ...
    @property
    def caption_nll(self) -> tuple[float, ...]: ...
    @property
    def caption_kl(self) -> tuple[float, ...]: ...
    @property
    def caption_tokens(self) -> tuple[int, ...]: ...
    @property
    def nll(self) -> float: ...
    @property
    def kl(self) -> float: ...


def mean_delta_nll(result: PassSums, baseline: PassSums) -> float:
    """Mean NLL increase per held-out token of ``result`` over ``baseline`` (same tokens)."""
    return (result.nll_sum - baseline.nll_sum) / baseline.tokens


@attrs.frozen(eq=False)
class Measurement:
    """Every pass of one validation: the baseline, each group alone, the top groups together."""

    baseline: PassSums
    """Every group unquantized (groups with a fixed format stay on it)."""
    single: tuple[tuple[Candidate, Selection, PassSums], ...]
    joint: PassSums | None
    """The top groups quantized together (additivity), when asked for."""
    chosen: PassSums
    """The model as AutoQuant chose it, before validation touched it."""
    restored: bool
    """Switches, folded weights, the baseline and the chosen model all came back bit for bit."""
    extra: tuple[tuple[Candidate, PassSums], ...] = ()
    """Groups measured alone for the refinement only (not among the validated selection)."""
    extra_seconds: float = 0.0
    """Wall time of the :attr:`extra` passes."""
    weights: Mapping[str, Mapping[str, WeightStats]] = attrs.field(factory=dict)
    """Selected group -> quantized format -> weight quantization error (for the proxies)."""
    activations: Mapping[str, ActivationStats] = attrs.field(factory=dict)
    """Selected group -> its input activations in the baseline pass (for the proxies)."""
    proxy_seconds: float = 0.0
    """Wall time spent on the proxies' weight errors (the activation hooks ride the baseline pass)."""
    last_position: LastPosition | None = None
    """The chosen model at each held-out caption's last position (and its generation check)."""
    greedy_seconds: float = 0.0
    """Wall time of the greedy continuations (the baseline's and the chosen model's)."""

    def delta_nll(self, result: PassSums) -> float:
        return mean_delta_nll(result, self.baseline)

    def measured(self) -> tuple[tuple[Candidate, PassSums], ...]:
        """Every group measured alone: the selection, then the refinement's extra groups."""
        return (*((c, r) for c, _, r in self.single), *self.extra)
