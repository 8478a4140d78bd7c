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


@pytest.mark.slow
def test_the_runs_kernels_reach_validation_the_measured_points_and_the_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``autoquant.kernels = "pytorch"``: every later stage that fake-quantizes runs ModelOpt's plain
    PyTorch path too (scores and measurements from one arithmetic, and no JIT build on a GPU)."""
    import contextlib
    from collections.abc import Iterator

    from modelopt.torch.quantization import extensions

    from auto_quantize_model.backend.modelopt import patches
    from auto_quantize_model.stages import run_autoquant

    seen: list[tuple[str, object, object]] = []
    real = patches.fake_quant_kernels

    @contextlib.contextmanager
    def recorded(kernels: str) -> Iterator[None]:
        with real(kernels):
            seen.append((kernels, extensions.get_cuda_ext(), extensions.get_cuda_ext_fp8()))
            yield

    monkeypatch.setattr(patches, "fake_quant_kernels", recorded)
    monkeypatch.setattr(run_autoquant, "fake_quant_kernels", recorded)
    toml = tmp_path / "p.toml"
    text = TINY_DEFAULT.read_text(encoding="utf-8").replace(
        "[validate]", '[frontier]\nbits = "9,12"\nmeasure = 1\n\n[validate]'
    )
    toml.write_text(text + "\n[export]\nbits = 9\ncheckpoint = true\n", encoding="utf-8")
    run_dir = tmp_path / "run"
    args = ["run", str(toml), "--output", str(run_dir), "--set", 'autoquant.kernels="pytorch"']
    assert main(args) == 0
    # the search, validation, the measured frontier point and the export
    assert [kernels for kernels, _, _ in seen] == ["pytorch"] * 4
    assert all(ext is None and fp8 is None for _, ext, fp8 in seen)
    record = json.loads((run_dir / "export" / "export.json").read_text(encoding="utf-8"))
    assert record["read_back"]["ok"] is True
    sample = record["read_back"]["weights_sample"]
    assert sample["layers"] > 0
    assert 0 <= sample["differing"] <= sample["of"] // 100  # float32: rounding ties only
    rounding = record["read_back"]["exporter_rounding"]
    assert rounding["written_weights_nll"] == record["read_back"]["exported_nll"]
    fake_quant = rounding["fused_fake_quant_nll"]
    assert rounding["shift"] == pytest.approx(rounding["written_weights_nll"] - fake_quant)
    assert abs(rounding["shift"]) <= record["read_back"]["tolerance"]


@pytest.mark.parametrize(
    ("fmt", "checkpoint_format", "says"),
    [
        ("W4A8_AWQ_BETA_CFG", "modelopt", "is written as W4A8_AWQ, which aqm's read-back cannot decode"),
        ("INT4_AWQ_CFG", "compressed-tensors", "cannot be exported as compressed-tensors"),
    ],
)
def test_a_checkpoint_of_a_refused_format_stops_before_the_copy_is_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, checkpoint_format: str, says: str
) -> None:
    import auto_quantize_model.backend.models as models
    from auto_quantize_model.errors import ConfigError
    from auto_quantize_model.pipeline import Artifacts
    from auto_quantize_model.specs import ExportSpec
    from auto_quantize_model.stages.export_checkpoint import ExportCheckpoint
    from builders import NONE, group, scores

    def load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the unquantized copy must not be loaded")

    monkeypatch.setattr(models, "load", load)
    down = "model.language_model.layers.0.mlp.down_proj"
    run = scores(group(down, (fmt, 4.0, 0.5), NONE, costs=(400.0, 1600.0)), formats=(fmt,))  # budget 8: fmt
    spec = ExportSpec(checkpoint=True, output_dir=str(tmp_path / "export"), format=checkpoint_format)
    with pytest.raises(ConfigError, match=f"^group {down}: format {fmt} {says}"):
        ExportCheckpoint(spec).run(Artifacts.of([run]))
    assert list(tmp_path.iterdir()) == []
