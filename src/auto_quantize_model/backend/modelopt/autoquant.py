"""Stage 4, ``RunAutoQuant``: ModelOpt's AutoQuant on the language model, reduced to plain scores.

What ModelOpt does in ``mtq.auto_quantize`` (0.47), and what this stage adds around it:

* Calibration: for each format, ``num_calib_steps`` leading batches of the loader. Scoring:
  ``num_score_steps`` leading batches again (the loader restarts from its first batch). Sizes are
  given in captions here and turned into leading batches with :func:`leading_steps`, so the same
  settings mean the same text in the packed and padded layouts.
* ``scope="language_model"`` runs on :class:`~auto_quantize_model.backend.lm_forward.TextLM` (decoder +
  lm_head under one root); ``scope="full_model"`` runs on the whole VLM with the vision modules
  disabled. Disabled groups are costed by ModelOpt at 16 bits and would dilute the budget, so
  the constraint passed is raised until the LM alone meets the user's target
  (:func:`model_constraint`); both effective-bits figures are reported.
* ModelOpt enables gradient checkpointing on Hugging Face models while scoring and leaves it on,
  and leaves modules in train mode: both are undone here. For ``TextLM`` (not an HF model)
  ModelOpt would require grads on every parameter; :func:`register_textlm_support` gives it the
  HF treatment instead (only the embedding needs grad; decoder layers recompute in backward).
* ``checkpoint=``: ModelOpt loads the file at the start of the search when it exists, saves
  after calibrating any format not restored from it (calibration state per format), and saves
  again after scoring (``candidate_stats``). A rerun with the file therefore skips the
  calibration of every format already saved, and skips scoring entirely once scores are saved;
  only the cheap format search runs again. ModelOpt refuses a file whose method, formats or
  recipe groups differ, but not one made with other data or step counts: a settings record
  next to it (``<checkpoint>.settings.json``) closes that gap.
"""

from __future__ import annotations

import collections
import contextlib
import fnmatch
import gc
import importlib
import itertools
import logging
import math
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import attrs

from auto_quantize_model.artifacts import GroupScore, LanguageModel
from auto_quantize_model.core import formats as fmt
from auto_quantize_model.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn


log = logging.getLogger("auto_quantize_model")

RECIPE_SUFFIX = ".quant_recipe"
NO_QUANT = "NONE"
_LABEL = re.compile(r"^(?P<name>.*?)\s*\(effective-bits:\s*(?P<bits>[^()]*)\)\s*$")
STATE_FILE = "autoquant_state.pt"
SETTINGS_SUFFIX = ".settings.json"


# --------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------


def leading_steps(captions_per_batch: Sequence[int], size: int | None) -> tuple[int, int]:
    """Fewest leading batches holding at least ``size`` captions: ``(batches, captions)``.

    ModelOpt always reads the loader from its first batch, so "the first N batches" is the only
    subset it can be given. ``None`` means every batch; a size beyond the data uses every batch.
    """
    if size is None:
        return len(captions_per_batch), sum(captions_per_batch)
    covered = 0
    for steps, count in enumerate(captions_per_batch, start=1):
        covered += count
        if covered >= size:
            return steps, covered
    return len(captions_per_batch), covered


def caption_segments(
    position_ids: Sequence[int], input_ids: Sequence[int], pad_id: int
) -> list[tuple[int, int]]:
    """``(start, end)`` of every caption in one row; padding segments are left out.

    A caption starts wherever positions restart at 0 (packed rows hold several, padded rows one
    whose padding continues its positions). A segment made only of pad tokens is padding.
    """
    starts = [i for i, pos in enumerate(position_ids) if pos == 0]
    bounds = [*starts, len(position_ids)]
    return [
        (start, end)
        for start, end in itertools.pairwise(bounds)
        if any(token != pad_id for token in input_ids[start:end])
    ]


