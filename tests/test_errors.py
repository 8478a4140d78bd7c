"""Every bad input of issue 5 that a CPU can produce: exit code, one line naming the culprit, no traceback,
nothing left in the output folder. Each case runs ``cli.main`` in-process, so the table stays fast."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from auto_quantize_model.app import cli
from auto_quantize_model.app.run_service import RunService
from auto_quantize_model.data import tiny_tokenizer_dir
from builders import tiny_pipeline_toml

BASE = tiny_pipeline_toml(max_samples=8, score_size=4)
"""A small tiny-model pipeline file that each test breaks in one way."""

QUICK = RunService(library_importer=lambda: 0.0)
"""The real run service without importing torch, transformers and ModelOpt up front: each case
imports only what its stages reach before they fail."""

Setup = Callable[[Path], list[str]]
"""Builds the inputs of one case under the test's folder; returns the ``aqm`` arguments."""


def _pipeline(tmp: Path, text: str = BASE) -> str:
    path = tmp / "p.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def run_with(*settings: str) -> Setup:
    def setup(tmp: Path) -> list[str]:
        sets = [arg for s in settings for arg in ("--set", s.format(tmp=tmp))]
        return ["run", _pipeline(tmp), "--output", str(tmp / "out"), *sets]

    return setup


def with_file(name: str, content: bytes | None, *settings: str) -> Setup:
    """A file (or, with ``content`` None, a folder) at ``tmp/name`` before running ``settings``."""

    def setup(tmp: Path) -> list[str]:
        target = tmp / name
        if content is None:
            target.mkdir()
        else:
            target.write_bytes(content)
        return run_with(*settings)(tmp)

    return setup


def checkout(model_type: str, *settings: str) -> Setup:
    """A folder holding only a ``config.json`` of ``model_type``, used as ``model.path``."""

    def setup(tmp: Path) -> list[str]:
        (tmp / "d").mkdir()
        (tmp / "d" / "config.json").write_text(json.dumps({"model_type": model_type}), encoding="utf-8")
        return run_with("model.path='{tmp}/d'", *settings)(tmp)

    return setup


def pipeline_text(text: str) -> Setup:
    def setup(tmp: Path) -> list[str]:
        return ["run", _pipeline(tmp, text), "--output", str(tmp / "out")]

    return setup


def taken_output(tmp: Path) -> list[str]:
    (tmp / "out").mkdir()
    (tmp / "out" / "old_quant_manifest.json").write_text("{}", encoding="utf-8")
    return run_with()(tmp)


def report_of(content: str) -> Setup:
    def setup(tmp: Path) -> list[str]:
        path = tmp / "m_quant_manifest.json"
        path.write_text(content, encoding="utf-8")
        return ["report", str(path), "--output", str(tmp / "out")]

    return setup


def _manifest_with_version(version: int) -> str:
    return json.dumps({"schema_version": version, "scheme": {}, "model": {}, "groups": []})


