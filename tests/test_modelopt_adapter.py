"""The ModelOpt door: version guard, patches that undo themselves, and the resume protocol's files.

Fast tests use plain objects for ModelOpt's searcher (only the attributes the protocol reads);
tests that import ModelOpt itself (tens of seconds on the 2-core machine) are ``slow``.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from auto_quantize_model.backend.modelopt import SUPPORTED_RANGE, check_version, installed_version
from auto_quantize_model.backend.modelopt.checkpoint import (
    CORRUPT_SUFFIX,
    SearchCheckpoint,
    StateFiles,
    file_sha256,
    settings_mismatch,
    weight_checksum,
)
from auto_quantize_model.backend.modelopt.patches import modes_restored, swapped
from auto_quantize_model.backend.modelopt.plan import plan_steps
from auto_quantize_model.errors import ConfigError
from auto_quantize_model.specs import AutoQuantSpec

LOGGER = "auto_quantize_model"

# --------------------------------------------------------------------------------------------------
# Version guard
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.47.0", "0.47.1", "0.47.0rc1", "0.47.2+cu12"])
def test_version_guard_accepts_the_version_the_adapter_was_written_for(version: str) -> None:
    check_version(version)


@pytest.mark.parametrize("version", ["0.48.0", "0.46.3", "1.0.0", "0.4.7", "unknown"])
def test_version_guard_refuses_any_other_naming_both_versions(version: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_version(version)
    message = str(caught.value)
    assert f"nvidia-modelopt {version} is installed" in message
    assert SUPPORTED_RANGE in message
    assert "pip install" in message
    assert "\n" not in message


def test_the_installed_modelopt_passes_the_guard() -> None:
    check_version(installed_version())


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
# Steps, fingerprint, messages
# --------------------------------------------------------------------------------------------------


def test_sizes_beyond_the_data_are_named_not_clamped_silently() -> None:
    steps = plan_steps((4, 4, 4), AutoQuantSpec(score_size=20, calib_size=8))
    assert (steps.calib_steps, steps.calib_samples, steps.score_steps, steps.score_samples) == (2, 8, 3, 12)
    assert steps.unmet == ("autoquant.score_size 20 exceeds the 12 calibration captions; all 12 were used",)
    assert plan_steps((4, 4), AutoQuantSpec(score_size=8)).unmet == ()


def test_settings_mismatch_shortens_hashes() -> None:
    old, new = "a" * 64, "b" * 64
    assert settings_mismatch({"model_weights_sha256": old, "seq_len": 32}, {"model_weights_sha256": new}) == [
        "model_weights_sha256: 'aaaaaaaaaaaa...' -> 'bbbbbbbbbbbb...'",
        "seq_len: 32 -> None",
    ]


def test_weight_checksum_tells_models_apart_and_ignores_nothing_it_samples() -> None:
    import torch

    def model(seed: int) -> torch.nn.Sequential:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.Linear(200, 3))

    first = weight_checksum(model(0))
    assert first == weight_checksum(model(0))
    assert first != weight_checksum(model(1))
    changed = model(0)
    head = changed[1]
    assert isinstance(head, torch.nn.Linear)
    with torch.no_grad():
        head.bias[2] += 1.0  # one element of a small tensor: sampled
    assert weight_checksum(changed) != first
    assert weight_checksum(model(0).to(torch.bfloat16)) != first  # dtype is part of identity
    assert len(first) == 64


# --------------------------------------------------------------------------------------------------
# The resume protocol's files (a plain object stands in for ModelOpt's searcher)
# --------------------------------------------------------------------------------------------------

SETTINGS = {"formats": ["INT8_DEFAULT_CFG"], "seq_len": 32, "model_weights_sha256": "c" * 64}


def _searcher(formats: int = 2, scored: bool = True) -> Any:
    stats = {"decoder.layers.0.mlp.up_proj.quant_recipe": {"scores": [1.0, 0.0]}} if scored else {}
    return SimpleNamespace(quantizer_states=dict.fromkeys(range(formats)), candidate_stats=stats)


def _saved_unit(tmp_path: Path) -> StateFiles:
    """A state with scores, its settings record and its raw-score record, as a finished search leaves."""
    files = StateFiles(tmp_path / "state.pt")
    files.state.write_bytes(b"modelopt search state")
    files.write_settings(SETTINGS)
    files.write_raw_scores({"g.quant_recipe": {"INT8(effective-bits: 8.0)": 2.5}}, files.state)
    return files


def test_a_fresh_search_records_its_settings_and_drops_a_stale_raw_score_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = StateFiles(tmp_path / "sub" / "state.pt")
    files.state.parent.mkdir()
    files.raw_scores.write_text("{}", encoding="utf-8")  # left by a state that is gone
    checkpoint = SearchCheckpoint.open(str(files.state), lambda: SETTINGS)
    assert json.loads(files.settings.read_text(encoding="utf-8")) == SETTINGS
    assert not files.raw_scores.exists()
    assert checkpoint.modelopt_path == str(files.state)
    with caplog.at_level(logging.INFO, LOGGER):
        checkpoint.loaded(_searcher(), False)
    assert f"AutoQuant: no saved search state at {files.state}, starting fresh" in caplog.messages


def test_a_killed_saves_temporary_is_removed_but_a_live_ones_is_kept(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from auto_quantize_model.backend.modelopt.patches import temporary_beside

    files = StateFiles(tmp_path / "state.pt")
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = temporary_beside(files.state, pid=int(done.stdout))  # that process has exited
    live = temporary_beside(files.state, pid=os.getppid())
    for path in (dead, live):
        path.write_bytes(b"half a state")
    assert {dead, live} <= set(files.all_files())  # what a forced rerun must clear
    SearchCheckpoint.open(str(files.state), lambda: SETTINGS)
    assert not dead.exists()
    assert live.exists()


def test_no_checkpoint_means_nothing_saved_and_no_fingerprint_computed(tmp_path: Path) -> None:
    def never() -> dict[str, Any]:
        raise AssertionError("the fingerprint is only needed for a saved state")

    checkpoint = SearchCheckpoint.open(None, never)
    assert checkpoint.modelopt_path is None
    checkpoint.loaded(_searcher(), False)  # nothing to say, nothing written
    assert list(tmp_path.iterdir()) == []


def test_a_resume_reuses_scores_only_with_their_raw_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = _saved_unit(tmp_path)
    checkpoint = SearchCheckpoint.open(str(files.state), lambda: SETTINGS)
    searcher = _searcher()
    with caplog.at_level(logging.INFO, LOGGER):
        checkpoint.loaded(searcher, True)
    assert checkpoint.raw == {"g.quant_recipe": {"INT8(effective-bits: 8.0)": 2.5}}
    assert searcher.candidate_stats  # scores kept
    assert (
        f"AutoQuant: resuming from {files.state} (calibration of 2 formats and the scores are reused)"
        in caplog.messages
    )


@pytest.mark.parametrize("damage", ["missing", "garbage", "other state", "old format"])
def test_restored_scores_without_a_matching_raw_record_are_recomputed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    files = _saved_unit(tmp_path)
    if damage == "missing":
        files.raw_scores.unlink()
    elif damage == "garbage":
        files.raw_scores.write_bytes(b"\x00\xff not json")
    elif damage == "other state":
        files.state.write_bytes(b"another search state")  # the record describes the old one
    else:
        files.raw_scores.write_text(json.dumps({"g.quant_recipe": {"x": 1.0}}), encoding="utf-8")
    checkpoint = SearchCheckpoint.open(str(files.state), lambda: SETTINGS)
    searcher = _searcher(formats=1)
    with caplog.at_level(logging.INFO, LOGGER):
        checkpoint.loaded(searcher, True)
    assert checkpoint.raw is None
    assert not searcher.candidate_stats  # ModelOpt scores again; calibration stays restored
    assert searcher.quantizer_states
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(files.raw_scores) in warning
    assert "the scores are recomputed (calibration of 1 format is reused)" in warning


def test_a_state_without_scores_resumes_calibration(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files = _saved_unit(tmp_path)
    checkpoint = SearchCheckpoint.open(str(files.state), lambda: SETTINGS)
    with caplog.at_level(logging.INFO, LOGGER):
        checkpoint.loaded(_searcher(formats=3, scored=False), True)
    assert f"AutoQuant: resuming from {files.state} (calibration of 3 formats is reused)" in caplog.messages


def test_other_settings_are_refused_naming_what_changed(tmp_path: Path) -> None:
    files = _saved_unit(tmp_path)
    other = {**SETTINGS, "seq_len": 16, "model_weights_sha256": "d" * 64}
    with pytest.raises(ConfigError) as caught:
        SearchCheckpoint.open(str(files.state), lambda: other)
    assert str(caught.value) == (
        f"autoquant.checkpoint {files.state} was saved with other settings (model_weights_sha256: "
        "'cccccccccccc...' -> 'dddddddddddd...'; seq_len: 32 -> 16); delete it or point "
        "autoquant.checkpoint elsewhere"
    )
    assert json.loads(files.settings.read_text(encoding="utf-8")) == SETTINGS  # untouched


def test_a_state_without_a_record_or_a_fingerprint_is_refused(tmp_path: Path) -> None:
    files = _saved_unit(tmp_path)
    old = {key: value for key, value in SETTINGS.items() if key != "model_weights_sha256"}
    files.write_settings(old)
    with pytest.raises(ConfigError, match="saved without a model fingerprint"):
        SearchCheckpoint.open(str(files.state), lambda: SETTINGS)
    files.settings.unlink()
    with pytest.raises(ConfigError, match=r"has no settings record \(state\.pt\.settings\.json\)"):
        SearchCheckpoint.open(str(files.state), lambda: SETTINGS)


@pytest.mark.parametrize("garbage", [b"{truncated", b"[1, 2]", b"\xff\xfe"])
def test_an_unreadable_settings_record_moves_the_unit_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, garbage: bytes
) -> None:
    files = _saved_unit(tmp_path)
    files.settings.write_bytes(garbage)
    with caplog.at_level(logging.WARNING, LOGGER):
        checkpoint = SearchCheckpoint.open(str(files.state), lambda: SETTINGS)
    (warning,) = caplog.messages
    assert f"the settings record {files.settings} cannot be read" in warning
    assert not files.state.exists()
    assert not files.raw_scores.exists()
    assert all(p.with_name(p.name + CORRUPT_SUFFIX).is_file() for p in files.unit())
    assert json.loads(files.settings.read_text(encoding="utf-8")) == SETTINGS  # a fresh record
    assert checkpoint.modelopt_path == str(files.state)


def test_an_unreadable_state_is_moved_aside_with_its_raw_scores(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = _saved_unit(tmp_path)
    checkpoint = SearchCheckpoint.open(str(files.state), lambda: SETTINGS)
    with caplog.at_level(logging.WARNING, LOGGER):
        checkpoint.unreadable(files.state, EOFError("Ran out of input"))
    (warning,) = caplog.messages
    assert f"the saved search state {files.state} cannot be read (EOFError: Ran out of input)" in warning
    assert not files.state.exists()
    assert not files.raw_scores.exists()
    assert files.settings.exists()  # it matched this search and describes the fresh state
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "state.pt.corrupt",
        "state.pt.raw-scores.json.corrupt",
        "state.pt.settings.json",
    ]


def test_the_raw_record_is_written_for_the_exact_state_about_to_replace_the_old(tmp_path: Path) -> None:
    files = _saved_unit(tmp_path)
    checkpoint = SearchCheckpoint.open(str(files.state), lambda: SETTINGS)
    checkpoint.loaded(_searcher(), True)
    temporary = tmp_path / ".state.pt.tmp"
    temporary.write_bytes(b"the state after another save")
    checkpoint.before_replace(_searcher(), files.state, temporary)
    record = json.loads(files.raw_scores.read_text(encoding="utf-8"))
    assert record["state_sha256"] == file_sha256(temporary)
    assert record["raw_scores"] == checkpoint.raw
    checkpoint.before_replace(_searcher(scored=False), files.state, temporary)  # no scores: no record
    assert not files.raw_scores.exists()


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


def test_kernels_setting_is_checked_and_defaults_to_the_extension() -> None:
    from auto_quantize_model.io.pipeline_file import spec_from_dict

    assert AutoQuantSpec().kernels == "extension"
    parsed = spec_from_dict(
        {"model": {"path": "builtin:tiny-qwen3-vl"}, "autoquant": {"kernels": "pytorch"}}, source="p.toml"
    )
    assert parsed.autoquant.kernels == "pytorch"
    with pytest.raises(ConfigError, match="kernels"):
        spec_from_dict(
            {"model": {"path": "builtin:tiny-qwen3-vl"}, "autoquant": {"kernels": "triton"}}, source="p.toml"
        )


def test_the_pytorch_kernels_enter_the_settings_record_and_the_default_keeps_old_records_valid() -> None:
    from types import SimpleNamespace

    from auto_quantize_model.backend.modelopt.checkpoint import ModelFingerprint, search_settings

    stats: Any = SimpleNamespace(
        captions_sha256="a" * 64, layout="packed", seq_len=32, batch_size=2, samples=8, real_tokens=100
    )
    steps: Any = SimpleNamespace(calib_steps=1, score_steps=1)
    model = ModelFingerprint(source="builtin:x", architecture="X", dtype="float32", weights_sha256="c" * 64)
    default = search_settings(AutoQuantSpec(), "language_model", stats, steps, model)
    plain = search_settings(AutoQuantSpec(kernels="pytorch"), "language_model", stats, steps, model)
    assert "kernels" not in default  # a record written before the setting existed still matches
    assert {key: value for key, value in plain.items() if key != "kernels"} == default
    assert plain["kernels"] == "pytorch"
    assert settings_mismatch(default, plain) == ["kernels: None -> 'pytorch'"]
