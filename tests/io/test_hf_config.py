"""A checkout's ``config.json`` judged without torch (io/hf_config.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from auto_quantize_model.errors import InputError
from auto_quantize_model.io import hf_config
from auto_quantize_model.io.hf_config import read_config_json, supported_model_type

# --------------------------------------------------------------------------- config.json


def _write_config(tmp_path: Path, content: str) -> Path:
    (tmp_path / "config.json").write_text(content, encoding="utf-8")
    return tmp_path


def test_read_config_json(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"has no config\.json"):
        read_config_json(tmp_path)
    assert read_config_json(_write_config(tmp_path, '{"model_type": "qwen3"}')) == {"model_type": "qwen3"}
    with pytest.raises(InputError, match=r"config\.json holds a JSON str, not an object"):
        read_config_json(_write_config(tmp_path, '"qwen3"'))
    (tmp_path / "config.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(InputError, match=r"config\.json is not UTF-8"):
        read_config_json(tmp_path)


@pytest.mark.parametrize(
    ("model_type", "kind"),
    [
        ("qwen3_vl", "image-text-to-text"),
        ("llava", "image-text-to-text"),
        ("qwen3", "causal-lm"),
        ("llama", "causal-lm"),
    ],
)
def test_supported_model_types(model_type: str, kind: str) -> None:
    assert supported_model_type({"model_type": model_type}, "x/config.json") == kind


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"model_type": "vit"}, "'vit' has no language model"),
        ({}, "has no model_type"),
        ({"model_type": 3}, "has no model_type string, got 3"),
    ],
)
def test_unsupported_configs_name_the_file(config: dict[str, Any], needle: str) -> None:
    with pytest.raises(InputError, match=r"x/config\.json") as info:
        supported_model_type(config, "x/config.json")
    assert needle in str(info.value)


def test_unreadable_transformers_tables_leave_the_decision_to_load_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    hf_config.auto_model_types.cache_clear()
    try:
        assert hf_config.auto_model_types() is None
        assert supported_model_type({"model_type": "vit"}, "x/config.json") is None
    finally:
        hf_config.auto_model_types.cache_clear()


@pytest.mark.slow
def test_tables_read_from_source_match_the_imported_ones() -> None:
    from transformers.models.auto import modeling_auto

    tables = hf_config.auto_model_types()
    assert tables is not None
    assert tables[hf_config.CAUSAL_LM_TABLE] == set(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    assert tables[hf_config.IMAGE_TEXT_TO_TEXT_TABLE] == set(
        modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    )
