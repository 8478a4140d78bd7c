"""One ``mtq.auto_quantize`` call, with every patch it needs in place and undone afterwards.

Besides the patches (:mod:`.patches`) and the resume protocol (:mod:`.checkpoint`), this is
where the batches meet the model: calibration sees every caption, scoring the label-limited
copies (:func:`~.plan.limit_scored_captions`), and a :class:`ForwardCounter` records what each
phase really ran, which is how a resumed run proves what it skipped.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from auto_quantize_model.artifacts import CalibData, LanguageModel
from auto_quantize_model.backend.modelopt import patches
from auto_quantize_model.backend.modelopt.batched_experts import batched_fused_experts
from auto_quantize_model.backend.modelopt.checkpoint import SearchCheckpoint
from auto_quantize_model.backend.modelopt.fsdp_lookup import fsdp_lookup_skipped
from auto_quantize_model.backend.modelopt.plan import SearchPlan, Steps, limit_scored_captions
from auto_quantize_model.backend.modelopt.quantizer_setup import fast_fused_experts_setup
from auto_quantize_model.backend.modelopt.split_calibration import batched_split_experts
from auto_quantize_model.backend.modelopt.state import RawScores, collect_raw_scores
from auto_quantize_model.specs import AutoQuantSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger("auto_quantize_model")

AutoQuantize = Callable[..., tuple[Any, dict[str, Any]]]
"""``mtq.auto_quantize``'s shape: ``(model, **kwargs) -> (model, search state)``."""


def release_output_diffs(model: nn.Module) -> list[Any]:
    """Free each module's quantization-error tensors as soon as its score is accumulated.

    ModelOpt's gradient scoring keeps ``Q(Y) - Y`` of every quantized linear (``output_diff_dict``)
    until the next forward overwrites it: with gradient checkpointing that is one activation-sized
    tensor per linear and format for the whole model at once (about 9 GB for Qwen3-VL-4B at 4,096
    tokens per step). A backward hook registered after ModelOpt's own runs right after it and drops
    the tensors, so only the layer being recomputed holds them. Scores are unchanged.
    """

    def drop(module: nn.Module, grad_input: Any, grad_output: Any) -> None:
        module.__dict__.pop("output_diff_dict", None)

    return [
        module.register_full_backward_hook(drop)
        for module in model.modules()
        if hasattr(module, "_backward_hook_handle")
    ]


class ForwardCounter:
    """Counts ModelOpt's calls of ``forward_step``, split into calibration and scoring.

    The counts prove what a resumed run skipped (restored calibration runs no calibration step,
    restored scores no scoring step). Mutable on purpose: it lives only for one stage call.
    ``release`` installs the hooks that free ModelOpt's per-layer error tensors (injectable, so
    a test can compare with and without).
    """

    def __init__(
        self,
        forward_step: Callable[[nn.Module, Any], Any],
        score_view: Mapping[int, Any] | None = None,
        calibration_step: Callable[[nn.Module, Any], Any] | None = None,
        release: Callable[[nn.Module], list[Any]] = release_output_diffs,
    ) -> None:
        self._forward_step = forward_step
        self._calibration_step = calibration_step
        self._score_view = dict(score_view or {})
        self._release = release
        self.scoring_started = False
        self.calibration = 0
        self.scoring = 0
        self._release_hooks: list[Any] = []

    def start_scoring(self) -> None:
        self.scoring_started = True

    def step(self, model: nn.Module, batch: Any) -> Any:
        if self.scoring_started:
            self.scoring += 1
            if not self._release_hooks:
                self._release_hooks = self._release(model)
            batch = self.scoring_view(batch)
        else:
            self.calibration += 1
            if self._calibration_step is not None:
                return self._calibration_step(model, batch)
        return self._forward_step(model, batch)

    def backward_step_for(
        self, decoder_path: str, head_path: str, normalizer: float
    ) -> Callable[[nn.Module, Any], None]:
        """ModelOpt's ``forward_backward_step`` for gradient scores: lm_head in chunks, counted.

        The loss is a sum over tokens with one run-wide divisor: AutoQuant's score squares
        per-token gradients, so a per-batch mean would weigh a token by 1/(tokens in its batch)^2
        and make scores depend on how captions were batched; this way packed, padded and one
        caption per batch score every token alike.
        """
        from auto_quantize_model.backend.lm_forward import chunked_loss_backward

        def forward_backward_step(model: nn.Module, batch: Any) -> None:
            self.scoring += 1
            if not self._release_hooks:
                self._release_hooks = self._release(model)
            decoder = model.get_submodule(decoder_path) if decoder_path else model
            head = model.get_submodule(head_path)
            chunked_loss_backward(decoder, head, self.scoring_view(batch), normalizer)

        return forward_backward_step

    def scoring_view(self, batch: Any) -> Any:
        """The label-limited copy of ``batch`` that scoring uses (``batch`` itself if none)."""
        return self._score_view.get(id(batch), batch)

    def remove_hooks(self) -> None:
        for handle in self._release_hooks:
            handle.remove()
        self._release_hooks = []


