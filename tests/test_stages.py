"""The stage registry: one list of stages that the schema, the assembler, the exports and the bench read."""

from __future__ import annotations

import ast
import subprocess
import sys
import typing
from pathlib import Path

import attrs
import pytest

import auto_quantize_model
from auto_quantize_model.io.pipeline_file import spec_from_dict, spec_to_dict
from auto_quantize_model.specs import STAGE_TABLES, ExportSpec, FrontierSpec, PipelineSpec, ValidateSpec
from auto_quantize_model.stages import (
    STAGE_LABELS,
    STAGES,
    build_pipeline,
    entry_named,
    stage_names,
)

PACKAGE = Path(auto_quantize_model.__file__).parent
TINY = {"model": {"path": "builtin:tiny-qwen3-vl", "device": "cpu"}}


def test_the_registry_is_the_pipeline_in_order() -> None:
    assert [entry.name for entry in STAGES] == [
        "LoadModel",
        "ExtractLM",
        "BuildCalibLoader",
        "RunAutoQuant",
        "ValidateSensitivity",
        "SolveBudgets",
        "MeasureFrontier",
        "ExportCheckpoint",
        "BuildManifest",
        "WriteReports",
    ]
    assert [entry.name for entry in STAGES if entry.optional] == [
        "ValidateSensitivity",
        "SolveBudgets",
        "MeasureFrontier",
        "ExportCheckpoint",
    ]
    assert entry_named("MeasureFrontier").table == entry_named("SolveBudgets").table == "frontier"
    assert entry_named("MeasureFrontier").switch == "measure"
    assert STAGE_LABELS["RunAutoQuant"] == "autoquant"
    assert len(set(STAGE_LABELS.values())) == len(STAGES)


def test_every_stage_table_of_the_schema_is_a_registry_row() -> None:
    tables = [field.name for field in attrs.fields(PipelineSpec)]
    assert tables == [*STAGE_TABLES, "sweep"]  # one table may configure two stages ([frontier])
    hints = typing.get_type_hints(PipelineSpec)
    for entry in STAGES:
        expected = entry.spec | None if entry.optional else entry.spec
        assert hints[entry.table] == expected


@pytest.mark.parametrize("entry", STAGES, ids=lambda e: e.name)
def test_each_row_names_a_stage_holding_its_spec(entry: typing.Any) -> None:
    stage = entry.stage_class()
    assert stage.__name__ == entry.name
    assert stage.__module__ == entry.module
    assert "spec" in attrs.fields_dict(stage)
    assert typing.get_type_hints(stage)["spec"] == entry.spec
    assert getattr(auto_quantize_model, entry.name) is stage
    assert entry_named(entry.name) is entry


def test_the_package_exports_every_stage_for_type_checkers_too() -> None:
    tree = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    typed = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("auto_quantize_model.stages.")
        for alias in node.names
    }
    assert typed == {entry.name for entry in STAGES}
    assert {entry.name for entry in STAGES} <= set(auto_quantize_model.__all__)
    missing = [name for name in auto_quantize_model.__all__ if not hasattr(auto_quantize_model, name)]
    assert missing == []


def test_stage_names_and_the_assembled_pipeline_follow_the_tables(tmp_path: Path) -> None:
    without = spec_from_dict(TINY, source="t")
    assert "ValidateSensitivity" not in stage_names(without)
    with_validation = attrs.evolve(
        without,
        validate=ValidateSpec(k=1),
        frontier=FrontierSpec(bits="8:16:1", measure=2),
        export=ExportSpec(bits=12.0, output_dir=str(tmp_path / "export")),
    )
    solve_only = attrs.evolve(with_validation, frontier=FrontierSpec(bits="8:16:1"))
    assert "SolveBudgets" in stage_names(solve_only)
    assert "MeasureFrontier" not in stage_names(solve_only)  # measure = 0: the switch is off
    names = stage_names(with_validation)
    assert names == tuple(entry.name for entry in STAGES)
    pipeline = build_pipeline(with_validation, tmp_path)
    assert tuple(type(stage).__name__ for stage in pipeline.stages) == names
    for stage, entry in zip(pipeline.stages, STAGES, strict=True):
        assert stage.spec is not None  # type: ignore[attr-defined]
        expected = getattr(with_validation, entry.table)
        if entry.table != "reports":
            assert stage.spec == expected  # type: ignore[attr-defined]
    assert pipeline.stages[-1].spec.output_dir == str(tmp_path)  # type: ignore[attr-defined]


def test_written_tables_follow_the_registry() -> None:
    spec = attrs.evolve(
        spec_from_dict(TINY, source="t"),
        validate=ValidateSpec(),
        frontier=FrontierSpec(bits="8"),
        export=ExportSpec(),
    )
    assert list(spec_to_dict(spec)) == list(STAGE_TABLES)


def test_the_registry_imports_no_stage_and_no_torch() -> None:
    code = (
        "import sys\n"
        "import auto_quantize_model\n"
        "from auto_quantize_model.stages import STAGES\n"
        "loaded = [m for m in sys.modules if m.startswith('auto_quantize_model.stages.') or m == 'torch']\n"
        "print(loaded)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
