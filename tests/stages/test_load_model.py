"""LoadModel: checkpoints, built-in sources and the errors that name the file or the stage."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from pytest_mock import MockerFixture

from auto_quantize_model.backend.models import (
    build_builtin,
    load_tokenizer,
    read_checkpoint_config,
    tiny_qwen3_vl_config,
)
from auto_quantize_model.data import tiny_tokenizer_dir
from auto_quantize_model.errors import AqmError, ConfigError, InputError
from auto_quantize_model.pipeline import Artifacts, Pipeline
from auto_quantize_model.sources import TINY_QWEN3_VL
from auto_quantize_model.specs import LoadSpec
from auto_quantize_model.stages.load_model import LoadModel

TINY_SEED = 0  # the seed conftest.tiny_checkpoint was built with


# ---------------------------------------------------------------- errors


def _write_tiny_config(directory: Path) -> None:
    tiny_qwen3_vl_config(load_tokenizer(tiny_tokenizer_dir())).save_pretrained(str(directory))


def _copy_tokenizer(directory: Path) -> None:
    for item in tiny_tokenizer_dir().iterdir():
        shutil.copy(item, directory / item.name)


def test_load_errors_table(tmp_path: Path) -> None:
    """Each unusable input fails with a one-line InputError naming the culprit."""
    not_dir = tmp_path / "weights.safetensors"
    not_dir.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_json = tmp_path / "bad-json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    vision_only = tmp_path / "vision-only"
    vision_only.mkdir()
    (vision_only / "config.json").write_text(json.dumps({"model_type": "vit"}))
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    _write_tiny_config(no_tokenizer)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    _write_tiny_config(no_weights)
    _copy_tokenizer(no_weights)

    cases: list[tuple[LoadSpec, str]] = [
        (LoadSpec(str(tmp_path / "missing")), f"model path {tmp_path / 'missing'} does not exist"),
        (LoadSpec(str(not_dir)), f"model path {not_dir} is not a directory"),
        (LoadSpec(str(empty)), f"{empty} is not a Hugging Face checkout: it has no config.json"),
        (LoadSpec(str(bad_json)), f"{bad_json / 'config.json'} is not valid JSON"),
        (LoadSpec(str(vision_only)), "model_type 'vit' has no language model"),
        (LoadSpec(str(no_tokenizer), device="cpu"), f"no tokenizer in {no_tokenizer}"),
        (
            LoadSpec(str(no_tokenizer), tokenizer=str(tmp_path / "tok"), device="cpu"),
            f"tokenizer directory {tmp_path / 'tok'} does not exist",
        ),
        (LoadSpec(str(no_weights), device="cpu"), f"cannot load weights from {no_weights}"),
    ]
    for spec, expected in cases:
        with pytest.raises(InputError) as err:
            LoadModel(spec).run(Artifacts())
        message = str(err.value)
        assert expected in message, (spec.path, message)
        assert "\n" not in message


def test_checkpoint_faults_name_the_file(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Truncated or garbage weights and malformed config.json fail naming the file, in one line."""

    def broken(name: str, damage: Callable[[Path], None]) -> Path:
        folder = tmp_path / name
        shutil.copytree(tiny_checkpoint, folder)
        damage(folder)
        return folder

    def _garbage(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"\x07" * 4096)

    def truncate(folder: Path) -> None:
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    def edit_config(change: Callable[[dict[str, Any]], object]) -> Callable[[Path], None]:
        def apply(folder: Path) -> None:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            (folder / "config.json").write_text(json.dumps(change(config)), encoding="utf-8")

        return apply

    cases = [
        (broken("truncated", truncate), "model.safetensors: Error while deserializing header"),
        (
            broken("garbage", _garbage),
            "model.safetensors: Error while deserializing header",
        ),
        (broken("list", edit_config(lambda c: [c])), "config.json holds a JSON list, not an object"),
        (
            broken("no-type", edit_config(lambda c: {**c, "model_type": 3})),
            "config.json has no model_type string",
        ),
        (
            broken("unknown", edit_config(lambda c: {**c, "model_type": "qwen9_vl"})),
            "model_type 'qwen9_vl' has no language model",
        ),
        (broken("mismatch", edit_config(lambda c: {**c, "model_type": "bert"})), "cannot load weights from"),
    ]
    for folder, expected in cases:
        with pytest.raises(InputError) as err:
            LoadModel(LoadSpec(str(folder), device="cpu")).run(Artifacts())
        message = str(err.value)
        assert expected in message, (folder.name, message)
        assert str(folder) in message
        assert "\n" not in message