def cuda_extension_built(name: str = "modelopt_cuda_ext") -> bool:
    """Whether torch's JIT cache already holds a built ModelOpt extension.

    Best effort (it reads torch's private build-directory helper): False when it cannot tell,
    which only costs a log line that may be unnecessary.
    """
    try:
        from torch.utils import cpp_extension

        directory = Path(cpp_extension._get_build_directory(name, verbose=False))
    except Exception:
        return False
    return any(directory.glob("*.so"))


EXTENSION_GETTERS: dict[str, str] = {
    "modelopt_cuda_ext": "get_cuda_ext",
    "modelopt_cuda_ext_fp8": "get_cuda_ext_fp8",
    "modelopt_cuda_ext_mx": "get_cuda_ext_mx",
}
"""ModelOpt 0.47's loader of each extension in ``modelopt.torch.quantization.extensions``."""


def warm_cuda_extensions(
    names: Iterable[str],
    getters: Mapping[str, Callable[[], Any]] | None = None,
    built: Callable[[str], bool] = cuda_extension_built,
) -> tuple[tuple[str, str, float], ...]:
    """Load ModelOpt's CUDA extensions ``names``, JIT-building any this machine lacks (~1 min each).

    ``names`` are what the formats' quantizers call
    (:func:`~auto_quantize_model.core.formats.cuda_extensions`), so a timed run after this pays
    for no build. ``getters`` replaces ModelOpt's loaders (tests); a loader holding ``extension``
    already loaded it in this process. Returns ``(name, what happened, seconds)`` per extension.
    """
    if getters is None:
        from auto_quantize_model.backend.modelopt import import_modelopt

        module = import_modelopt("modelopt.torch.quantization.extensions")
        getters = {name: getattr(module, getter) for name, getter in EXTENSION_GETTERS.items()}
    found: list[tuple[str, str, float]] = []
    for name in names:
        getter = getters[name]
        if hasattr(getter, "extension"):
            found.append((name, "already loaded in this process", 0.0))
            continue
        prebuilt = built(name)
        if not prebuilt:
            log.info(
                "ModelOpt's CUDA extension %s is not built on this machine: building it now "
                "(about a minute, once per machine)",
                name,
            )
        started = time.perf_counter()
        loaded = getter()
        seconds = time.perf_counter() - started
        if loaded is None:
            what = "failed to build or load (ModelOpt falls back to slower code)"
        else:
            what = "prebuilt, loaded" if prebuilt else "JIT-built now"
        found.append((name, what, seconds))
    return tuple(found)


@contextlib.contextmanager
def seeded_rng(model: nn.Module, seed: int = 0) -> Iterator[None]:
    """Seeded CPU and model-GPU generators for a while; the caller's RNG states come back afterwards.

    Nothing in ModelOpt's search is known to draw random numbers; seeded anyway so that a future
    one cannot make two runs of the same inputs differ. Only the GPUs holding the model are
    touched (forking every visible GPU's state would create a context on each).
    """
    import torch

    gpus = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=gpus):
        torch.default_generator.manual_seed(seed)
        for index in gpus:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


@attrs.frozen(eq=False)
class SearchData:
    """The batches on the model's device, and the label-limited copies scoring reads instead."""

    batches: list[dict[str, torch.Tensor]]
    score_view: dict[int, dict[str, torch.Tensor]]
    """``id(batch)`` -> the copy scoring uses (only batches that lost captions have one)."""
    scored_targets: int
    """Tokens whose prediction is scored: the gradient loss's run-wide divisor."""
    score_samples: int
    """Captions really scored."""


def search_data(lm: LanguageModel, calib: CalibData, steps: Steps, score_size: int) -> SearchData:
    from auto_quantize_model.backend.lm_forward import input_device, target_index, to_device

    device = input_device(lm.module)
    scored, score_samples = limit_scored_captions(
        calib.batches, calib.captions_per_batch, steps.score_steps, score_size, lm.pad_token_id
    )
    batches = [to_device(batch, device) for batch in calib.batches]
    score_view = {
        id(batches[i]): to_device(scored[i], device)
        for i in range(steps.score_steps)
        if scored[i] is not calib.batches[i]
    }
    targets = sum(int(target_index(batch)[1].numel()) for batch in scored[: steps.score_steps])
    return SearchData(batches, score_view, targets, score_samples)


