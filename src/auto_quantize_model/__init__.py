"""Per-layer quantization sensitivity of (vision-)language models with ModelOpt AutoQuant.

The public names are loaded on first use, so ``import auto_quantize_model`` (and ``aqm --help``)
stays fast; torch, transformers and ModelOpt are imported only by the stages that need them. The
stage classes exported are those of the stage registry, :data:`auto_quantize_model.stages.STAGES`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from auto_quantize_model.stages import STAGES

if TYPE_CHECKING:
    from auto_quantize_model.artifacts import (
        BudgetFrontier,
        CalibData,
        ExportedMix,
        LanguageModel,
        LoadedModel,
        MeasuredFrontier,
        ReportPaths,
        RunTimings,
        SensitivityScores,
    )
    from auto_quantize_model.errors import AqmError
    from auto_quantize_model.io.manifest_file import read_manifest
    from auto_quantize_model.manifest_records import Manifest
    from auto_quantize_model.pipeline import Artifacts, Pipeline, Stage
    from auto_quantize_model.specs import (
        AutoQuantSpec,
        CalibSpec,
        ExportSpec,
        ExtractSpec,
        FrontierSpec,
        LoadSpec,
        ManifestSpec,
        PipelineSpec,
        ReportSpec,
        ValidateSpec,
    )

    # For type checkers, which cannot follow the registry; tests/test_stages.py checks these names.
    from auto_quantize_model.stages.build_calib_loader import BuildCalibLoader
    from auto_quantize_model.stages.build_manifest import BuildManifest
    from auto_quantize_model.stages.export_checkpoint import ExportCheckpoint
    from auto_quantize_model.stages.extract_lm import ExtractLM
    from auto_quantize_model.stages.load_model import LoadModel
    from auto_quantize_model.stages.measure_frontier import MeasureFrontier
    from auto_quantize_model.stages.run_autoquant import RunAutoQuant
    from auto_quantize_model.stages.solve_budgets import SolveBudgets
    from auto_quantize_model.stages.validate_sensitivity import ValidateSensitivity
    from auto_quantize_model.stages.write_reports import WriteReports
    from auto_quantize_model.validation_records import ValidationReport

_EXPORTS = {
    "Pipeline": "pipeline",
    "Artifacts": "pipeline",
    "Stage": "pipeline",
    "read_manifest": "render.reports",
    "LoadSpec": "specs",
    "ExtractSpec": "specs",
    "CalibSpec": "specs",
    "AutoQuantSpec": "specs",
    "ValidateSpec": "specs",
    "FrontierSpec": "specs",
    "ExportSpec": "specs",
    "ManifestSpec": "specs",
    "ReportSpec": "specs",
    "PipelineSpec": "specs",
    "LoadedModel": "artifacts",
    "LanguageModel": "artifacts",
    "CalibData": "artifacts",
    "SensitivityScores": "artifacts",
    "ValidationReport": "validation_records",
    "BudgetFrontier": "artifacts",
    "MeasuredFrontier": "artifacts",
    "ExportedMix": "artifacts",
    "RunTimings": "artifacts",
    "ReportPaths": "artifacts",
    "Manifest": "manifest_records",
    "AqmError": "errors",
}
"""Public names other than the stage classes -> their module; the stages come from the registry."""

__all__ = [
    "AqmError",
    "Artifacts",
    "AutoQuantSpec",
    "BudgetFrontier",
    "BuildCalibLoader",
    "BuildManifest",
    "CalibData",
    "CalibSpec",
    "ExportCheckpoint",
    "ExportSpec",
    "ExportedMix",
    "ExtractLM",
    "ExtractSpec",
    "FrontierSpec",
    "LanguageModel",
    "LoadModel",
    "LoadSpec",
    "LoadedModel",
    "Manifest",
    "ManifestSpec",
    "MeasureFrontier",
    "MeasuredFrontier",
    "Pipeline",
    "PipelineSpec",
    "ReportPaths",
    "ReportSpec",
    "RunAutoQuant",
    "RunTimings",
    "SensitivityScores",
    "SolveBudgets",
    "Stage",
    "ValidateSensitivity",
    "ValidateSpec",
    "ValidationReport",
    "WriteReports",
    "read_manifest",
]
"""Spelled out for type checkers and linters, like the imports above; tests/test_stages.py checks both."""


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"auto_quantize_model.{_EXPORTS[name]}"), name)
    for entry in STAGES:
        if entry.name == name:
            return entry.stage_class()
    raise AttributeError(f"module 'auto_quantize_model' has no attribute {name!r}")