def limit_scored_captions(
    batches: Sequence[dict[str, torch.Tensor]],
    captions_per_batch: Sequence[int],
    score_steps: int,
    score_size: int,
    pad_id: int,
) -> tuple[list[dict[str, torch.Tensor]], int]:
    """Score exactly ``score_size`` captions even when a packed batch holds hundreds.

    The last scoring batch gets ``-100`` labels on the captions past ``score_size``: the loss (and
    the kl_div logits) skip them, and since attention never crosses a caption boundary they leave
    the other captions' outputs untouched. Only the scoring phase gets these copies (calibration
    keeps every caption). Returns the batches and the captions scored.
    """
    out = list(batches)
    before = sum(captions_per_batch[: score_steps - 1])
    keep = score_size - before
    last = score_steps - 1
    if last < 0 or keep >= captions_per_batch[last]:
        return out, min(score_size, sum(captions_per_batch[:score_steps]))
    batch = dict(out[last])
    labels = batch["labels"].clone()
    positions = batch["position_ids"].tolist()
    tokens = batch["input_ids"].tolist()
    seen = 0
    for row, (row_pos, row_ids) in enumerate(zip(positions, tokens, strict=True)):
        for start, end in caption_segments(row_pos, row_ids, pad_id):
            if seen >= keep:
                labels[row, start:end] = -100
            seen += 1
    batch["labels"] = labels
    out[last] = batch
    return out, score_size


def model_constraint(target_bits: float, lm_weights: int, other_weights: int) -> float:
    """The effective-bits constraint over every costed weight that holds the LM at ``target_bits``.

    ModelOpt's budget is ``sum(cost) <= bits / 16 * sum(weights)`` over all groups, and the
    ``other_weights`` (disabled vision layers) always cost 16 bits each.
    """
    total = lm_weights + other_weights
    if total <= 0:
        raise ValueError("no weights to quantize")
    return (target_bits * lm_weights + 16.0 * other_weights) / total


def parse_label(label: str) -> tuple[str, float]:
    """``"INT8_DEFAULT_CFG(effective-bits: 8.0)"`` -> ``("INT8_DEFAULT_CFG", 8.0)``."""
    match = _LABEL.match(label)
    if match is None:
        raise ValueError(f"unexpected ModelOpt recipe label {label!r}")
    return match["name"], float(match["bits"])


def _number(value: Any) -> float:
    """A float from a Python number or a one-element tensor (ModelOpt stores both)."""
    item = getattr(value, "item", None)
    return float(item() if callable(item) else value)


def textlm_name_map(prefix: str, head_name: str) -> Callable[[str], str]:
    """Maps module names inside ``TextLM`` (``decoder.*``, ``lm_head``) to full-model names."""

    def full_name(name: str) -> str:
        if name == "lm_head" or name.startswith("lm_head."):
            return head_name + name.removeprefix("lm_head")
        if name == "decoder":
            return prefix
        if name.startswith("decoder."):
            rest = name.removeprefix("decoder.")
            return f"{prefix}.{rest}" if prefix else rest
        return name

    return full_name


def lm_membership(prefix: str, head_name: str) -> Callable[[str], bool]:
    """Whether a full-model module name belongs to the language model (decoder or head)."""

    def is_lm(name: str) -> bool:
        if name == head_name or name.startswith(head_name + "."):
            return True
        return not prefix or name == prefix or name.startswith(prefix + ".")

    return is_lm


@attrs.frozen
class StateSummary:
    """ModelOpt's search state as plain numbers, split into the LM part and the whole."""

    groups: tuple[GroupScore, ...]
    """LM groups that had at least one format to choose from, in ModelOpt's order."""
    disabled: tuple[str, ...]
    """LM groups ModelOpt could only leave unquantized (``disabled_layers``); costed at 16 bits."""
    other: tuple[str, ...]
    """Groups outside the language model (vision), all of them costed too."""
    effective_bits_lm: float
    effective_bits_model: float
    total_score: float
    satisfied: bool
    method: str
    lm_weights: float
    other_weights: float
    nonfinite: tuple[str, ...]
    """LM groups with a NaN or infinite score for some format."""


