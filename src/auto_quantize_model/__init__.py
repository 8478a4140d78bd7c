"""Per-layer quantization sensitivity of (vision-)language models with ModelOpt AutoQuant.

The public names are loaded on first use, so ``import auto_quantize_model`` (and ``aqm --help``)
stays fast; torch, transformers and ModelOpt are imported only by the stages that need them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from auto_quantize_model.artifacts import (
        CalibData,
        LanguageModel,
        LoadedModel,
        ReportPaths,
        RunTimings,
        SensitivityScores,
        ValidationReport,
    )
    from auto_quantize_model.autoquant import RunAutoQuant
    from auto_quantize_model.calib import BuildCalibLoader
    from auto_quantize_model.errors import AqmError
    from auto_quantize_model.extract import ExtractLM
    from auto_quantize_model.load import LoadModel
    from auto_quantize_model.manifest import Manifest
    from auto_quantize_model.pipeline import Artifacts, Pipeline, Stage
    from auto_quantize_model.ranking import BuildManifest
    from auto_quantize_model.reports import WriteReports, read_manifest
    from auto_quantize_model.specs import (
        AutoQuantSpec,
        CalibSpec,
        ExtractSpec,
        LoadSpec,
        ManifestSpec,
        ReportSpec,
        ValidateSpec,
    )
    from auto_quantize_model.validate import ValidateSensitivity

_EXPORTS = {
    "Pipeline": "pipeline",
    "Artifacts": "pipeline",
    "Stage": "pipeline",
    "LoadModel": "load",
    "ExtractLM": "extract",
    "BuildCalibLoader": "calib",
    "RunAutoQuant": "autoquant",
    "ValidateSensitivity": "validate",
    "BuildManifest": "ranking",
    "WriteReports": "reports",
    "read_manifest": "reports",
    "LoadSpec": "specs",
    "ExtractSpec": "specs",
    "CalibSpec": "specs",
    "AutoQuantSpec": "specs",
    "ValidateSpec": "specs",
    "ManifestSpec": "specs",
    "ReportSpec": "specs",
    "LoadedModel": "artifacts",
    "LanguageModel": "artifacts",
    "CalibData": "artifacts",
    "SensitivityScores": "artifacts",
    "ValidationReport": "artifacts",
    "RunTimings": "artifacts",
    "ReportPaths": "artifacts",
    "Manifest": "manifest",
    "AqmError": "errors",
}

__all__ = [
    "AqmError",
    "Artifacts",
    "AutoQuantSpec",
    "BuildCalibLoader",
    "BuildManifest",
    "CalibData",
    "CalibSpec",
    "ExtractLM",
    "ExtractSpec",
    "LanguageModel",
    "LoadModel",
    "LoadSpec",
    "LoadedModel",
    "Manifest",
    "ManifestSpec",
    "Pipeline",
    "ReportPaths",
    "ReportSpec",
    "RunAutoQuant",
    "RunTimings",
    "SensitivityScores",
    "Stage",
    "ValidateSensitivity",
    "ValidateSpec",
    "ValidationReport",
    "WriteReports",
    "read_manifest",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'auto_quantize_model' has no attribute {name!r}")
    return getattr(importlib.import_module(f"auto_quantize_model.{module}"), name)
