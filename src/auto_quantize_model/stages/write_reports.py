"""The ``WriteReports`` stage."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import attrs

from auto_quantize_model.artifacts import BudgetFrontier, MeasuredFrontier, ReportPaths, SensitivityScores
from auto_quantize_model.errors import ConfigError
from auto_quantize_model.manifest_records import Manifest
from auto_quantize_model.pipeline import Artifacts
from auto_quantize_model.render.reports import write_reports
from auto_quantize_model.specs import ReportSpec


@attrs.frozen
class WriteReports:
    """Write the manifest and reports; copies ModelOpt's state when ``spec.save_state``.

    SensitivityScores is optional and read only for its ``state_path``: the path is machine- and
    run-specific, so it stays out of the manifest (two identical runs must give identical
    manifests). A :class:`BudgetFrontier` (``[frontier]``) adds ``frontier.md``/``.json`` and its
    plots, with the :class:`MeasuredFrontier` points when they were measured.
    """

    requires: ClassVar[tuple[type, ...]] = (Manifest,)
    optional: ClassVar[tuple[type, ...]] = (SensitivityScores, BudgetFrontier, MeasuredFrontier)
    produces: ClassVar[type] = ReportPaths
    spec: ReportSpec = attrs.field(factory=ReportSpec)

    def run(self, inputs: Artifacts) -> ReportPaths:
        if self.spec.output_dir is None:
            raise ConfigError(
                "WriteReports needs an output folder: set reports.output_dir (or pass --output)"
            )
        state_path: str | None = None
        if self.spec.save_state:
            scores = inputs.find(SensitivityScores)
            state_path = None if scores is None else scores.state_path
            if state_path is None:
                raise ConfigError(
                    "reports.save_state is true but RunAutoQuant saved no search state "
                    "(set autoquant.checkpoint to a file path)"
                )
        manifest = inputs.get(Manifest)
        paths = write_reports(manifest, self.spec.output_dir, plots=self.spec.plots, state_path=state_path)
        frontier = inputs.find(BudgetFrontier)
        if frontier is None:
            return paths
        from auto_quantize_model.core.damage import additivity_of, fit_or_why
        from auto_quantize_model.core.noise import random_weights_banner
        from auto_quantize_model.render.frontier import write_budget_frontier
        from auto_quantize_model.render.reports import PLOTS_DIR

        measured = inputs.find(MeasuredFrontier)
        damage, why = fit_or_why(measured, additivity_of(manifest.validation))
        written = write_budget_frontier(
            frontier,
            self.spec.output_dir,
            title=manifest.scheme.name,
            measured=measured,
            plots=self.spec.plots,
            plots_dir=Path(self.spec.output_dir) / PLOTS_DIR,
            damage=damage,
            notes=why,
            banner=random_weights_banner(manifest.model.source),
        )
        return attrs.evolve(paths, files=(*paths.files, *(str(path) for path in written)))