def scores_from_state(
    state: Mapping[str, Any],
    name_map: Callable[[str], str] = lambda name: name,
    is_lm: Callable[[str], bool] = lambda name: True,
    raw_scores: Mapping[str, Mapping[str, float]] | None = None,
) -> StateSummary:
    """Convert ``mtq.auto_quantize``'s returned state into plain :class:`GroupScore` tuples.

    ``state["candidate_stats"]`` maps ``"<module>.quant_recipe"`` to ``formats`` (recipe objects
    whose ``str()`` is ``"NAME(effective-bits: B)"``), ``scores``, ``costs`` (weights x bits/16),
    ``module_names`` and, in 0.47, ``uncompressed_cost``; ``state["best"]`` holds the chosen
    ``recipe`` per key, ``constraints.effective_bits``, ``score`` and ``is_satisfied``.
    ``name_map`` turns the names ModelOpt saw into full-model names; ``is_lm`` (on mapped names)
    says which groups belong to the language model: only those are returned as groups, but every
    group counts toward the whole-model effective bits. Nothing here needs torch or ModelOpt.

    ``raw_scores`` (``"<module>.quant_recipe"`` -> format label -> score) replaces the scores of
    ``candidate_stats``, which ModelOpt clamps so that no format scores above a cheaper-or-equal
    one listed before it (``min(score, previous)``): that hides non-monotone formats and gives a
    second same-bit format (FP8 after INT8) the first one's score. The search result still comes
    from the clamped scores, as ModelOpt ran it.
    """
    stats: Mapping[str, Mapping[str, Any]] = state["candidate_stats"]
    best: Mapping[str, Any] = state.get("best", {})
    chosen: Mapping[str, Any] = best.get("recipe", {})

    groups: list[GroupScore] = []
    disabled: list[str] = []
    other: list[str] = []
    nonfinite: list[str] = []
    lm_cost = lm_weights = all_cost = all_weights = 0.0
    for key, entry in stats.items():
        name = name_map(key.removesuffix(RECIPE_SUFFIX))
        modules = tuple(name_map(m) for m in entry.get("module_names", ())) or (name,)
        labels = [parse_label(str(recipe)) for recipe in entry["formats"]]
        names = tuple(label for label, _ in labels)
        costs = tuple(_number(c) for c in entry["costs"])
        scores = tuple(_number(s) for s in entry["scores"])
        raw = (raw_scores or {}).get(key)
        if raw is not None and all(str(recipe) in raw for recipe in entry["formats"]):
            scores = tuple(_number(raw[str(recipe)]) for recipe in entry["formats"])
        if "uncompressed_cost" in entry:
            weights = _number(entry["uncompressed_cost"])
        else:
            weights = costs[names.index(NO_QUANT)]
        picked = chosen.get(key)
        best_name = parse_label(str(picked))[0] if picked is not None else NO_QUANT
        best_cost = costs[names.index(best_name)] if best_name in names else weights
        all_cost += best_cost
        all_weights += weights
        if not all(is_lm(m) for m in modules):
            other.append(name)
            continue
        lm_cost += best_cost
        lm_weights += weights
        if all(label == NO_QUANT for label in names):
            disabled.append(name)
            continue
        if not all(math.isfinite(s) for s, label in zip(scores, names, strict=True) if label != NO_QUANT):
            nonfinite.append(name)
        groups.append(
            GroupScore(
                name=name,
                module_names=modules,
                formats=names,
                bits=tuple(bits for _, bits in labels),
                scores=scores,
                costs=costs,
                best_format=best_name,
            )
        )

    constraints = best.get("constraints", {})
    if "effective_bits" in constraints:
        bits_model = _number(constraints["effective_bits"])
    else:
        bits_model = 16.0 * all_cost / all_weights if all_weights else math.nan
    score = best.get("score")
    total = _number(score) if score is not None else math.nan
    if math.isinf(total) and not chosen:
        total = math.nan  # ModelOpt's "no search ran" default
    return StateSummary(
        groups=tuple(groups),
        disabled=tuple(disabled),
        other=tuple(other),
        effective_bits_lm=16.0 * lm_cost / lm_weights if lm_weights else math.nan,
        effective_bits_model=bits_model,
        total_score=total,
        satisfied=bool(best.get("is_satisfied", False)),
        method=str(state.get("method", "")),
        lm_weights=lm_weights,
        other_weights=all_weights - lm_weights,
        nonfinite=tuple(nonfinite),
    )


