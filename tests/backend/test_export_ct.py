"""``aqm export --format compressed-tensors``: the mix written with compressed-tensors, read by transformers.

Fast tests check the flag and the refusals before anything is loaded (the scheme of each format:
core/test_ct_config.py). The slow ones export the tiny model's INT8 W8A8 run (the session's
``tiny_default_run``) and one tiny run that mixes FP8 with max-calibrated INT4 blocks, then load
each folder with ``from_pretrained`` through transformers' own compressed-tensors quantizer, not
our code.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from auto_quantize_model.app.cli import main
from auto_quantize_model.app.run_service import RunService
from auto_quantize_model.core.scores import NO_QUANT
from auto_quantize_model.io.manifest import manifest_to_json
from builders import TINY_DEFAULT, AqmRun, manifest

CT = "compressed-tensors"
INT8_MANIFEST = "tiny_wint8_aint8_quant_manifest.json"


def export(
    capsys: pytest.CaptureFixture[str], *argv: str, service: RunService | None = None
) -> tuple[int, str, str]:
    code = main(["export", *argv], service=service)
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("aqm: error:")]


# --------------------------------------------------------------------------------------------------
# Which formats map, and to what
# --------------------------------------------------------------------------------------------------


def test_aqm_formats_lists_the_export_formats(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["formats"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split()[-1] == "export"
    column = {line.split()[0]: re.split(r"\s{2,}", line)[-1] for line in rows[2:] if line.strip()}
    assert column["INT8_DEFAULT_CFG"] == "modelopt, compressed-tensors"
    assert column["INT4_AWQ_CFG"] == "modelopt"
    assert column["wfp8_a16"] == "compressed-tensors"
    assert column["MXFP4_DEFAULT_CFG"] == "-"


# --------------------------------------------------------------------------------------------------
# The flag
# --------------------------------------------------------------------------------------------------


def test_compressed_tensors_without_checkpoint_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code, stdout, err = export(capsys, str(tmp_path), "--output", str(out), "--format", CT)
    assert code == 2
    assert stdout == ""
    assert error_lines(err) == [
        "aqm: error: --format compressed-tensors writes a checkpoint (the weights are the format): "
        "add --checkpoint"
    ]
    assert not out.exists()


def test_an_unknown_format_is_refused_by_the_parser(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["export", str(tmp_path), "--output", str(tmp_path / "o"), "--format", "gguf"])
    assert exited.value.code == 2
    assert "invalid choice: 'gguf'" in capsys.readouterr().err


def test_a_refused_format_in_the_mix_stops_before_the_model_is_loaded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    shutil.copyfile(TINY_DEFAULT, run / "pipeline.toml")
    modules = ["model.language_model.layers.0.mlp.down_proj", "model.language_model.layers.1.mlp.down_proj"]
    data = manifest([(name, 1.0) for name in modules], fmt="INT4_AWQ_CFG", target=8.0)
    (run / "test_scheme_quant_manifest.json").write_text(manifest_to_json(data), encoding="utf-8")
    loads: list[object] = []

    def loader(pipeline: object) -> Any:
        loads.append(pipeline)
        raise AssertionError("the model must not be loaded")

    out = tmp_path / "out"
    code, stdout, err = export(
        capsys,
        str(run),
        "--output",
        str(out),
        "--checkpoint",
        "--format",
        CT,
        service=RunService(export_loader=loader),
    )
    assert code == 2
    assert stdout == ""
    [line] = error_lines(err)
    assert line.startswith(
        f"aqm: error: group {modules[0]}: format INT4_AWQ_CFG cannot be exported as compressed-tensors: "
        "its awq_lite calibration"
    )
    assert "export it with --format modelopt" in line
    assert loads == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# --------------------------------------------------------------------------------------------------
# The tiny model, exported and read back by transformers
# --------------------------------------------------------------------------------------------------


def read_back_with_transformers(folder: Path) -> Any:
    """``from_pretrained`` as a user would call it (compressed weights, decompressed on first use)."""
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(folder))
    ids = torch.tensor([[3, 17, 42, 99, 5, 8]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return model, logits


def check_export(folder: Path, choice: dict[str, str]) -> dict[str, Any]:
    """The folder's quantization_config lists exactly ``choice`` (module -> format); returns export.json."""
    import torch

    record = json.loads((folder / "export.json").read_text(encoding="utf-8"))
    assert record["format"] == CT
    back = record["read_back"]
    assert back["ok"] is True
    assert abs(back["difference"]) <= back["tolerance"] == 5e-4
    assert back["weights"]["relative"] <= back["weights"]["tolerance"] == 1e-5
    assert "CompressedTensorsHfQuantizer" in back["loader"]
    quant = json.loads((folder / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    assert quant["quant_method"] == CT
    assert quant["quantization_status"] == "compressed"
    chosen = {fmt for fmt in choice.values() if fmt != NO_QUANT}
    assert set(quant["config_groups"]) == chosen
    per_format = back["weights"]["per_format"]
    assert set(per_format) == chosen
    assert all(found["relative"] <= back["weights"]["tolerance"] for found in per_format.values())
    assert max(found["relative"] for found in per_format.values()) == back["weights"]["relative"]
    for fmt, group in quant["config_groups"].items():
        assert sorted(group["targets"]) == sorted(m for m, f in choice.items() if f == fmt)
    assert {m for m, f in choice.items() if f == NO_QUANT} <= set(quant["ignore"])
    assert not set(quant["ignore"]) & {m for m, f in choice.items() if f != NO_QUANT}
    model, logits = read_back_with_transformers(folder)
    assert torch.isfinite(logits).all()
    assert logits.shape[-1] == model.config.get_text_config().vocab_size
    assert "vllm serve" in (folder / "README.md").read_text(encoding="utf-8")
    result: dict[str, Any] = record
    return result


def manifest_choice(folder: Path, name: str) -> dict[str, str]:
    """Every module's format at the run's budget as the frontier picks it (what aqm export writes:
    the least predicted score, which can beat ModelOpt's own choice)."""
    from auto_quantize_model.app.run_folder import FinishedRun
    from auto_quantize_model.specs import FrontierSpec

    run = FinishedRun.open(folder / name)
    budget = run.manifest.scheme.effective_bits_target
    frontier = run.frontier(FrontierSpec(bits=repr(budget), workers=1)).frontier
    chosen = dict(zip(frontier.groups, frontier.point(budget).formats, strict=True))
    return {
        module: chosen.get(group.name, NO_QUANT)
        for group in run.manifest.groups
        for module in group.module_names
    }


@pytest.mark.slow
def test_int8_w8a8_run_exports_and_transformers_reads_it_back(
    tiny_default_run: AqmRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tiny_default_run.returncode == 0, tiny_default_run.stderr
    folder = tiny_default_run.folder
    out = tmp_path / "ct"
    code, stdout, _ = export(capsys, str(folder), "--output", str(out), "--checkpoint", "--format", CT)
    assert code == 0
    assert "int-quantized compressed-tensors checkpoint" in stdout
    assert "ok)" in stdout
    record = check_export(out, manifest_choice(folder, INT8_MANIFEST))
    quant = json.loads((out / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    group = quant["config_groups"]["INT8_DEFAULT_CFG"]
    assert (group["format"], group["weights"]["strategy"], group["input_activations"]["dynamic"]) == (
        "int-quantized",
        "channel",
        False,
    )
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as tensors:
        target = group["targets"][0]
        assert str(tensors.get_tensor(f"{target}.weight").dtype) == "torch.int8"
        assert tensors.get_tensor(f"{target}.input_scale").numel() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]  # no scratch folder left
    assert record["files"] == sorted(p.name for p in out.iterdir())


@pytest.fixture(scope="module")
def fp8_int4_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run over FP8 and max-calibrated INT4 blocks at 8 bits: its mix holds both and NONE."""
    folder = tmp_path_factory.mktemp("fp8-int4") / "run"
    code = main(
        [
            "run",
            str(TINY_DEFAULT),
            "--output",
            str(folder),
            "--set",
            'autoquant.formats=["FP8_DEFAULT_CFG", "wint4-b128_a16"]',
            "--set",
            "autoquant.effective_bits=8.0",
            "--set",
            'manifest.scheme="tiny_fp8_int4"',
        ]
    )
    assert code == 0
    return folder


@pytest.mark.slow
def test_fp8_and_int4_mix_exports_as_mixed_precision_and_reads_back(
    fp8_int4_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    choice = manifest_choice(fp8_int4_run, "tiny_fp8_int4_quant_manifest.json")
    assert set(choice.values()) == {"FP8_DEFAULT_CFG", "wint4-b128_a16", NO_QUANT}
    out = tmp_path / "ct"
    code, stdout, _ = export(capsys, str(fp8_int4_run), "--output", str(out), "--checkpoint", "--format", CT)
    assert code == 0
    assert "mixed-precision compressed-tensors checkpoint" in stdout
    check_export(out, choice)
    quant = json.loads((out / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    assert quant["format"] == "mixed-precision"
    int4 = quant["config_groups"]["wint4-b128_a16"]
    assert (int4["format"], int4["weights"]["num_bits"], int4["weights"]["group_size"]) == (
        "pack-quantized",
        4,
        128,
    )
    assert int4["input_activations"] is None
    fp8 = quant["config_groups"]["FP8_DEFAULT_CFG"]
    assert (fp8["format"], fp8["weights"]["type"], fp8["input_activations"]["strategy"]) == (
        "float-quantized",
        "float",
        "tensor",
    )
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as tensors:
        names = set(tensors.keys())
        packed = int4["targets"][0]
        assert {f"{packed}.weight_packed", f"{packed}.weight_shape", f"{packed}.weight_scale"} <= names
        assert f"{packed}.weight" not in names
        assert str(tensors.get_tensor(f"{fp8['targets'][0]}.weight").dtype) == "torch.float8_e4m3fn"
