"""Search states on the built-in tiny model: never silently wrong, always recoverable, said in our words.

One reference search saves its state; each test copies that folder, changes or damages it, and
runs RunAutoQuant again on a freshly built model. All of it runs real ModelOpt on CPU (slow).
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import attrs
import pytest

from auto_quantize_model.artifacts import CalibData, CalibStats, LanguageModel, QuantSearch, SensitivityScores
from auto_quantize_model.backend.modelopt.checkpoint import CORRUPT_SUFFIX, StateFiles
from auto_quantize_model.errors import AqmError, ConfigError
from auto_quantize_model.pipeline import Artifacts
from auto_quantize_model.specs import AutoQuantSpec
from auto_quantize_model.stages.run_autoquant import RunAutoQuant

pytestmark = pytest.mark.slow

LOGGER = "auto_quantize_model"
SPEC = AutoQuantSpec(formats=("INT8_DEFAULT_CFG",), effective_bits=12.0, score_size=4)


def _calib(batches: int = 3, rows: int = 2, length: int = 16) -> CalibData:
    """Packed-style rows of random token ids: two captions per row, no loss across the boundary."""
    import torch

    generator = torch.Generator().manual_seed(3)
    half = length // 2
    data = []
    for _ in range(batches):
        ids = torch.randint(5, 200, (rows, length), generator=generator)
        positions = torch.arange(half).repeat(2).expand(rows, length).clone()
        labels = ids.clone()
        labels[:, 0] = -100
        labels[:, half] = -100
        data.append({"input_ids": ids, "position_ids": positions, "labels": labels})
    captions = 2 * rows * batches
    stats = CalibStats(
        captions_path="hand-built",
        captions_sha256="1" * 64,
        layout="packed",
        seq_len=length,
        batch_size=rows,
        max_samples=captions,
        samples=captions,
        real_tokens=rows * length * batches,
        total_tokens=rows * length * batches,
        batches=batches,
        truncated_samples=0,
    )
    return CalibData(batches=tuple(data), captions_per_batch=(2 * rows,) * batches, stats=stats)


def _inputs(seed: int = 0) -> Artifacts:
    """A freshly built tiny model (weights from ``seed``), its language model and calibration data."""
    from auto_quantize_model.backend.models import build_builtin
    from auto_quantize_model.sources import TINY_QWEN3_VL
    from auto_quantize_model.stages.extract_lm import ExtractLM

    loaded = build_builtin(TINY_QWEN3_VL, seed=seed, device="cpu")
    lm = ExtractLM().run(Artifacts.of([loaded]))
    return Artifacts.of([loaded, lm, _calib()])


@attrs.frozen
class Search:
    scores: SensitivityScores
    search: QuantSearch
    messages: tuple[str, ...]
    """Our log lines, WARNING and up prefixed ``WARNING: ``."""
    warnings: tuple[str, ...]
    """Python warnings that escaped the stage."""


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        prefix = "WARNING: " if record.levelno >= logging.WARNING else ""
        self.lines.append(prefix + record.getMessage())


@pytest.fixture
def quiet_modelopt_import() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization  # noqa: F401  (its import-time notices are not ours)


def _search(inputs: Artifacts, spec: AutoQuantSpec) -> Search:
    logger = logging.getLogger(LOGGER)
    handler, level = _Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            scores, search = RunAutoQuant(spec).run(inputs)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    shown = tuple(str(w.message) for w in seen)
    return Search(scores, search, tuple(handler.lines), shown)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Search, Path]:
    """One fresh search whose state folder the tests copy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization  # noqa: F401

    folder = tmp_path_factory.mktemp("reference")
    found = _search(_inputs(), attrs.evolve(SPEC, checkpoint=str(folder / "state.pt")))
    return found, folder


def _copy(reference: tuple[Search, Path], tmp_path: Path) -> StateFiles:
    shutil.copytree(reference[1], tmp_path / "run")
    return StateFiles(tmp_path / "run" / "state.pt")


