"""Every run-time change to ModelOpt, torch or the interpreter that a search needs, each undone on exit.

Each patch is a context manager that puts back exactly what it replaced (a class's own
attribute, or its absence), so nothing outlives the ``mtq.auto_quantize`` call: a second search
in the same process, or a caller using ModelOpt directly afterwards, sees ModelOpt as installed.
They reach into private names of ModelOpt 0.47; :func:`~auto_quantize_model.backend.modelopt.import_modelopt`
refuses other versions. Patching classes is process-wide while it lasts: two searches must not
run at the same time in one process (they could not share a GPU's worth of model anyway).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import gc
import glob
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from auto_quantize_model.errors import ConfigError, InputError
from auto_quantize_model.io.atomic import fsync_path

if TYPE_CHECKING:
    from torch import nn

    from auto_quantize_model.backend.experts import ExpertGrouping


@contextlib.contextmanager
def swapped(owner: Any, name: str, value: Any) -> Iterator[None]:
    """``owner.name = value`` for a while; afterwards the owner's own attribute, or its absence, is back.

    Restoring "own" matters for classes: a method inherited from a base is shadowed while patched
    and must be deleted again, not copied down onto the subclass.
    """
    own = vars(owner)
    had = name in own
    original = own.get(name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if had:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


def _classes_defining(module: Any, method: str) -> list[type]:
    """Classes of ``module`` that define ``method`` themselves (each searcher overrides its own)."""
    return [cls for cls in vars(module).values() if isinstance(cls, type) and method in vars(cls)]


# --------------------------------------------------------------------------------------------------
# Scoring TextLM like a Hugging Face model
# --------------------------------------------------------------------------------------------------


def _is_textlm(model: nn.Module) -> bool:
    from auto_quantize_model.backend.lm_forward import TextLM

    return isinstance(model, TextLM)


CHECKPOINT_ON_CPU = False
"""Checkpoint on a CPU as on a GPU. Off for the reason :func:`_textlm_checkpointing` gives; tests turn it
on to run the GPU's scoring path (a no-grad pass, then each layer recomputed in backward) on CPU."""


@contextlib.contextmanager
def _textlm_checkpointing(model: nn.Module) -> Iterator[None]:
    """Gradient checkpointing on the decoder while ModelOpt scores, switched off afterwards.

    Mirrors ModelOpt's Hugging Face support: reentrant checkpointing, checkpointed layers in
    train mode (that is when HF recomputes them) and every other module in eval mode. Not on CPU:
    there host memory holds the activations of the small models that run there (SmolLM2-135M:
    2.0 -> 5.8 GB), and the recompute made every scoring step about 25% slower with bit-identical
    scores (measured on 2 cores); a GPU's memory is what checkpointing saves.
    """
    decoder = getattr(model, "decoder", None)
    supported = bool(getattr(decoder, "supports_gradient_checkpointing", False)) and hasattr(
        decoder, "gradient_checkpointing_enable"
    )
    first = next(iter(decoder.parameters()), None) if decoder is not None else None
    on_cpu = first is not None and first.device.type == "cpu" and not CHECKPOINT_ON_CPU
    if decoder is None or not supported or on_cpu:
        try:
            yield
        finally:
            model.eval()
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


@contextlib.contextmanager
def textlm_support() -> Iterator[None]:
    """ModelOpt scores ``TextLM`` like a Hugging Face model while this lasts.

    For a model it does not recognise, gradient scoring would require grads on every parameter;
    registered here (``register_custom_support``), only the embedding needs a grad and decoder
    layers recompute in backward. Undo: our entry leaves the searcher's ``_custom_support`` list,
    which is then as it was.
    """
    from modelopt.torch.quantization.algorithms import AutoQuantizeGradientSearcher

    AutoQuantizeGradientSearcher.register_custom_support(
        _is_textlm, _textlm_checkpointing, _embedding_grad_only
    )
    try:
        yield
    finally:
        registry: list[Any] = AutoQuantizeGradientSearcher._custom_support
        for index in range(len(registry) - 1, -1, -1):
            if registry[index][0] is _is_textlm:
                del registry[index]
                break


