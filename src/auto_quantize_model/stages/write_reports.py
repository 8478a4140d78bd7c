"""The ``WriteReports`` stage."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

import attrs

from auto_quantize_model.artifacts import BudgetFrontier, MeasuredFrontier, ReportPaths, SensitivityScores
from auto_quantize_model.core.diff import diff_manifests, render_diff_markdown
from auto_quantize_model.errors import ConfigError, InputError
from auto_quantize_model.io.atomic import atomic_write_text
from auto_quantize_model.io.manifest_file import MANIFEST_SUFFIX, read_manifest
from auto_quantize_model.manifest_records import Manifest
from auto_quantize_model.pipeline import Artifacts
from auto_quantize_model.render.reports import write_reports
from auto_quantize_model.specs import ReportSpec

log = logging.getLogger("auto_quantize_model")


RANKING_DIFF = "ranking-diff.md"


def compared_manifest(other: Path) -> tuple[Manifest, Path]:
    """``reports.compare_to``'s manifest (the file, or the one inside a run folder), read before
    any report is written so that a bad path leaves nothing half-written."""
    found = sorted(other.glob(f"*{MANIFEST_SUFFIX}")) if other.is_dir() else [other]
    if len(found) != 1:
        raise InputError(
            f"reports.compare_to: {other} holds {len(found)} *{MANIFEST_SUFFIX} files; "
            "give the manifest itself"
        )
    return read_manifest(found[0]), found[0]


def ranking_diff(manifest: Manifest, before: Manifest, path: Path, out: Path) -> Path:
    """How this run's ranking moved against ``before`` (``aqm diff``'s Markdown, ``before`` as A),
    written to ``ranking-diff.md`` beside the report."""
    diff = diff_manifests(before, manifest)
    text = render_diff_markdown(diff, f"{before.scheme.name} ({path})", manifest.scheme.name, level=1)
    log.info(
        "ranking vs %s: Spearman %.3f over %d groups, top-10 overlap %d/%d",
        path,
        diff.spearman,
        diff.common,
        diff.top_k[0].shared,
        diff.top_k[0].size,
    )
    return atomic_write_text(out / RANKING_DIFF, text)


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
        compared = None if self.spec.compare_to is None else compared_manifest(Path(self.spec.compare_to))
        paths = write_reports(manifest, self.spec.output_dir, plots=self.spec.plots, state_path=state_path)
        if compared is not None:
            diff_file = ranking_diff(manifest, *compared, Path(self.spec.output_dir))
            paths = attrs.evolve(paths, files=(*paths.files, str(diff_file)))
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
