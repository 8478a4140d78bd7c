"""Output folders: which files are aqm's, and what a failed run or a killed export leaves.

A failed run with an ``[export]`` table leaves no export behind, nor a killed export's scratch. The
export itself is atomic (a scratch folder renamed into place); what a run folder must not keep
is an export of an attempt that failed afterwards, or the scratch folder of a killed one.
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest

from auto_quantize_model.app import cli, folders
from auto_quantize_model.app.folders import EXPORT_DIR, EXPORT_RECORD, aqm_files, is_aqm_name
from auto_quantize_model.app.run_service import RunService
from auto_quantize_model.errors import InputError, StageError
from auto_quantize_model.pipeline import Artifacts
from auto_quantize_model.specs import PipelineSpec
from builders import STATE_KIT, tree
from builders import TINY_DEFAULT as TINY
from fakes import FakeRun

EXPORT_FILES = ("README.md", "quant_config.json", "quant_recipe.yaml", EXPORT_RECORD)


def write_export(directory: Path) -> None:
    """The files an export of the config leaves (their content does not matter here)."""
    directory.mkdir(parents=True)
    for name in EXPORT_FILES:
        (directory / name).write_text("x", "utf-8")
    (directory / EXPORT_RECORD).write_text(json.dumps({"files": sorted(EXPORT_FILES)}), "utf-8")


@attrs.define
class ExportThenFail(FakeRun):
    """Saves the search state, writes ``export/`` as ExportCheckpoint does, then a later stage fails."""

    def __call__(self, spec: PipelineSpec, folder: Path) -> Artifacts:
        assert spec.autoquant.checkpoint is not None
        state = Path(spec.autoquant.checkpoint)
        state.write_text("state", "utf-8")
        state.with_name(state.name + ".raw-scores.json").write_text("{}", "utf-8")
        write_export(folder / EXPORT_DIR)
        raise StageError("WriteReports", InputError("reports.output_dir: refused"))


def run_into(out: Path, runner: FakeRun, *extra: str) -> int:
    using = RunService(pipeline_runner=runner, library_importer=lambda: 0.0)
    return cli.main(["run", str(TINY), "--output", str(out), *extra], service=using)


def test_a_run_failing_after_its_export_keeps_only_what_resumes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine", "utf-8")
    assert run_into(out, ExportThenFail()) == 2
    assert "stage WriteReports failed" in capsys.readouterr().err
    assert tree(out) == sorted([*STATE_KIT, "notes.txt", "pipeline.toml", "run.json"])


def test_an_export_folder_without_its_record_is_not_ours(tmp_path: Path) -> None:
    (tmp_path / EXPORT_DIR).mkdir()
    (tmp_path / EXPORT_DIR / "quant_config.json").write_text("mine", "utf-8")
    assert aqm_files(tmp_path) == []
    write_export(tmp_path / "elsewhere")
    assert aqm_files(tmp_path) == []  # an export the user pointed elsewhere is theirs to keep


def test_force_removes_a_killed_exports_scratch_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert run_into(out, FakeRun()) == 0
    scratch = out / f".{EXPORT_DIR}.export-k1ll3d"
    write_export(scratch / "nested")  # a checkpoint's files, half there
    set_aside = out / f".{EXPORT_DIR}.replaced-k1ll3d"
    write_export(set_aside)
    assert {scratch / "nested" / EXPORT_RECORD, set_aside / EXPORT_RECORD} <= set(aqm_files(out))
    assert run_into(out, FakeRun(), "--force") == 0
    capsys.readouterr()
    assert not scratch.exists()
    assert not set_aside.exists()


def test_the_folder_names_match_the_export_stage() -> None:
    from auto_quantize_model.backend.exporting import EXPORT_FILE
    from auto_quantize_model.io.pipeline_file import load_pipeline
    from auto_quantize_model.specs import ExportSpec
    from auto_quantize_model.stages import build_pipeline
    from auto_quantize_model.stages.export_checkpoint import ExportCheckpoint

    assert EXPORT_RECORD == EXPORT_FILE
    spec = attrs.evolve(load_pipeline(TINY), export=ExportSpec())
    stages = build_pipeline(spec, "/runs/x").stages
    export = next(stage for stage in stages if isinstance(stage, ExportCheckpoint))
    assert export.spec.output_dir == f"/runs/x/{EXPORT_DIR}"


# --------------------------------------------------------------------------- which files are aqm's


@pytest.mark.parametrize(
    ("name", "ours"),
    [
        ("run.json", True),
        ("pipeline.toml", True),
        ("sweep-index.md", True),
        ("x_quant_manifest.json", True),
        ("int8_autoquant_lm_default_autoquant_state.pt", True),
        ("autoquant_search_state.pt.settings.json", True),
        ("my.pt.raw-scores.json", True),
        ("layer-sensitivity-report.md", True),
        (".per-layer-sensitivity.md.a1b2c3.tmp", True),
        (".autoquant_search_state.pt.4242.tmp.pt", True),
        ("autoquant_search_state.pt.settings.json.corrupt", True),
        ("notes.txt", False),
        ("model.pt", False),
        ("settings.json", False),
        (".aqm.lock", False),  # only the lock's holder removes it
        (".notes.txt.a1b2.tmp", False),
    ],
)
def test_is_aqm_name(name: str, ours: bool) -> None:
    assert is_aqm_name(name) is ours


def test_aqm_files_never_leave_the_folder(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("x", "utf-8")
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text("{}", "utf-8")
    assert aqm_files(out, ["../secret.txt", "run.json", "missing.bin"]) == [out / "run.json"]


# --------------------------------------------------------------------------- output folders


def test_check_output_dir(tmp_path: Path) -> None:
    folders.check_output_dir(tmp_path / "new", force=False)
    (tmp_path / "empty").mkdir()
    folders.check_output_dir(tmp_path / "empty", force=False)
    for marker in ("run.json", "x_quant_manifest.json", "sweep-index.md"):
        folder = tmp_path / marker.replace(".", "_")
        folder.mkdir()
        (folder / marker).write_text("{}", "utf-8")
        with pytest.raises(InputError, match=rf"already holds a run \({marker}\); pass --force"):
            folders.check_output_dir(folder, force=False)
        folders.check_output_dir(folder, force=True)
    (tmp_path / "file").write_text("x", "utf-8")
    with pytest.raises(InputError, match="exists and is not a folder"):
        folders.check_output_dir(tmp_path / "file", force=True)


def test_new_run_dir_never_reuses_a_folder(tmp_path: Path) -> None:
    first = folders.new_run_dir("tiny", tmp_path)
    assert first.parent == tmp_path / "runs"
    assert first.name.endswith("-tiny")
    first.mkdir(parents=True)
    second = folders.new_run_dir("tiny", tmp_path)
    assert second != first
    assert not second.exists()
