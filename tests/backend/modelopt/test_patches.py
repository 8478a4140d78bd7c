"""Patches on ModelOpt that undo themselves, the frozen heap, and the searcher's state file writes."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from auto_quantize_model.backend.modelopt.patches import frozen_heap, modes_restored, swapped

# --------------------------------------------------------------------------------------------------
# Patches without ModelOpt
# --------------------------------------------------------------------------------------------------


class _Base:
    def method(self) -> str:
        return "base"


class _Sub(_Base):
    def own(self) -> str:
        return "own"


def test_swapped_restores_an_own_attribute_and_removes_a_shadowing_one() -> None:
    own = vars(_Sub)["own"]
    with swapped(_Sub, "method", lambda self: "patched"), swapped(_Sub, "own", lambda self: "patched"):
        assert _Sub().method() == _Sub().own() == "patched"
    assert "method" not in vars(_Sub)  # not copied down from the base
    assert vars(_Sub)["own"] is own
    assert _Sub().method() == "base"


def test_swapped_restores_even_when_the_body_fails() -> None:
    module = SimpleNamespace(value=1)
    with pytest.raises(RuntimeError), swapped(module, "value", 2):
        raise RuntimeError("boom")
    assert module.value == 1


class _Checkpointable:
    """Stands in for a Hugging Face model: a checkpointing flag and its off switch."""

    def __init__(self, training: bool, children: tuple[Any, ...] = ()) -> None:
        self.training = training
        self.is_gradient_checkpointing = False
        self._children = children

    def modules(self) -> Iterator[Any]:
        yield self
        for child in self._children:
            yield from child.modules()

    def gradient_checkpointing_enable(self) -> None:
        self.is_gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.is_gradient_checkpointing = False


def test_modes_restored_undoes_what_modelopt_switches_on() -> None:
    layer_a, layer_b = _Checkpointable(training=False), _Checkpointable(training=True)
    model = _Checkpointable(training=False, children=(layer_a, layer_b))
    already = _Checkpointable(training=False)
    already.gradient_checkpointing_enable()  # the caller's own choice stays
    with modes_restored(model, already):  # type: ignore[arg-type]
        for module in (model, layer_a, layer_b, already):
            module.gradient_checkpointing_enable()
            module.training = True
    assert [m.training for m in (model, layer_a, layer_b, already)] == [False, False, True, False]
    assert not model.is_gradient_checkpointing
    assert not layer_a.is_gradient_checkpointing
    assert already.is_gradient_checkpointing


# --------------------------------------------------------------------------------------------------
# Patches of ModelOpt itself (imports ModelOpt: slow)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def modelopt() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from modelopt.torch.opt import searcher
        from modelopt.torch.quantization import algorithms

    return SimpleNamespace(searcher=searcher, algorithms=algorithms)


def _methods(modelopt: Any, name: str) -> dict[type, Any]:
    classes = [modelopt.searcher.BaseSearcher, *vars(modelopt.algorithms).values()]
    return {cls: vars(cls)[name] for cls in classes if isinstance(cls, type) and name in vars(cls)}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("patch", "method"),
    [
        ("scoring_phase", "estimate_sensitivity_scores"),
        ("candidate_stats_fix", "initialize_candidate_stats"),
        ("checked_state_load", "load_search_checkpoint"),
        ("atomic_state_save", "save_search_checkpoint"),
    ],
)
def test_each_method_patch_puts_back_the_original(modelopt: Any, patch: str, method: str) -> None:
    from auto_quantize_model.backend.modelopt import patches

    before = _methods(modelopt, method)
    assert before
    arguments: dict[str, tuple[Any, ...]] = {
        "scoring_phase": (lambda: None,),
        "candidate_stats_fix": (),
        "checked_state_load": (lambda searcher, loaded: None, lambda path, err: None),
        "atomic_state_save": (lambda searcher, real, temporary: None,),
    }
    with getattr(patches, patch)(*arguments[patch]):
        inside = _methods(modelopt, method)
        assert all(inside[cls] is not original for cls, original in before.items())
    assert _methods(modelopt, method) == before
    assert all(_methods(modelopt, method)[cls] is original for cls, original in before.items())


@pytest.mark.slow
def test_textlm_support_leaves_modelopts_registry_as_it_was(modelopt: Any) -> None:
    from auto_quantize_model.backend.modelopt.patches import textlm_support

    registry = modelopt.algorithms.AutoQuantizeGradientSearcher._custom_support
    before = list(registry)
    with textlm_support():
        assert [entry[0].__name__ for entry in registry[len(before) :]] == ["_is_textlm"]
    assert registry == before


@pytest.mark.slow
def test_named_custom_formats_leave_modelopts_config_module_as_it_was(modelopt: Any) -> None:
    import modelopt.torch.quantization.config as mtq_config

    from auto_quantize_model.backend.modelopt.patches import named_custom_formats

    choices = set(mtq_config.choices)
    with named_custom_formats(["INT8_DEFAULT_CFG", "wint4-b64_aint8-token"]) as entries:
        assert entries == ["INT8_DEFAULT_CFG", "wint4-b64_aint8-token"]
        assert isinstance(getattr(mtq_config, "wint4-b64_aint8-token"), dict)
        assert "wint4-b64_aint8-token" in mtq_config.choices
    assert not hasattr(mtq_config, "wint4-b64_aint8-token")
    assert set(mtq_config.choices) == choices


@pytest.mark.slow
def test_only_modelopts_fresh_start_warnings_are_quieted(modelopt: Any) -> None:
    from modelopt.torch.utils import warn_rank_0

    from auto_quantize_model.backend.modelopt.patches import known_warnings_quieted

    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with known_warnings_quieted():
            warn_rank_0("Per-rank checkpoint /x/state.pt not found, falling back to /x/state.pt. Ensure ...")
            warn_rank_0("\033[33mCheckpoint /x/state.pt does not exist! Initializing from scratch.\033[0m")
            warn_rank_0("Checkpoint method 'kl_div' does not match")  # anything else still shows
        warn_rank_0("Checkpoint /x/state.pt does not exist! Initializing from scratch.")  # outside: shown
    assert [str(w.message) for w in seen] == [
        "Checkpoint method 'kl_div' does not match",
        "Checkpoint /x/state.pt does not exist! Initializing from scratch.",
    ]
    assert warnings.filters == filters


def _toy_searcher(modelopt: Any, path: Path) -> Any:
    """A minimal ModelOpt searcher: one value in its state, ModelOpt's own save and load."""

    class Toy(modelopt.searcher.BaseSearcher):  # type: ignore[misc]
        @property
        def default_state_dict(self) -> dict[str, Any]:
            return {"value": 0}

        def run_search(self) -> None:
            """Never searched here; only saved and loaded."""

    toy = Toy()
    toy.config = {"checkpoint": str(path), "verbose": False}
    toy.reset_search()
    return toy


