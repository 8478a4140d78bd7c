"""The benchmark's results on plain numbers: timings, score alignment, agreement, tables and JSON."""

from __future__ import annotations

import json
import math
from typing import Any

import attrs
import pytest

from auto_quantize_model.bench.results import (
    BenchReport,
    Environment,
    LayoutRun,
    PipelineRun,
    ScalingPoint,
    Warmup,
    agreement,
    agreement_table,
    agreements,
    format_gib,
    layout_table,
    ratio_spread,
    render_report,
    render_table,
    report_to_dict,
    scaling_table,
    seconds_per_1k_tokens,
    speedup,
    stage_seconds,
    steps_for,
)
from auto_quantize_model.bench.settings import LAYOUTS, BenchSettings
from auto_quantize_model.io.convert import dumps_json

# --------------------------------------------------------------------------------------------------
# The reference layout
# --------------------------------------------------------------------------------------------------


def test_steps_for_calibrates_on_everything_and_scores_leading_batches() -> None:
    assert steps_for((297, 215), 128) == (2, 512, 1, 297)
    assert steps_for((8,) * 64, 128) == (64, 512, 16, 128)
    assert steps_for((1,) * 10, 3) == (10, 10, 3, 3)


# --------------------------------------------------------------------------------------------------
# Arithmetic and agreement
# --------------------------------------------------------------------------------------------------


def test_seconds_per_1k_tokens_and_speedup() -> None:
    assert seconds_per_1k_tokens(3.0, 6000) == pytest.approx(0.5)
    assert math.isnan(seconds_per_1k_tokens(1.0, 0))
    assert speedup(40.0, 8.0) == pytest.approx(5.0)
    assert math.isnan(speedup(0.0, 1.0))
    assert math.isnan(speedup(1.0, math.nan))


def test_stage_seconds_uses_short_labels_and_keeps_order() -> None:
    timings = [("LoadModel", 1.0), ("BuildReferenceCalib", 0.1), ("RunAutoQuant", 2.0), ("Custom", 0.5)]
    assert stage_seconds(timings) == (("load", 1.0), ("calib", 0.1), ("autoquant", 2.0), ("Custom", 0.5))


def _run(layout: str, ranking: list[tuple[str, float]], score_captions: int = 10, **kw: Any) -> LayoutRun:
    values: dict[str, Any] = {
        "layout": layout,
        "stage_seconds": (
            ("load", 1.0),
            ("extract", 0.01),
            ("calib", 0.1),
            ("autoquant", 3.0),
            ("manifest", 0.0),
        ),
        "autoquant_seconds": 2.5,
        "peak_gpu_bytes": None,
        "samples": 32,
        "real_tokens": 400,
        "total_tokens": 512,
        "batches": 4,
        "calib_steps": 4,
        "score_steps": 1,
        "calib_captions": 32,
        "score_captions": score_captions,
        "score_size": 8,
        "calib_forward_steps": 4,
        "score_forward_steps": 1,
        "effective_bits_lm": 8.0,
        "weight_checksum": "abc",
        "leftover_gpu_bytes": None,
        "ranking": tuple(sorted(ranking, key=lambda item: -item[1])),
    }
    values.update(kw)
    return LayoutRun(**values)


RANKING = [(f"layer{i}", float(20 - i)) for i in range(12)]


def test_ratio_spread() -> None:
    assert ratio_spread([2.0, 4.0, 6.0], [1.0, 2.0, 3.0]) == 0.0  # one global scale
    assert ratio_spread([1.0, 3.0], [1.0, 1.0]) == pytest.approx(0.5)  # ratios 1 and 3: sd 1, mean 2
    assert math.isnan(ratio_spread([1.0, 2.0], [0.0, 1.0]))
    assert math.isnan(ratio_spread([1.0, math.nan], [1.0, 1.0]))
    assert math.isnan(ratio_spread([1.0], [1.0]))
    with pytest.raises(ValueError, match="paired"):
        ratio_spread([1.0], [1.0, 2.0])


def test_agreement_of_identical_and_reversed_rankings() -> None:
    same = agreement(_run("packed", RANKING), _run("reference", RANKING), k=10)
    assert (same.spearman, same.kendall, same.top_k_overlap) == (1.0, 1.0, 1.0)
    assert same.groups == 12
    assert same.same_score_captions
    reversed_ranking = [(name, -value) for name, value in RANKING]
    opposite = agreement(_run("padded", RANKING), _run("packed", reversed_ranking), k=5)
    assert opposite.spearman == pytest.approx(-1.0)
    assert opposite.kendall == pytest.approx(-1.0)
    assert opposite.top_k_overlap == 0.0


def test_agreement_flags_different_scored_captions_and_ignores_unshared_groups() -> None:
    first = _run("padded", [*RANKING, ("only_here", 100.0)], score_captions=8)
    second = _run("packed", RANKING, score_captions=297)
    found = agreement(first, second, k=3)
    assert found.groups == 12
    assert found.spearman == 1.0
    assert not found.same_score_captions


def test_agreements_cover_the_pairs_that_were_run() -> None:
    runs = [_run(layout, RANKING) for layout in LAYOUTS]
    assert [(a.first, a.second) for a in agreements(runs)] == [
        ("packed", "reference"),
        ("padded", "reference"),
        ("padded", "packed"),
    ]
    assert [(a.first, a.second) for a in agreements(runs[1:])] == [("packed", "reference")]
    assert agreements(runs[:1]) == ()


