"""The ``BuildManifest`` stage."""

from __future__ import annotations

from typing import ClassVar

import attrs

from auto_quantize_model.artifacts import (
    CalibData,
    LoadedModel,
    RunTimings,
    SensitivityScores,
    ValidationReport,
)
from auto_quantize_model.core.ranking import (
    build_manifest,
    dataset_info,
    installed_versions,
    model_info,
    utc_now_iso,
)
from auto_quantize_model.io.manifest import (
    Manifest,
    Timing,
)
from auto_quantize_model.pipeline import Artifacts
from auto_quantize_model.specs import ManifestSpec


@attrs.frozen
class BuildManifest:
    """Rank the scored groups and record what was measured, on what, and with which versions."""

    requires: ClassVar[tuple[type, ...]] = (SensitivityScores,)
    optional: ClassVar[tuple[type, ...]] = (LoadedModel, CalibData, RunTimings, ValidationReport)
    produces: ClassVar[type] = Manifest
    spec: ManifestSpec = attrs.field(factory=ManifestSpec)

    def run(self, inputs: Artifacts) -> Manifest:
        calib = inputs.find(CalibData)
        run_timings = inputs.find(RunTimings)
        timings = () if run_timings is None else run_timings.stages
        return build_manifest(
            inputs.get(SensitivityScores),
            self.spec,
            model=model_info(inputs.find(LoadedModel)),
            dataset=dataset_info(None if calib is None else calib.stats),
            timings=[Timing(t.stage, t.seconds) for t in timings],
            validation=inputs.find(ValidationReport),
            created_at=utc_now_iso(),
            versions=installed_versions(),
        )
