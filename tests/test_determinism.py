"""Same inputs and seed, same manifest: two runs of the tiny pipeline differ only in timing fields."""

from __future__ import annotations

from pathlib import Path

import pytest

from auto_quantize_model.app import cli
from builders import comparable_manifest, tiny_pipeline_toml


@pytest.mark.slow
def test_two_runs_give_the_same_manifest(tmp_path: Path) -> None:
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(tiny_pipeline_toml(seed=3), encoding="utf-8")
    for name in ("a", "b"):
        assert cli.main(["run", str(pipeline), "--output", str(tmp_path / name)]) == 0
    first, second = comparable_manifest(tmp_path / "a"), comparable_manifest(tmp_path / "b")
    assert first["groups"]  # something was ranked
    assert first == second