def _ranking(scores: SensitivityScores) -> list[str]:
    return [g.name for g in sorted(scores.groups, key=lambda g: -max(g.scores))]


def _same_result(again: SensitivityScores, first: SensitivityScores) -> None:
    assert _ranking(again) == _ranking(first)
    for a, b in zip(again.groups, first.groups, strict=True):
        assert a.name == b.name
        assert a.scores == pytest.approx(b.scores, rel=1e-5)


def test_a_fresh_search_and_its_resume_say_what_happens_in_our_words(
    reference: tuple[Search, Path], tmp_path: Path
) -> None:
    first, _ = reference
    files = _copy(reference, tmp_path)
    state = str(tmp_path / "run" / "state.pt")
    fresh_line = f"AutoQuant: no saved search state at {reference[1] / 'state.pt'}, starting fresh"
    assert first.messages.count(fresh_line) == 1
    assert not [w for w in first.warnings if "Per-rank checkpoint" in w or "does not exist" in w]
    assert files.raw_scores.is_file()
    record = json.loads(files.settings.read_text(encoding="utf-8"))
    assert record["model_source"] == "builtin:tiny-qwen3-vl"
    assert record["model_architecture"] == "Qwen3VLForConditionalGeneration"
    assert record["model_dtype"] == "float32"
    assert len(record["model_weights_sha256"]) == 64

    again = _search(_inputs(), attrs.evolve(SPEC, checkpoint=state))
    assert f"AutoQuant: resuming from {state} (calibration of 1 format and the scores are reused)" in (
        again.messages
    )
    assert (again.scores.calib_forward_steps, again.scores.score_forward_steps) == (0, 0)
    assert again.scores.groups == first.scores.groups  # unclamped raw scores restored exactly
    assert not [m for m in again.messages if m.startswith("WARNING")]


def test_a_resume_with_other_weights_is_refused(reference: tuple[Search, Path], tmp_path: Path) -> None:
    """``model.seed`` edited in a run folder's pipeline: same source, other weights."""
    files = _copy(reference, tmp_path)
    inputs = _inputs(seed=1)
    with pytest.raises(ConfigError, match=r"was saved with other settings \(model_weights_sha256: '"):
        RunAutoQuant(attrs.evolve(SPEC, checkpoint=str(files.state))).run(inputs)
    assert not any("Quant" in type(m).__name__ for m in inputs.get(LanguageModel).full_model.modules())


def test_a_second_model_pointed_at_the_same_checkpoint_is_refused(
    reference: tuple[Search, Path], tmp_path: Path
) -> None:
    from auto_quantize_model.backend.models import build_builtin
    from auto_quantize_model.sources import TINY_QWEN3_VL
    from auto_quantize_model.stages.extract_lm import ExtractLM

    files = _copy(reference, tmp_path)
    loaded = build_builtin(TINY_QWEN3_VL, seed=0, device="cpu", dtype="bfloat16")
    lm = ExtractLM().run(Artifacts.of([loaded]))
    with pytest.raises(ConfigError) as caught:
        RunAutoQuant(attrs.evolve(SPEC, checkpoint=str(files.state))).run(
            Artifacts.of([loaded, lm, _calib()])
        )
    message = str(caught.value)
    assert "model_dtype: 'float32' -> 'bfloat16'" in message
    assert "model_weights_sha256" in message
    assert not any("Quant" in type(m).__name__ for m in lm.full_model.modules())  # refused before ModelOpt
    # and without a LoadedModel at hand (Python API), the unknown source is a difference too
    with pytest.raises(ConfigError, match=r"model_source: 'builtin:tiny-qwen3-vl' -> None"):
        RunAutoQuant(attrs.evolve(SPEC, checkpoint=str(files.state))).run(
            Artifacts.of([_inputs().get(LanguageModel), _calib()])
        )


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_an_unreadable_state_is_set_aside_and_the_search_redone(
    reference: tuple[Search, Path], tmp_path: Path, damage: str
) -> None:
    first, _ = reference
    files = _copy(reference, tmp_path)
    data = files.state.read_bytes()
    files.state.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage\xff" * 10)
    again = _search(_inputs(), attrs.evolve(SPEC, checkpoint=str(files.state)))
    (warning,) = [m for m in again.messages if m.startswith("WARNING")]
    assert f"the saved search state {files.state} cannot be read" in warning
    assert "moved aside (state.pt.corrupt, state.pt.raw-scores.json.corrupt)" in warning
    assert files.state.with_name("state.pt" + CORRUPT_SUFFIX).is_file()
    assert again.scores.calib_forward_steps
    assert again.scores.score_forward_steps
    _same_result(again.scores, first.scores)
    # the redone state is whole and resumable again
    resumed = _search(_inputs(), attrs.evolve(SPEC, checkpoint=str(files.state)))
    assert (resumed.scores.calib_forward_steps, resumed.scores.score_forward_steps) == (0, 0)


