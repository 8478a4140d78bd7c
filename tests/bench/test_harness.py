"""The benchmark's harness: the reference layout, caption counts, checksums, memory, one CPU run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import attrs
import pytest

from auto_quantize_model.app.cli import main
from auto_quantize_model.bench.harness import (
    BuildReferenceCalib,
    builds_extensions,
    count_captions,
    reference_calib_data,
    release_memory,
    track_peak_gpu_memory,
    weight_checksum,
)
from auto_quantize_model.bench.settings import BenchSettings
from auto_quantize_model.core.batching import IGNORE_INDEX, calib_columns
from auto_quantize_model.errors import InputError
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
# Captions
# --------------------------------------------------------------------------------------------------


def test_count_captions_of_the_bundled_file(tmp_path: Path) -> None:
    assert count_captions("builtin") == 512
    path = tmp_path / "c.txt"
    path.write_text("\ufeffone\n\n two \nthree\n", encoding="utf-8")
    assert count_captions(str(path)) == 3
    with pytest.raises(InputError, match="does not exist"):
        count_captions(str(tmp_path / "missing.txt"))


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