@pytest.mark.slow
@pytest.mark.parametrize("damage", [None, "garbage"])
def test_a_searcher_whose_load_calls_its_base_reports_once(
    modelopt: Any, tmp_path: Path, damage: str | None
) -> None:
    """AutoQuant's searchers override the load and call BaseSearcher's: both are wrapped, one reports."""
    from auto_quantize_model.backend.modelopt.patches import checked_state_load

    class Toy(modelopt.algorithms.AutoQuantizeKLDivSearcher):  # type: ignore[misc]
        @property
        def default_state_dict(self) -> dict[str, Any]:
            return {"value": 0}

    state = tmp_path / "state.pt"
    if damage is not None:
        state.write_bytes(damage.encode())
    searcher = Toy()
    searcher.config = {"checkpoint": str(state), "verbose": False}
    searcher.reset_search()
    calls: list[Any] = []
    with checked_state_load(lambda s, loaded: calls.append(loaded), lambda p, e: calls.append(p)):
        assert searcher.load_search_checkpoint() is False
    assert calls == ([False] if damage is None else [state, False])


@pytest.mark.slow
def test_the_state_is_written_beside_and_renamed_over_the_old_one(modelopt: Any, tmp_path: Path) -> None:
    from auto_quantize_model.backend.modelopt.patches import StateNotSaved, atomic_state_save

    state = tmp_path / "search" / "state.pt"
    toy = _toy_searcher(modelopt, state)
    seen: list[tuple[bool, bytes]] = []

    def before_replace(searcher: Any, real: Path, temporary: Path) -> None:
        assert real == state
        seen.append((real.exists(), temporary.read_bytes()))

    with atomic_state_save(before_replace):
        toy.value = 7
        toy.save_search_checkpoint()
    assert seen == [(False, state.read_bytes())]
    assert toy.config["checkpoint"] == str(state)
    first = state.read_bytes()

    def full_disk(searcher: Any, real: Path, temporary: Path) -> None:
        raise OSError(28, "No space left on device")

    toy.value = 8
    with atomic_state_save(full_disk), pytest.raises(StateNotSaved, match="the disk is full"):
        toy.save_search_checkpoint()
    assert state.read_bytes() == first  # the old state is whole
    assert sorted(p.name for p in state.parent.iterdir()) == ["state.pt"]  # no temporary left behind


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_an_unreadable_state_is_reported_and_the_search_starts_fresh(
    modelopt: Any, tmp_path: Path, damage: str
) -> None:
    from auto_quantize_model.backend.modelopt.patches import checked_state_load

    state = tmp_path / "state.pt"
    toy = _toy_searcher(modelopt, state)
    toy.value = 5
    toy.save_search_checkpoint()
    data = state.read_bytes()
    state.write_bytes(
        {"truncated": data[: len(data) // 2], "garbage": b"not a checkpoint", "empty": b""}[damage]
    )
    calls: list[Any] = []
    with checked_state_load(lambda s, loaded: calls.append(loaded), lambda p, e: calls.append((p, type(e)))):
        fresh = _toy_searcher(modelopt, state)
        assert fresh.load_search_checkpoint() is False
    (path, error), loaded = calls
    assert (path, loaded) == (state, False)
    assert issubclass(error, Exception)
    assert fresh.value == 0
    good = tmp_path / "good.pt"
    toy.config["checkpoint"] = str(good)
    toy.save_search_checkpoint()
    calls.clear()
    with checked_state_load(lambda s, loaded: calls.append(loaded), lambda p, e: calls.append(p)):
        again = _toy_searcher(modelopt, good)
        assert again.load_search_checkpoint() is True
    assert (calls, again.value) == ([True], 5)


def test_textlm_scoring_skips_checkpointing_on_cpu() -> None:
    """On CPU the recompute only costs time (activations fit in host memory): it stays off."""
    import torch

    from auto_quantize_model.backend.modelopt.patches import _textlm_checkpointing

    class Decoder(torch.nn.Module):
        supports_gradient_checkpointing = True

        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 4)
            self.enabled = 0

        def gradient_checkpointing_enable(self, kwargs: object = None) -> None:
            self.enabled += 1

    class Root(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decoder = Decoder()

    root = Root()
    root.train()
    with _textlm_checkpointing(root):
        assert root.decoder.enabled == 0
    assert root.decoder.enabled == 0
    assert not root.training  # left in eval mode, as on GPU
    assert not root.decoder.layer.training


@pytest.mark.slow
def test_pytorch_fake_quant_hides_the_extensions_and_puts_back_what_was_loaded(modelopt: Any) -> None:
    import torch
    from modelopt.torch.quantization import extensions, tensor_quant

    from auto_quantize_model.backend.modelopt.patches import pytorch_fake_quant

    loaded = object()
    extensions.get_cuda_ext_fp8.extension = loaded  # as if built earlier in this process
    had_int8 = "extension" in vars(extensions.get_cuda_ext)
    int8_before = vars(extensions.get_cuda_ext).get("extension")
    try:
        with pytorch_fake_quant():
            assert extensions.get_cuda_ext() is None
            assert extensions.get_cuda_ext_fp8() is None
            # the fallback ModelOpt takes when the extension is missing still quantizes
            x = torch.linspace(-1.0, 1.0, 9)
            q = tensor_quant.fake_tensor_quant(x, torch.tensor(1.0), None, 8, False, True)
            assert torch.equal(q, torch.round(x * 127) / 127)
        assert extensions.get_cuda_ext_fp8.extension is loaded
        assert ("extension" in vars(extensions.get_cuda_ext)) == had_int8
        assert vars(extensions.get_cuda_ext).get("extension") is int8_before
    finally:
        del extensions.get_cuda_ext_fp8.extension


# --------------------------------------------------------------------------------------------------
# The frozen heap
# --------------------------------------------------------------------------------------------------


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_frozen_heap_skips_old_objects_but_collects_new_garbage() -> None:
    import weakref

    assert gc.get_freeze_count() == 0
    with frozen_heap():
        assert gc.get_freeze_count() > 0
        cycle = _Cycle()
        alive = weakref.ref(cycle)
        del cycle
        gc.collect()
        assert alive() is None  # garbage made inside is still collected
    assert gc.get_freeze_count() == 0


def test_frozen_heap_freezes_what_was_made_inside_when_asked_and_thaws_it_all() -> None:
    assert gc.get_freeze_count() == 0
    with frozen_heap() as freeze_more:
        before = gc.get_freeze_count()
        made = [_Cycle() for _ in range(1000)]
        freeze_more()
        assert gc.get_freeze_count() >= before + len(made)
    assert gc.get_freeze_count() == 0


def test_frozen_heap_leaves_a_callers_freeze_alone() -> None:
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with frozen_heap() as freeze_more:
            _ = [_Cycle() for _ in range(100)]
            freeze_more()
            assert gc.get_freeze_count() == frozen
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


# --------------------------------------------------------------------------------------------------
# ModelOpt's process-wide class registrations
# --------------------------------------------------------------------------------------------------


def _tiny_search(scope: str) -> Any:
    from auto_quantize_model.backend.models import build_builtin
    from auto_quantize_model.pipeline import Pipeline
    from auto_quantize_model.sources import TINY_QWEN3_VL
    from auto_quantize_model.specs import AutoQuantSpec, CalibSpec, ExtractSpec
    from auto_quantize_model.stages.build_calib_loader import BuildCalibLoader
    from auto_quantize_model.stages.extract_lm import ExtractLM
    from auto_quantize_model.stages.run_autoquant import RunAutoQuant

    loaded = build_builtin(TINY_QWEN3_VL, seed=0, dtype="float32", device="cpu")
    Pipeline(
        [
            ExtractLM(ExtractSpec(scope=scope)),  # type: ignore[arg-type]
            BuildCalibLoader(CalibSpec(max_samples=4, seq_len=16, batch_size=4)),
            RunAutoQuant(AutoQuantSpec(formats=("INT8_DEFAULT_CFG",), effective_bits=12.0, score_size=4)),
        ],
        supplied=[loaded],
    ).run()
    return loaded.model


@pytest.mark.slow
def test_a_full_model_search_leaves_no_registration_behind(modelopt: Any) -> None:
    """ModelOpt registers the VLM's attention classes for KV-cache quantization while converting the
    full model; left registered, the next language-model search would convert its attention too
    (extra ``bmm_quantizer`` keys that an in-process resume rejects)."""
    from modelopt.torch.quantization.nn import QuantModuleRegistry

    for cls in list(QuantModuleRegistry._registry):  # left by conversions of earlier tests
        if cls.__name__.endswith("Attention"):
            QuantModuleRegistry.unregister(cls)
    before = set(QuantModuleRegistry._registry)
    full = _tiny_search("full_model")
    assert any("bmm_quantizer" in name for name, _ in full.named_modules())  # it did register them
    assert set(QuantModuleRegistry._registry) == before
    text_only = _tiny_search("language_model")
    assert not [name for name, _ in text_only.named_modules() if "bmm_quantizer" in name]
