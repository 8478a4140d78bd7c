"""Run folders under faults (issue 15): ``--force``, failed runs, full disks, bad output paths, ``run.json``.

Every run here goes through the real CLI and the real run service with one collaborator faked: the
pipeline runner writes what a real run writes (search state and its side files, manifest,
reports, plots) without loading a model, and fails where a test asks; the text or report writer
fails with ENOSPC where a test asks. Read-only places are paths under ``/sys``: sysfs refuses new
files and folders even to root, and these tests may run as root, whom ``chmod`` does not stop.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest

from auto_quantize_model.app import cli
from auto_quantize_model.app.defaults import write_text
from auto_quantize_model.app.lock import process_started_at
from auto_quantize_model.app.run_service import RunService
from auto_quantize_model.app.runs import (
    COMPLETE,
    FAILED,
    RUNNING,
    RunRecord,
    open_run_folder,
    read_run,
    write_run,
)
from auto_quantize_model.artifacts import ReportPaths
from auto_quantize_model.errors import InputError, StageError
from auto_quantize_model.io.atomic import atomic_write_text
from auto_quantize_model.io.manifest import manifest_to_json
from auto_quantize_model.io.pipeline_file import load_pipeline
from builders import REPO, STATE_KIT, descending, error_lines, manifest, tiny_pipeline_toml, tree
from fakes import FakeRun, Writer, run_into, service

TINY = REPO / "pipelines" / "tiny-qwen3-vl.toml"
SYS = Path("/sys")


def _sysfs_refuses_files() -> bool:
    probe = SYS / "aqm-probe"
    try:
        probe.mkdir()
    except OSError:
        return True
    probe.rmdir()
    return False


needs_sysfs = pytest.mark.skipif(
    not SYS.is_dir() or not _sysfs_refuses_files(), reason="needs /sys mounted as sysfs (no new files)"
)


def full_disk_when(condition: Callable[[Path, str], bool]) -> Writer:
    """The real atomic writer, except that it fails as a full disk does when ``condition`` holds."""

    def write(path: Path, text: str) -> Path:
        if condition(path, text):
            raise disk_full(path)
        return write_text(path, text)

    return write


def record_of(out: Path) -> RunRecord:
    record = read_run(out)
    assert record is not None
    return record


def disk_full(path: Path) -> OSError:
    """ENOSPC as an atomic write of ``path`` raises it (naming its temporary file)."""
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path.parent / f".{path.name}.z9q2k.tmp"))


# --------------------------------------------------------------------------- run.json


def test_run_json_lists_every_file_the_run_wrote_and_its_owner(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_into(out) == 0
    record = read_run(out)
    assert record is not None
    assert record.status == "complete"
    assert sorted(record.files) == [name for name in tree(out) if name != "plots"]
    assert "run.json" in record.files
    assert set(STATE_KIT) <= set(record.files)
    assert record.owner is not None
    assert (record.owner.pid, record.owner.host) == (os.getpid(), socket.gethostname())
    assert record.owner.started_at == process_started_at(os.getpid())
    assert not (out / ".aqm.lock").exists()


def test_a_corrupt_run_json_is_named_and_force_starts_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text('{"status": "running", "started_at": 5}', "utf-8")
    (out / "notes.txt").write_text("mine", "utf-8")
    assert run_into(out) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"{out / 'run.json'} is not a valid run record" in line
    assert "cannot tell which files" in line
    assert run_into(out, "--force") == 2  # without its record nothing there is known to be aqm's
    (line,) = error_lines(capsys.readouterr().err)
    assert f"{out / 'run.json'} is not a valid run record" in line
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "run.json"]
    assert (out / "notes.txt").read_text("utf-8") == "mine"


# --------------------------------------------------------------------------- --force


def test_force_removes_every_file_of_the_previous_run_and_nothing_else(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_into(out) == 0
    # the user's own files, in the folder and in plots/
    (out / "notes.txt").write_text("my notes", "utf-8")
    (out / "plots" / "README.txt").write_text("mine too", "utf-8")
    (tmp_path / "outside.txt").write_text("not in the folder", "utf-8")
    # a file the previous run listed under a name aqm does not always write, and a hostile entry
    (out / "extra").mkdir()
    (out / "extra" / "listed.bin").write_bytes(b"1")
    record = json.loads((out / "run.json").read_text("utf-8"))
    record["files"] += ["extra/listed.bin", "../outside.txt"]
    (out / "run.json").write_text(json.dumps(record), "utf-8")
    assert run_into(out, "--force") == 2  # an edited record is trusted with nothing
    assert (tmp_path / "outside.txt").read_text("utf-8") == "not in the folder"
    record["files"].remove("../outside.txt")
    (out / "run.json").write_text(json.dumps(record), "utf-8")
    old = tree(out)

    assert run_into(out, "--force", "--set", 'manifest.scheme="other"') == 0
    now = tree(out)
    assert "tiny_wint8_aint8_quant_manifest.json" in old
    assert "tiny_wint8_aint8_quant_manifest.json" not in now
    assert "other_quant_manifest.json" in now
    assert not (out / "extra").exists()
    assert (out / "notes.txt").read_text("utf-8") == "my notes"
    assert (out / "plots" / "README.txt").read_text("utf-8") == "mine too"
    assert (tmp_path / "outside.txt").read_text("utf-8") == "not in the folder"
    assert (out / "autoquant_search_state.pt").read_text("utf-8") == "other"  # written anew
    record_now = read_run(out)
    assert record_now is not None
    assert sorted(record_now.files) == [n for n in now if n not in ("notes.txt", "plots", "plots/README.txt")]


def test_force_into_a_sweep_folder_removes_its_points(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_into(out, "--set", "sweep.calib.seq_len=[32, 64]") == 0
    assert (out / "calib.seq_len=32" / "autoquant_search_state.pt").is_file()
    assert record_of(out).sweep
    (out / "notes.txt").write_text("mine", "utf-8")
    assert run_into(out) == 2  # a sweep is never resumed into, nor overwritten without --force
    assert run_into(out, "--force") == 0
    assert not (out / "calib.seq_len=32").exists()
    assert not (out / "sweep-index.md").exists()
    assert (out / "notes.txt").read_text("utf-8") == "mine"


def test_a_pipeline_toml_aqm_did_not_write_is_never_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "pipeline.toml").write_text(TINY.read_text("utf-8"), "utf-8")
    for extra in ((), ("--force",)):
        assert run_into(out, *extra) == 2
        (line,) = error_lines(capsys.readouterr().err)
        assert f"{out / 'pipeline.toml'} was not written by aqm" in line
    assert (out / "pipeline.toml").read_text("utf-8") == TINY.read_text("utf-8")
    assert tree(out) == ["pipeline.toml"]


# --------------------------------------------------------------------------- failed runs


def test_a_failure_before_the_search_state_leaves_only_the_users_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine", "utf-8")
    runner = FakeRun(StageError("LoadModel", InputError("model.path: no weights")))
    assert run_into(out, using=service(runner)) == 2
    assert error_lines(capsys.readouterr().err) == [
        "aqm: error: stage LoadModel failed: model.path: no weights"
    ]
    assert tree(out) == ["notes.txt"]


def test_disk_full_while_writing_reports_keeps_only_what_resumes_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine", "utf-8")
    report = out / "per-layer-sensitivity.md"
    runner = FakeRun(StageError("WriteReports", disk_full(report)), fail_after="manifest")
    assert run_into(out, using=service(runner)) == 2
    lines = error_lines(capsys.readouterr().err)
    assert lines == [f"aqm: error: stage WriteReports failed: {report}: No space left on device"]
    kit = sorted([*STATE_KIT, "pipeline.toml", "run.json"])
    assert tree(out) == sorted([*kit, "notes.txt"])  # the half-written report set is gone
    record = record_of(out)
    assert record.status.startswith("failed: stage WriteReports failed: ")
    assert sorted(record.files) == kit

    assert run_into(out) == 0
    assert "resuming the interrupted run in" in capsys.readouterr().err
    record = record_of(out)
    assert (record.status, record.resumed) == ("complete", True)


def test_disk_full_while_recording_the_failure_keeps_the_original_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    runner = FakeRun(
        StageError("RunAutoQuant", InputError("autoquant.score_size: too large")), fail_after="state"
    )
    writer = full_disk_when(lambda path, text: path.name == "run.json" and '"failed: ' in text)
    assert run_into(out, using=service(runner, writer)) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == ["aqm: error: stage RunAutoQuant failed: autoquant.score_size: too large"]
    assert f"could not record the failure in {out / 'run.json'}" in err
    assert "No space left on device" in err
    assert record_of(out).status == "running"  # what a killed process leaves, too

    # its owner (this process) has moved on: the next run says so and resumes
    assert run_into(out) == 0
    assert f"the run in {out} was interrupted" in capsys.readouterr().err
    record = record_of(out)
    assert (record.status, record.resumed) == ("complete", True)


def test_a_running_record_whose_owner_is_gone_resumes_as_interrupted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert run_into(out, using=service(FakeRun(KeyboardInterrupt(), fail_after="state"))) == 130
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(gone.stdout)
    record = json.loads((out / "run.json").read_text("utf-8"))
    assert record["status"] == "failed: interrupted (Ctrl-C)"
    first_start = record["started_at"]
    record["status"] = "running"
    record["owner"] = {"pid": pid, "host": socket.gethostname(), "started_at": "2000-01-01T00:00:00+00:00"}
    (out / "run.json").write_text(json.dumps(record), "utf-8")
    capsys.readouterr()

    assert cli.main(["resume", str(out)], service=service()) == 0
    err = capsys.readouterr().err
    assert f"the run in {out} was interrupted (its process {pid} on {socket.gethostname()}" in err
    done = read_run(out)
    assert done is not None
    assert (done.status, done.resumed, done.first_started_at) == ("complete", True, first_start)


def test_a_running_record_whose_owner_lives_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Beside the lock: a live owner named in ``run.json`` also keeps the folder (flock-less file systems)."""
    out = tmp_path / "out"
    assert run_into(out, using=service(FakeRun(KeyboardInterrupt(), fail_after="state"))) == 130
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = process_started_at(sleeper.pid)
        assert started is not None
        record = json.loads((out / "run.json").read_text("utf-8"))
        record["status"] = "running"
        record["owner"] = {"pid": sleeper.pid, "host": socket.gethostname(), "started_at": started}
        (out / "run.json").write_text(json.dumps(record), "utf-8")
        before = tree(out)
        capsys.readouterr()
        for argv in (
            ["resume", str(out)],
            ["resume", str(out), "--force"],
            ["run", str(TINY), "--output", str(out)],
        ):
            assert cli.main(argv, service=service()) == 2
            (line,) = error_lines(capsys.readouterr().err)
            assert f"is in use by aqm process {sleeper.pid} on {socket.gethostname()}" in line
        assert run_into(out, "--force") == 2
        assert tree(out) == before
    finally:
        sleeper.kill()
        sleeper.wait()
    assert cli.main(["resume", str(out)], service=service()) == 0