def nonfinite_message(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
    return (
        f"AutoQuant produced NaN or infinite sensitivity scores for {len(names)} recipe group(s): {shown}; "
        "the forward/backward pass overflowed (try float32 or bfloat16, or fewer/shorter captions), "
        "or set autoquant.allow_nonfinite = true to keep going"
    )


def checkpoint_file(path: str) -> str:
    """The file ModelOpt really uses for ``checkpoint=path`` (a folder gets ``rank0.pth``)."""
    if Path(path).is_dir() or path.endswith(os.sep) or not Path(path).suffix:
        return str(Path(path) / "rank0.pth")
    return path


def settings_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ between two settings records, as ``key: old -> new``."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


# --------------------------------------------------------------------------------------------------
# ModelOpt glue
# --------------------------------------------------------------------------------------------------


_registered = False


def _is_textlm(model: nn.Module) -> bool:
    from auto_quantize_model.backend.lm_forward import TextLM

    return isinstance(model, TextLM)


@contextlib.contextmanager
def _textlm_checkpointing(model: nn.Module) -> Iterator[None]:
    """Gradient checkpointing on the decoder while ModelOpt scores, switched off afterwards.

    Mirrors ModelOpt's Hugging Face support: reentrant checkpointing, checkpointed layers in
    train mode (that is when HF recomputes them) and every other module in eval mode.
    """
    decoder = getattr(model, "decoder", None)
    supported = bool(getattr(decoder, "supports_gradient_checkpointing", False)) and hasattr(
        decoder, "gradient_checkpointing_enable"
    )
    if decoder is None or not supported:
        yield
        return
    was_on = bool(getattr(decoder, "is_gradient_checkpointing", False))
    decoder.gradient_checkpointing_enable({"use_reentrant": True})
    for module in decoder.modules():
        module.training = hasattr(module, "gradient_checkpointing")
    try:
        yield
    finally:
        if not was_on:
            decoder.gradient_checkpointing_disable()
        model.eval()


def _embedding_grad_only(param_name: str, model: nn.Module) -> bool:
    # A grad on the embedding output makes autograd reach every layer's output, which is all
    # the score needs; weight gradients of the other layers would only cost memory.
    return "embed" in param_name


def register_textlm_support() -> None:
    """Let ModelOpt score ``TextLM`` like a Hugging Face model (idempotent, process-wide)."""
    global _registered
    if _registered:
        return
    from modelopt.torch.quantization.algorithms import AutoQuantizeGradientSearcher

    AutoQuantizeGradientSearcher.register_custom_support(
        _is_textlm, _textlm_checkpointing, _embedding_grad_only
    )
    _registered = True


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep the objects that exist now out of the garbage collector's passes for a while.

    ModelOpt runs two full ``gc.collect()`` passes around scoring to free GPU memory. Each walks
    every object of the process (torch, transformers and ModelOpt with all they import, the
    model's modules), a fixed cost paid whatever the data. Same-process A/B
    (``tests/bench/frozen_heap_ab.py``, BENCHMARKS.md): 2.29 -> 1.56 s for the tiny model on CPU;
    within noise for a packed 4B run on an H100 host (3.00 vs 2.99 s). What those passes are for
    (tensors left over from calibration) is created after this point and stays collectable; the
    frozen objects go back to the collector afterwards. A process that froze its heap itself is
    left as it is, since unfreezing would undo its freeze.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def _named_custom_formats(names: Sequence[str]) -> Iterator[list[Any]]:
    """The ``quantization_formats`` list, with our custom formats known to ModelOpt by name.

    ModelOpt labels a config dict it does not know ``CUSTOM_<i>``, and that label sticks to its
    recipe objects (the scores, the reports, ValidateSensitivity's format switch). Registered for
    the duration of the call as attributes of ModelOpt's config module, our formats are looked up
    by name like presets, so every label carries our name.
    """
    import modelopt.torch.quantization.config as mtq_config

    added: list[str] = []
    entries: list[Any] = []
    try:
        for name in names:
            config = fmt.modelopt_config(name)
            if isinstance(config, dict):
                if hasattr(mtq_config, name):
                    raise ConfigError(f"format {name} clashes with a ModelOpt attribute of the same name")
                setattr(mtq_config, name, config)
                mtq_config.choices.add(name)
                added.append(name)
            entries.append(name)
        yield entries
    finally:
        for name in added:
            mtq_config.choices.discard(name)
            delattr(mtq_config, name)


def _quantizable_weights(root: nn.Module, skip: Callable[[str], bool]) -> int:
    """Weights of the layers ModelOpt costs (linear and convolution), outside ``skip``."""
    from torch import nn

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d)
    total = 0
    for name, module in root.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, kinds) and weight is not None and not skip(name):
            total += int(weight.numel())
    return total


