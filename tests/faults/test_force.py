"""``--force`` replaces only aqm's own files (issue 21, item 1).

A run folder comes from the fake runner of ``test_run_folders`` (real ``run.json``, manifest,
reports; no model), so ``aqm export`` (config only) and ``aqm run --force`` work on real records.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from auto_quantize_model.app import cli
from builders import error_lines, tree
from fakes import FakeRun, run_into, service


def finished_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    assert run_into(run, using=service(FakeRun(fmt="INT8_DEFAULT_CFG"))) == 0
    return run


def export(*argv: str) -> int:
    return cli.main(["export", *argv], service=service())


def test_export_force_refuses_a_folder_that_holds_no_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = finished_run(tmp_path)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "thesis.tex").write_text("years of work", "utf-8")
    capsys.readouterr()
    assert export(str(run), "--output", str(docs)) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "holds files aqm did not write (thesis.tex)" in line
    assert "--force" not in line  # the refusal never suggests destroying the folder
    assert export(str(run), "--output", str(docs), "--force") == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "--force replaces only an earlier aqm export" in line
    assert tree(docs) == ["thesis.tex"]
    assert (docs / "thesis.tex").read_text("utf-8") == "years of work"


@pytest.mark.slow  # renders, exports or spawns for real: slow tier (fast one under a minute)
def test_export_force_replaces_only_the_files_the_earlier_export_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = finished_run(tmp_path)
    out = tmp_path / "out"
    assert export(str(run), "--output", str(out)) == 0
    first = tree(out)
    record = json.loads((out / "export.json").read_text("utf-8"))
    assert sorted(record["files"]) == first
    (out / "notes.txt").write_text("mine", "utf-8")
    (out / "quant_config.json").write_text("stale", "utf-8")  # one of the export's own files
    capsys.readouterr()
    assert export(str(run), "--output", str(out)) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "already holds an aqm export" in line
    assert "pass --force to replace those files (nothing else there is touched)" in line
    assert export(str(run), "--output", str(out), "--force") == 0
    assert tree(out) == sorted([*first, "notes.txt"])
    assert (out / "notes.txt").read_text("utf-8") == "mine"
    assert (out / "quant_config.json").read_text("utf-8") != "stale"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]  # no scratch or set-aside left


def test_a_new_export_file_never_overwrites_an_unrecorded_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = finished_run(tmp_path)
    out = tmp_path / "out"
    assert export(str(run), "--output", str(out)) == 0
    record = json.loads((out / "export.json").read_text("utf-8"))
    record["files"].remove("README.md")  # the user's README now sits where the export writes one
    (out / "export.json").write_text(json.dumps(record), "utf-8")
    (out / "README.md").write_text("my readme", "utf-8")
    capsys.readouterr()
    assert export(str(run), "--output", str(out), "--force") == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"{out / 'README.md'} exists and was not written by aqm" in line
    assert (out / "README.md").read_text("utf-8") == "my readme"
    assert (out / "quant_config.json").is_file()  # the old export is untouched as well


@pytest.mark.parametrize("where", ["itself", "inside", "above"])
def test_export_never_goes_into_its_source_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    run = finished_run(tmp_path)
    before = tree(tmp_path)
    output = {"itself": run, "inside": run / "export", "above": tmp_path}[where]
    capsys.readouterr()
    assert export(str(run), "--output", str(output), "--force") == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"--output {output}" in line
    assert tree(tmp_path) == before


def test_export_to_dot_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = finished_run(tmp_path)
    monkeypatch.chdir(tmp_path)  # `.` holds the run folder
    capsys.readouterr()
    assert export(str(run), "--output", ".", "--force") == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "--output . holds the run folder" in line
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    monkeypatch.chdir(fresh)  # `.` is an empty folder elsewhere: it takes the export
    assert export(str(run), "--output", ".") == 0
    assert "export.json" in tree(fresh)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "run"]


def test_run_force_keeps_earlier_runs_in_subfolders_and_the_users_pictures(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_into(out) == 0
    kept = out / "kept-run"
    assert run_into(kept) == 0  # a complete run the user keeps inside the folder
    kept_before = {name: (kept / name).read_bytes() for name in tree(kept) if (kept / name).is_file()}
    (out / "plots" / "my-figure.png").write_bytes(b"\x89PNG mine")
    assert run_into(out, "--force", "--set", 'manifest.scheme="other"') == 0
    assert {name: (kept / name).read_bytes() for name in tree(kept) if (kept / name).is_file()} == kept_before
    assert (out / "plots" / "my-figure.png").read_bytes() == b"\x89PNG mine"
    assert "other_quant_manifest.json" in tree(out)


def test_run_force_refuses_a_folder_aqm_did_not_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old_quant_manifest.json").write_text("{}", "utf-8")  # the previous tool's output
    (out / "notes.txt").write_text("mine", "utf-8")
    assert run_into(out, "--force") == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "holds old_quant_manifest.json without a run.json of aqm's" in line
    assert tree(out) == ["notes.txt", "old_quant_manifest.json"]


def test_run_force_after_a_kill_removes_the_half_search_so_nothing_resumes_from_it(tmp_path: Path) -> None:
    """A ``running`` record lists the search state it is about to write, so ``--force`` takes it too."""
    out = tmp_path / "out"
    assert run_into(out, using=service(FakeRun(KeyboardInterrupt(), fail_after="state"))) == 130
    record = json.loads((out / "run.json").read_text("utf-8"))
    assert "autoquant_search_state.pt" in record["files"]
    record["status"] = "running"  # as a kill -9 leaves it
    (out / "run.json").write_text(json.dumps(record), "utf-8")
    assert run_into(out, "--force", "--set", 'manifest.scheme="other"') == 0
    assert (out / "autoquant_search_state.pt").read_text("utf-8") == "other"


@pytest.mark.parametrize("text", ['{"status": "complete", "started_at": 5}', '{"status": "runn', "\xff\xfe"])
def test_a_corrupt_run_json_is_named_by_resume_and_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    out = tmp_path / "out"
    assert run_into(out) == 0
    (out / "run.json").write_bytes(text.encode("latin-1"))
    before = tree(out)
    capsys.readouterr()
    assert cli.main(["resume", str(out)], service=service()) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"{out / 'run.json'} is not a" in line
    assert "not a run folder" not in line
    assert run_into(out, "--force") == 2  # nothing there is known to be aqm's without its record
    assert tree(out) == before
