"""Kill tests on the tiny model: a SIGKILLed run resumes from ModelOpt's checkpoint in its folder.

A driver script runs exactly ``aqm run`` in a subprocess with one hook added that SIGKILLs the
process (a) in the middle of scoring, (b) once scoring is saved (at the manifest stage). The
rerun's forward-step counts (``run.json``) prove what was skipped; its manifest must equal an
uninterrupted run's.

The killed runs and the reruns that resume them each get a fresh interpreter, as after a real
kill: a resumed run must not inherit this session's ModelOpt state (a full-model search earlier in
the session registers Hugging Face attention classes process-wide, and the quantizers they add
are not in the state a fresh process saved). The uninterrupted reference only has to compute the
same scores, so it runs in this process through ``cli.main``, sparing ~13 s of library imports.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from auto_quantize_model.app import cli
from builders import comparable_manifest, tiny_pipeline_toml

pytestmark = pytest.mark.slow

DRIVER = """\
import os, signal, sys

mode = sys.argv[1]
if mode == "scoring":
    from modelopt.torch.quantization import algorithms

    searcher = algorithms.AutoQuantizeGradientSearcher
    original = searcher.estimate_sensitivity_scores

    def estimate(self, *args, **kwargs):
        calls = []

        def kill_on_second(module, inputs, output):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)

        self.model.lm_head.register_forward_hook(kill_on_second)
        return original(self, *args, **kwargs)

    searcher.estimate_sensitivity_scores = estimate
elif mode == "after-scoring":
    from auto_quantize_model.stages.build_manifest import BuildManifest

    def kill(self, inputs):
        os.kill(os.getpid(), signal.SIGKILL)

    BuildManifest.run = kill

from auto_quantize_model.app.cli import main

sys.exit(main(sys.argv[2:]))
"""


def aqm(*argv: str, driver: Path | None = None, mode: str = "") -> subprocess.CompletedProcess[str]:
    head = [str(driver), mode] if driver is not None else ["-m", "auto_quantize_model"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, *head, *argv], capture_output=True, text=True, env=env, timeout=300
    )


def contents(folder: Path) -> list[str]:
    """The folder's files, less the run lock (an OS lock file that a dead owner may leave behind)."""
    return sorted(p.name for p in folder.iterdir() if p.name != ".aqm.lock")


def run_record(folder: Path) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    return record


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("resume")
    (root / "p.toml").write_text(tiny_pipeline_toml(), encoding="utf-8")
    (root / "driver.py").write_text(DRIVER, encoding="utf-8")
    reference = root / "reference"
    assert cli.main(["run", str(root / "p.toml"), "--output", str(reference)]) == 0
    record = run_record(reference)
    assert record["status"] == "complete"
    assert record["forward_steps"]["calibration"] > 0
    assert record["forward_steps"]["scoring"] > 0
    return {"pipeline": root / "p.toml", "driver": root / "driver.py", "reference": reference}


def test_killed_during_scoring_resumes_without_calibrating(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    pipeline = str(files["pipeline"])
    killed = aqm("run", pipeline, "--output", str(out), driver=files["driver"], mode="scoring")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert run_record(out)["status"] == "running"
    assert (out / "autoquant_search_state.pt").is_file()  # calibration was saved before scoring began
    before = contents(out)

    changed = aqm("run", pipeline, "--output", str(out), "--set", "calib.seq_len=16")
    assert changed.returncode == 2
    assert "holds an interrupted run with other settings (calib.seq_len: 32 -> 16)" in changed.stderr
    assert "Traceback" not in changed.stderr
    assert contents(out) == before

    resumed = aqm("run", pipeline, "--output", str(out))
    assert resumed.returncode == 0, resumed.stderr
    record = run_record(out)
    assert record["status"] == "complete"
    assert record["resumed"] is True
    reference_steps = run_record(files["reference"])["forward_steps"]
    assert record["forward_steps"] == {"calibration": 0, "scoring": reference_steps["scoring"]}
    assert "AutoQuant forward steps: calibration 0, scoring" in resumed.stderr
    assert comparable_manifest(out) == comparable_manifest(files["reference"])

    again = aqm("run", pipeline, "--output", str(out))
    assert again.returncode == 2
    assert "already holds a run (complete); pass --force" in again.stderr


def test_killed_after_scoring_resumes_without_forward_steps(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    killed = aqm(
        "run", str(files["pipeline"]), "--output", str(out), driver=files["driver"], mode="after-scoring"
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert run_record(out)["status"] == "running"

    resumed = aqm("resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    record = run_record(out)
    assert record["status"] == "complete"
    assert record["resumed"] is True
    assert record["forward_steps"] == {"calibration": 0, "scoring": 0}
    assert comparable_manifest(out) == comparable_manifest(files["reference"])