def _matching_layers(root: nn.Module, name_map: Callable[[str], str], patterns: Sequence[str]) -> list[str]:
    """Names inside ``root`` of the layers whose full-model name matches a user pattern.

    Users write full-model names; inside ``TextLM`` ModelOpt sees ``decoder.*``, so patterns are
    resolved here into exact names rather than handed to ModelOpt as they are.
    """
    matched: list[str] = []
    unused = list(patterns)
    for name, _ in root.named_modules():
        hits = [p for p in patterns if name and fnmatch.fnmatchcase(name_map(name), p)]
        if hits:
            matched.append(name)
            unused = [p for p in unused if p not in hits]
    for pattern in unused:
        log.warning("autoquant.disabled_layers: %r matches no layer of the language model", pattern)
    return matched


def _input_device(lm: LanguageModel) -> torch.device:
    embeddings = getattr(lm.module, "get_input_embeddings", None)
    if callable(embeddings):
        with contextlib.suppress(Exception):
            found = embeddings()
            weight = getattr(found, "weight", None)
            if weight is not None:
                return cast("torch.device", weight.device)
    return next(lm.module.parameters()).device


def _to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def _turn_off_checkpointing(model: nn.Module) -> None:
    """Undo what ModelOpt leaves behind on HF models: checkpointing on, layers in train mode."""
    for module in model.modules():
        disable = getattr(module, "gradient_checkpointing_disable", None)
        if getattr(module, "is_gradient_checkpointing", False) and callable(disable):
            disable()
    model.eval()


class ForwardCounter:
    """Counts ModelOpt's calls of ``forward_step``, split into calibration and scoring.

    The counts prove what a resumed run skipped (restored calibration runs no calibration step,
    restored scores no scoring step). Mutable on purpose: it lives only for one stage call.
    """

    def __init__(
        self,
        forward_step: Callable[[nn.Module, Any], Any],
        score_view: Mapping[int, Any] | None = None,
        calibration_step: Callable[[nn.Module, Any], Any] | None = None,
    ) -> None:
        self._forward_step = forward_step
        self._calibration_step = calibration_step
        self._score_view = dict(score_view or {})
        self.scoring_started = False
        self.calibration = 0
        self.scoring = 0
        self._release_hooks: list[Any] = []

    def step(self, model: nn.Module, batch: Any) -> Any:
        if self.scoring_started:
            self.scoring += 1
            if not self._release_hooks:
                self._release_hooks = release_output_diffs(model)
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
                self._release_hooks = release_output_diffs(model)
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