# --------------------------------------------------------------------------------------------------
# Rendering and JSON
# --------------------------------------------------------------------------------------------------


def test_render_table_pads_columns() -> None:
    text = render_table(["a", "long header"], [["xyz", "1"], ["q", "22"]])
    lines = text.splitlines()
    assert lines[0] == "| a   | long header |"
    assert lines[1] == "|-----|-------------|"
    assert lines[2] == "| xyz | 1           |"
    assert len({len(line) for line in lines}) == 1
    with pytest.raises(ValueError, match="2 columns"):
        render_table(["a", "b"], [["only one"]])


def test_format_gib() -> None:
    assert format_gib(None) == "n/a"
    assert format_gib(11 * 1024**3) == "11.00 GiB"


def _report(**kw: Any) -> BenchReport:
    runs = (
        _run(
            "padded",
            RANKING,
            autoquant_seconds=40.0,
            real_tokens=6066,
            total_tokens=262144,
            score_captions=128,
        ),
        _run("packed", RANKING, autoquant_seconds=8.0, peak_gpu_bytes=10 * 1024**3, score_captions=297),
        _run("reference", RANKING, score_captions=297, real_tokens=6066, total_tokens=6066),
    )
    values: dict[str, Any] = {
        "settings": BenchSettings(),
        "environment": Environment(
            python="3.11",
            torch="2.13",
            transformers="5.17",
            modelopt="0.47",
            device="cuda:0",
            device_name="NVIDIA H100",
            dtype="bfloat16",
            model="config:qwen3-vl-4b",
            architecture="Qwen3VLForConditionalGeneration",
        ),
        "captions_sha256": "f" * 64,
        "warmup": Warmup(extensions=(("modelopt_cuda_ext", "JIT-built now", 61.0),), autoquant_seconds=70.0),
        "layouts": runs,
        "agreements": agreements(runs),
        "pipeline": PipelineRun(
            stage_seconds=(("load", 3.0), ("autoquant", 4.0), ("reports", 0.5)),
            wall_seconds=9.0,
            load_seconds=3.0,
            autoquant_seconds=3.9,
            peak_gpu_bytes=None,
            files_written=5,
        ),
        "scaling": (
            ScalingPoint(
                source="builtin",
                captions=128,
                real_tokens=1500,
                total_tokens=1536,
                calib_steps=1,
                score_steps=1,
                autoquant_seconds=3.0,
                seconds_per_1k_tokens=2.0,
                peak_gpu_bytes=None,
                weight_checksum="abc",
            ),
        ),
        "weight_checksums": ("abc",),
    }
    values.update(kw)
    return BenchReport(**values)


def test_layout_table_has_a_row_per_layout_with_its_numbers() -> None:
    report = _report()
    table = layout_table(report.layouts)
    rows = table.splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows] == ["padded", "packed", "reference"]
    assert "97.7%" in rows[0]  # 6066 real tokens in 262144
    assert "10.00 GiB" in rows[1]
    assert "297 (asked 8)" in rows[1]
    assert "0.0%" in rows[2]


def test_render_report_has_every_section() -> None:
    text = render_report(_report())
    for expected in (
        "config:qwen3-vl-4b",
        "NVIDIA H100",
        "modelopt 0.47",
        "modelopt_cuda_ext: JIT-built now (61.0 s)",
        "warm-up AutoQuant",
        "weights: identical on every load (checksum abc)",
        "## Layouts",
        "AutoQuant speed-up, packed vs padded: 5.00x",
        "## Per-layer importance agreement",
        "packed vs reference",
        "## Whole pipeline",
        "9.00 s including the model load, 6.00 s excluding it",
        "## Scaling (packed)",
    ):
        assert expected in text, expected
    assert "DIFFERENT" in render_report(_report(weight_checksums=("abc", "def")))
    bare = render_report(_report(layouts=(), agreements=(), pipeline=None, scaling=()))
    assert "## Layouts" not in bare
    assert "## Whole pipeline" not in bare


def test_agreement_and_scaling_tables() -> None:
    report = _report()
    table = agreement_table(report.agreements)
    assert "top-10 overlap" in table
    assert "| packed vs reference | 12     | 1.0000" in table
    assert "| padded vs packed    | 12     | 1.0000   | 1.0000      | 1.00           | 0.0%" in table
    assert table.splitlines()[-1].rstrip(" |").endswith("no")
    nan_row = agreement_table([attrs.evolve(report.agreements[0], spearman=math.nan)])
    assert "n/a" in nan_row
    assert "| builtin       | 128 " in scaling_table(report.scaling)


def test_report_to_dict_is_strict_json_with_every_number() -> None:
    data = report_to_dict(_report())
    text = dumps_json(data)
    parsed = json.loads(text)
    assert parsed["packed_speedup_vs_padded"] == pytest.approx(5.0)
    assert parsed["checksums_identical"] is True
    assert parsed["pipeline"]["wall_without_load"] == pytest.approx(6.0)
    assert [a["spearman"] for a in parsed["agreements"]] == [1.0, 1.0, 1.0]
    assert parsed["layouts"][0]["ranking"][0] == ["layer0", 20.0]
    assert parsed["settings"]["autoquant"]["formats"] == ["INT8_DEFAULT_CFG"]
    assert parsed["settings"]["calib"]["max_samples"] == 512
