"""The README's examples run as shown and its quoted output is what the code prints today."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SEEDS = Path(__file__).resolve().parent / "data" / "seed-manifests"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_first_command_installs_and_runs_the_tiny_default() -> None:
    first = _blocks("bash")[0].strip().splitlines()
    assert "pip install -c constraints.txt -e ." in first[0]
    assert "aqm run pipelines/tiny-qwen3-vl.toml" in first[0]
    assert "nox -s tests" in first[1]
    assert (ROOT / "pipelines" / "tiny-qwen3-vl.toml").is_file()


@pytest.mark.slow
def test_python_example_runs_as_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    example = _blocks("python")[0]
    script = tmp_path / "example.py"
    script.write_text(example, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(script), run_name="__main__")
    printed = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [line.split()[0] for line in printed[-5:]] == ["1", "2", "3", "4", "5"]
    out = tmp_path / "runs" / "tiny-python"
    assert (out / "tiny_int8_fp8_quant_manifest.json").is_file()
    assert (out / "per-layer-sensitivity.md").is_file()


def test_quoted_int8_vs_fp8_diff_is_current() -> None:
    from auto_quantize_model.app.diff import diff_paths

    text = diff_paths(SEEDS / "wint8_aint8", SEEDS / "wfp8_afp8")
    quoted = README.read_text(encoding="utf-8")
    for line in text.splitlines():
        if line.startswith("| ") and "---" not in line:
            assert line in quoted, f"README's INT8 vs FP8 diff is stale at: {line}"


@pytest.mark.slow
def test_python_export_example_runs_as_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    example = _blocks("python")[1]
    assert "ExportCheckpoint" in example
    script = tmp_path / "export_example.py"
    script.write_text(example, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert 8.0 <= float(printed.split()[0]) <= 10.0, printed  # LM bits reached within the budget
    assert printed.endswith("read-back ok: True"), printed
    out = tmp_path / "runs" / "tiny-export"
    for name in ("quant_config.json", "quant_recipe.yaml", "hf_quant_config.json", "export.json"):
        assert (out / name).is_file(), name
