"""The ``[export]`` table runs ExportCheckpoint after SolveBudgets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from auto_quantize_model.app.cli import main
from builders import TINY_DEFAULT


@pytest.mark.slow
def test_export_table_runs_the_stage_after_solve_budgets(tmp_path: Path) -> None:
    """A pipeline with [export] writes the config next to the reports; the stage is in the registry."""
    from auto_quantize_model.io.pipeline_file import load_pipeline
    from auto_quantize_model.stages import stage_names

    source = TINY_DEFAULT
    toml = tmp_path / "p.toml"
    text = source.read_text(encoding="utf-8").replace("[validate]", '[frontier]\nbits = "9,12"\n\n[validate]')
    toml.write_text(text + "\n[export]\nbits = 9\n", encoding="utf-8")
    names = stage_names(load_pipeline(toml))
    assert names.index("SolveBudgets") < names.index("ExportCheckpoint") < names.index("BuildManifest")
    run_dir = tmp_path / "run"
    assert main(["run", str(toml), "--output", str(run_dir)]) == 0
    record = json.loads((run_dir / "export" / "export.json").read_text(encoding="utf-8"))
    assert record["budget"] == 9.0
    assert record["effective_bits_lm"] <= 9.0
    shutil.rmtree(run_dir / "export")
