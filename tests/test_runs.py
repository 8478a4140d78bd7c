"""``run.json`` records: which ones the same command goes on with, and what a run into a sweep's
folder is told."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from auto_quantize_model.app.runs import COMPLETE, FAILED, RUNNING, RunRecord, open_run_folder, write_run
from auto_quantize_model.errors import InputError
from auto_quantize_model.io.atomic import atomic_write_text
from auto_quantize_model.io.pipeline_file import load_pipeline
from builders import tiny_pipeline_toml

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
