"""The ``aqm`` command: fast help, torch-free validation, one-line errors, output folders, runs."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from auto_quantize_model.app import cli, legacy_driver
from auto_quantize_model.app.run_service import RunService
from auto_quantize_model.artifacts import ReportPaths
from auto_quantize_model.errors import InputError, StageError
from auto_quantize_model.io.pipeline_file import load_pipeline, spec_from_dict
from auto_quantize_model.manifest_records import Manifest, ModelInfo
from auto_quantize_model.pipeline import Artifacts
from auto_quantize_model.specs import PipelineSpec
from builders import INT8, REPO, SEEDS, AqmRun, descending, manifest

TINY = REPO / "pipelines" / "tiny-qwen3-vl.toml"

QUICK = RunService(library_importer=lambda: 0.0)
"""The real service minus the 11-16 s library import: for runs whose pipeline never starts."""


def _reports_without_plots(manifest: Path, output: Path | None) -> ReportPaths:
    from auto_quantize_model.render.reports import regenerate_reports

    return regenerate_reports(manifest, output, plots=False)


NO_PLOTS = RunService(library_importer=lambda: 0.0, report_writer=_reports_without_plots)
"""Reports as ``aqm report`` writes them, less the plots (seconds of matplotlib per manifest)."""


def failing_with(error: BaseException) -> RunService:
    """A run service whose pipeline fails at once with ``error`` (nothing loaded, nothing imported)."""

    def run(spec: PipelineSpec, folder: Path) -> Artifacts:
        raise error

    return RunService(pipeline_runner=run, library_importer=lambda: 0.0)


def run_cli(*argv: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "auto_quantize_model", *argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


# --------------------------------------------------------------------------- speed and imports


def test_help_builds_no_benchmark_parser() -> None:
    """``aqm run --help`` must not build (and import) the benchmark's flags, only ``aqm bench`` does."""
    code = (
        "import time, io, contextlib, sys\n"
        "t = time.process_time()\n"
        "from auto_quantize_model.app.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        "        main(['run', '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(time.process_time() - t, 'auto_quantize_model.bench.command' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    _, bench_loaded = result.stdout.split()
    assert bench_loaded == "False"  # the benchmark's flags are only built for ``aqm bench``


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "aqm"
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "usage: aqm" in result.stdout


# --------------------------------------------------------------------------- errors


def test_validate_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", str(TINY), "--set", "calib.seq_len=32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{TINY}: OK\n")
    assert "LoadModel -> ExtractLM -> BuildCalibLoader -> RunAutoQuant" in out


def test_validate_lists_sweep_points(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", str(TINY), "--set", "sweep.calib.seq_len=[32, 64]"]) == 0
    out = capsys.readouterr().out
    assert "sweep: 2 points" in out
    assert "calib.seq_len=64" in out


def test_config_errors_are_one_line_each_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[model]\npath = "builtin:tiny-qwen3-vl"\n[calib]\nseq_len = "8"\nnmu = 1\n', "utf-8")
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 2
    assert all(line.startswith(f"aqm: error: {path}: calib.") for line in lines)
    assert "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[model]\npath = "builtin:tiny-qwen3-vl"\n[calib]\nseq_len = "8"\n', "utf-8")
    assert cli.main(["validate", str(path), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.rstrip().endswith(f'aqm: error: {path}: calib.seq_len: expected int, got str "8"')


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["validate", "nope.toml"], "aqm: error: nope.toml: pipeline file not found"),
        (
            ["validate", str(TINY), "--set", "calib.seq_len"],
            "aqm: error: --set calib.seq_len: expected KEY=VALUE",
        ),
        (["validate", str(TINY), "--set", "autoquant.formats=[1,"], "is not a valid TOML value"),
        (["validate", str(TINY), "--set", "calib.batch_size=0"], "calib.batch_size: must be > 0, got 0"),
        (
            ["validate", str(TINY), "--set", "autoquant.effective_bits=20"],
            "autoquant.effective_bits: must be in (0, 16], got 20",
        ),
        (["validate", str(TINY), "--set", 'autoquant.formats=["NVFP4_DEFAULT_CFG"]'], "needs a CUDA GPU"),
        (["validate", str(TINY), "--set", 'autoquant.method="fast"'], 'expected one of "gradient", "kl_div"'),
        (
            ["validate", str(TINY), "--set", "calib.captions=/no/such/file.txt"],
            "/no/such/file.txt does not exist",
        ),
    ],
)
def test_bad_input_exit_code_and_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert all(line.startswith("aqm: error: ") for line in err.splitlines())


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "usage: aqm" in capsys.readouterr().err


def test_ctrl_c_exits_130(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    service = failing_with(KeyboardInterrupt())
    assert cli.main(["run", str(TINY), "--output", str(out)], service=service) == 130
    err = capsys.readouterr().err
    assert err.startswith("aqm: interrupted (Ctrl-C): nothing computed was kept")
    assert f"`aqm resume {out}` starts the run again" in err
    assert sorted(p.name for p in out.iterdir()) == ["pipeline.toml", "run.json"]  # resumable


def test_a_bug_in_a_stage_exits_1_and_points_at_debug(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    service = failing_with(StageError("RunAutoQuant", ZeroDivisionError("division by zero")))
    assert cli.main(["run", str(TINY), "--output", str(tmp_path / "out")], service=service) == 1
    err = capsys.readouterr().err
    assert "aqm: error: stage RunAutoQuant failed: division by zero" in err
    assert "--debug" in err


# --------------------------------------------------------------------------- output folders


def test_run_refuses_a_folder_holding_another_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text("{}", "utf-8")
    assert cli.main(["run", str(TINY), "--output", str(out)], service=QUICK) == 2
    assert "already holds a run (run.json)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]


def test_bad_input_leaves_no_output_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert cli.main(["run", str(TINY), "--output", str(out), "--set", "calib.seq_len=0"], service=QUICK) == 2
    assert "calib.seq_len: must be > 0" in capsys.readouterr().err
    assert not out.exists()


def test_a_failed_run_that_wrote_nothing_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    service = failing_with(StageError("BuildCalibLoader", InputError("captions file x.txt is empty")))
    out = tmp_path / "deeper" / "out"
    assert cli.main(["run", str(TINY), "--output", str(out)], service=service) == 2
    assert "stage BuildCalibLoader failed: captions file x.txt is empty" in capsys.readouterr().err
    assert not out.exists()
    assert not out.parent.exists()  # the folders the run made, and only those


def test_a_failing_sweep_point_is_recorded_and_the_exit_code_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def run_one(spec: PipelineSpec, folder: Path) -> Artifacts:
        if "64" in folder.name:
            raise StageError("RunAutoQuant", InputError("out of memory"))
        return Artifacts()

    service = RunService(pipeline_runner=run_one, library_importer=lambda: 0.0)
    out = tmp_path / "out"
    argv = ["run", str(TINY), "--output", str(out), "--set", "sweep.calib.seq_len=[32, 64]"]
    assert cli.main(argv, service=service) == 1
    captured = capsys.readouterr()
    assert "1 of 2 sweep points failed" in captured.err
    index = (out / "sweep-index.md").read_text("utf-8")
    assert "failed: stage RunAutoQuant failed: out of memory" in index
    assert (out / "calib.seq_len=32" / "pipeline.toml").is_file()
    assert "seq_len = 64" in (out / "calib.seq_len=64" / "pipeline.toml").read_text("utf-8")


# --------------------------------------------------------------------------- formats, report, diff


def test_formats_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["formats"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["name", "bits", "weights", "activations", "runs", "on", "export"]
    int8 = next(line for line in lines if line.startswith("INT8_DEFAULT_CFG "))
    assert int8.split()[1] == "8"
    assert re.split(r"\s{2,}", int8.rstrip())[-2:] == ["CPU and CUDA", "modelopt, compressed-tensors"]
    nvfp4 = next(line for line in lines if line.startswith("NVFP4_DEFAULT_CFG "))
    assert re.split(r"\s{2,}", nvfp4.rstrip())[-2:] == ["CUDA only", "modelopt, compressed-tensors"]
    assert any(line.startswith("wint4-b128_aint8-token ") for line in lines)
    assert "Your own weight/activation pairs" in out
    unchecked = out.split("Exported in ModelOpt's format without --checkpoint only", 1)[1].splitlines()[1:]
    assert "  W4A8_AWQ_BETA_CFG (W4A8_AWQ)" in unchecked
    assert not any(line.startswith("  INT8_DEFAULT_CFG") for line in unchecked)


@pytest.mark.parametrize("name", ["wint8_aint8", "wfp8_afp8", "int8_lm_default_legacy"])
def test_report_on_previous_tool_manifests(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (manifest,) = (SEEDS / name).glob("*_quant_manifest.json")
    out = tmp_path / name
    assert cli.main(["report", str(manifest), "--output", str(out)], service=NO_PLOTS) == 0
    printed = capsys.readouterr().out
    md = out / "per-layer-sensitivity.md"
    assert md.is_file()
    assert (out / "per-layer-sensitivity.json").is_file()
    assert str(md) in printed
    expected = json.loads((SEEDS / name / "per-layer-sensitivity.json").read_text("utf-8"))
    top = [entry["layer"] for entry in expected["layer_sensitivity"][:3]]
    text = md.read_text("utf-8")
    positions = [text.find(layer.removeprefix("model.")) for layer in top]
    assert all(p >= 0 for p in positions), top
    assert positions == sorted(positions)


def test_report_refuses_to_overwrite_previous_tool_reports(capsys: pytest.CaptureFixture[str]) -> None:
    manifest = next(iter((SEEDS / "wint8_aint8").glob("*_quant_manifest.json")))
    assert cli.main(["report", str(manifest)]) == 2
    assert "--output" in capsys.readouterr().err


def test_diff_two_previous_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = (next(iter((SEEDS / n).glob("*_quant_manifest.json"))) for n in ("wint8_aint8", "wfp8_afp8"))
    assert cli.main(["diff", str(a), str(b)]) == 0
    text = capsys.readouterr().out
    assert text.lstrip().startswith("#")
    out = tmp_path / "d" / "diff.md"
    assert cli.main(["diff", str(a), str(b), "--output", str(out)]) == 0
    assert out.read_text("utf-8") == text


# --------------------------------------------------------------------------- previous tool's driver


def legacy_spec(*argv: str) -> PipelineSpec:
    args = cli.build_parser().parse_args(["qwen3-lm-int8", *argv])
    return spec_from_dict(legacy_driver.legacy_raw_spec(args), source="t")


def test_legacy_driver_defaults_match_the_previous_tool() -> None:
    spec = legacy_spec("--model-dir", "/ckpt")
    assert spec.model.path == "/ckpt"
    assert spec.autoquant.formats == ("INT8_DEFAULT_CFG",)
    assert spec.autoquant.method == "gradient"
    assert spec.autoquant.effective_bits == 8.0
    assert spec.autoquant.score_size == 128
    assert (spec.calib.max_samples, spec.calib.seq_len, spec.calib.batch_size) == (512, 512, 8)
    assert spec.calib.layout == "padded"
    assert spec.manifest.scheme == "int8_autoquant_lm_default"
    assert spec.reports.save_state is True
    assert spec.validate is None


def test_legacy_driver_flags_map_to_settings() -> None:
    spec = legacy_spec(
        "--model-dir=/m",
        "--captions-path=/c.txt",
        "--max-calib-samples=64",
        "--calib-seq-len=128",
        "--batch-size=2",
        "--device=cpu",
        "--effective-bits=11.5",
        "--auto-quantize-score-size=16",
        "--layout=packed",
    )
    assert spec.calib.captions == "/c.txt"
    assert (spec.calib.max_samples, spec.calib.seq_len, spec.calib.batch_size) == (64, 128, 2)
    assert spec.model.device == "cpu"
    assert spec.autoquant.effective_bits == 11.5
    assert spec.autoquant.score_size == 16
    assert spec.calib.layout == "packed"


def test_legacy_driver_errors_name_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    argv = ["qwen3-lm-int8", "--model-dir", "builtin:tiny-qwen3-vl", "--device", "cpu"]
    assert cli.main([*argv, "--calib-seq-len", "0", "--output-dir", str(out)]) == 2
    assert "--calib-seq-len (calib.seq_len): must be > 0, got 0" in capsys.readouterr().err
    assert not out.exists()
    assert cli.main(["qwen3-lm-int8", "--output-dir", str(out)]) == 2
    assert "--model-dir is required" in capsys.readouterr().err
    assert (
        cli.main(["qwen3-lm-int8", "--model-dir", str(tmp_path / "missing"), "--output-dir", str(out)]) == 2
    )
    assert f"--model-dir (model.path): {tmp_path / 'missing'} does not exist" in capsys.readouterr().err


def our_manifest() -> Manifest:
    return manifest(
        descending([f"model.language_model.layers.{i}.mlp.down_proj" for i in range(3)]),
        fmt=INT8,
        score_samples=4,
        scheme=legacy_driver.LEGACY_SCHEME,
        target=8.0,
        bits=8.0,
        total_score=3.0,
        model=ModelInfo(
            source="/ckpt", architecture="Qwen3VLForConditionalGeneration", dtype="bf16", device="cuda"
        ),
    )


def test_legacy_report_only_regenerates_with_the_old_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from auto_quantize_model.render.reports import write_reports

    write_reports(our_manifest(), tmp_path, plots=False)
    (tmp_path / "per-layer-sensitivity.md").unlink()
    assert cli.main(["qwen3-lm-int8", "--report-only", "--output-dir", str(tmp_path)], service=NO_PLOTS) == 0
    out = capsys.readouterr().out
    for name in (
        "per-layer-sensitivity.md",
        "per-layer-sensitivity.json",
        "layer-sensitivity-report.md",
        "layer-sensitivity-report.json",
    ):
        assert (tmp_path / name).is_file(), name
        assert str(tmp_path / name) in out
    assert (tmp_path / "layer-sensitivity-report.md").read_bytes() == (
        tmp_path / "per-layer-sensitivity.md"
    ).read_bytes()


def test_legacy_report_only_refuses_the_previous_tool_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for item in (SEEDS / "int8_lm_default_legacy").iterdir():
        shutil.copy(item, tmp_path / item.name)
    before = (tmp_path / "per-layer-sensitivity.md").read_bytes()
    assert cli.main(["qwen3-lm-int8", "--report-only", "--output-dir", str(tmp_path)]) == 2
    assert "aqm report" in capsys.readouterr().err
    assert (tmp_path / "per-layer-sensitivity.md").read_bytes() == before


def test_legacy_report_only_without_a_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["qwen3-lm-int8", "--report-only", "--output-dir", str(tmp_path)]) == 2
    assert "no *_quant_manifest.json" in capsys.readouterr().err


# --------------------------------------------------------------------------- real runs (slow)


@pytest.mark.slow
def test_run_the_tiny_pipeline(tiny_default_run: AqmRun, tmp_path: Path) -> None:
    """``aqm run pipelines/tiny-qwen3-vl.toml`` in a fresh interpreter from an empty folder: the
    session's one such run (``tiny_default_run``), read here, not run again."""
    result = tiny_default_run
    assert result.returncode == 0, result.stderr
    (folder,) = (result.cwd / "runs").iterdir()
    assert folder.name.endswith("-tiny-qwen3-vl")
    for name in (
        "pipeline.toml",
        "tiny_wint8_aint8_quant_manifest.json",
        "per-layer-sensitivity.md",
        "per-layer-sensitivity.json",
    ):
        assert (folder / name).is_file(), name
    # progress on stderr: a line per stage start and end
    assert "[1/7] LoadModel ..." in result.stderr
    assert "[7/7] WriteReports done in" in result.stderr
    assert "ValidateSensitivity done in" in result.stderr
    # a fresh process imports the heavy libraries before the first stage, timed on their own
    imported = result.stderr.index("imported torch, transformers, modelopt.torch.quantization in ")
    assert imported < result.stderr.index("[1/7] LoadModel ...")
    assert "(importing libraries " in result.stdout
    seconds = json.loads((folder / "run.json").read_text("utf-8"))["seconds"]
    assert list(seconds) == [
        "library_imports",
        "LoadModel",
        "ExtractLM",
        "BuildCalibLoader",
        "RunAutoQuant",
        "ValidateSensitivity",
        "BuildManifest",
        "WriteReports",
    ]
    assert seconds["library_imports"] > 0
    assert all(value >= 0 for value in seconds.values())
    # summary on stdout names every written file, and they all exist
    listed = [Path(line.strip()) for line in result.stdout.splitlines() if line.startswith("  /")]
    assert folder / "pipeline.toml" in listed
    assert folder / "per-layer-sensitivity.md" in listed
    assert all(path.is_file() for path in listed)
    assert "effective bits" in result.stdout
    # the written pipeline re-runs as is: same spec as the source file
    assert load_pipeline(folder / "pipeline.toml") == load_pipeline(TINY)
    assert (
        tomllib.loads((folder / "pipeline.toml").read_text("utf-8"))["model"]["path"]
        == "builtin:tiny-qwen3-vl"
    )
    # and a second run into the same folder is refused before anything is loaded
    again = run_cli("run", str(TINY), "--output", str(folder), cwd=tmp_path)
    assert again.returncode == 2
    assert "already holds a run" in again.stderr


@pytest.mark.slow
def test_legacy_driver_runs_with_the_previous_file_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """In this process: the driver's flags and file names are the point, not a fresh interpreter."""
    out = tmp_path / "legacy"
    code = cli.main(
        [
            "qwen3-lm-int8",
            "--model-dir=builtin:tiny-qwen3-vl",
            "--device=cpu",
            "--max-calib-samples=16",
            "--calib-seq-len=32",
            "--batch-size=4",
            "--auto-quantize-score-size=8",
            "--effective-bits=12",
            f"--output-dir={out}",
        ]
    )
    result = capsys.readouterr()
    assert code == 0, result.err
    for name in (
        "int8_autoquant_lm_default_quant_manifest.json",
        "int8_autoquant_lm_default_autoquant_state.pt",
        "layer-sensitivity-report.md",
        "layer-sensitivity-report.json",
        "per-layer-sensitivity.md",
        "pipeline.toml",
    ):
        assert (out / name).is_file(), name
        assert str(out / name) in result.out
    spec = load_pipeline(out / "pipeline.toml")
    assert spec.calib.layout == "padded"
    manifest = json.loads((out / "int8_autoquant_lm_default_quant_manifest.json").read_text("utf-8"))
    assert manifest["scheme"]["name"] == "int8_autoquant_lm_default"


def test_bench_subcommand_hands_its_flags_to_the_benchmark() -> None:
    given: list[argparse.Namespace] = []

    def bench(args: argparse.Namespace) -> int:
        given.append(args)
        return 0

    service = RunService(library_importer=lambda: 0.0, bench_runner=bench)
    assert cli.main(["bench", "--model", "builtin:tiny-qwen3-vl", "--skip-scaling"], service=service) == 0
    (args,) = given
    assert (args.model, args.skip_scaling, args.seq_len) == ("builtin:tiny-qwen3-vl", True, 512)


def test_bench_flags_are_checked_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(["bench", "--seq-len", "0"], service=QUICK)
    assert stop.value.code == 2
    assert "--seq-len: expected an integer > 0, got 0" in capsys.readouterr().err


def test_bench_is_listed_and_its_help_lists_its_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "bench" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    assert "--scaling-captions" in capsys.readouterr().out