CASES: list[tuple[str, Setup, int, str]] = [
    ("model-missing", run_with("model.path='{tmp}/nope'"), 2, r"model\.path: .*/nope does not exist"),
    (
        "model-not-dir",
        with_file("f", b"x", "model.path='{tmp}/f'"),
        2,
        r"model\.path: .*/f is not a directory",
    ),
    ("model-not-hf", with_file("d", None, "model.path='{tmp}/d'"), 2, r"/d has no config\.json"),
    (
        "model-without-lm",
        checkout("vit", f"model.tokenizer='{tiny_tokenizer_dir()}'"),
        2,
        r"model_type 'vit' has no language model",
    ),
    (
        "tokenizer-not-in-checkout",
        checkout("qwen3"),
        2,
        r"no tokenizer in .*/d \(none of tokenizer\.json",
    ),
    (
        "tokenizer-missing",
        run_with("model.tokenizer='{tmp}/tok'"),
        2,
        r"model\.tokenizer: .*/tok is not a directory",
    ),
    (
        "captions-missing",
        run_with("calib.captions='{tmp}/c.txt'"),
        2,
        r"calib\.captions: .*/c\.txt does not exist",
    ),
    ("captions-empty", with_file("c.txt", b"", "calib.captions='{tmp}/c.txt'"), 2, r"c\.txt is empty"),
    (
        "captions-blank",
        with_file("c.txt", b"\n  \n\t\n", "calib.captions='{tmp}/c.txt'"),
        2,
        r"c\.txt holds only blank lines",
    ),
    (
        "captions-not-utf8",
        with_file("c.txt", b"a cat\n\xff\xfe dog\n", "calib.captions='{tmp}/c.txt'"),
        2,
        r"c\.txt is not UTF-8: byte 0xff",
    ),
    (
        "captions-too-few",
        with_file("c.txt", b"a cat\na dog\n", "calib.captions='{tmp}/c.txt'"),
        2,
        r"c\.txt holds 2 captions but calib\.max_samples asks for 8",
    ),
    ("seq-len-0", run_with("calib.seq_len=0"), 2, r"calib\.seq_len: must be > 0, got 0"),
    ("batch-size-neg", run_with("calib.batch_size=-1"), 2, r"calib\.batch_size: must be > 0, got -1"),
    ("max-samples-0", run_with("calib.max_samples=0"), 2, r"calib\.max_samples: must be > 0, got 0"),
    ("score-size-0", run_with("autoquant.score_size=0"), 2, r"autoquant\.score_size: must be > 0, got 0"),
    (
        "bits-0",
        run_with("autoquant.effective_bits=0.0"),
        2,
        r"autoquant\.effective_bits: must be in \(0, 16\]",
    ),
    (
        "bits-17",
        run_with("autoquant.effective_bits=17.0"),
        2,
        r"autoquant\.effective_bits: must be in \(0, 16\]",
    ),
    (
        "bits-unreachable",
        run_with("autoquant.effective_bits=4.0"),
        2,
        r"autoquant\.effective_bits: 4 is below what these formats can reach \(minimum 8\)",
    ),
    (
        "format-unknown",
        run_with("autoquant.formats=['INT8_DEFALT_CFG']"),
        2,
        r"INT8_DEFALT_CFG.*INT8_DEFAULT_CFG",
    ),
    ("format-needs-cuda", run_with("autoquant.formats=['NVFP4_DEFAULT_CFG']"), 2, r"NVFP4_DEFAULT_CFG.*CUDA"),
    (
        "method-unknown",
        run_with("autoquant.method='gradiant'"),
        2,
        r'autoquant\.method: expected one of "gradient", "kl_div", got str "gradiant"',
    ),
    ("cuda-absent", run_with("model.device='cuda'"), 2, r"(?i)cuda.*(not available|absent|no cuda)"),
    (
        "pipeline-missing",
        lambda tmp: ["run", str(tmp / "none.toml"), "--output", str(tmp / "out")],
        2,
        r"none\.toml: pipeline file not found",
    ),
    ("pipeline-not-toml", pipeline_text("[model\npath = 1\n"), 2, r"p\.toml: not valid TOML"),
    ("pipeline-unknown-key", pipeline_text(BASE + "nmu_samples = 3\n"), 2, r"nmu_samples"),
    ("pipeline-wrong-type", run_with("calib.seq_len='long'"), 2, r"calib\.seq_len: .*'long'"),
    ("output-taken", taken_output, 2, r"already holds a run \(old_quant_manifest\.json\); pass --force"),
    ("report-not-manifest", report_of("[1, 2]"), 2, r"m_quant_manifest\.json"),
    ("report-not-json", report_of("hello"), 2, r"m_quant_manifest\.json"),
    ("report-unknown-schema", report_of(_manifest_with_version(99)), 2, r"(?i)schema.*99"),
]


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.mark.parametrize(("setup", "code", "pattern"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fails_cleanly(
    setup: Setup, code: int, pattern: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = setup(tmp_path)
    out = tmp_path / "out"
    before = _files(out)
    assert cli.main(argv, service=QUICK) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("aqm: error:")]
    assert lines, err
    assert any(re.search(pattern, line) for line in lines), err
    assert "Traceback" not in err
    assert _files(out) == before  # nothing written (or, for a taken folder, nothing changed)


def test_out_of_memory_names_stage_and_sizes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from auto_quantize_model.stages.load_model import LoadModel

    def out_of_memory(self: Any, inputs: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(LoadModel, "run", out_of_memory)
    assert cli.main(run_with("calib.batch_size=4")(tmp_path), service=QUICK) == 1
    err = capsys.readouterr().err
    assert (
        "aqm: error: out of GPU memory in stage LoadModel (calib.batch_size 4, calib.seq_len 32); "
        "try smaller ones, e.g. --set calib.batch_size=2 or --set calib.seq_len=16"
    ) in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
