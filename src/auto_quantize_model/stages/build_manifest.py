"""The ``BuildManifest`` stage: rank the scored groups and record what was measured, on what, how.

The manifest's records are made from the artifacts field by name
(:func:`~auto_quantize_model.io.convert.project`), never copied by hand. Everything here is pure
except :meth:`BuildManifest.run`, which reads the clock and the installed package versions and
hands them to :func:`build_manifest`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import attrs

from auto_quantize_model.artifacts import (
    BudgetFrontier,
    CalibData,
    CalibStats,
    LoadedModel,
    MeasuredFrontier,
    RunTimings,
    SensitivityScores,
    StageTiming,
)
from auto_quantize_model.core.format_agreement import format_agreement
from auto_quantize_model.core.frontier_points import frontier_summary
from auto_quantize_model.core.ranking import check_ranking, rank_groups, scheme_name
from auto_quantize_model.io.convert import project
from auto_quantize_model.io.manifest import SCHEMA_VERSION, installed_versions, utc_now_iso
from auto_quantize_model.manifest_records import DatasetInfo, Manifest, ModelInfo, SchemeInfo
from auto_quantize_model.pipeline import Artifacts
from auto_quantize_model.specs import ManifestSpec
from auto_quantize_model.validation_records import ValidationReport


def model_info(loaded: LoadedModel | None) -> ModelInfo:
    """What was loaded; all ``""`` when the pipeline was handed scores without a model."""
    if loaded is None:
        return ModelInfo(source="", architecture="", dtype="", device="")
    return project(loaded, ModelInfo)


def dataset_info(stats: CalibStats | None) -> DatasetInfo | None:
    """The manifest's record of the calibration data; the image mix is the artifact's own record
    (projection structures plain fields only)."""
    if stats is None:
        return None
    return attrs.evolve(project(attrs.evolve(stats, images=None), DatasetInfo), images=stats.images)


def scheme_info(scores: SensitivityScores, name: str) -> SchemeInfo:
    return project(scores, SchemeInfo, name=name)


def run_warnings(scores: SensitivityScores, validation: ValidationReport | None) -> tuple[str, ...]:
    """What the run could not do as asked: the search's warnings, then validation's unmet settings.

    Validation's notes on its own figures (a NaN coefficient, groups left out) stay in its section.
    """
    return (*scores.warnings, *(() if validation is None else validation.unmet))


def build_manifest(
    scores: SensitivityScores,
    spec: ManifestSpec,
    *,
    model: ModelInfo,
    dataset: DatasetInfo | None,
    timings: Sequence[StageTiming] = (),
    validation: ValidationReport | None = None,
    created_at: str = "",
    versions: tuple[tuple[str, str], ...] = (),
    frontier: BudgetFrontier | None = None,
    measured: MeasuredFrontier | None = None,
) -> Manifest:
    """The whole manifest from plain inputs; the clock and environment come in as arguments.

    A ranking with no finite importance is refused here, before any report is written: every
    report would rank noise (:func:`~auto_quantize_model.core.ranking.check_ranking`).
    """
    check_ranking(scores.groups)
    return Manifest(
        schema_version=SCHEMA_VERSION,
        scheme=scheme_info(scores, scheme_name(scores.formats, spec.scheme)),
        model=model,
        dataset=dataset,
        groups=rank_groups(scores.groups),
        timings=tuple(timings),
        created_at=created_at,
        versions=versions,
        validation=validation,
        origin="aqm",
        warnings=run_warnings(scores, validation),
        search_order=scores.search_order,
        fixed_groups=scores.fixed_groups,
        frontier=None if frontier is None else frontier_summary(frontier, measured),
        format_agreement=format_agreement(rank_groups(scores.groups), order=scores.formats),
        routing=scores.routing,
    )


@attrs.frozen
class BuildManifest:
    """Rank the scored groups and record what was measured, on what, and with which versions."""

    requires: ClassVar[tuple[type, ...]] = (SensitivityScores,)
    optional: ClassVar[tuple[type, ...]] = (
        LoadedModel,
        CalibData,
        RunTimings,
        ValidationReport,
        BudgetFrontier,
        MeasuredFrontier,
    )
    produces: ClassVar[type] = Manifest
    spec: ManifestSpec = attrs.field(factory=ManifestSpec)

    def run(self, inputs: Artifacts) -> Manifest:
        calib = inputs.find(CalibData)
        run_timings = inputs.find(RunTimings)
        return build_manifest(
            inputs.get(SensitivityScores),
            self.spec,
            model=model_info(inputs.find(LoadedModel)),
            dataset=dataset_info(None if calib is None else calib.stats),
            timings=() if run_timings is None else run_timings.stages,
            validation=inputs.find(ValidationReport),
            created_at=utc_now_iso(),
            versions=installed_versions(),
            frontier=inputs.find(BudgetFrontier),
            measured=inputs.find(MeasuredFrontier),
        )
