"""No write follows a planted link (issue 21, item 2).

Each test plants a symbolic link where aqm creates a file or folder, points it at a file or folder
outside the run folder, and checks that the command refuses in one line naming the link and that
nothing outside changed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from auto_quantize_model.app import cli
from builders import error_lines, tree
from fakes import FakeRun, run_into, service


def outside_file(tmp_path: Path) -> Path:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious", "utf-8")
    return victim


def test_a_planted_lock_link_is_refused_by_run_and_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = outside_file(tmp_path)
    run = tmp_path / "run"
    assert run_into(run, using=service(FakeRun(fmt="INT8_DEFAULT_CFG"))) == 0
    (run / ".aqm.lock").symlink_to(victim)
    capsys.readouterr()
    assert run_into(run, "--force") == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"{run / '.aqm.lock'} is a symbolic link" in line
    assert cli.main(["export", str(run), "--output", str(tmp_path / "x")], service=service()) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"{run / '.aqm.lock'} is a symbolic link" in line
    assert victim.read_text("utf-8") == "precious"
    assert not (tmp_path / "x").exists()


def test_a_planted_plots_link_carries_no_picture_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert run_into(run) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "report"
    out.mkdir()
    (out / "plots").symlink_to(elsewhere, target_is_directory=True)
    manifest = run / "tiny_wint8_aint8_quant_manifest.json"
    capsys.readouterr()
    assert cli.main(["report", str(manifest), "--output", str(out)]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"{out / 'plots'} is a symbolic link" in line
    assert list(elsewhere.iterdir()) == []


def test_a_planted_report_file_link_is_not_written_through(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = outside_file(tmp_path)
    run = tmp_path / "run"
    assert run_into(run) == 0
    out = tmp_path / "report"
    out.mkdir()
    (out / "per-layer-sensitivity.md").symlink_to(victim)
    capsys.readouterr()
    code = cli.main(["report", str(run / "tiny_wint8_aint8_quant_manifest.json"), "--output", str(out)])
    assert code == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "per-layer-sensitivity.md is a symbolic link" in line
    assert victim.read_text("utf-8") == "precious"


@pytest.mark.slow  # renders, exports or spawns for real: slow tier (fast one under a minute)
def test_export_force_removes_nothing_through_a_link(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert run_into(run, using=service(FakeRun(fmt="INT8_DEFAULT_CFG"))) == 0
    out = tmp_path / "out"
    assert cli.main(["export", str(run), "--output", str(out)], service=service()) == 0
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "README.md").write_text("mine", "utf-8")
    (out / "README.md").unlink()
    (out / "sub").symlink_to(precious, target_is_directory=True)
    record = (out / "export.json").read_text("utf-8").replace('"README.md"', '"sub/README.md"')
    (out / "export.json").write_text(record, "utf-8")
    capsys.readouterr()
    assert cli.main(["export", str(run), "--output", str(out), "--force"], service=service()) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"{out / 'sub'} is a symbolic link" in line
    assert tree(precious) == ["README.md"]


def test_a_sweep_point_folder_link_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "calib.seq_len=32").symlink_to(elsewhere, target_is_directory=True)
    assert run_into(out, "--set", "sweep.calib.seq_len=[32, 64]") != 0
    assert "calib.seq_len=32 is a symbolic link" in capsys.readouterr().err
    assert list(elsewhere.iterdir()) == []
