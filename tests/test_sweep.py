"""Sweeps: expansion, up-front checks, folder names, failure bookkeeping, the index."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from auto_quantize_model.app.folders import INDEX_NAME
from auto_quantize_model.app.sweep import (
    PointResult,
    SweepPoint,
    expand_sweep,
    folder_name,
    point_label,
    render_index,
    run_sweep,
)
from auto_quantize_model.errors import ConfigError, InputError
from auto_quantize_model.io.manifest import Manifest, ModelInfo
from auto_quantize_model.io.pipeline_file import spec_from_dict
from auto_quantize_model.specs import PipelineSpec
from builders import INT8, descending, manifest

REPO = Path(__file__).resolve().parents[1]


def make_spec(sweep: dict[str, list[object]] | None = None, **tables: object) -> PipelineSpec:
    raw: dict[str, object] = {"model": {"path": "builtin:tiny-qwen3-vl", "device": "cpu"}, **tables}
    if sweep is not None:
        raw["sweep"] = sweep
    return spec_from_dict(raw, source="s.toml")


def fake_manifest(names: list[str], bits: float) -> Manifest:
    model = ModelInfo(source="builtin:tiny-qwen3-vl", architecture="X", dtype="float32", device="cpu")
    return manifest(
        descending(names), fmt=INT8, score_samples=4, scheme="s", target=12.0, bits=bits, model=model
    )


def test_no_sweep_is_one_point_holding_the_spec() -> None:
    spec = make_spec()
    (point,) = expand_sweep(spec)
    assert point.spec is spec
    assert point.label == ""
    assert point.settings == ()


def test_cartesian_product_in_file_order() -> None:
    spec = make_spec(sweep={"autoquant.method": ["gradient", "kl_div"], "calib.seq_len": [32, 64]})
    points = expand_sweep(spec)
    assert [p.label for p in points] == [
        "autoquant.method=gradient,calib.seq_len=32",
        "autoquant.method=gradient,calib.seq_len=64",
        "autoquant.method=kl_div,calib.seq_len=32",
        "autoquant.method=kl_div,calib.seq_len=64",
    ]
    assert [(p.spec.autoquant.method, p.spec.calib.seq_len) for p in points] == [
        ("gradient", 32),
        ("gradient", 64),
        ("kl_div", 32),
        ("kl_div", 64),
    ]
    assert all(p.spec.sweep == {} for p in points)
    assert len({p.folder for p in points}) == 4


def test_sweep_over_a_list_setting_and_into_an_absent_table() -> None:
    spec = make_spec(
        sweep={
            "autoquant.formats": [["INT8_DEFAULT_CFG"], ["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"]],
            "validate.k": [2],
        }
    )
    points = expand_sweep(spec)
    assert [p.spec.autoquant.formats for p in points] == [
        ("INT8_DEFAULT_CFG",),
        ("INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"),
    ]
    assert all(p.spec.validate is not None and p.spec.validate.k == 2 for p in points)
    assert points[1].label == "autoquant.formats=INT8_DEFAULT_CFG+FP8_DEFAULT_CFG,validate.k=2"


def test_every_point_is_checked_before_anything_runs() -> None:
    spec = make_spec(sweep={"calib.seq_len": [32, "64", 0], "autoquant.method": ["gradient", "fast"]})
    with pytest.raises(ConfigError) as info:
        expand_sweep(spec, source="s.toml")
    lines = str(info.value).splitlines()
    assert len(lines) == 3
    assert (
        "s.toml: sweep point calib.seq_len=64,autoquant.method=gradient; "
        'calib.seq_len=64,autoquant.method=fast: calib.seq_len: expected int, got str "64"'
    ) in lines
    assert any(
        line.endswith(': autoquant.method: expected one of "gradient", "kl_div", got str "fast"')
        for line in lines
    )
    # a point with two problems reports both (the range check runs even when the method is wrong)
    assert (
        "s.toml: sweep point calib.seq_len=0,autoquant.method=gradient; "
        "calib.seq_len=0,autoquant.method=fast: calib.seq_len: must be > 0, got 0"
    ) in lines


def test_a_problem_of_every_point_is_reported_once(tmp_path: Path) -> None:
    spec = make_spec(sweep={"calib.seq_len": [32, 64]}, calib={"captions": str(tmp_path / "no.txt")})
    with pytest.raises(InputError) as info:
        expand_sweep(spec, source="s.toml")
    assert str(info.value) == f"s.toml: calib.captions: {tmp_path / 'no.txt'} does not exist"


def test_folder_names_are_safe_and_readable() -> None:
    assert folder_name([("autoquant.method", "kl_div"), ("calib.seq_len", 256)]) == (
        "autoquant.method=kl_div,calib.seq_len=256"
    )
    assert folder_name([("calib.captions", "/data/coco/captions small.txt")]) == (
        "calib.captions=captions_small.txt"
    )
    assert folder_name([("autoquant.effective_bits", 4.5)]) == "autoquant.effective_bits=4.5"
    long = folder_name([("autoquant.formats", ["wint4-b128_aint8-token"] * 10)])
    assert len(long) <= 96
    assert "/" not in long
    assert point_label([("reports.plots", False)]) == "reports.plots=false"


def test_colliding_folder_names_get_a_suffix(tmp_path: Path) -> None:
    files = [tmp_path / "a" / "x.txt", tmp_path / "b" / "x.txt"]
    for file in files:
        file.parent.mkdir()
        file.write_text("a caption\n", encoding="utf-8")
    spec = make_spec(sweep={"calib.captions": [str(f) for f in files]}, calib={"max_samples": 1})
    points = expand_sweep(spec)
    assert [p.folder for p in points] == ["calib.captions=x.txt", "calib.captions=x.txt-2"]
    assert [p.spec.calib.captions for p in points] == [str(f) for f in files]


def test_run_sweep_records_a_failure_and_goes_on(tmp_path: Path) -> None:
    spec = make_spec(sweep={"calib.seq_len": [16, 32, 64]})
    points = expand_sweep(spec)
    seen: list[str] = []

    def run_point(point: SweepPoint, folder: Path) -> Manifest | None:
        seen.append(folder.name)
        if point.spec.calib.seq_len == 32:
            raise InputError("captions file is empty | really")
        if point.spec.calib.seq_len == 64:
            raise RuntimeError("boom\nsecond line")
        # the index of the points before this one is already on disk
        return fake_manifest([f"layer{i}" for i in range(7)], 11.5)

    results = run_sweep(points, tmp_path, run_point, title="s.toml")
    assert seen == [p.folder for p in points]
    assert [r.status for r in results] == [
        "ok",
        "failed: captions file is empty | really",
        "failed: RuntimeError: boom",
    ]
    assert results[0].effective_bits == 11.5
    assert results[0].top_layers == ("layer0", "layer1", "layer2", "layer3", "layer4")
    index = (tmp_path / INDEX_NAME).read_text(encoding="utf-8")
    assert index.startswith("# Sweep: s.toml\n")
    assert "3 of 3 points run, 2 failed." in index
    rows = [line for line in index.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 3
    assert "11.500" in rows[0]
    assert "`layer4`" in rows[0]
    assert "`layer5`" not in rows[0]
    assert "failed: captions file is empty \\| really" in rows[1]
    assert rows[0].count("|") - rows[0].count("\\|") == 8


def test_run_sweep_lets_ctrl_c_through(tmp_path: Path) -> None:
    points = expand_sweep(make_spec(sweep={"calib.seq_len": [16, 32]}))

    def run_point(point: SweepPoint, folder: Path) -> Manifest | None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(points, tmp_path, run_point)


def test_render_index_of_a_partial_sweep() -> None:
    points = expand_sweep(make_spec(sweep={"calib.seq_len": [16, 32]}))
    text = render_index([PointResult(points[0], "ok", 1.25)], total=2)
    assert "1 of 2 points run, 0 failed." in text
    assert "[calib.seq_len=16](calib.seq_len=16/)" in text
    assert "`calib.seq_len = 16`" in text
    assert "1.2 s" in text or "1.3 s" in text


@pytest.mark.slow
def test_two_point_sweep_on_the_tiny_model(tmp_path: Path) -> None:
    pipeline = tmp_path / "sweep.toml"
    pipeline.write_text(
        """
[model]
path = "builtin:tiny-qwen3-vl"
device = "cpu"
[calib]
max_samples = 16
seq_len = 32
batch_size = 4
[autoquant]
formats = ["INT8_DEFAULT_CFG"]
effective_bits = 12.0
score_size = 8
[manifest]
scheme = "tiny"
[reports]
plots = false
[sweep]
"autoquant.method" = ["gradient", "kl_div"]
""",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "auto_quantize_model", "run", str(pipeline), "--output", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    index = (out / INDEX_NAME).read_text(encoding="utf-8")
    assert "2 of 2 points run, 0 failed." in index
    for method in ("gradient", "kl_div"):
        folder = out / f"autoquant.method={method}"
        assert (folder / "tiny_quant_manifest.json").is_file()
        assert (folder / "per-layer-sensitivity.md").is_file()
        assert f'method = "{method}"' in (folder / "pipeline.toml").read_text(encoding="utf-8")
    assert "[sweep]" in (out / "pipeline.toml").read_text(encoding="utf-8")
    rows = [line for line in index.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 2
    assert all(row.rstrip().endswith("| ok |") for row in rows)
    assert all("model.language_model.layers." in row for row in rows)
