"""The resume protocol's files: settings records, raw scores, fingerprints, states set aside.

Fast tests use plain objects for ModelOpt's searcher (only the attributes the protocol reads);
tests that import ModelOpt itself (tens of seconds on the 2-core machine) are ``slow``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from auto_quantize_model.backend.modelopt.checkpoint import (
    CORRUPT_SUFFIX,
    SearchCheckpoint,
    StateFiles,
    checkpoint_file,
    file_sha256,
    settings_mismatch,
    weight_checksum,
)
from auto_quantize_model.errors import ConfigError
from auto_quantize_model.specs import AutoQuantSpec

LOGGER = "auto_quantize_model"


# --------------------------------------------------------------------------------------------------
# Steps, fingerprint, messages
# --------------------------------------------------------------------------------------------------


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
# The kernels setting in the settings record
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# File names and settings diffs
# --------------------------------------------------------------------------------------------------


def test_checkpoint_helpers(tmp_path: Path) -> None:
    assert checkpoint_file(str(tmp_path / "state.pt")) == str(tmp_path / "state.pt")
    assert checkpoint_file(str(tmp_path)) == str(tmp_path / "rank0.pth")
    assert checkpoint_file(str(tmp_path / "noext")) == str(tmp_path / "noext" / "rank0.pth")
    assert settings_mismatch({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == ["b: 2 -> 3", "c: None -> 4"]
