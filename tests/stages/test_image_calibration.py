"""Image-conditioned calibration end to end on the tiny Qwen3-VL: AutoQuant scores the language
model on image + caption pairs, not as it would on captions alone, and the vision tower stays
unquantized; the predefined pipeline runs from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from auto_quantize_model.artifacts import CalibData, LoadedModel, SensitivityScores
from auto_quantize_model.core.scores import importance
from auto_quantize_model.pipeline import Pipeline
from auto_quantize_model.specs import AutoQuantSpec, CalibSpec, ExtractSpec, LoadSpec
from auto_quantize_model.stages.build_calib_loader import BuildCalibLoader
from auto_quantize_model.stages.extract_lm import ExtractLM
from auto_quantize_model.stages.load_model import LoadModel
from auto_quantize_model.stages.run_autoquant import RunAutoQuant
from builders import REPO, run_aqm

pytestmark = pytest.mark.slow


def _scores(calib: CalibSpec, state: Path) -> tuple[dict[str, float], LoadedModel, CalibData]:
    spec = AutoQuantSpec(
        formats=("INT8_DEFAULT_CFG",), effective_bits=12.0, score_size=8, checkpoint=str(state)
    )
    store = Pipeline(
        [
            LoadModel(LoadSpec(path="builtin:tiny-qwen3-vl", device="cpu", dtype="float32")),
            ExtractLM(),
            BuildCalibLoader(calib),
            RunAutoQuant(spec),
        ]
    ).run()
    scores = store.get(SensitivityScores)
    found = {group.name: importance(group.formats, group.scores) for group in scores.groups}
    return found, store.get(LoadedModel), store.get(CalibData)


def test_image_pairs_score_every_group_differently_from_captions_alone(tmp_path: Path) -> None:
    settings: dict[str, Any] = {"max_samples": 16, "seq_len": 512, "batch_size": 2}
    images, loaded, data = _scores(CalibSpec(images="builtin", **settings), tmp_path / "images.pt")
    text, _, _ = _scores(CalibSpec(captions="builtin", **settings), tmp_path / "text.pt")
    assert data.stats.images is not None
    assert data.stats.images.pairs == 16
    assert images.keys() == text.keys()
    assert len(images) == 17
    # every layer's output gradient reached: no group scores 0 (the ready-made embeddings carry grad)
    assert all(value > 0 for value in images.values()), images
    differing = [name for name in images if abs(images[name] - text[name]) > 0.01 * text[name]]
    assert len(differing) >= 15, sorted(set(images) - set(differing))
    # the ranking moves: lm_head leads on image + caption turns, layer 0's q_proj on captions alone
    assert max(images, key=images.__getitem__) == "lm_head"
    assert max(text, key=text.__getitem__) == "model.language_model.layers.0.self_attn.q_proj"

    model: Any = loaded.model
    quantizers = [
        name for name, module in model.named_modules() if type(module).__name__ == "TensorQuantizer"
    ]
    assert any(name.startswith("model.language_model.layers.0.") for name in quantizers)
    assert [name for name in quantizers if name.startswith("model.visual")] == []


def test_the_image_pipeline_runs_from_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "x"
    run = run_aqm(
        "run", str(REPO / "pipelines" / "tiny-qwen3-vl-images.toml"), "--output", str(out), cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    manifest = json.loads((out / "tiny_images_wint8_aint8_quant_manifest.json").read_text(encoding="utf-8"))
    mix = manifest["dataset"]["images"]
    assert (manifest["dataset"]["samples"], mix["pairs"], mix["prompt"]) == (16, 16, "Describe this image.")
    assert mix["image_tokens"] + mix["text_tokens"] == manifest["dataset"]["real_tokens"]
    validation = manifest["validation"]  # measured on the 8 bundled pairs calibration did not take
    assert (validation["holdout_samples"], validation["holdout_source"]) == (8, "builtin")
    report = (out / "per-layer-sensitivity.md").read_text(encoding="utf-8")
    assert (
        f"- **Images:** 16 image + caption pairs, prompt 'Describe this image.'; {mix['image_tokens']} image"
        in report
    )


def test_in_full_model_scope_the_vision_tower_quantizers_stay_off(tmp_path: Path) -> None:
    """ModelOpt puts quantizers into every module of the root it searches; in ``full_model`` scope
    the vision tower's are disabled (and its features were computed before they existed)."""
    store = Pipeline(
        [
            LoadModel(LoadSpec(path="builtin:tiny-qwen3-vl", device="cpu", dtype="float32")),
            ExtractLM(ExtractSpec(scope="full_model")),
            BuildCalibLoader(CalibSpec(images="builtin", max_samples=8, seq_len=512, batch_size=2)),
            RunAutoQuant(AutoQuantSpec(effective_bits=12.0, score_size=4, checkpoint=str(tmp_path / "s.pt"))),
        ]
    ).run()
    model: Any = store.get(LoadedModel).model
    vision = [
        m for n, m in model.named_modules() if n.startswith("model.visual") and n.endswith("_quantizer")
    ]
    assert len(vision) > 0
    assert [m for m in vision if m.is_enabled] == []