# --------------------------------------------------------------------------- output paths


def _manifests(tmp: Path) -> tuple[Path, Path]:
    a, b = tmp / "a_quant_manifest.json", tmp / "b_quant_manifest.json"
    a.write_text(manifest_to_json(manifest(descending(["x", "y"]), scheme="a")), "utf-8")
    b.write_text(manifest_to_json(manifest(descending(["y", "x"]), scheme="b")), "utf-8")
    return a, b


def _file(tmp: Path) -> Path:
    (tmp / "f").write_text("a file", "utf-8")
    return tmp / "f"


LONG = "x" * 300
PathCase = tuple[Callable[[Path], list[str]], str]
PATH_CASES: dict[str, PathCase] = {
    "run-parent-is-a-file": (
        lambda t: ["run", str(TINY), "--output", str(_file(t) / "out")],
        r"cannot create output folder .*/f/out: .*/f is a file, not a folder$",
    ),
    "run-output-is-a-file": (
        lambda t: ["run", str(TINY), "--output", str(_file(t))],
        r"output .*/f exists and is not a folder$",
    ),
    "run-name-too-long": (
        lambda t: ["run", str(TINY), "--output", str(t / LONG / "out")],
        rf"cannot create output folder .*/{LONG}/out: File name too long$",
    ),
    "report-output-is-a-file": (
        lambda t: ["report", str(_manifests(t)[0]), "--output", str(_file(t))],
        r"output .*/f exists and is not a folder$",
    ),
    "report-parent-is-a-file": (
        lambda t: ["report", str(_manifests(t)[0]), "--output", str(_file(t) / "r")],
        r"cannot create output folder .*/f/r: .*/f is a file, not a folder$",
    ),
    "report-name-too-long": (
        lambda t: ["report", str(_manifests(t)[0]), "--output", str(t / LONG)],
        r"cannot create output folder .*: File name too long$",
    ),
    "diff-output-is-a-folder": (
        lambda t: ["diff", *map(str, _manifests(t)), "--output", str(t)],
        r"--output .* is a folder; name a file in it, e.g. .*/diff\.md$",
    ),
    "diff-parent-is-a-file": (
        lambda t: ["diff", *map(str, _manifests(t)), "--output", str(_file(t) / "d.md")],
        r"cannot write .*/f/d\.md: .*/f is a file, not a folder$",
    ),
}
SYSFS_CASES: dict[str, PathCase] = {
    "run-into-a-new-read-only-folder": (
        lambda t: ["run", str(TINY), "--output", str(SYS / "aqm-out")],
        r"cannot create output folder /sys/aqm-out: Operation not permitted$",
    ),
    "run-into-a-read-only-folder": (
        lambda t: ["run", str(TINY), "--output", str(SYS)],
        r"cannot write in output folder /sys: Permission denied$",
    ),
    "report-into-a-read-only-folder": (
        lambda t: ["report", str(_manifests(t)[0]), "--output", str(SYS)],
        r"cannot write /sys/[^ /]+: Permission denied$",
    ),
    "diff-into-a-read-only-folder": (
        lambda t: ["diff", *map(str, _manifests(t)), "--output", str(SYS / "d.md")],
        r"cannot write /sys/d\.md: Permission denied$",
    ),
}


