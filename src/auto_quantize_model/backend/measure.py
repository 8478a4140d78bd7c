"""Held-out measurement: the torch passes behind ValidateSensitivity and the budget frontier.

AutoQuant's score is a Taylor/Fisher proxy. Validation quantizes a few recipe groups one at a
time (everything else in full precision, through
:class:`~auto_quantize_model.backend.modelopt.recipe_switch.RecipeSwitch`) and measures the real
increase in next-token loss (ΔNLL) and the KL divergence to the unquantized model on captions
calibration never saw. This module runs those passes and puts the model back; which groups to
measure, on which text, is decided in :mod:`auto_quantize_model.core.validation`, and what the
sums say is :mod:`auto_quantize_model.core.validation_report` (both plain data, no torch). The
baseline layer outputs that let a pass skip unchanged layers are
:mod:`auto_quantize_model.backend.layer_cache`. Nothing here imports torch at module level.

Every pass also keeps its sums per held-out caption, so the report can say how far each figure
can be trusted (:mod:`auto_quantize_model.core.noise`). The same passes feed the proxy baselines
(:mod:`auto_quantize_model.core.proxies`: input activations recorded in the baseline pass, each
format's weight quantization error read while the model is switched) and the measured
refinement (the top N predicted groups and a control set, measured alone).

Every pass also reads each caption's last position, which has no target and so is never scored,
yet is where a deployed model generates from: the most likely next token there and, against
the baseline, its KL. With a :class:`~auto_quantize_model.backend.generation.Greedy` plan the
baseline and the chosen model (or each mix) also continue a few captions greedily; what those
figures mean is :mod:`auto_quantize_model.core.last_position`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import attrs

from auto_quantize_model.backend import layer_cache as lc
from auto_quantize_model.backend.activations import ActivationRecorder
from auto_quantize_model.core.batching import IGNORE_INDEX, holdout_columns
from auto_quantize_model.core.last_position import last_position
from auto_quantize_model.core.scores import NO_QUANT
from auto_quantize_model.core.validation import Candidate, GroupSelection, Measurement, mean_delta_nll

if TYPE_CHECKING:
    import torch
    from torch import nn

    from auto_quantize_model.artifacts import GroupScore, LanguageModel
    from auto_quantize_model.backend.generation import Greedy
    from auto_quantize_model.backend.modelopt.recipe_switch import RecipeSwitch
    from auto_quantize_model.core.last_position import Continuations
    from auto_quantize_model.core.proxies import WeightStats
    from auto_quantize_model.validation_records import LastPosition

log = logging.getLogger("auto_quantize_model")


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
    last_top: tuple[int, ...] = ()
    """Most likely next token at each caption's last position (no target there), in the same order."""
    last_kl: tuple[float, ...] = ()
    """KL(unquantized || this model) at each caption's last position; empty without a reference."""
    last_log_probs: tuple[torch.Tensor, ...] = ()
    """The last positions' log-probabilities per batch, kept (``keep``) to become a reference."""

    @property
    def nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def kl(self) -> float:
        return self.kl_sum / self.tokens

    def same_as(self, other: PassResult) -> bool:
        return self.nll_sum == other.nll_sum and bool(self.token_nll.equal(other.token_nll))


