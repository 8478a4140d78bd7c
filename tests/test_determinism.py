"""Same inputs and seed, same manifest: two runs of the tiny pipeline differ only in timing fields."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from auto_quantize_model import cli

PIPELINE = """\
[model]
path = "builtin:tiny-qwen3-vl"
device = "cpu"
seed = 3
[calib]
max_samples = 12
seq_len = 32
batch_size = 2
[autoquant]
formats = ["INT8_DEFAULT_CFG"]
effective_bits = 12.0
score_size = 8
[manifest]
scheme = "t"
[reports]
plots = false
"""


def comparable(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / "t_quant_manifest.json").read_text(encoding="utf-8"))
    assert data["timings"]
    assert data["created_at"]
    data.pop("timings")
    data.pop("created_at")
    return data


@pytest.mark.slow
def test_two_runs_give_the_same_manifest(tmp_path: Path) -> None:
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(PIPELINE, encoding="utf-8")
    for name in ("a", "b"):
        assert cli.main(["run", str(pipeline), "--output", str(tmp_path / name)]) == 0
    first, second = comparable(tmp_path / "a"), comparable(tmp_path / "b")
    assert first["groups"]  # something was ranked
    assert first == second
