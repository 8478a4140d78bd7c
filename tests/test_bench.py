"""aqm bench: the pure helpers (reference layout, score alignment, tables, JSON), then one CPU run."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import attrs
import pytest

from auto_quantize_model.app.cli import main
from auto_quantize_model.bench.command import add_bench_arguments, build_parser, settings_from_args
from auto_quantize_model.bench.harness import (
    BuildReferenceCalib,
    builds_extensions,
    count_captions,
    reference_calib_data,
    release_memory,
    track_peak_gpu_memory,
    weight_checksum,
)
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
from auto_quantize_model.bench.settings import LAYOUTS, BenchSettings, ScalingSource, parse_scaling_item
from auto_quantize_model.core.batching import IGNORE_INDEX, calib_columns
from auto_quantize_model.errors import ConfigError, InputError
from auto_quantize_model.io.convert import dumps_json
from auto_quantize_model.pipeline import Artifacts
from auto_quantize_model.specs import CalibSpec
from fakes import FakeTokenizer, fake_loaded

# --------------------------------------------------------------------------------------------------
# The reference layout
# --------------------------------------------------------------------------------------------------

TOKENS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]


def _reference(token_lists: list[list[int]], seq_len: int = 16) -> Any:
    return reference_calib_data(token_lists, seq_len, pad_id=0, captions_path="p", captions_sha256="h")


def test_reference_is_one_unpadded_caption_per_batch() -> None:
    data = _reference(TOKENS)
    assert data.captions_per_batch == (1, 1, 1, 1)
    assert len(data.batches) == len(TOKENS)
    for ids, batch in zip(TOKENS, data.batches, strict=True):
        assert set(batch) == {"input_ids", "position_ids", "labels"}  # no attention_mask: nothing to hide
        assert batch["input_ids"].tolist() == [ids]
        assert batch["position_ids"].tolist() == [list(range(len(ids)))]
        assert batch["labels"].tolist() == [[IGNORE_INDEX, *ids[1:]]]
    stats = data.stats
    assert stats.real_tokens == stats.total_tokens == sum(len(ids) for ids in TOKENS)
    assert stats.padding_fraction == 0.0
    assert (stats.samples, stats.batches, stats.batch_size, stats.truncated_samples) == (4, 4, 1, 0)


def test_reference_truncates_like_the_other_layouts() -> None:
    data = _reference([[1, 2, 3, 4, 5], [6, 7]], seq_len=3)
    assert [b["input_ids"].tolist() for b in data.batches] == [[[1, 2, 3]], [[6, 7]]]
    assert data.stats.truncated_samples == 1
    assert data.stats.real_tokens == 5


def test_reference_and_packed_hold_the_same_tokens() -> None:
    packed = calib_columns(
        TOKENS,
        CalibSpec(layout="packed", max_samples=4, seq_len=8, batch_size=2),
        pad_id=0,
        captions_path="p",
        captions_sha256="h",
    )
    reference = _reference(TOKENS, seq_len=8)
    assert reference.stats.real_tokens == packed.stats.real_tokens
    assert sum(reference.captions_per_batch) == sum(packed.captions_per_batch) == 4


def test_steps_for_calibrates_on_everything_and_scores_leading_batches() -> None:
    assert steps_for((297, 215), 128) == (2, 512, 1, 297)
    assert steps_for((8,) * 64, 128) == (64, 512, 16, 128)
    assert steps_for((1,) * 10, 3) == (10, 10, 3, 3)


def test_reference_stage_reads_tokenizes_and_builds(tmp_path: Path) -> None:
    captions = tmp_path / "c.txt"
    captions.write_text("a bb ccc\n\nd ee\nfff\n", encoding="utf-8")
    tokenizer = FakeTokenizer()
    stage = BuildReferenceCalib(CalibSpec(captions=str(captions), max_samples=2, seq_len=2))
    data = stage.run(Artifacts.of([fake_loaded(tokenizer)]))
    assert [b["input_ids"].tolist() for b in data.batches] == [[[10, 11]], [[13, 14]]]  # a bb | d ee
    assert tokenizer.calls[0]["add_special_tokens"] is False  # as the calibration stage asks
    assert data.captions == ("a bb ccc", "d ee")
    assert data.stats.truncated_samples == 1
    assert data.stats.max_samples == 2
    assert data.stats.captions_path == str(captions.resolve())


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


def test_parse_scaling_item() -> None:
    assert parse_scaling_item("builtin") == ScalingSource("builtin", None)
    assert parse_scaling_item("builtin:128") == ScalingSource("builtin", 128)
    assert parse_scaling_item("/data/c4096.txt:4096") == ScalingSource("/data/c4096.txt", 4096)
    assert parse_scaling_item("C:/data/caps.txt") == ScalingSource("C:/data/caps.txt", None)
    with pytest.raises(ConfigError, match="must be > 0"):
        parse_scaling_item("builtin:0")
    with pytest.raises(ConfigError, match="missing"):
        parse_scaling_item(":12")


def test_count_captions_of_the_bundled_file(tmp_path: Path) -> None:
    assert count_captions("builtin") == 512
    path = tmp_path / "c.txt"
    path.write_text("\ufeffone\n\n two \nthree\n", encoding="utf-8")
    assert count_captions(str(path)) == 3
    with pytest.raises(InputError, match="does not exist"):
        count_captions(str(tmp_path / "missing.txt"))


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


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def test_settings_from_args_defaults_and_parsing() -> None:
    parser = build_parser()
    defaults = settings_from_args(parser.parse_args([]))
    assert defaults.load.path == "builtin:tiny-qwen3-vl"
    assert defaults.layouts == LAYOUTS
    assert defaults.scaling == (ScalingSource("builtin", 128), ScalingSource("builtin", 512))
    assert defaults.rounds == 1
    calib, search = defaults.calib, defaults.autoquant
    assert (calib.max_samples, calib.seq_len, calib.batch_size, search.score_size) == (512, 512, 8, 128)
    assert defaults == BenchSettings(scaling=defaults.scaling)  # the flags' defaults are the specs' own
    args = parser.parse_args(
        [
            "--formats",
            "INT8_DEFAULT_CFG,FP8_DEFAULT_CFG",
            "--layouts",
            "packed",
            "reference",
            "packed",
            "--skip-scaling",
            "--skip-pipeline",
            "--rounds",
            "2",
        ]
    )
    chosen = settings_from_args(args)
    assert chosen.rounds == 2
    assert chosen.autoquant.formats == ("INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG")
    assert chosen.layouts == ("packed", "reference")
    assert chosen.scaling == ()
    assert not chosen.pipeline


@pytest.mark.parametrize("argv", [["--max-samples", "0"], ["--layouts", "bogus"], ["--batch-size", "x"]])
def test_parser_refuses_bad_values(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)


def test_a_spec_range_check_reaches_the_command_line() -> None:
    with pytest.raises(ConfigError, match=r"effective_bits: must be in \(0, 16\], got 20"):
        settings_from_args(build_parser().parse_args(["--effective-bits", "20"]))


def test_flags_register_on_a_subcommand() -> None:
    parser = argparse.ArgumentParser(prog="aqm")
    add_bench_arguments(parser.add_subparsers(dest="command").add_parser("bench"))
    args = parser.parse_args(["bench", "--model", "config:qwen3-vl-4b", "--skip-scaling", "--rounds", "2"])
    settings = settings_from_args(args)
    assert (args.command, settings.load.path, settings.scaling, settings.rounds) == (
        "bench",
        "config:qwen3-vl-4b",
        (),
        2,
    )


# --------------------------------------------------------------------------------------------------
# Torch-side helpers (fast)
# --------------------------------------------------------------------------------------------------


def test_weight_checksum_sees_every_bit() -> None:
    import torch

    def model(seed: int, dtype: torch.dtype = torch.float32) -> torch.nn.Sequential:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 2)).to(dtype)

    assert weight_checksum(model(0)) == weight_checksum(model(0))
    assert weight_checksum(model(0)) != weight_checksum(model(1))
    changed = model(0)
    layer = changed[0]
    assert isinstance(layer, torch.nn.Linear)
    with torch.no_grad():
        layer.weight[1, 2] = torch.nextafter(layer.weight[1, 2], torch.tensor(10.0))  # one ulp
    assert weight_checksum(changed) != weight_checksum(model(0))
    assert weight_checksum(model(0, torch.bfloat16)) == weight_checksum(model(0, torch.bfloat16))
    assert weight_checksum(model(0, torch.bfloat16)) != weight_checksum(model(0))


def test_memory_helpers_on_cpu() -> None:
    with track_peak_gpu_memory("cpu") as peaks:
        pass
    assert peaks == []
    assert release_memory("cpu") is None


# --------------------------------------------------------------------------------------------------
# End to end on CPU
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_main_runs_every_layout_on_the_tiny_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--device",
            "cpu",
            "--max-samples",
            "8",
            "--seq-len",
            "64",
            "--batch-size",
            "2",
            "--score-size",
            "2",
            "--scaling-captions",
            "builtin:6",
            "--no-plots",
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    table = printed.split("## Layouts")[1].split("##")[0]
    layout_rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:]
    assert layout_rows == ["padded", "packed", "reference"]
    assert "Inserted" not in printed  # ModelOpt's own prints go to stderr
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["checksums_identical"] is True
    assert len(data["agreements"]) == 3
    for found in data["agreements"]:
        assert isinstance(found["spearman"], float)
        assert math.isfinite(found["spearman"])
        assert found["groups"] == 17  # 4 layers x (qkv, o, gate/up, down) + lm_head
    layouts = {run["layout"]: run for run in data["layouts"]}
    assert layouts["reference"]["total_tokens"] == layouts["reference"]["real_tokens"]
    assert layouts["reference"]["score_captions"] == layouts["packed"]["score_captions"]
    assert layouts["padded"]["score_captions"] == 2
    assert layouts["padded"]["total_tokens"] == 8 * 64
    assert data["agreements"][0]["same_score_captions"] is True
    assert data["pipeline"]["files_written"] >= 3
    assert [p["captions"] for p in data["scaling"]] == [6]


def test_rounds_report_the_last_run_of_each_layout(mocker: Any) -> None:
    import auto_quantize_model.bench.harness as bench

    calls: list[str] = []

    def fake_run(s: Any, layout: str, calib: Any, score_size: int) -> Any:
        calls.append(layout)
        return mocker.Mock(layout=layout, autoquant_seconds=float(len(calls)), score_captions=1)

    mocker.patch.object(bench, "warm_up", return_value=(mocker.Mock(), mocker.Mock(device="cpu"), "c"))
    mocker.patch.object(bench, "environment", return_value=mocker.Mock())
    mocker.patch.object(bench, "run_layout", side_effect=fake_run)
    mocker.patch.object(bench, "agreements", return_value=())
    settings = BenchSettings(
        layouts=("padded", "packed"), pipeline=False, rounds=2, calib=CalibSpec(max_samples=8)
    )
    report = bench.run_bench(settings)
    assert calls == ["padded", "packed", "padded", "packed"]
    assert [(r.layout, r.autoquant_seconds) for r in report.layouts] == [("padded", 3.0), ("packed", 4.0)]


def test_warm_up_builds_the_extensions_only_where_the_runs_use_them() -> None:
    extension = BenchSettings()
    pytorch = attrs.evolve(extension, autoquant=attrs.evolve(extension.autoquant, kernels="pytorch"))
    assert builds_extensions("cuda", extension)
    assert builds_extensions("cuda:1", extension)
    assert not builds_extensions("cuda", pytorch)
    assert not builds_extensions("cpu", extension)


class FakeExtensionGetter:
    """Stands in for one of ModelOpt's ``get_cuda_ext*`` loaders; ``extension`` set = loaded before."""

    def __init__(self, calls: list[str], name: str, result: object, loaded: bool = False) -> None:
        self.calls, self.name, self.result = calls, name, result
        if loaded:
            self.extension = result

    def __call__(self) -> object:
        self.calls.append(self.name)
        return self.result