def test_device_map_without_accelerate_is_refused(tmp_path: Path, mocker: MockerFixture) -> None:
    _write_tiny_config(tmp_path)
    _copy_tokenizer(tmp_path)
    mocker.patch("auto_quantize_model.backend.models._has_accelerate", return_value=False)
    with pytest.raises(ConfigError, match=r"^device_map='auto' needs the accelerate package"):
        LoadModel(LoadSpec(str(tmp_path), device_map="auto")).run(Artifacts())


def test_read_checkpoint_config_of_saved_config(tmp_path: Path) -> None:
    _write_tiny_config(tmp_path)
    config = read_checkpoint_config(tmp_path)
    assert config.model_type == "qwen3_vl"


def test_pipeline_wraps_load_errors_naming_the_stage(tmp_path: Path) -> None:
    with pytest.raises(AqmError, match=r"^stage LoadModel failed: model path .* does not exist$"):
        Pipeline([LoadModel(LoadSpec(str(tmp_path / "nope")))]).run()


# ---------------------------------------------------------------- real models on CPU


@pytest.mark.slow
def test_load_model_builtin_honours_spec() -> None:
    spec = LoadSpec(
        TINY_QWEN3_VL, dtype="bfloat16", device="cpu", padding_side="left", attn_implementation="eager"
    )
    loaded = LoadModel(spec).run(Artifacts())
    assert loaded.dtype == "bfloat16"
    assert loaded.tokenizer.padding_side == "left"
    model: Any = loaded.model
    assert model.config.text_config._attn_implementation == "eager"


@pytest.mark.slow
def test_reload_through_from_pretrained_gives_the_same_logits(tiny_checkpoint: Path) -> None:
    spec = LoadSpec(str(tiny_checkpoint), device="cpu", padding_side="left")
    loaded = LoadModel(spec).run(Artifacts())
    assert loaded.architecture == "Qwen3VLForConditionalGeneration"
    assert (loaded.dtype, loaded.device, loaded.source) == ("float32", "cpu", str(tiny_checkpoint))
    assert loaded.tokenizer.padding_side == "left"
    assert not loaded.model.training
    model: Any = loaded.model
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight

    original = build_builtin(TINY_QWEN3_VL, seed=TINY_SEED, device="cpu")
    batch = original.tokenizer(["A red bicycle leans against a brick wall."], return_tensors="pt")
    with torch.no_grad():
        expected = original.model(**batch).logits
        got = loaded.model(**batch).logits
    assert torch.equal(got, expected)


@pytest.mark.slow
def test_tokenizer_from_another_directory(tiny_checkpoint: Path, tmp_path: Path) -> None:
    weights_only = tmp_path / "weights"
    weights_only.mkdir()
    for item in tiny_checkpoint.iterdir():
        if item.name in {"config.json", "model.safetensors", "generation_config.json"}:
            shutil.copy(item, weights_only / item.name)
    with pytest.raises(InputError, match="no tokenizer in"):
        LoadModel(LoadSpec(str(weights_only), device="cpu")).run(Artifacts())
    spec = LoadSpec(str(weights_only), tokenizer=str(tiny_tokenizer_dir()), device="cpu", dtype="bfloat16")
    loaded = LoadModel(spec).run(Artifacts())
    assert loaded.dtype == "bfloat16"
    assert loaded.tokenizer.pad_token == "<|endoftext|>"
