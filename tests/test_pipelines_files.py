"""Every predefined pipeline in ``pipelines/`` loads, passes pre-flight and says what it promises."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from auto_quantize_model.app.sweep.points import expand_sweep
from auto_quantize_model.errors import InputError
from auto_quantize_model.io.pipeline_file import load_pipeline, spec_from_dict, spec_to_toml
from auto_quantize_model.specs import PipelineSpec

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
FILES = sorted(PIPELINES.glob("*.toml"))
LM_4B = ["qwen3-vl-4b-lm-int8", "qwen3-vl-4b-lm-fp8", "qwen3-vl-4b-lm-w4a8", "qwen3-vl-4b-lm-w8a8-token"]


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A stand-in for a real checkout: pre-flight reads config.json and looks for a tokenizer file."""
    folder = tmp_path / "Qwen3-VL-4B-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "qwen3_vl"}', encoding="utf-8")
    (folder / "tokenizer.json").write_text("{}", encoding="utf-8")
    return folder


def needs_checkpoint(path: Path) -> bool:
    model_path = tomllib.loads(path.read_text(encoding="utf-8"))["model"]["path"]
    return not str(model_path).startswith(("builtin:", "config:"))


def load(path: Path, checkpoint: Path, *extra: str) -> PipelineSpec:
    overrides = [f"model.path={checkpoint}"] if needs_checkpoint(path) else []
    return load_pipeline(path, [*overrides, *extra])


def test_the_promised_files_exist() -> None:
    names = {path.stem for path in FILES}
    images = {"tiny-qwen3-vl-images", "qwen3-vl-4b-images"}
    assert {"tiny-qwen3-vl", "qwen3-vl-4b-random-bench", *images, *LM_4B} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_every_file_loads_and_passes_preflight(path: Path, checkpoint: Path) -> None:
    spec = load(path, checkpoint)
    points = expand_sweep(spec, source=str(path))
    assert len(points) >= 1
    back = spec_from_dict(tomllib.loads(spec_to_toml(spec)), source="round trip")
    assert back == spec


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_every_file_explains_its_knobs(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#")
    header = text.split("\n[", 1)[0]
    # the opening comment says what the file runs and the command that runs it
    assert all(line.startswith("#") or not line.strip() for line in header.splitlines())
    assert f"aqm run pipelines/{path.name}" in header


@pytest.mark.parametrize("stem", LM_4B)
def test_placeholder_checkpoint_is_reported_with_the_fix(stem: str) -> None:
    with pytest.raises(InputError, match=r"model.path: .* does not exist .*--set model.path=DIR"):
        expand_sweep(load_pipeline(PIPELINES / f"{stem}.toml"))


def test_tiny_pipeline_is_the_seconds_long_cpu_run() -> None:
    spec = load_pipeline(PIPELINES / "tiny-qwen3-vl.toml")
    assert spec.model.path == "builtin:tiny-qwen3-vl"
    assert spec.model.device == "cpu"
    assert spec.calib.captions == "builtin"
    assert spec.calib.layout == "packed"
    assert spec.autoquant.formats == ("INT8_DEFAULT_CFG",)
    assert spec.validate is not None
    assert spec.validate.k <= 3
    assert spec.calib.max_samples <= 128
    assert spec.calib.seq_len <= 128
    assert spec.autoquant.score_size <= spec.calib.max_samples
    assert spec.sweep == {}


@pytest.mark.parametrize("stem", LM_4B)
def test_4b_lm_pipelines_match_the_previous_tool(stem: str, checkpoint: Path) -> None:
    spec = load(PIPELINES / f"{stem}.toml", checkpoint)
    assert spec.model.path == str(checkpoint)
    assert spec.model.device == "cuda"
    assert spec.extract.scope == "language_model"
    assert (spec.calib.max_samples, spec.calib.seq_len, spec.calib.batch_size) == (512, 512, 8)
    assert spec.autoquant.score_size == 128
    assert spec.autoquant.method == "gradient"
    assert spec.autoquant.effective_bits == 8.0
    assert len(spec.autoquant.formats) == 1


def test_4b_lm_formats() -> None:
    formats = {
        stem: tomllib.loads((PIPELINES / f"{stem}.toml").read_text("utf-8"))["autoquant"]["formats"]
        for stem in LM_4B
    }
    assert formats == {
        "qwen3-vl-4b-lm-int8": ["INT8_DEFAULT_CFG"],
        "qwen3-vl-4b-lm-fp8": ["FP8_DEFAULT_CFG"],
        "qwen3-vl-4b-lm-w4a8": ["wint4-b128_aint8-token"],
        "qwen3-vl-4b-lm-w8a8-token": ["wint8-pc_aint8-token"],
    }


@pytest.mark.parametrize("stem", LM_4B)
def test_padded_layout_is_a_one_line_switch(stem: str, checkpoint: Path, tmp_path: Path) -> None:
    text = (PIPELINES / f"{stem}.toml").read_text(encoding="utf-8")
    assert '#   layout = "padded"' in text
    switched = tmp_path / f"{stem}.toml"
    switched.write_text(text.replace('layout = "packed"', 'layout = "padded"', 1), encoding="utf-8")
    assert load(switched, checkpoint).calib.layout == "padded"


def test_random_bench_is_the_4b_architecture_on_cuda() -> None:
    spec = load_pipeline(PIPELINES / "qwen3-vl-4b-random-bench.toml")
    assert spec.model.path == "config:qwen3-vl-4b"
    assert spec.model.device == "cuda"
    assert (spec.calib.max_samples, spec.calib.seq_len, spec.calib.batch_size) == (512, 512, 8)
    assert spec.validate is None  # the timing target is the six stages; random weights rank nothing
    expand_sweep(spec)
