"""One owner per run folder (issue 15): the folder lock, with real second processes.

A holder process keeps a folder: either a bare lock (a few lines of Python that take it and
sleep) or an ``aqm run`` / sweep whose pipeline runner sleeps instead of loading a model. The
contender is the real ``aqm`` in another process. Killing the holder with SIGKILL must free the
folder at once, and the next run must call the killed run interrupted.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from auto_quantize_model.app.lock import LOCK_NAME, FolderBusy, FolderLock, Owner, read_holder
from builders import REPO

TINY = REPO / "pipelines" / "tiny-qwen3-vl.toml"

HOLD_LOCK = """\
import sys, time
from pathlib import Path
from auto_quantize_model.app.lock import FolderLock

lock = FolderLock.acquire(Path(sys.argv[1]), ("holder",))
print("locked", flush=True)
time.sleep(120)
"""

DRIVER = """\
import sys, time
from pathlib import Path
from auto_quantize_model.app import cli
from auto_quantize_model.app.run_service import RunService
from auto_quantize_model.pipeline import Artifacts

def run(spec, folder):
    Path(spec.autoquant.checkpoint).write_text("search state", "utf-8")
    if sys.argv[1] == "sleep":
        print("running", flush=True)
        time.sleep(120)
    return Artifacts()

service = RunService(pipeline_runner=run, library_importer=lambda: 0.0)
sys.exit(cli.main(sys.argv[2:], service=service))
"""
"""``python driver.py sleep|fast ARGS``: ``aqm ARGS``, whose pipeline saves a search state, then sleeps
(printing ``running`` first) or returns."""


def aqm(*argv: str) -> subprocess.CompletedProcess[str]:
    """The real ``aqm``, in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "auto_quantize_model", *argv], capture_output=True, text=True, timeout=120
    )