def test_an_unreadable_settings_record_sets_the_state_aside(
    reference: tuple[Search, Path], tmp_path: Path
) -> None:
    first, _ = reference
    files = _copy(reference, tmp_path)
    files.settings.write_text('{"formats": ["INT8_DEF', encoding="utf-8")  # cut by a full disk
    again = _search(_inputs(), attrs.evolve(SPEC, checkpoint=str(files.state)))
    (warning,) = [m for m in again.messages if m.startswith("WARNING")]
    assert f"the settings record {files.settings} cannot be read" in warning
    assert again.scores.calib_forward_steps
    _same_result(again.scores, first.scores)
    assert json.loads(files.settings.read_text(encoding="utf-8"))["formats"] == ["INT8_DEFAULT_CFG"]


def test_a_stale_raw_score_record_is_never_mixed_in(reference: tuple[Search, Path], tmp_path: Path) -> None:
    first, _ = reference
    files = _copy(reference, tmp_path)
    record = json.loads(files.raw_scores.read_text(encoding="utf-8"))
    record["state_sha256"] = "0" * 64  # a record left by another state
    record["raw_scores"] = {key: dict.fromkeys(value, 99.0) for key, value in record["raw_scores"].items()}
    files.raw_scores.write_text(json.dumps(record), encoding="utf-8")
    again = _search(_inputs(), attrs.evolve(SPEC, checkpoint=str(files.state)))
    (warning,) = [m for m in again.messages if m.startswith("WARNING")]
    assert f"the raw-score record {files.raw_scores} is not usable" in warning
    assert (again.scores.calib_forward_steps, bool(again.scores.score_forward_steps)) == (0, True)
    assert not any(99.0 in g.scores for g in again.scores.groups)
    _same_result(again.scores, first.scores)


def test_a_model_quantized_by_a_previous_run_is_refused_and_nothing_global_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quiet_modelopt_import: None
) -> None:
    import gc

    import torch

    monkeypatch.chdir(tmp_path)
    inputs = _inputs()
    rng = torch.get_rng_state()
    filters = list(warnings.filters)
    found = _search(inputs, attrs.evolve(SPEC, score_size=100))  # no checkpoint: nothing saved
    assert torch.equal(torch.get_rng_state(), rng)
    assert warnings.filters == filters
    assert gc.get_freeze_count() == 0
    assert found.scores.state_path is None
    assert list(tmp_path.iterdir()) == []
    sentence = "autoquant.score_size 100 exceeds the 12 calibration captions; all 12 were used"
    assert found.scores.warnings == (sentence,)
    assert f"WARNING: {sentence} (the scores describe less text than asked for)" in found.messages
    assert found.search.model is inputs.get(LanguageModel).full_model
    with pytest.raises(AqmError, match=r"quantized it in place; load it again \(or pass copy\.deepcopy"):
        RunAutoQuant(SPEC).run(inputs)