@attrs.frozen(eq=False)
class Reference:
    """The unquantized model's log-probabilities per held-out batch, and their exponentials.

    Every KL pass needs ``exp(reference)``; computing it once instead of in every pass took the
    largest elementwise cost out of validation on CPU (about a fifth of its time on SmolLM2-135M).
    The exponentials double the reference's memory, so a batch keeps them only while they fit in
    the layer cache's share of its device's free memory
    (:data:`~auto_quantize_model.backend.layer_cache.LAYER_CACHE_SHARE`); the others recompute
    them per pass. Either way the KL is the same number, bit for bit.
    """

    log_probs: tuple[torch.Tensor, ...]
    """Per batch, at the positions with a target; empty in a :meth:`last_only` reference."""
    probs: tuple[torch.Tensor | None, ...]
    last: tuple[torch.Tensor, ...] = ()
    """Per batch, at each caption's last position (``[captions, vocab]``, small); empty: no KL there."""

    @classmethod
    def of(
        cls, log_probs: Sequence[torch.Tensor], precompute: bool = True, last: Sequence[torch.Tensor] = ()
    ) -> Reference:
        import torch

        probs: list[torch.Tensor | None] = []
        room: dict[torch.device, int] = {}
        for logp in log_probs:
            device = logp.device
            if device not in room:
                room[device] = int(lc.free_bytes(device) * lc.LAYER_CACHE_SHARE) if precompute else 0
            size = logp.numel() * logp.element_size()
            fits = size <= room[device]
            room[device] -= size if fits else 0
            probs.append(torch.exp(logp) if fits else None)
        return cls(tuple(log_probs), tuple(probs), tuple(last))

    def last_only(self) -> Reference:
        """The last positions' part alone: what checking the chosen model needs, without the big part."""
        return Reference((), (), self.last)

    def last_kl(self, index: int, logq: torch.Tensor) -> torch.Tensor:
        """``KL(reference || q)`` at each caption's last position of batch ``index``."""
        import torch

        ref = self.last[index].to(logq.device)
        return (torch.exp(ref) * (ref - logq)).sum(-1)

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
    cache: lc.LayerCache | None = None
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
        cache = lc.LayerCache(lm.module, lm.lm_head) if layer_cache else None
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

        from auto_quantize_model.backend.lm_forward import decoder_hidden, target_index, to_head

        if reference is not None and not isinstance(reference, Reference):
            reference = Reference.of(reference, precompute=False)
        scored = reference is not None and bool(reference.log_probs)
        nll_sum = 0.0
        kl_sum = 0.0
        tokens = 0
        token_nll: list[torch.Tensor] = []
        kept: list[torch.Tensor] = []
        caption_nll: list[torch.Tensor] = []
        caption_kl: list[torch.Tensor] = []
        caption_tokens: list[torch.Tensor] = []
        last_top: list[torch.Tensor] = []
        last_kl: list[torch.Tensor] = []
        last_kept: list[torch.Tensor] = []
        with torch.inference_mode():
            for index, batch in enumerate(self.batches):
                if observe is not None:
                    observe(batch)
                batch_index(index)
                hidden = decoder_hidden(self.decoder, batch)
                hidden = hidden.reshape(-1, hidden.shape[-1])
                flat, targets = target_index(batch)
                # as selected_logits computes them, so the scored figures keep their bits
                logits = self.lm_head(to_head(hidden.index_select(0, flat.to(hidden.device)), self.lm_head))
                at_last = self.lm_head(
                    to_head(hidden.index_select(0, last_index(batch).to(hidden.device)), self.lm_head)
                )
                last_logq = torch.log_softmax(at_last.double(), dim=-1)
                last_top.append(last_logq.argmax(-1).cpu())
                if reference is not None and reference.last:
                    last_kl.append(reference.last_kl(index, last_logq).cpu())
                if keep:
                    last_kept.append(last_logq)
                del hidden, at_last
                logq = torch.log_softmax(logits.double(), dim=-1)
                nll = -logq.gather(1, targets.to(logq.device)[:, None]).squeeze(1)
                nll_sum += nll.sum().item()
                tokens += int(nll.numel())
                token_nll.append(nll.cpu())
                rows, length = batch["labels"].shape
                row = (flat // length).to(logq.device)
                caption_nll.append(nll.new_zeros(rows).index_add_(0, row, nll).cpu())
                caption_tokens.append(torch.bincount(row, minlength=rows).cpu())
                if reference is not None and scored:
                    per_position = reference.kl_per_position(index, logq, in_place=not keep)
                    kl_sum += per_position.sum().item()
                    caption_kl.append(per_position.new_zeros(rows).index_add_(0, row, per_position).cpu())
                if keep:
                    kept.append(logq)
        result = PassResult(
            nll_sum=nll_sum,
            kl_sum=max(kl_sum, 0.0) if scored else math.nan,
            tokens=tokens,
            token_nll=torch.cat(token_nll),
            caption_nll=tuple(torch.cat(caption_nll).tolist()),
            caption_kl=tuple(torch.cat(caption_kl).tolist()) if caption_kl else (),
            caption_tokens=tuple(int(n) for n in torch.cat(caption_tokens).tolist()),
            last_top=tuple(int(t) for t in torch.cat(last_top).tolist()) if last_top else (),
            last_kl=tuple(torch.cat(last_kl).tolist()) if last_kl else (),
            last_log_probs=tuple(last_kept),
        )
        return result, kept


def last_index(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Flat index of each row's last real token in a held-out batch (one caption per row,
    right-padded, every real token labelled)."""
    import torch

    labels = batch["labels"]
    rows, length = labels.shape
    real = (labels != IGNORE_INDEX).sum(1)
    return torch.arange(rows, device=labels.device) * length + real - 1


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
    chosen_last: PassResult | None = None
    """The chosen model again, once put back: its last positions measured against the baseline."""
    greedy_steps: int = 0
    """Tokens of each greedy continuation; 0 without a generation check."""
    baseline_greedy: Continuations = ()
    chosen_greedy: Continuations = ()
    """Empty unless the chosen model was asked to generate."""
    mix_greedy: tuple[Continuations, ...] = ()
    """One per mix when the mixes were asked to generate, else empty."""
    greedy_seconds: float = 0.0

    def delta_nll(self, result: PassResult) -> float:
        return mean_delta_nll(result, self.baseline)

    def chosen_last_position(self) -> LastPosition | None:
        """The chosen model's figures at the last positions; None when it was not measured."""
        if self.chosen_last is None:
            return None
        return self._figures(self.chosen_last, self.chosen_greedy)

    def mix_last_position(self, index: int) -> LastPosition:
        return self._figures(self.mixes[index], self.mix_greedy[index] if self.mix_greedy else ())

    def _figures(self, result: PassResult, continuations: Continuations) -> LastPosition:
        steps = self.greedy_steps if continuations else 0
        return last_position(
            result, self.baseline, steps=steps, continuations=continuations, reference=self.baseline_greedy
        )


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
    greedy: Greedy | None = None,
    greedy_mixes: bool = False,
) -> MixPasses:
    """Measure each mix (hparam ``id`` -> format; every other group on NONE), then put the model back.

    The one measuring loop of validation and of the budget frontier. The model is restored in a
    ``finally``, and the restore is checked: the weights bit for bit, the baseline pass and the
    chosen model's pass identical to before. ``recorder`` watches the baseline pass;
    ``while_switched`` runs after the mixes, before the model is put back, so whatever it
    switches is covered by the same restore and checks. On a CPU, freed host memory is reused
    meanwhile (:func:`~auto_quantize_model.backend.host_memory.host_memory_kept`).

    The chosen model's last positions are measured against the baseline's once it is back.
    ``greedy``: the baseline continues its prompts, and so does the chosen model, or with
    ``greedy_mixes`` each mix instead (validation measures single groups, which nobody deploys).
    """
    from auto_quantize_model.backend.host_memory import host_memory_kept

    with host_memory_kept(evaluator.device):
        return _measure_mixes(evaluator, switch, mixes, recorder, while_switched, greedy, greedy_mixes)