def _check_path_case(case: PathCase, tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import re

    argv = case[0](tmp)
    before, sys_before = tree(tmp), sorted(SYS.iterdir()) if SYS.is_dir() else []
    assert cli.main(argv, service=service()) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert re.search(case[1], line), line
    assert tree(tmp) == before  # nothing half-written, no folder left behind
    assert (sorted(SYS.iterdir()) if SYS.is_dir() else []) == sys_before


@pytest.mark.parametrize("case", PATH_CASES.values(), ids=PATH_CASES.keys())
def test_output_path_mistakes_are_one_line(
    case: PathCase, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _check_path_case(case, tmp_path, capsys)


@needs_sysfs
@pytest.mark.parametrize("case", SYSFS_CASES.values(), ids=SYSFS_CASES.keys())
def test_read_only_places_are_one_line(
    case: PathCase, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _check_path_case(case, tmp_path, capsys)


def test_disk_full_at_the_start_of_a_run_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "new" / "out"
    writer = full_disk_when(lambda path, text: path.name == "pipeline.toml")
    assert run_into(out, using=service(writer=writer)) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"aqm: error: cannot write {out / 'pipeline.toml'}: No space left on device"
    ]
    assert tree(tmp_path) == []


def test_a_read_only_file_system_at_the_start_keeps_the_users_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Injected EROFS: the folder exists, holds the user's file, and refuses aqm's first write."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine", "utf-8")

    def read_only(path: Path, text: str) -> Path:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path.parent / f".{path.name}.q1w2e.tmp"))

    assert run_into(out, using=service(writer=read_only)) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"aqm: error: cannot write {out / 'pipeline.toml'}: Read-only file system"
    ]
    assert tree(out) == ["notes.txt"]