RAW_SCORES_SUFFIX = ".raw-scores.json"


def collect_raw_scores(root: nn.Module) -> dict[str, dict[str, float]]:
    """Each recipe group's unclamped score per format, read from ModelOpt's hparams.

    Only meaningful right after scoring ran in this process: a search restored from a
    checkpoint has no per-module importances (use the sidecar file written then).
    """
    from modelopt.torch.opt.utils import named_hparams
    from modelopt.torch.quantization.algorithms import QuantRecipeHparam

    raw: dict[str, dict[str, float]] = {}
    for name, hparam in named_hparams(root, configurable=True, unique=True):
        if isinstance(hparam, QuantRecipeHparam):
            raw[name] = {str(recipe): float(hparam.get_score(recipe)) for recipe in hparam.choices}
    return raw


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


def import_off_stack(name: str) -> Any:
    """Import ``name`` on a short-lived thread and return the module.

    Importing ModelOpt imports pulp, whose solver probes keep a traceback from import time. Its
    frames' ``f_back`` chain would pin the importing caller's locals (here: the whole model) for
    the life of the process, so a second model loaded in the same process would sit next to the
    first on the GPU. A fresh thread's stack has no caller frames to pin.
    """
    found: dict[str, Any] = {}

    def target() -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is not tested with current version of modelopt.*")
            found["module"] = importlib.import_module(name)

    thread = threading.Thread(target=target, name=f"import {name}")
    thread.start()
    thread.join()
    if "module" not in found:  # the import failed: repeat it here so its error surfaces normally
        return importlib.import_module(name)
    return found["module"]


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


@contextlib.contextmanager
def _scoring_phase(counter: ForwardCounter) -> Iterator[None]:
    """Tell ``counter`` when ModelOpt starts scoring: its searchers' ``estimate_sensitivity_scores``.

    ModelOpt calls ``forward_step`` for both phases and says which only in progress bars, so the
    searchers' scoring entry point is wrapped for the duration of the call.
    """
    from modelopt.torch.quantization import algorithms

    classes = [
        cls
        for cls in vars(algorithms).values()
        if isinstance(cls, type) and "estimate_sensitivity_scores" in vars(cls)
    ]
    originals = {cls: vars(cls)["estimate_sensitivity_scores"] for cls in classes}

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def estimate(self: Any, *args: Any, **kwargs: Any) -> Any:
            counter.scoring_started = True
            return original(self, *args, **kwargs)

        return estimate

    # ModelOpt 0.47 keeps ``candidate_stats`` as a defaultdict but restores it from a checkpoint
    # saved after calibration as a plain (empty) dict, so scoring after such a resume fails with
    # a KeyError in ``initialize_candidate_stats``: give it its defaultdict back first.
    fillers = {
        cls: vars(cls)["initialize_candidate_stats"]
        for cls in vars(algorithms).values()
        if isinstance(cls, type) and "initialize_candidate_stats" in vars(cls)
    }

    def with_defaultdict(original: Callable[..., Any]) -> Callable[..., Any]:
        def initialize(self: Any, *args: Any, **kwargs: Any) -> Any:
            if not isinstance(self.candidate_stats, collections.defaultdict):
                self.candidate_stats = collections.defaultdict(dict, self.candidate_stats)
            return original(self, *args, **kwargs)

        return initialize

    for cls, original in originals.items():
        setattr(cls, "estimate_sensitivity_scores", wrap(original))  # noqa: B010
    for cls, original in fillers.items():
        setattr(cls, "initialize_candidate_stats", with_defaultdict(original))  # noqa: B010
    try:
        yield
    finally:
        for cls, original in originals.items():
            setattr(cls, "estimate_sensitivity_scores", original)  # noqa: B010
        for cls, original in fillers.items():
            setattr(cls, "initialize_candidate_stats", original)  # noqa: B010


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------
