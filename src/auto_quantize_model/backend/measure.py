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

Every pass also keeps its sums per held-out caption, so the report can say how far each figure
can be trusted (:mod:`auto_quantize_model.core.noise`: bootstrap intervals, what lies within the
noise, the headline measure). The same passes feed the proxy baselines
(:mod:`auto_quantize_model.core.proxies`: input activations recorded in the baseline pass, each
format's weight quantization error read while the model is switched) and the measured
refinement (the top N predicted groups and a control set, measured alone and reordered).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import attrs

from auto_quantize_model.artifacts import (
    Interval,
    NoiseFloor,
    ProxyRating,
    RefinedGroup,
    Refinement,
    ValidatedGroup,
    ValidationReport,
)
from auto_quantize_model.core import stats
from auto_quantize_model.core.batching import encode, holdout_columns, scorable
from auto_quantize_model.core.captions import caption_file, read_caption_file
from auto_quantize_model.core.noise import (
    CONFIDENCE,
    Resamples,
    choose_headline,
    kendall_draws,
    resolved_pairs,
    spearman_draws,
    within_noise,
)
from auto_quantize_model.core.proxies import GroupInputs, rate_proxies
from auto_quantize_model.core.scores import (
    NO_QUANT,
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
    from auto_quantize_model.core.noise import Floats
    from auto_quantize_model.core.proxies import ActivationStats, WeightStats
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


def refined_order(
    candidates: Sequence[Candidate], sets: RefineSets, kl: Mapping[str, float]
) -> tuple[tuple[Candidate, ...], tuple[str, ...]]:
    """The refined ranking and the control groups promoted into its measured block.

    The block comes first: the top N, plus every control group whose KL exceeds the smallest KL
    measured among the top N (the prediction missed it), ordered by measured KL with the
    manifest's rule (NaN first, ties in predicted order). Every other candidate follows in
    predicted order, measured controls included: an unmeasured group is never moved by a guess,
    and a measured group is only ever compared with measured ones.
    """
    top_kl = [kl[c.name] for c in sets.top if not math.isnan(kl[c.name])]
    floor = min(top_kl) if top_kl else math.inf
    promoted = tuple(c for c in sets.control if kl[c.name] > floor)
    block = sorted((*sets.top, *promoted), key=lambda c: c.rank)
    ordered = [block[i] for i in rank_order([kl[c.name] for c in block])]
    inside = {c.name for c in ordered}
    rest = [c for c in sorted(candidates, key=lambda c: c.rank) if c.name not in inside]
    return (*ordered, *rest), tuple(c.name for c in promoted)


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
    caption_nll: tuple[float, ...] = ()
    """NLL summed over each held-out caption's tokens, in batch order (one caption per row): what
    the bootstrap resamples (:mod:`auto_quantize_model.core.noise`)."""
    caption_kl: tuple[float, ...] = ()
    """KL summed per caption likewise; empty when there was no reference."""
    caption_tokens: tuple[int, ...] = ()
    """Scored tokens per caption, in the same order."""

    @property
    def nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def kl(self) -> float:
        return self.kl_sum / self.tokens

    def same_as(self, other: PassResult) -> bool:
        return self.nll_sum == other.nll_sum and bool(self.token_nll.equal(other.token_nll))


LAYER_CACHE_SHARE = 0.25
"""Share of a device's free memory (host: ``MemAvailable``) the layer cache may take there."""


def free_bytes(device: torch.device) -> int:
    """Memory free for new tensors on ``device`` now; 0 where it cannot be told (no cache there)."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return 0
    meminfo = Path("/proc/meminfo")
    with contextlib.suppress(OSError, ValueError, IndexError), meminfo.open(encoding="ascii") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(AttributeError, ValueError, OSError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return 0


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _tensors(item)


def _cloned(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple | list):
        return type(value)(_cloned(item) for item in value)
    return value


class LayerCache:
    """Every decoder layer's output on every held-out batch of the baseline pass, for replay.

    With one group quantized, the decoder layers before the group's layer compute exactly what
    they computed in the baseline pass (same weights, same inputs, every other group on NONE), so
    a pass can take the baseline's output of the layer just before and run only from the group's
    layer on. Replayed layers get their ``forward`` swapped for one returning the recorded output,
    so the decoder's own forward still builds masks, positions and rotary embeddings and calls
    each layer as it always does: nothing about a layer's arguments is re-derived here. Each
    replayed output is a fresh copy, so a layer that works in place on its input cannot spoil
    the record.

    Costs layers x held-out positions (padding included) x hidden x element bytes, about 60 MB
    for SmolLM2-135M on 64 captions; recording stops and the cache stays empty once it would take
    more than :data:`LAYER_CACHE_SHARE` of the free memory of a device it lives on, and every pass
    then runs the whole decoder. Not a frozen value: it is filled by one pass and read by later
    ones, and only while :func:`measure_mixes` runs.
    """

    def __init__(self, decoder: nn.Module, lm_head: nn.Module) -> None:
        from torch import nn

        layers = getattr(decoder, "layers", None)
        self.layers: tuple[nn.Module, ...] = tuple(layers) if isinstance(layers, nn.ModuleList) else ()
        self.layer_of = {id(m): index for index, layer in enumerate(self.layers) for m in layer.modules()}
        """Module ``id`` -> index of the decoder layer holding it."""
        self.head = {id(m) for m in lm_head.modules()}
        self.outputs: list[list[Any]] = []
        """``[batch][layer]``: what each layer returned in the recorded pass."""
        self.off = "" if self.layers else "the decoder has no ``layers`` list"
        """Why the cache is not used (empty while it is)."""

    @property
    def ready(self) -> bool:
        return not self.off and bool(self.outputs) and all(len(o) == len(self.layers) for o in self.outputs)

    def clear(self) -> None:
        self.outputs = []

    def start(self, modules: Sequence[nn.Module]) -> int:
        """The first layer a pass must run when ``modules`` differ from the recorded pass.

        A module inside decoder layer ``i`` gives ``i``; the lm_head alone gives the number of
        layers (every layer replayed); anything else (embeddings, final norm, a module outside
        decoder and head) gives 0, the whole decoder.
        """
        first = len(self.layers)
        for module in modules:
            key = id(module)
            if key in self.layer_of:
                first = min(first, self.layer_of[key])
            elif key not in self.head:
                return 0
        return first

    @contextlib.contextmanager
    def recording(self, batches: int) -> Iterator[Callable[[int], None]]:
        """Record every layer's output during one pass; yields the callback that names the batch."""
        self.clear()
        if self.off:
            yield lambda index: None
            return
        outputs: list[list[Any]] = [[] for _ in range(batches)]
        current = [0]
        used: dict[torch.device, int] = {}
        allowed: dict[torch.device, int] = {}

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if self.off:
                return
            for tensor in _tensors(output):
                device = tensor.device
                if device not in allowed:
                    allowed[device] = int(free_bytes(device) * LAYER_CACHE_SHARE)
                used[device] = used.get(device, 0) + tensor.numel() * tensor.element_size()
                if used[device] > allowed[device]:
                    self.off = (
                        f"the layer outputs would take more than {allowed[device] / 2**20:.0f} MiB on "
                        f"{device} ({LAYER_CACHE_SHARE:.0%} of its free memory)"
                    )
                    outputs.clear()
                    log.info("held-out layer cache off: %s; every pass runs the whole decoder", self.off)
                    return
            outputs[current[0]].append(_cloned(output))

        def batch(index: int) -> None:
            current[0] = index

        handles = [layer.register_forward_hook(hook) for layer in self.layers]
        try:
            yield batch
        finally:
            for handle in handles:
                handle.remove()
        if not self.off:
            self.outputs = outputs
            if not self.ready:
                self.off = "a decoder layer did not run exactly once per held-out batch"
                self.clear()

    @contextlib.contextmanager
    def replaying(self, start: int) -> Iterator[Callable[[int], None]]:
        """Layers before ``start`` return their recorded output; yields the callback naming the batch."""
        current = [0]
        replayed = self.layers[:start] if self.ready else ()
        saved = [layer.__dict__.get("forward") for layer in replayed]

        def replay(index: int) -> Callable[..., Any]:
            return lambda *args, **kwargs: _cloned(self.outputs[current[0]][index])

        def batch(index: int) -> None:
            current[0] = index

        try:
            for index, layer in enumerate(replayed):
                layer.forward = replay(index)
            yield batch
        finally:
            for layer, forward in zip(replayed, saved, strict=True):
                if forward is None:
                    layer.__dict__.pop("forward", None)
                else:
                    layer.forward = forward


@attrs.frozen(eq=False)
class Reference:
    """The unquantized model's log-probabilities per held-out batch, and their exponentials.

    Every KL pass needs ``exp(reference)``; computing it once instead of in every pass took the
    largest elementwise cost out of validation on CPU (about a fifth of its time on SmolLM2-135M).
    The exponentials double the reference's memory, so a batch keeps them only while they fit in
    :data:`LAYER_CACHE_SHARE` of its device's free memory; the others recompute them per pass.
    Either way the KL is the same number, bit for bit.
    """

    log_probs: tuple[torch.Tensor, ...]
    probs: tuple[torch.Tensor | None, ...]

    @classmethod
    def of(cls, log_probs: Sequence[torch.Tensor], precompute: bool = True) -> Reference:
        import torch

        probs: list[torch.Tensor | None] = []
        room: dict[torch.device, int] = {}
        for logp in log_probs:
            device = logp.device
            if device not in room:
                room[device] = int(free_bytes(device) * LAYER_CACHE_SHARE) if precompute else 0
            size = logp.numel() * logp.element_size()
            fits = size <= room[device]
            room[device] -= size if fits else 0
            probs.append(torch.exp(logp) if fits else None)
        return cls(tuple(log_probs), tuple(probs))

    def kl_per_position(self, index: int, logq: torch.Tensor, in_place: bool) -> torch.Tensor:
        """``KL(reference || q)`` of each position of batch ``index``, summed over the vocabulary.

        The terms are ``exp(ref) * (ref - logq)``, the very operations and order of
        ``torch.nn.functional.kl_div(logq, ref, log_target=True)``, so the sums are bit-identical
        to it. ``in_place``: ``logq`` may be overwritten (saves two vocabulary-sized buffers).
        """
        import torch

        ref = self.log_probs[index].to(logq.device)
        probs = self.probs[index]
        terms = torch.sub(ref, logq, out=logq) if in_place else torch.sub(ref, logq)
        terms.mul_(torch.exp(ref) if probs is None else probs.to(logq.device))
        return terms.sum(-1)


@attrs.frozen(eq=False)
class HeldOutEval:
    """Runs the decoder and lm_head over the held-out batches.

    Log-probabilities are float64. In float32 the rounding of the softmax normaliser alone shifts
    every log-probability of a position by ~1e-7 * |log-sum-exp|, which is the size of the KL of
    a lightly quantized layer (it even came out negative). The unquantized ones are kept for the
    KL terms: ``[tokens, vocab]`` float64, about 1.9 GB for 1,600 tokens of a 152k vocabulary, on
    the model's device, with their exponentials as much again where the device has room
    (:class:`Reference`). A KL that rounding pushes below zero (~1e-16) is reported as 0.
    """

    decoder: nn.Module
    lm_head: nn.Module
    batches: tuple[dict[str, torch.Tensor], ...]
    cache: LayerCache | None = None
    """Baseline layer outputs for passes that change only later layers (None: always run them all)."""

    @classmethod
    def on(
        cls, lm: LanguageModel, token_lists: Sequence[Sequence[int]], layer_cache: bool = True
    ) -> HeldOutEval:
        """Held-out batches padded with the model's pad id, on the decoder's input device.

        ``layer_cache``: let :func:`measure_mixes` replay the baseline's outputs of the layers
        before the first one a mix changes (same results, bit for bit, in less time).
        """
        from auto_quantize_model.backend.lm_forward import as_tensors, input_device, to_device

        device = input_device(lm.module)
        batches = holdout_columns(token_lists, lm.pad_token_id)
        cache = LayerCache(lm.module, lm.lm_head) if layer_cache else None
        return cls(lm.module, lm.lm_head, tuple(to_device(as_tensors(b), device) for b in batches), cache)

    @property
    def device(self) -> torch.device:
        """Where the batches are (the decoder's input device)."""
        import torch

        return self.batches[0]["input_ids"].device if self.batches else torch.device("cpu")

    def run(
        self,
        reference: Reference | Sequence[torch.Tensor] | None = None,
        keep: bool = False,
        observe: Callable[[dict[str, torch.Tensor]], None] | None = None,
        *,
        record: bool = False,
        start: int = 0,
    ) -> tuple[PassResult, list[torch.Tensor]]:
        """One pass; ``observe`` is told each batch before its forward (for activation hooks).

        ``record``: fill the layer cache from this pass. ``start``: replay the cached outputs of
        the layers before it (the caller vouches that they compute what the recorded pass
        computed); ignored when the cache is off or empty.

        Sums are also kept per caption (per row: one caption each) for the bootstrap; a caption's
        KL is the sum of its positions' KL, so the total is the same sum in another order.
        """
        with contextlib.ExitStack() as stack:
            batch_index: Callable[[int], None] = lambda index: None  # noqa: E731
            if self.cache is not None and record:
                batch_index = stack.enter_context(self.cache.recording(len(self.batches)))
            elif self.cache is not None and start > 0:
                batch_index = stack.enter_context(self.cache.replaying(start))
            return self._run(reference, keep, observe, batch_index)

    def _run(
        self,
        reference: Reference | Sequence[torch.Tensor] | None,
        keep: bool,
        observe: Callable[[dict[str, torch.Tensor]], None] | None,
        batch_index: Callable[[int], None],
    ) -> tuple[PassResult, list[torch.Tensor]]:
        import torch

        from auto_quantize_model.backend.lm_forward import selected_logits, target_index

        if reference is not None and not isinstance(reference, Reference):
            reference = Reference.of(reference, precompute=False)
        nll_sum = 0.0
        kl_sum = 0.0
        tokens = 0
        token_nll: list[torch.Tensor] = []
        kept: list[torch.Tensor] = []
        caption_nll: list[torch.Tensor] = []
        caption_kl: list[torch.Tensor] = []
        caption_tokens: list[torch.Tensor] = []
        with torch.inference_mode():
            for index, batch in enumerate(self.batches):
                if observe is not None:
                    observe(batch)
                batch_index(index)
                logits = selected_logits(self.decoder, self.lm_head, batch)
                logq = torch.log_softmax(logits.double(), dim=-1)
                flat, targets = target_index(batch)
                nll = -logq.gather(1, targets.to(logq.device)[:, None]).squeeze(1)
                nll_sum += nll.sum().item()
                tokens += int(nll.numel())
                token_nll.append(nll.cpu())
                rows, length = batch["labels"].shape
                row = (flat // length).to(logq.device)
                caption_nll.append(nll.new_zeros(rows).index_add_(0, row, nll).cpu())
                caption_tokens.append(torch.bincount(row, minlength=rows).cpu())
                if reference is not None:
                    per_position = reference.kl_per_position(index, logq, in_place=not keep)
                    kl_sum += per_position.sum().item()
                    caption_kl.append(per_position.new_zeros(rows).index_add_(0, row, per_position).cpu())
                if keep:
                    kept.append(logq)
        result = PassResult(
            nll_sum=nll_sum,
            kl_sum=max(kl_sum, 0.0) if reference is not None else math.nan,
            tokens=tokens,
            token_nll=torch.cat(token_nll),
            caption_nll=tuple(torch.cat(caption_nll).tolist()),
            caption_kl=tuple(torch.cat(caption_kl).tolist()) if caption_kl else (),
            caption_tokens=tuple(int(n) for n in torch.cat(caption_tokens).tolist()),
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
    seconds: tuple[float, ...] = ()
    """Wall time of each mix's pass, in the order given."""

    def delta_nll(self, result: PassResult) -> float:
        return (result.nll_sum - self.baseline.nll_sum) / self.baseline.tokens


def changed_modules(switch: RecipeSwitch, mix: Mapping[int, str]) -> list[nn.Module]:
    """The modules whose computation differs from the baseline (every group on NONE) under ``mix``.

    The modules of every group the mix puts on a quantized format and, where that group's
    smoothing is folded into a weight, every module holding that weight (a tied embedding too).
    A group the mix leaves on NONE is as in the baseline.
    """
    changed = {key for key, fmt in mix.items() if fmt != NO_QUANT}
    modules = [switch.root.get_submodule(name) for name, h in switch.by_module.items() if id(h) in changed]
    rewritten = {id(weight) for weight, hparam, _, _ in switch.folded.values() if id(hparam) in changed}
    if rewritten:
        modules += [
            module
            for module in switch.root.modules()
            if any(id(p) in rewritten for p in module.parameters(recurse=False))
        ]
    return modules


def measure_mixes(
    evaluator: HeldOutEval,
    switch: RecipeSwitch,
    mixes: Sequence[Mapping[int, str]],
    *,
    recorder: ActivationRecorder | None = None,
    while_switched: Callable[[], None] | None = None,
) -> MixPasses:
    """Measure each mix (hparam ``id`` -> format; every other group on NONE), then put the model back.

    The one measuring loop of validation and of the budget frontier. The model is restored in a
    ``finally``, and the restore is checked: the weights bit for bit, the baseline pass and the
    chosen model's pass identical to before. ``recorder`` watches the baseline pass;
    ``while_switched`` runs after the mixes, before the model is put back, so whatever it
    switches is covered by the same restore and checks. On a CPU, freed host memory is reused
    meanwhile (:func:`~auto_quantize_model.backend.host_memory.host_memory_kept`).
    """
    from auto_quantize_model.backend.host_memory import host_memory_kept

    with host_memory_kept(evaluator.device):
        return _measure_mixes(evaluator, switch, mixes, recorder, while_switched)


def _measure_mixes(
    evaluator: HeldOutEval,
    switch: RecipeSwitch,
    mixes: Sequence[Mapping[int, str]],
    recorder: ActivationRecorder | None,
    while_switched: Callable[[], None] | None,
) -> MixPasses:
    results: list[PassResult] = []
    seconds: list[float] = []
    cache = evaluator.cache
    replayed = 0
    try:
        chosen_before, _ = evaluator.run()
        switch.apply({})
        if recorder is None:
            baseline, kept = evaluator.run(keep=True, record=True)
        else:
            with recorder.recording():
                baseline, kept = evaluator.run(keep=True, observe=recorder.batch, record=True)
        reference = Reference.of(kept)
        del kept
        for mix in mixes:
            started = time.perf_counter()
            switch.apply(mix)
            start = 0 if cache is None or not cache.ready else cache.start(changed_modules(switch, mix))
            replayed += start
            result, _ = evaluator.run(reference, start=start)
            results.append(result)
            seconds.append(time.perf_counter() - started)
        if while_switched is not None:
            while_switched()
        if cache is not None and cache.ready and mixes:
            log.info(
                "held-out passes: %d of %d decoder layer runs of the %d mix(es) replayed from the baseline",
                replayed,
                len(cache.layers) * len(mixes),
                len(mixes),
            )
        switch.apply({})
        baseline_after, _ = evaluator.run(reference)
        del reference
    finally:
        if cache is not None:
            cache.clear()
        weights_back = switch.restore()
    chosen_after, _ = evaluator.run()
    restored = (
        weights_back
        and baseline_after.same_as(baseline)
        and baseline_after.kl_sum == 0.0
        and chosen_after.same_as(chosen_before)
    )
    return MixPasses(chosen_before, baseline, tuple(results), restored, tuple(seconds))


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
    extra: tuple[tuple[Candidate, PassResult], ...] = ()
    """Groups measured alone for the refinement only (not among the validated selection)."""
    extra_seconds: float = 0.0
    """Wall time of the :attr:`extra` passes."""
    weights: Mapping[str, Mapping[str, WeightStats]] = attrs.field(factory=dict)
    """Selected group -> quantized format -> weight quantization error (for the proxies)."""
    activations: Mapping[str, ActivationStats] = attrs.field(factory=dict)
    """Selected group -> its input activations in the baseline pass (for the proxies)."""
    proxy_seconds: float = 0.0
    """Wall time spent on the proxies' weight errors (the activation hooks ride the baseline pass)."""

    def delta_nll(self, result: PassResult) -> float:
        return (result.nll_sum - self.baseline.nll_sum) / self.baseline.tokens

    def measured(self) -> tuple[tuple[Candidate, PassResult], ...]:
        """Every group measured alone: the selection, then the refinement's extra groups."""
        return (*((c, r) for c, _, r in self.single), *self.extra)


class ActivationRecorder:
    """Input statistics of chosen modules over the held-out captions' real tokens.

    Forward pre-hooks see each module's input; decoder inputs ``[rows, length, hidden]`` are
    cut to the real tokens with the batch's labels (padding carries ``IGNORE_INDEX``), the
    lm_head's input is already one row per scored position. Sums are float64 on the host.
    """

    def __init__(self, modules: Mapping[str, Sequence[nn.Module]]) -> None:
        self.modules = modules
        self.sums: dict[str, list[float]] = {}
        self.mask: torch.Tensor | None = None

    def batch(self, batch: dict[str, torch.Tensor]) -> None:
        from auto_quantize_model.core.batching import IGNORE_INDEX

        self.mask = batch["labels"] != IGNORE_INDEX

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        handles = [
            module.register_forward_pre_hook(functools.partial(self._hook, name))
            for name, modules in self.modules.items()
            for module in modules
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, group: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        import torch

        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.numel() == 0:
            return
        mask = self.mask
        if mask is not None and x.ndim == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            x = x[mask.to(x.device)]
        magnitude = x.detach().double().abs()
        sums = self.sums.setdefault(group, [0.0, 0.0, 0.0, 0.0])
        sums[0] = max(sums[0], float(magnitude.max()))
        sums[1] += float(magnitude.sum())
        sums[2] += float(magnitude.square().sum())
        sums[3] += magnitude.numel()

    def result(self) -> dict[str, ActivationStats]:
        from auto_quantize_model.core.proxies import ActivationStats

        return {
            name: ActivationStats(top, abs_sum, square_sum, int(count))
            for name, (top, abs_sum, square_sum, count) in self.sums.items()
        }


def measure(
    evaluator: HeldOutEval,
    switch: RecipeSwitch,
    groups: Sequence[GroupScore],
    selection: GroupSelection,
    additivity: bool,
    extra: Sequence[Candidate] = (),
    proxies: bool = False,
) -> Measurement:
    """Measure each selected group alone (and the top ones together), then put the model back
    (:func:`measure_mixes`).

    ``extra``: further groups to measure alone (the refinement's, beyond the selection).
    ``proxies``: also record the selected groups' input activations (in the baseline pass) and
    their weights' quantization error on each of their quantized formats.
    """
    by_name = {g.name: g for g in groups}
    labelled = selection.labelled()
    measured = (*(c for c, _ in labelled), *extra)
    hparam_ids = {c.name: id(switch.hparam_of(by_name[c.name])) for c in measured}
    mixes: list[dict[int, str]] = [{hparam_ids[c.name]: c.format} for c in measured]
    with_joint = additivity and bool(selection.top)
    if with_joint:
        mixes.append({hparam_ids[c.name]: c.format for c in selection.top})
    recorder = None
    if proxies:
        recorder = ActivationRecorder(
            {
                c.name: [switch.root.get_submodule(m) for m in by_name[c.name].module_names]
                for c, _ in labelled
            }
        )
    weights: dict[str, dict[str, WeightStats]] = {}
    proxy_seconds = [0.0]

    def weight_errors() -> None:
        started = time.perf_counter()
        for candidate, _ in labelled:
            group = by_name[candidate.name]
            found = {fmt: switch.weight_stats(group, fmt) for fmt in group.formats if fmt != NO_QUANT}
            weights[candidate.name] = {fmt: stat for fmt, stat in found.items() if stat is not None}
        proxy_seconds[0] = time.perf_counter() - started

    passes = measure_mixes(
        evaluator, switch, mixes, recorder=recorder, while_switched=weight_errors if proxies else None
    )
    single = tuple(
        (candidate, label, result)
        for (candidate, label), result in zip(labelled, passes.mixes[: len(labelled)], strict=True)
    )
    for candidate, result in zip(measured, passes.mixes, strict=False):
        log.debug(
            "validate %s (%s): NLL %.6g, KL %.6g", candidate.name, candidate.format, result.nll, result.kl
        )
    extra_slice = slice(len(labelled), len(measured))
    return Measurement(
        passes.baseline,
        single,
        passes.mixes[-1] if with_joint else None,
        passes.chosen,
        passes.restored,
        extra=tuple(zip(extra, passes.mixes[extra_slice], strict=True)),
        extra_seconds=math.fsum(passes.seconds[extra_slice]),
        weights=weights,
        activations={} if recorder is None else recorder.result(),
        proxy_seconds=proxy_seconds[0],
    )


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


@attrs.frozen
class RefinePlan:
    """What the stage asked the refinement for: every candidate, the sets, ``validate.refine``."""

    candidates: tuple[Candidate, ...]
    sets: RefineSets
    n: int


@attrs.frozen(eq=False)
class Bootstrapped:
    """Bootstrap draws of every group measured alone (the selection first, then the extra ones)."""

    resamples: Resamples
    delta_nll: Floats
    """``[resamples, measured groups]``."""
    kl: Floats


def bootstrap(measurement: Measurement, resamples: int, seed: int) -> tuple[Bootstrapped | None, str]:
    """Draws for every measured group from the per-caption sums; ``(None, why)`` when there are none."""
    captions = len(measurement.baseline.caption_tokens)
    if resamples <= 0:
        return None, ""
    if captions < 2:
        return None, f"no bootstrap intervals: {captions} held-out caption(s), at least 2 are needed"
    base = measurement.baseline.caption_nll
    measured = [r for _, r in measurement.measured()]
    drawn = Resamples.draw(measurement.baseline.caption_tokens, resamples, seed, CONFIDENCE)
    if not measured:
        return None, ""
    nll_sums = [[n - b for n, b in zip(r.caption_nll, base, strict=True)] for r in measured]
    kl_sums = [list(r.caption_kl) for r in measured]
    return Bootstrapped(drawn, drawn.means(nll_sums), drawn.means(kl_sums)), ""


def noise_floor(
    candidates: Sequence[Candidate],
    kl: Sequence[float],
    boot: Bootstrapped,
    k: int,
    seed: int,
    started: float,
) -> tuple[NoiseFloor, tuple[Interval, ...], tuple[Interval, ...]]:
    """The intervals of the validated groups and of their rank agreement, and the headline.

    Returns the noise floor and the ΔNLL and KL interval of each group (in ``candidates`` order).
    """
    count = len(candidates)
    resamples = boot.resamples
    nll_draws, kl_draws = boot.delta_nll[:, :count], boot.kl[:, :count]
    nll_cis, kl_cis = resamples.intervals(nll_draws), resamples.intervals(kl_draws)
    names = [c.name for c in candidates]
    predicted = [c.importance for c in candidates]
    nll_within = within_noise(names, nll_cis)
    nll_resolved, pairs = resolved_pairs(nll_draws, resamples)
    kl_resolved, _ = resolved_pairs(kl_draws, resamples)
    headline, reason = choose_headline(
        len(nll_within), count, nll_resolved, kl_resolved, pairs, resamples.confidence
    )
    floor = NoiseFloor(
        resamples=resamples.size,
        confidence=resamples.confidence,
        seed=seed,
        spearman_nll=resamples.interval(spearman_draws(predicted, nll_draws)),
        kendall_nll=resamples.interval(kendall_draws(predicted, nll_draws)),
        spearman_kl=resamples.interval(spearman_draws(predicted, kl_draws)),
        kendall_kl=resamples.interval(kendall_draws(predicted, kl_draws)),
        topk_overlap_kl=rank_overlap(candidates, kl, k),
        headline=headline,
        headline_reason=reason,
        nll_within_noise=nll_within,
        kl_within_noise=within_noise(names, kl_cis),
        pairs=pairs,
        nll_pairs_resolved=nll_resolved,
        kl_pairs_resolved=kl_resolved,
        seconds=time.perf_counter() - started,
    )
    return floor, nll_cis, kl_cis


def proxy_ratings(
    measurement: Measurement, kl: Sequence[float], delta_nll: Sequence[float], boot: Bootstrapped | None
) -> tuple[ProxyRating, ...]:
    """The free proxies of the validated groups, rated on the same measurements and resamples."""
    candidates = [c for c, _, _ in measurement.single]
    if not candidates or not (measurement.weights or measurement.activations):
        return ()
    inputs = [
        GroupInputs(c.format, measurement.weights.get(c.name, {}), measurement.activations.get(c.name))
        for c in candidates
    ]
    formats = tuple(dict.fromkeys(f for g in inputs for f in g.weights))
    count = len(candidates)
    draws = None if boot is None else (boot.kl[:, :count], boot.delta_nll[:, :count])
    return rate_proxies(
        inputs,
        formats,
        [c.importance for c in candidates],
        kl,
        delta_nll,
        draws,
        None if boot is None else boot.resamples,
    )


def refinement(
    plan: RefinePlan, measurement: Measurement, boot: Bootstrapped | None, k: int, batches: int
) -> Refinement:
    """The refined ranking (:func:`refined_order`) with its measurements, intervals and cost."""
    measured = measurement.measured()
    position = {c.name: i for i, (c, _) in enumerate(measured)}
    kl = {c.name: r.kl for c, r in measured}
    delta = {c.name: measurement.delta_nll(r) for c, r in measured}
    order, promoted = refined_order(plan.candidates, plan.sets, kl)
    label: dict[str, Literal["top", "control"]] = {c.name: "top" for c in plan.sets.top}
    label |= {c.name: "control" for c in plan.sets.control}

    def interval(name: str) -> Interval | None:
        return None if boot is None else boot.resamples.interval(boot.kl[:, position[name]])

    groups = tuple(
        RefinedGroup(
            name=c.name,
            format=c.format,
            importance=c.importance,
            predicted_rank=c.rank,
            refined_rank=place,
            measured=label.get(c.name, ""),
            kl_div=kl[c.name] if c.name in label else math.nan,
            kl_ci=interval(c.name) if c.name in label else None,
            delta_nll=delta[c.name] if c.name in label else math.nan,
        )
        for place, c in enumerate(order, start=1)
    )
    block = [c.name for c in order[: len(plan.sets.top) + len(promoted)]]
    resolved = 0
    if boot is not None:
        for a, b in itertools.pairwise(block):
            gap = boot.resamples.interval(boot.kl[:, position[a]] - boot.kl[:, position[b]])
            resolved += not math.isnan(gap.low) and not gap.contains(0.0)
    predicted_top = [c.name for c in sorted(plan.candidates, key=lambda c: c.rank)[:k]]
    refined_top = [c.name for c in order[:k]]
    top = plan.sets.top
    return Refinement(
        n=len(top),
        groups=groups,
        k=k,
        entered=tuple(name for name in refined_top if name not in predicted_top),
        left=tuple(name for name in predicted_top if name not in refined_top),
        promoted=promoted,
        spearman_top_kl=stats.spearman([c.importance for c in top], [kl[c.name] for c in top]),
        seconds=measurement.extra_seconds,
        passes=len(measurement.extra),
        forward_batches=len(measurement.extra) * batches,
        reused=len(top) + len(plan.sets.control) - len(measurement.extra),
        neighbours=max(len(block) - 1, 0),
        neighbours_resolved=resolved,
    )


def validation_report(
    measurement: Measurement,
    held_out: HeldOut,
    k: int,
    notes: Sequence[str],
    seconds: float,
    *,
    resamples: int = 0,
    seed: int = 0,
    refine: RefinePlan | None = None,
    batches: int = 0,
) -> ValidationReport:
    """The report: rank agreement, top-k overlap, additivity, and every note on what fell short.

    With ``resamples`` > 0, every measured figure gets a bootstrap interval over the held-out
    captions (seeded by ``seed``) and the report says what lies within the noise and which
    measure leads; the proxies are rated when the measurement recorded them; ``refine`` adds
    the measured refinement (``batches``: held-out batches per pass, for its cost).
    """
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

    started = time.perf_counter()
    boot, why_not = bootstrap(measurement, resamples, seed)
    if why_not:
        notes.append(why_not)
    noise: NoiseFloor | None = None
    nll_cis: Sequence[Interval | None] = [None] * len(candidates)
    kl_cis: Sequence[Interval | None] = [None] * len(candidates)
    if boot is not None and candidates:
        noise, nll_cis, kl_cis = noise_floor(candidates, kl, boot, k_used, seed, started)
        log.info(
            "validation noise floor: %d resamples in %.2f s; ΔNLL within the noise for %d of %d groups, "
            "headline %s",
            noise.resamples,
            noise.seconds,
            len(noise.nll_within_noise),
            len(candidates),
            "KL" if noise.headline == "kl" else "dNLL",
        )
    started = time.perf_counter()
    proxies = proxy_ratings(measurement, kl, delta_nll, boot)
    if proxies:
        log.info(
            "validation proxies: %d rated in %.2f s (%.2f s measuring weight errors)",
            len(proxies),
            time.perf_counter() - started,
            measurement.proxy_seconds,
        )
    refined = None if refine is None else refinement(refine, measurement, boot, k_used, batches)
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
                delta_nll_ci=nll_ci,
                kl_ci=kl_ci,
            )
            for (c, label, _), d, q, nll_ci, kl_ci in zip(
                measurement.single, delta_nll, kl, nll_cis, kl_cis, strict=True
            )
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
        noise=noise,
        proxies=proxies,
        refinement=refined,
    )