@pytest.mark.parametrize("new_folder", [False, True], ids=["existing-folder", "new-folder"])
def test_disk_full_while_writing_reports_leaves_no_report(
    new_folder: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, _ = _manifests(tmp_path)
    out = tmp_path / "reports"
    if not new_folder:
        out.mkdir()
        (out / "notes.txt").write_text("mine", "utf-8")
    before = tree(tmp_path)

    def writes_then_fills(manifest_path: Path, output: Path | None) -> ReportPaths:
        assert output == out
        (out / "plots").mkdir()
        (out / "plots" / "sensitivity-top.png").write_bytes(b"png")
        (out / "per-layer-sensitivity.json").write_text("{}", "utf-8")
        raise OSError(
            errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / ".per-layer-sensitivity.md.z9z9z.tmp")
        )

    using = RunService(library_importer=lambda: 0.0, report_writer=writes_then_fills)
    assert cli.main(["report", str(source), "--output", str(out)], service=using) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"aqm: error: cannot write {out / 'per-layer-sensitivity.md'}: No space left on device"
    ]
    assert tree(tmp_path) == before


def test_disk_full_while_writing_a_diff(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _manifests(tmp_path)
    out = tmp_path / "d" / "diff.md"
    writer = full_disk_when(lambda path, text: True)
    assert cli.main(["diff", str(a), str(b), "--output", str(out)], service=service(writer=writer)) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"aqm: error: cannot write {out}: No space left on device"
    ]
    assert not (tmp_path / "d").exists()