def _measure_mixes(
    evaluator: HeldOutEval,
    switch: RecipeSwitch,
    mixes: Sequence[Mapping[int, str]],
    recorder: ActivationRecorder | None,
    while_switched: Callable[[], None] | None,
    greedy: Greedy | None,
    greedy_mixes: bool,
) -> MixPasses:
    results: list[PassResult] = []
    seconds: list[float] = []
    cache = evaluator.cache
    replayed = 0
    generated: list[Continuations] = []
    greedy_seconds = [0.0]

    def generate() -> Continuations:
        if greedy is None:
            return ()
        started = time.perf_counter()
        tokens = greedy.run(evaluator.decoder, evaluator.lm_head, evaluator.device)
        greedy_seconds[0] += time.perf_counter() - started
        return tokens

    try:
        chosen_before, _ = evaluator.run()
        switch.apply({})
        if recorder is None:
            baseline, kept = evaluator.run(keep=True, record=True)
        else:
            with recorder.recording():
                baseline, kept = evaluator.run(keep=True, observe=recorder.batch, record=True)
        reference = Reference.of(kept, last=baseline.last_log_probs)
        baseline = attrs.evolve(baseline, last_log_probs=())
        del kept
        baseline_greedy = generate()
        for mix in mixes:
            started = time.perf_counter()
            switch.apply(mix)
            start = 0 if cache is None or not cache.ready else cache.start(changed_modules(switch, mix))
            replayed += start
            result, _ = evaluator.run(reference, start=start)
            results.append(result)
            seconds.append(time.perf_counter() - started)
            if greedy_mixes:
                generated.append(generate())
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
        last_reference = reference.last_only()
        del reference
    finally:
        if cache is not None:
            cache.clear()
        weights_back = switch.restore()
    chosen_after, _ = evaluator.run(last_reference)
    chosen_greedy = () if greedy_mixes else generate()
    restored = (
        weights_back
        and baseline_after.same_as(baseline)
        and baseline_after.kl_sum == 0.0
        and chosen_after.same_as(chosen_before)
    )
    return MixPasses(
        chosen_before,
        baseline,
        tuple(results),
        restored,
        tuple(seconds),
        chosen_last=chosen_after,
        greedy_steps=0 if greedy is None else greedy.steps,
        baseline_greedy=baseline_greedy,
        chosen_greedy=chosen_greedy,
        mix_greedy=tuple(generated),
        greedy_seconds=greedy_seconds[0],
    )


def measure(
    evaluator: HeldOutEval,
    switch: RecipeSwitch,
    groups: Sequence[GroupScore],
    selection: GroupSelection,
    additivity: bool,
    extra: Sequence[Candidate] = (),
    proxies: bool = False,
    greedy: Greedy | None = None,
) -> Measurement:
    """Measure each selected group alone (and the top ones together), then put the model back
    (:func:`measure_mixes`).

    ``extra``: further groups to measure alone (the refinement's, beyond the selection).
    ``proxies``: also record the selected groups' input activations (in the baseline pass) and
    their weights' quantization error on each of their quantized formats. ``greedy``: the chosen
    model's generation check.
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
        evaluator,
        switch,
        mixes,
        recorder=recorder,
        while_switched=weight_errors if proxies else None,
        greedy=greedy,
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
        last_position=passes.chosen_last_position(),
        greedy_seconds=passes.greedy_seconds,
    )
