"""``aqm report`` and ``aqm frontier`` never overwrite a user's file in an existing ``--output``
(issue 21, item 10): a file there is overwritten only when an earlier aqm output recorded it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from auto_quantize_model.app import cli
from builders import error_lines
from fakes import FakeRun, run_into, service


def manifest_of(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    assert run_into(run, using=service(FakeRun(fmt="INT8_DEFAULT_CFG"))) == 0
    return run / "tiny_wint8_aint8_quant_manifest.json"


@pytest.mark.slow  # renders, exports or spawns for real: slow tier (fast one under a minute)
def test_report_keeps_a_users_same_named_file_and_rewrites_its_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = manifest_of(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "per-layer-sensitivity.md").write_text("my own report", "utf-8")
    capsys.readouterr()
    assert cli.main(["report", str(manifest), "--output", str(out)]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"{out / 'per-layer-sensitivity.md'} exists and was not written by aqm" in line
    assert sorted(p.name for p in out.iterdir()) == ["per-layer-sensitivity.md"]
    (out / "per-layer-sensitivity.md").unlink()
    assert cli.main(["report", str(manifest), "--output", str(out)]) == 0
    record = json.loads((out / "aqm-outputs.json").read_text("utf-8"))
    assert "per-layer-sensitivity.md" in record["files"]
    assert cli.main(["report", str(manifest), "--output", str(out)]) == 0  # its own files: rewritten


def test_frontier_keeps_a_users_same_named_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = manifest_of(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "frontier.md").write_text("my frontier notes", "utf-8")
    capsys.readouterr()
    assert cli.main(["frontier", str(manifest), "--output", str(out), "--bits", "8,12"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"{out / 'frontier.md'} exists and was not written by aqm" in line
    assert (out / "frontier.md").read_text("utf-8") == "my frontier notes"
    assert sorted(p.name for p in out.iterdir()) == ["frontier.md"]