# --------------------------------------------------------------------------------------------------
# Searcher methods wrapped for one call
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _wrap_own(
    module: Any, method: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> Iterator[None]:
    """Wrap ``method`` of every class of ``module`` that defines it itself, for the block.

    Each searcher class overrides its own copy, so each is wrapped around its own original; the
    undo puts each class's own method back (:func:`swapped`).
    """
    with contextlib.ExitStack() as stack:
        for cls in _classes_defining(module, method):
            stack.enter_context(swapped(cls, method, wrap(vars(cls)[method])))
        yield


@contextlib.contextmanager
def scoring_phase(on_start: Callable[[], None]) -> Iterator[None]:
    """Call ``on_start`` when ModelOpt starts scoring: its searchers' ``estimate_sensitivity_scores``.

    ModelOpt calls ``forward_step`` for both phases and says which only in progress bars, so the
    searchers' scoring entry point is wrapped.
    """
    from modelopt.torch.quantization import algorithms

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def estimate(self: Any, *args: Any, **kwargs: Any) -> Any:
            on_start()
            return original(self, *args, **kwargs)

        return estimate

    with _wrap_own(algorithms, "estimate_sensitivity_scores", wrap):
        yield


@contextlib.contextmanager
def candidate_stats_fix() -> Iterator[None]:
    """Scoring after a resume from a calibration-only checkpoint works (a ModelOpt 0.47 bug).

    ModelOpt keeps ``candidate_stats`` as a defaultdict but restores it from a checkpoint saved
    after calibration as a plain (empty) dict, so scoring then fails with a KeyError in
    ``initialize_candidate_stats``: the wrapper gives it its defaultdict back first.
    """
    from modelopt.torch.quantization import algorithms

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def initialize(self: Any, *args: Any, **kwargs: Any) -> Any:
            if not isinstance(self.candidate_stats, collections.defaultdict):
                self.candidate_stats = collections.defaultdict(dict, self.candidate_stats)
            return original(self, *args, **kwargs)

        return initialize

    with _wrap_own(algorithms, "initialize_candidate_stats", wrap):
        yield


# --------------------------------------------------------------------------------------------------
# Split MoE experts: grouping and score rules, and the registrations a search leaves
# --------------------------------------------------------------------------------------------------


def _scores_at_mlp(rule: object) -> bool:
    return isinstance(rule, str) and r"\.experts\.\d+\." in rule


@contextlib.contextmanager
def _new_registrations_undone(registry: Any, wrapper: type) -> Iterator[None]:
    """Afterwards, unregister every class the block registered in ModelOpt's registry as ``wrapper``."""
    before = set(registry._registry)
    try:
        yield
    finally:
        for cls, registered in list(registry._registry.items()):
            if cls not in before and registered is wrapper:
                registry.unregister(cls)


@contextlib.contextmanager
def expert_search_rules(grouping: ExpertGrouping) -> Iterator[None]:
    """ModelOpt's grouping and score rules for split experts, while a search runs; undone after.

    ``layer`` changes nothing. Otherwise our rule goes first (ModelOpt applies the first rule that
    matches a name) and the gradient searcher's rule that scores split experts at the MoE block's
    output is set aside, so each expert projection is scored at its own output, as a dense
    layer is: one extra forward of that projection per format instead of one of the whole block
    per expert and format.

    Split experts make ModelOpt register the MoE block's class, process-wide, as
    ``_QuantSparseSequentialMoe``, whose calibration iterates over the experts: a later search
    of the same class with *fused* experts (not iterable) would then fail. Registrations of that
    kind made during the search are removed again; the modules already converted keep working.
    """
    if grouping == "layer":
        yield
        return
    from modelopt.torch.quantization.algorithms import AutoQuantizeGradientSearcher, _AutoQuantizeBaseSearcher
    from modelopt.torch.quantization.nn import QuantModuleRegistry
    from modelopt.torch.quantization.plugins.huggingface import _QuantSparseSequentialMoe

    from auto_quantize_model.backend.experts import expert_group_key

    def rule(_model: nn.Module, name: str) -> str | None:
        return expert_group_key(grouping, name)

    base_rules = vars(_AutoQuantizeBaseSearcher)["quant_grouping_rules"]
    score_rules = vars(AutoQuantizeGradientSearcher)["score_module_rules"]
    kept_scores = [r for r in score_rules if not _scores_at_mlp(r)]
    with (
        swapped(_AutoQuantizeBaseSearcher, "quant_grouping_rules", [rule, *base_rules]),
        swapped(AutoQuantizeGradientSearcher, "score_module_rules", kept_scores),
        _new_registrations_undone(QuantModuleRegistry, _QuantSparseSequentialMoe),
    ):
        yield


@contextlib.contextmanager
def registrations_undone() -> Iterator[None]:
    """Every class ModelOpt registers for quantization during a search is unregistered afterwards.

    ModelOpt registers model classes on the fly, process-wide, when it converts a model (a Hugging
    Face model's attention classes for KV-cache quantization, fused experts, split MoE blocks).
    Left behind, they change what a later conversion in the same process does: after a
    ``full_model`` search, a ``language_model`` search of the same architecture also converts its
    attention modules, whose extra ``bmm_quantizer`` keys then fail an in-process resume. The
    modules converted meanwhile keep working (they are instances of ModelOpt's classes), and a
    later conversion or restore registers what it needs again. Undo: the registry holds the
    classes it held before.
    """
    from modelopt.torch.quantization.nn import QuantModuleRegistry

    before = set(QuantModuleRegistry._registry)
    try:
        yield
    finally:
        for cls in list(QuantModuleRegistry._registry):
            if cls not in before:
                QuantModuleRegistry.unregister(cls)


class StateNotSaved(InputError):
    """The search state could not be written for want of room; the message says what is kept."""


NO_ROOM = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file-size limit stops it (ulimit -f, or the file system's largest file)",
}
"""OS errors that more room (or a higher limit) cures, and how the message says so."""


def _no_room(err: BaseException) -> int | None:
    """The errno of the out-of-room OS error behind ``err`` (torch wraps it in a RuntimeError of
    its own, with the OS error as its context), or None."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in NO_ROOM:
            return current.errno
        current = current.__cause__ or current.__context__
    return None


def state_not_saved(real: Path, err: BaseException, had_state: bool) -> StateNotSaved | None:
    """The one-line error for a save of ``real`` that ran out of room, or None for any other failure.

    The temporary file is gone by then and ``real`` was never touched, which is what the message
    promises.
    """
    code = _no_room(err)
    if code is None:
        return None
    kept = (
        "the file still holds the previous state, so a rerun resumes from it"
        if had_state
        else "no earlier state was saved, so a rerun starts the search again"
    )
    return StateNotSaved(
        f"cannot save the search state {real}: {NO_ROOM[code]} ({os.strerror(code)}); {kept} once there "
        "is room (nothing half-written is left)"
    )


def _new_file(path: Path) -> BinaryIO:
    return path.open("wb")


@contextlib.contextmanager
def atomic_state_save(
    before_replace: Callable[[Any, Path, Path], None], open_file: Callable[[Path], BinaryIO] = _new_file
) -> Iterator[None]:
    """ModelOpt's search state is written to a temporary file and renamed over the real one.

    ModelOpt 0.47 ``torch.save``s straight onto the checkpoint path, so a kill or a full disk
    mid-write leaves a truncated file that every later resume fails on. Here ModelOpt's own save
    runs with the path pointed at a temporary file beside the real one; the file is fsync'ed,
    ``before_replace(searcher, real, temporary)`` runs (it writes files that must describe this
    very state, before the state becomes visible), then ``os.replace`` makes it the state at once.

    The bytes go through a Python file (``open_file``; tests pass one that runs out of room):
    ``torch.save`` onto a path writes from C++ and loses the OS's reason, so a full disk read
    ``[enforce fail at inline_container.cc] ... unexpected pos``; through a Python file the
    ``OSError`` stays attached, and running out of room becomes :class:`StateNotSaved`, one line
    naming the file. Undo: ``BaseSearcher.save_search_checkpoint`` and the searcher module's
    ``safe_save`` are put back.
    """
    from modelopt.torch.opt import searcher as searcher_module
    from modelopt.torch.opt.searcher import BaseSearcher

    original = vars(BaseSearcher)["save_search_checkpoint"]
    write = searcher_module.safe_save

    def through_python_file(obj: Any, target: str, **kwargs: Any) -> None:
        with open_file(Path(target)) as handle:
            write(obj, handle, **kwargs)
            handle.flush()
            os.fsync(handle.fileno())

    def save(self: Any, verbose: bool = False) -> None:
        path = self._get_checkpoint_path()
        if path is None:
            return
        real = Path(path)
        real.parent.mkdir(parents=True, exist_ok=True)
        temporary = temporary_beside(real)
        had_state = real.exists()
        config = self.config
        configured = config["checkpoint"]
        config["checkpoint"] = str(temporary)
        try:
            original(self, verbose=verbose)
            before_replace(self, real, temporary)
            temporary.replace(real)
        except BaseException as err:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
            failure = state_not_saved(real, err, had_state)
            if failure is not None:
                raise failure from err
            raise
        finally:
            config["checkpoint"] = configured
        fsync_path(real.parent)

    with (
        swapped(BaseSearcher, "save_search_checkpoint", save),
        swapped(searcher_module, "safe_save", through_python_file),
    ):
        yield


def temporary_beside(real: Path, pid: int | None = None) -> Path:
    """Where :func:`atomic_state_save` has ModelOpt write before the rename (one per process)."""
    return real.with_name(f".{real.name}.{os.getpid() if pid is None else pid}.tmp.pt")


def temporaries_beside(real: Path) -> list[Path]:
    """Temporary states a killed process may have left beside ``real``."""
    return sorted(real.parent.glob(f".{glob.escape(real.name)}.*.tmp.pt"))


@contextlib.contextmanager
def checked_state_load(
    on_loaded: Callable[[Any, bool], None], on_unreadable: Callable[[Path, BaseException], None]
) -> Iterator[None]:
    """A search state that cannot be read is handed to ``on_unreadable`` and the search starts fresh.

    ModelOpt 0.47 fails the whole call (``EOFError``, a zip or unpickling error) when the file it
    would resume from is truncated or garbage, so a folder with such a file could never be
    resumed. Wrapped, a failed load calls ``on_unreadable(path, error)`` (which moves the file
    aside), resets the searcher to its defaults and reports "nothing loaded"; every load then
    calls ``on_loaded(searcher, loaded)`` once, which may still drop restored parts it cannot trust.
    AutoQuant's searchers override the method and call ``BaseSearcher``'s, so both are wrapped;
    only the outermost call of a searcher handles failures and reports (otherwise every fresh
    start would be announced twice). Undo: each class's own method is put back.
    """
    from modelopt.torch.opt.searcher import BaseSearcher
    from modelopt.torch.quantization import algorithms

    loading: set[int] = set()
    """Searchers (by id) inside a wrapped load: a nested ``super()`` call runs unwrapped."""

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def load(self: Any, *args: Any, **kwargs: Any) -> bool:
            if id(self) in loading:
                return bool(original(self, *args, **kwargs))
            loading.add(id(self))
            try:
                loaded = bool(original(self, *args, **kwargs))
            except Exception as err:
                path = self._get_checkpoint_path()
                on_unreadable(Path(path if path is not None else self.config["checkpoint"]), err)
                self.reset_search()
                loaded = False
            finally:
                loading.discard(id(self))
            on_loaded(self, loaded)
            return loaded

        return load

    owners = [BaseSearcher, *_classes_defining(algorithms, "load_search_checkpoint")]
    with contextlib.ExitStack() as stack:
        for cls in dict.fromkeys(owners):
            original = vars(cls)["load_search_checkpoint"]
            stack.enter_context(swapped(cls, "load_search_checkpoint", wrap(original)))
        yield


# --------------------------------------------------------------------------------------------------
# Model modes, the collector, ModelOpt's config module, its warnings
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def modes_restored(*models: nn.Module) -> Iterator[None]:
    """Every module's train/eval flag and gradient checkpointing as they were before ModelOpt ran.

    ModelOpt's Hugging Face support switches gradient checkpointing on for scoring and leaves it
    on, with checkpointed layers in train mode (it also restores the model's train flag only at
    the root). Undo: checkpointing that was off is switched off again, and each module's own
    ``training`` flag is put back (not ``.eval()``: a caller's mix is kept as it was).
    """
    modules = {id(m): m for model in models for m in model.modules()}
    training = {key: module.training for key, module in modules.items()}
    checkpointing = {
        key: bool(getattr(module, "is_gradient_checkpointing", False)) for key, module in modules.items()
    }
    try:
        yield
    finally:
        for key, module in modules.items():
            disable = getattr(module, "gradient_checkpointing_disable", None)
            now_on = bool(getattr(module, "is_gradient_checkpointing", False))
            if now_on and not checkpointing[key] and callable(disable):
                disable()
        for key, module in modules.items():
            module.training = training[key]


@contextlib.contextmanager
def frozen_heap() -> Iterator[Callable[[], None]]:
    """Keep the objects that exist now out of the garbage collector's passes for a while.

    ModelOpt runs two full ``gc.collect()`` passes around scoring to free GPU memory. Each walks
    every object of the process (torch, transformers and ModelOpt with all they import, the
    model's modules), a fixed cost paid whatever the data. Same-process A/B
    (``benchmarks/frozen_heap_ab.py``, BENCHMARKS.md): 2.29 -> 1.56 s for the tiny model on CPU;
    within noise for a packed 4B run on an H100 host (3.00 vs 2.99 s). What those passes are for
    (tensors left over from calibration) is created after this point and stays collectable.

    The callable it yields freezes what exists by then too: the search calls it when scoring
    starts, since the quantizers ModelOpt inserted meanwhile (75,846 on Qwen3-VL-30B-A3B, with
    their modules and configs) are what made those two passes cost 2.2 s there (H100 profile).
    Undo: every frozen object goes back to the collector. A process that froze its heap itself is
    left as it is, since unfreezing would undo its freeze (the callable then does nothing).
    """
    if gc.get_freeze_count():
        yield _nothing
        return
    gc.freeze()
    try:
        yield gc.freeze
    finally:
        gc.unfreeze()


def _nothing() -> None:
    """A freeze that leaves a caller's own frozen heap as it is."""


@contextlib.contextmanager
def named_custom_formats(names: Sequence[str]) -> Iterator[list[Any]]:
    """The ``quantization_formats`` list, with our custom formats known to ModelOpt by name.

    ModelOpt labels a config dict it does not know ``CUSTOM_<i>``, and that label sticks to its
    recipe objects (the scores, the reports, ValidateSensitivity's format switch). Registered for
    the duration of the call as attributes of ModelOpt's config module (and in its ``choices``),
    our formats are looked up by name like presets, so every label carries our name. Undo: the
    attributes and choices added are removed.
    """
    import modelopt.torch.quantization.config as mtq_config

    from auto_quantize_model.backend.modelopt.formats import modelopt_config

    added: list[str] = []
    entries: list[Any] = []
    try:
        for name in names:
            config = modelopt_config(name)
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


QUIETED_WARNINGS = (
    # ModelOpt's searcher on every fresh start (no file at the checkpoint path yet): we log
    # "no saved search state at X, starting fresh" instead. A leading ANSI colour code is
    # allowed, as ModelOpt colours the text when stderr is a terminal.
    r".*Per-rank checkpoint .* not found, falling back to ",
    r".*Checkpoint .* does not exist! Initializing from scratch",
    # Its Hugging Face support announcing checkpointing that modes_restored switches off again.
    r".*AutoQuantize: Huggingface model detected - Enabling gradient checkpointing",
)


@contextlib.contextmanager
def known_warnings_quieted() -> Iterator[None]:
    """ModelOpt's warnings that describe normal operation, hidden; every other warning still shows.

    Undo: the interpreter's warning filters are restored (``warnings.catch_warnings``).
    """
    with warnings.catch_warnings():
        for pattern in QUIETED_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        yield


@contextlib.contextmanager
def pytorch_fake_quant() -> Iterator[None]:
    """ModelOpt's plain-PyTorch fake quantization on CUDA for a while, its CUDA extensions left unbuilt.

    ModelOpt JIT-builds its extensions the first time a quantizer runs on a GPU (about a minute per
    fresh machine) and falls back to PyTorch ops when they are missing, as on CPU. Its loaders cache
    their result on the function object (``get_cuda_ext.extension``); a cached None is "failed to
    load", so the fallback runs and no build starts. An extension already loaded comes back afterwards.
    MX formats have no fallback (ModelOpt raises) and are left alone.
    """
    from auto_quantize_model.backend.modelopt import import_modelopt

    extensions = import_modelopt("modelopt.torch.quantization.extensions")
    with contextlib.ExitStack() as stack:
        for loader in ("get_cuda_ext", "get_cuda_ext_fp8"):
            stack.enter_context(swapped(getattr(extensions, loader), "extension", None))
        yield


def fake_quant_kernels(kernels: str) -> contextlib.AbstractContextManager[None]:
    """The fake-quantization kernels a run chose (``autoquant.kernels``), for every stage that
    fake-quantizes after its search: validation, measured frontier points and the export measure
    with the arithmetic the scores came from, and a run on ``pytorch`` never starts the JIT build."""
    return pytorch_fake_quant() if kernels == "pytorch" else contextlib.nullcontext()
