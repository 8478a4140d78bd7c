"""Ctrl-C and SIGTERM at any moment leave a ``run.json`` that says what happened (issue 21, item 4).

The signal is sent by the process to itself from inside the injected writer, at the exact moment
that used to lose the record: while the final ``complete`` record is being written. SIGTERM runs
in a child process, since before the fix it killed whatever process received it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from auto_quantize_model.app import cli
from fakes import FakeRun, run_into, service, signal_on_complete

TESTS = Path(__file__).resolve().parents[1]


def status(folder: Path) -> str:
    return str(json.loads((folder / "run.json").read_text("utf-8"))["status"])


def test_ctrl_c_while_the_run_completes_leaves_it_complete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)  # a process-directed signal may land on any thread
    other.start()
    try:
        assert run_into(out, using=service(writer=signal_on_complete(signal.SIGINT))) == 130
    finally:
        stop.set()
        other.join()
    assert status(out) == "complete"
    err = capsys.readouterr().err
    assert f"aqm: interrupted (Ctrl-C) after the end: the run in {out} is complete" in err
    assert "Traceback" not in err


def test_sigterm_while_the_run_completes_leaves_it_complete(tmp_path: Path) -> None:
    out = tmp_path / "out"
    child = (
        "import signal, sys\n"
        "from pathlib import Path\n"
        "from fakes import run_into, service, signal_on_complete\n"
        f"sys.exit(run_into(Path({str(out)!r}), using=service(writer=signal_on_complete(signal.SIGTERM))))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 143, done.stderr
    assert status(out) == "complete"
    assert "terminated (SIGTERM) after the end" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_early_ctrl_c_leaves_a_run_that_aqm_resume_takes_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert run_into(out, using=service(FakeRun(KeyboardInterrupt()))) == 130
    err = capsys.readouterr().err
    assert status(out) == "failed: interrupted (Ctrl-C)"
    assert f"`aqm resume {out}` starts the run again" in err
    assert cli.main(["resume", str(out)], service=service()) == 0
    assert status(out) == "complete"


def test_ctrl_c_after_the_search_state_names_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert run_into(out, using=service(FakeRun(KeyboardInterrupt(), fail_after="state"))) == 130
    assert f"keeps the saved calibration and scores; `aqm resume {out}` goes on" in capsys.readouterr().err
    assert status(out) == "failed: interrupted (Ctrl-C)"


def test_ctrl_c_while_a_sweep_point_completes_leaves_the_point_complete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    using = service(writer=signal_on_complete(signal.SIGINT))
    assert run_into(out, "--set", "sweep.calib.seq_len=[32, 64]", using=using) == 130
    assert status(out / "calib.seq_len=32") == "complete"
    assert status(out) == "failed: interrupted (Ctrl-C)"
    assert "goes on with it" in capsys.readouterr().err