@attrs.frozen
class SearchOutcome:
    state: dict[str, Any]
    """What ``mtq.auto_quantize`` returned (its searcher's state dict)."""
    raw: RawScores | None
    """Unclamped scores: read off the model when scoring ran here, else the restored state's
    validated record (restored scores without one are recomputed, see
    :meth:`SearchCheckpoint.loaded`); None only when ModelOpt ran no scoring at all."""
    seconds: float
    calib_forward_steps: int
    score_forward_steps: int


def run_search(
    auto_quantize: AutoQuantize,
    lm: LanguageModel,
    plan: SearchPlan,
    data: SearchData,
    steps: Steps,
    spec: AutoQuantSpec,
    checkpoint: SearchCheckpoint,
    release: Callable[[nn.Module], list[Any]] | None = None,
) -> SearchOutcome:
    """ModelOpt's search on ``plan.root``, every patch in place; the model keeps its quantizers.

    The caller's model comes back with each module's train/eval flag and checkpointing as they
    were, the RNG states, warning filters, garbage collector, host allocator and ModelOpt's classes
    and config module as they were; only ModelOpt's quantizers and recipe hparams stay (that is the
    result).
    ``release`` replaces :func:`release_output_diffs` (looked up at call time).
    """
    from auto_quantize_model.backend.host_memory import host_memory_kept
    from auto_quantize_model.backend.lm_forward import (
        calibration_step_for,
        decoder_and_head,
        forward_step_for,
        input_device,
    )

    root = plan.root
    counter = ForwardCounter(
        forward_step_for(lm, root),
        data.score_view,
        calibration_step_for(lm, root),
        release=release_output_diffs if release is None else release,
    )
    method_args: dict[str, Any] = {"method": spec.method}
    if spec.method == "gradient":
        method_args["forward_backward_step"] = counter.backward_step_for(
            *decoder_and_head(lm, root), normalizer=max(1, data.scored_targets)
        )

    def scoring_started() -> None:
        counter.start_scoring()
        checkpoint.scoring_started()
        freeze_heap()

    if plan.expert_ratio is not None:
        log.info(
            "AutoQuant budget counts active weights (ModelOpt's active_moe): routed experts at %g of "
            "their weights",
            plan.expert_ratio,
        )
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        stack.enter_context(patches.modes_restored(lm.full_model, root))
        root.eval()
        quantization_formats = stack.enter_context(patches.named_custom_formats(spec.formats))
        stack.enter_context(patches.known_warnings_quieted())
        if lm.scope == "language_model":
            stack.enter_context(patches.textlm_support())
        stack.enter_context(patches.scoring_phase(scoring_started))
        stack.enter_context(patches.candidate_stats_fix())
        stack.enter_context(patches.registrations_undone())
        stack.enter_context(patches.expert_search_rules(lm.expert_grouping if lm.experts else "layer"))
        paths, setup, split = None, None, None
        if spec.fused_experts == "batched" and lm.experts:
            paths = stack.enter_context(batched_fused_experts())
            setup = stack.enter_context(fast_fused_experts_setup())
            if lm.expert_grouping != "layer":
                split = stack.enter_context(batched_split_experts())
        stack.enter_context(fsdp_lookup_skipped(root))
        stack.enter_context(patches.checked_state_load(checkpoint.loaded, checkpoint.unreadable))
        stack.enter_context(patches.atomic_state_save(checkpoint.before_replace))
        freeze_heap = stack.enter_context(patches.frozen_heap())
        stack.enter_context(seeded_rng(root))
        stack.enter_context(host_memory_kept(input_device(lm.module)))
        stack.callback(counter.remove_hooks)
        _, state = auto_quantize(
            root,
            constraints=plan.constraints,
            quantization_formats=quantization_formats,
            data_loader=data.batches,
            forward_step=counter.step,
            disabled_layers=list(plan.disabled) or None,
            num_calib_steps=steps.calib_steps,
            num_score_steps=steps.score_steps,
            verbose=False,
            checkpoint=checkpoint.modelopt_path,
            **method_args,
        )
    seconds = time.perf_counter() - started
    if paths is not None and (paths.batched or paths.fallback):
        log.info("MoE fused experts forwards: %s", paths.summary())
    if setup is not None and (setup.copied or setup.declined):
        log.info("MoE fused experts quantizer set-up: %s", setup.summary())
    if split is not None and (split.batched or split.fallback):
        log.info("MoE split experts forwards: %s", split.summary())
    log.info("AutoQuant forward steps: calibration %d, scoring %d", counter.calibration, counter.scoring)
    raw = collect_raw_scores(root) if counter.scoring else checkpoint.raw
    return SearchOutcome(state, raw, seconds, counter.calibration, counter.scoring)
