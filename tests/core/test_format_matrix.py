"""The format-matrix pipeline: every runnable combination runs, the rest says why not."""

from __future__ import annotations

import re
from pathlib import Path

from auto_quantize_model.app.sweep.points import expand_sweep
from builders import REPO

# --------------------------------------------------------------------------------------------------
# The previous tool's matrix as a pipeline file
# --------------------------------------------------------------------------------------------------

MATRIX_FILE = REPO / "pipelines" / "qwen3-vl-4b-format-matrix.toml"


def _comment_text(path: Path) -> str:
    """The file's comments as one line of words (wrapping removed)."""
    lines = path.read_text("utf-8").split("\n[model]")[0].splitlines()
    return " ".join(" ".join(line.lstrip("#").split()) for line in lines)


def test_matrix_file_runs_every_runnable_combination_and_says_why_not_the_rest() -> None:
    from auto_quantize_model.core.format_matrix import CALIB_SIZES, OVERLAYS, matrix, pair_formats
    from auto_quantize_model.io.pipeline_file import load_pipeline

    entries = matrix()
    assert len(entries) == 16 * len(OVERLAYS)
    spec = load_pipeline(MATRIX_FILE)
    points = expand_sweep(spec, source=str(MATRIX_FILE))
    assert len(points) == 16 * len(CALIB_SIZES) == 48
    assert {p.spec.calib.max_samples for p in points} == set(CALIB_SIZES)
    assert tuple(tuple(value) for value in spec.sweep["autoquant.formats"]) == pair_formats()
    formats = [name for p in points for name in p.spec.autoquant.formats]
    ran = [e for e in entries if e.format is not None]
    assert len(formats) == len(ran) * len(CALIB_SIZES) == 246
    assert {p.spec.model.path for p in points} == {"config:qwen3-vl-4b"}

    comments = _comment_text(MATRIX_FILE)
    skipped = [e for e in entries if e.skipped is not None]
    assert f"Skipped: {len(skipped)} of the {len(entries)} pair x overlay combinations" in comments
    counts = "= 432 combinations. 82 distinct formats per size run: 246 (format, size) scorings, as 48"
    assert counts in comments
    for entry in skipped:
        assert entry.skipped is not None
        found = re.search(rf"{entry.pair}: runs \d+; skips (.*?)(?= w(fp4|fp8|int4|int8)_a|$)", comments)
        assert found is not None, entry.pair
        pair_line = found[1]
        assert f"{entry.overlay.name} (" in pair_line, (entry.pair, entry.overlay.name)
        if entry.skipped.startswith("refused: "):
            assert entry.skipped.removeprefix("refused: ") in comments