RECORD = RunRecord(
    status=RUNNING,
    started_at="2024-01-01T00:00:00+00:00",
    ended_at=None,
    resumed=False,
    command=("aqm", "run", "p.toml"),
    spec_sha256="0" * 64,
    versions=(("aqm", "0"),),
    device="cpu",
    owner=None,
)


@pytest.mark.parametrize(
    ("status", "sweep", "resumable"),
    [
        (RUNNING, False, True),
        (f"{FAILED}: out of memory", False, True),
        (COMPLETE, False, False),
        (RUNNING, True, True),  # an interrupted sweep: its finished points are skipped, the rest resume
        (f"{FAILED}: 1 of 3 points failed", True, True),
        (COMPLETE, True, False),
    ],
)
def test_interrupted_and_failed_runs_and_sweeps_are_resumable(
    status: str, sweep: bool, resumable: bool
) -> None:
    assert attrs.evolve(RECORD, status=status, sweep=sweep).is_resumable is resumable


@pytest.mark.parametrize(
    ("status", "advice"),
    [(f"{FAILED}: stopped", "aqm resume {folder} goes on with it"), (COMPLETE, "--force replaces it")],
)
def test_a_single_run_into_a_sweep_folder_says_how_to_go_on(tmp_path: Path, status: str, advice: str) -> None:
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(tiny_pipeline_toml(), encoding="utf-8")
    folder = tmp_path / "sweep"
    folder.mkdir()
    write_run(folder, attrs.evolve(RECORD, status=status, sweep=True), atomic_write_text)
    with pytest.raises(InputError) as caught:
        open_run_folder(folder, load_pipeline(pipeline), force=False, created=False)
    message = str(caught.value)
    assert "\n" not in message
    assert f"already holds a sweep ({status})" in message
    assert advice.format(folder=folder) in message
