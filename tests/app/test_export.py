"""``aqm export`` on the finished tiny default run.

The run folder comes from the session fixture ``tiny_default_run`` (read-only): every export goes
to ``tmp_path``. The config test compares the written per-layer config with the frontier's choice
at the run's budget (solved from the manifest); the checkpoint test loads the model again,
quantizes, exports and reads back on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from auto_quantize_model.app.cli import main
from auto_quantize_model.core import export_config as xc
from auto_quantize_model.core.formats import local_quantizer
from auto_quantize_model.core.scores import NO_QUANT
from builders import AqmRun

MANIFEST = "tiny_wint8_aint8_quant_manifest.json"


def finished(run: AqmRun) -> Path:
    assert run.returncode == 0, run.stderr
    return run.folder


def export(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["export", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> int:
    """How many error lines ``aqm`` printed (log lines such as the solver's announcement aside)."""
    return sum(line.startswith("aqm: error:") for line in err.splitlines())


def group_choice(folder: Path) -> tuple[float, dict[str, str], dict[str, tuple[str, ...]]]:
    """The run's budget, every group's format there as the frontier picks it from the manifest (what
    aqm export writes: the least predicted score, which can beat ModelOpt's own choice), and each
    group's modules."""
    from auto_quantize_model.app.run_folder import FinishedRun
    from auto_quantize_model.specs import FrontierSpec

    run = FinishedRun.open(folder / MANIFEST)
    manifest = run.manifest
    budget = manifest.scheme.effective_bits_target
    frontier = run.frontier(FrontierSpec(bits=repr(budget), workers=1)).frontier
    chosen = dict(zip(frontier.groups, frontier.point(budget).formats, strict=True))
    modules = {group.name: group.module_names for group in manifest.groups}
    return budget, {name: chosen.get(name, NO_QUANT) for name in modules}, modules


def manifest_choice(folder: Path) -> tuple[float, dict[str, str]]:
    """The run's budget and every module's format at it (:func:`group_choice`)."""
    budget, chosen, modules = group_choice(folder)
    return budget, {module: chosen[name] for name, names in modules.items() for module in names}


def enabled_formats(quant_config: dict[str, object], formats: dict[str, str]) -> dict[str, bool]:
    """Module -> whether its weight quantizer ends enabled, by replaying the config's entries."""
    entries = quant_config["quant_cfg"]
    assert isinstance(entries, list)
    return {module: local_quantizer(entries, f"{module}.weight_quantizer").enabled for module in formats}


@pytest.mark.slow
def test_export_writes_the_runs_choice_at_its_budget(
    tiny_default_run: AqmRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = finished(tiny_default_run)
    budget, formats = manifest_choice(folder)
    out = tmp_path / "export"
    code, stdout, _ = export(capsys, str(folder), "--output", str(out))
    assert code == 0
    assert stdout.startswith(f"aqm: export {out}: {budget:g}-bit budget")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "export.json",
        "quant_config.json",
        "quant_recipe.yaml",
    ]
    config = xc.read_quant_config((out / "quant_config.json").read_text(encoding="utf-8"))
    enabled = enabled_formats(config, formats)
    assert enabled == {module: fmt != NO_QUANT for module, fmt in formats.items()}
    assert any(enabled.values())
    assert not all(enabled.values())
    record = json.loads((out / "export.json").read_text(encoding="utf-8"))
    counts: dict[str, int] = {}
    for fmt in group_choice(folder)[1].values():
        counts[fmt] = counts.get(fmt, 0) + 1
    assert (record["budget"], record["formats"], record["checkpoint"]) == (budget, counts, False)
    assert record["effective_bits_lm"] <= budget
    # The same folder through the explicit --bits of the run's budget, and a lower budget that
    # quantizes more groups; no scratch folder is left behind.
    lower = tmp_path / "lower"
    code, _, _ = export(capsys, str(folder), "--bits", "9", "--output", str(lower))
    assert code == 0
    lower_record = json.loads((lower / "export.json").read_text(encoding="utf-8"))
    assert lower_record["effective_bits_lm"] <= 9.0
    assert lower_record["formats"].get(NO_QUANT, 0) < counts.get(NO_QUANT, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "lower"]


@pytest.mark.slow
def test_checkpoint_reads_back_within_tolerance_on_cpu(
    tiny_default_run: AqmRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = finished(tiny_default_run)
    out = tmp_path / "ckpt"
    code, stdout, _ = export(capsys, str(folder), "--output", str(out), "--checkpoint")
    assert code == 0
    assert "read back" in stdout
    assert "ok)" in stdout
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "hf_quant_config.json", "model.safetensors", "export.json"} <= names
    figures = json.loads((out / "export.json").read_text(encoding="utf-8"))["read_back"]
    assert figures["ok"] is True
    assert abs(figures["difference"]) <= figures["tolerance"]
    assert figures["difference"] == pytest.approx(figures["read_back_nll"] - figures["exported_nll"])
    _, formats = manifest_choice(folder)
    hf_quant = json.loads((out / "hf_quant_config.json").read_text(encoding="utf-8"))["quantization"]
    assert hf_quant["quant_algo"] == "W8A8_SQ_PER_CHANNEL"  # INT8 everywhere it quantizes
    excluded = hf_quant["exclude_modules"]
    import fnmatch

    for module, fmt in formats.items():
        assert any(fnmatch.fnmatchcase(module, p) for p in excluded) == (fmt == NO_QUANT), module


def test_missing_run_folder_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code, stdout, err = export(capsys, str(tmp_path / "nope"), "--output", str(out))
    assert code != 0
    assert stdout == ""
    assert error_lines(err) == 1
    assert "nope does not exist" in err
    assert not out.exists()


def test_a_run_folder_a_run_is_writing_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from auto_quantize_model.app.lock import LOCK_NAME, FolderLock

    folder = tmp_path / "run"
    folder.mkdir()
    out = tmp_path / "out"
    with FolderLock.acquire(folder, ("aqm", "run", "p.toml")):  # what aqm run holds while it works
        code, stdout, err = export(capsys, str(folder), "--output", str(out))
    assert code == 2
    assert stdout == ""
    assert error_lines(err) == 1
    assert f"{folder} is in use by aqm process" in err
    assert "aqm run p.toml" in err
    assert "export from it once that has finished" in err
    assert not out.exists()
    # free again: the export takes the lock itself, and lets go of it (here: no manifest to read)
    code, _, err = export(capsys, str(folder), "--output", str(out))
    assert code == 2
    assert "holds no *_quant_manifest.json" in err
    assert not (folder / LOCK_NAME).exists()


@pytest.mark.parametrize(
    ("bits", "message"),
    [("abc", "--bits: budgets 'abc'"), ("6,8", "export takes one budget"), ("1:3:1", "export takes one")],
)
def test_bad_bits_are_one_line_and_write_nothing(
    bits: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code, _, err = export(capsys, str(tmp_path), "--bits", bits, "--output", str(out))
    assert code != 0
    assert error_lines(err) == 1, err
    assert message in err, err
    assert not out.exists()


def test_existing_output_and_unreachable_budget_are_refused(
    tiny_default_run: AqmRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = finished(tiny_default_run)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine", encoding="utf-8")
    code, _, err = export(capsys, str(folder), "--output", str(taken))
    assert code != 0
    assert error_lines(err) == 1
    assert "holds files aqm did not write (keep.txt)" in err
    assert "--force" not in err  # never suggested for a folder aqm did not write
    assert sorted(p.name for p in taken.iterdir()) == ["keep.txt"]
    inside = folder / "export"
    code, _, err = export(capsys, str(folder), "--output", str(inside))
    assert code != 0
    assert "inside the run folder" in err
    assert not inside.exists()
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = export(capsys, str(folder), "--bits", "2", "--output", str(tmp_path / "low"))
    assert code != 0
    assert error_lines(err) == 1, err
    assert "below the cheapest mix" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no scratch folder left


@pytest.mark.slow
def test_force_replaces_an_existing_export_and_nothing_else(
    tiny_default_run: AqmRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = finished(tiny_default_run)
    out = tmp_path / "out"
    code, _, _ = export(capsys, str(folder), "--output", str(out))
    assert code == 0
    first = sorted(p.name for p in out.iterdir())
    (out / "old.txt").write_text("mine", encoding="utf-8")
    code, _, _ = export(capsys, str(folder), "--output", str(out), "--bits", "12", "--force")
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([*first, "old.txt"])
    assert (out / "old.txt").read_text(encoding="utf-8") == "mine"
    assert json.loads((out / "export.json").read_text(encoding="utf-8"))["budget"] == 12.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.slow
def test_aqm_export_quantizes_with_the_runs_kernels() -> None:
    """``aqm export --checkpoint`` loads the run's model with its pipeline's ``autoquant.kernels``,
    so the checkpoint is quantized and measured with the arithmetic the scores came from."""
    import attrs

    from auto_quantize_model.app.export import load_run_model
    from auto_quantize_model.io.pipeline_file import load_pipeline
    from builders import TINY_DEFAULT

    pipeline = load_pipeline(TINY_DEFAULT)
    assert load_run_model(pipeline).kernels == "extension"
    on_pytorch = attrs.evolve(pipeline, autoquant=attrs.evolve(pipeline.autoquant, kernels="pytorch"))
    assert load_run_model(on_pytorch).kernels == "pytorch"