def start(script: Path, *argv: str, ready: str) -> subprocess.Popen[str]:
    """Start a holder and wait until it prints ``ready`` (it holds the folder from then on)."""
    process = subprocess.Popen(
        [sys.executable, str(script), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if line.strip() != ready:
        process.kill()
        _, err = process.communicate()
        pytest.fail(f"holder did not start: {line!r} {err}")
    return process


def kill(process: subprocess.Popen[str], sig: int = signal.SIGKILL) -> tuple[int, str]:
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    return process.returncode, err


@pytest.fixture
def scripts(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "hold.py").write_text(HOLD_LOCK, "utf-8")
    (tmp_path / "driver.py").write_text(DRIVER, "utf-8")
    return {"hold": tmp_path / "hold.py", "driver": tmp_path / "driver.py"}


def record(folder: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((folder / "run.json").read_text("utf-8"))
    return data


# --------------------------------------------------------------------------- in one process


def test_a_second_lock_is_refused_naming_the_holder(tmp_path: Path) -> None:
    with FolderLock.acquire(tmp_path, ("aqm", "run", "p.toml")) as held:
        assert held.held
        holder = read_holder((tmp_path / LOCK_NAME).read_text("utf-8"))
        assert holder is not None
        assert holder.owner == Owner.me()
        with pytest.raises(FolderBusy, match=rf"in use by aqm process {os.getpid()} on .*: aqm run p\.toml"):
            FolderLock.acquire(tmp_path)
    assert not (tmp_path / LOCK_NAME).exists()  # the holder removes its file when it lets go
    with FolderLock.acquire(tmp_path):
        pass


def test_an_unreadable_lock_file_still_refuses(tmp_path: Path) -> None:
    with FolderLock.acquire(tmp_path) as held:
        held.path.write_text("", "utf-8")  # as between taking the lock and naming the holder
        with pytest.raises(FolderBusy, match="in use by another aqm process"):
            FolderLock.acquire(tmp_path)


def test_a_file_system_without_locks_warns_and_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Some network mounts answer ``flock`` with ENOLCK: the run goes on, guarded by run.json only."""

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="auto_quantize_model"), FolderLock.acquire(tmp_path) as held:
        assert not held.held
    assert "offers no file locks (No locks available)" in caplog.text
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- two processes


def test_a_run_into_a_locked_folder_is_refused_and_a_killed_holder_frees_it(
    tmp_path: Path, scripts: dict[str, Path]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    holder = start(scripts["hold"], str(out), ready="locked")
    try:
        refused = aqm("run", str(TINY), "--output", str(out))
        assert refused.returncode == 2, refused.stderr
        assert f"is in use by aqm process {holder.pid} on {socket.gethostname()}" in refused.stderr
        assert "holder" in refused.stderr  # the command the holder said it runs
        assert "imported torch" not in refused.stderr  # refused before any heavy work
        assert "Traceback" not in refused.stderr
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written beside it
    finally:
        kill(holder)
    # the kernel dropped the dead holder's lock; its file is left, and taken over
    assert (out / LOCK_NAME).exists()
    with FolderLock.acquire(out):
        pass


@pytest.mark.slow
def test_a_live_run_keeps_its_folder_against_run_force_and_resume(
    tmp_path: Path, scripts: dict[str, Path]
) -> None:
    out = tmp_path / "out"
    holder = start(scripts["driver"], "sleep", "run", str(TINY), "--output", str(out), ready="running")
    try:
        running = record(out)
        assert running["status"] == "running"
        owner = running["owner"]
        assert isinstance(owner, dict)
        assert owner["pid"] == holder.pid
        before = sorted(p.name for p in out.iterdir())
        for argv in (
            ("run", str(TINY), "--output", str(out)),
            ("run", str(TINY), "--output", str(out), "--force"),
            ("resume", str(out)),
            ("resume", str(out), "--force"),
        ):
            refused = aqm(*argv)
            assert refused.returncode == 2, (argv, refused.stderr)
            assert f"is in use by aqm process {holder.pid}" in refused.stderr, argv
            assert f"aqm run {TINY} --output {out}" in refused.stderr  # what the holder runs
        assert sorted(p.name for p in out.iterdir()) == before
        assert record(out) == running
    finally:
        kill(holder)
    assert record(out)["status"] == "running"  # SIGKILL leaves no chance to write anything

    resumed = subprocess.run(
        [sys.executable, str(scripts["driver"]), "fast", "resume", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"the run in {out} was interrupted (its process {holder.pid} on" in resumed.stderr
    done = record(out)
    assert (done["status"], done["resumed"]) == ("complete", True)
    assert not (out / LOCK_NAME).exists()


@pytest.mark.slow
def test_a_sweep_locks_its_folder(tmp_path: Path, scripts: dict[str, Path]) -> None:
    out = tmp_path / "sweep"
    argv = ("run", str(TINY), "--output", str(out), "--set", "sweep.calib.seq_len=[32, 64]")
    holder = start(scripts["driver"], "sleep", *argv, ready="running")
    try:
        with pytest.raises(FolderBusy, match=rf"in use by aqm process {holder.pid}"):
            FolderLock.acquire(out)
        refused = aqm("run", str(TINY), "--output", str(out), "--force")
        assert refused.returncode == 2
        assert f"is in use by aqm process {holder.pid}" in refused.stderr
        assert record(out)["sweep"] is True
    finally:
        kill(holder)
    with FolderLock.acquire(out):
        pass


def test_sigterm_during_a_run_records_it_and_lets_go(tmp_path: Path, scripts: dict[str, Path]) -> None:
    out = tmp_path / "out"
    holder = start(scripts["driver"], "sleep", "run", str(TINY), "--output", str(out), ready="running")
    code, err = kill(holder, signal.SIGTERM)
    assert code == 143, err
    assert "aqm: terminated (SIGTERM)" in err
    assert "Traceback" not in err
    assert record(out)["status"] == "failed: terminated (SIGTERM)"
    assert not (out / LOCK_NAME).exists()
    assert (out / "autoquant_search_state.pt").is_file()  # kept: the same command resumes
