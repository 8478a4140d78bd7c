"""``reports.compare_to``: the report folder gains how the ranking moved against another run."""

from __future__ import annotations

from pathlib import Path

import pytest

from auto_quantize_model.errors import InputError
from auto_quantize_model.pipeline import Artifacts
from auto_quantize_model.render.reports import write_reports
from auto_quantize_model.specs import ReportSpec
from auto_quantize_model.stages.write_reports import RANKING_DIFF, WriteReports
from builders import manifest


def test_the_ranking_diff_names_the_moves_against_the_other_run(tmp_path: Path) -> None:
    text_only = manifest([("a", 3.0), ("b", 2.0), ("c", 1.0)], scheme="text")
    write_reports(text_only, str(tmp_path / "text"), plots=False)
    images = manifest([("c", 3.0), ("a", 2.0), ("b", 1.0)], scheme="images")
    spec = ReportSpec(output_dir=str(tmp_path / "images"), plots=False, compare_to=str(tmp_path / "text"))
    paths = WriteReports(spec).run(Artifacts.of([images]))
    written = tmp_path / "images" / RANKING_DIFF
    assert str(written) in paths.files
    text = written.read_text(encoding="utf-8")
    assert text.startswith(
        f"# Ranking diff: text ({tmp_path / 'text' / 'text_quant_manifest.json'}) (A) vs images (B)\n"
    )
    assert "| `c` | 3 | 1 | -2 |" in text


def test_a_folder_with_no_manifest_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    spec = ReportSpec(output_dir=str(tmp_path / "out"), plots=False, compare_to=str(tmp_path / "empty"))
    with pytest.raises(InputError) as caught:
        WriteReports(spec).run(Artifacts.of([manifest([("a", 1.0)])]))
    assert str(caught.value) == (
        f"reports.compare_to: {tmp_path / 'empty'} holds 0 *_quant_manifest.json files; "
        "give the manifest itself"
    )
    assert not (tmp_path / "out").exists()