def test_warm_up_loads_the_extensions_the_formats_rows_name() -> None:
    from auto_quantize_model.backend.modelopt.search import warm_cuda_extensions
    from auto_quantize_model.core.formats import cuda_extensions

    calls: list[str] = []
    getters = {
        "modelopt_cuda_ext": FakeExtensionGetter(calls, "int", object(), loaded=True),
        "modelopt_cuda_ext_fp8": FakeExtensionGetter(calls, "fp8", object()),
        "modelopt_cuda_ext_mx": FakeExtensionGetter(calls, "mx", None),
    }
    # W4A8_AWQ_BETA_CFG has FP8 activations without FP8 in its name; wfp4_afp4 is NVFP4 without
    # NVFP4 in its name: the substring match of old warmed neither
    wanted = cuda_extensions(["W4A8_AWQ_BETA_CFG", "wfp4_afp4"])
    found = warm_cuda_extensions(wanted, getters, built=lambda name: name == "modelopt_cuda_ext_fp8")
    assert [(name, what) for name, what, _ in found] == [
        ("modelopt_cuda_ext", "already loaded in this process"),
        ("modelopt_cuda_ext_fp8", "prebuilt, loaded"),
        ("modelopt_cuda_ext_mx", "failed to build or load (ModelOpt falls back to slower code)"),
    ]
    assert calls == ["fp8", "mx"]
    assert warm_cuda_extensions(cuda_extensions(["wint8_aint8"]), getters) == (
        ("modelopt_cuda_ext", "already loaded in this process", 0.0),
    )
