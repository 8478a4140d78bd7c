"""The stages of a pipeline, one module each, and :data:`STAGES`: the one ordered registry of them.

Each row says which pipeline-file table configures a stage, its spec class, its stage class,
a short label (benchmark columns, logs) and whether the stage is optional. The rows are read
from the fields of :class:`~auto_quantize_model.specs.PipelineSpec`, where each stage table is
declared once with :func:`~auto_quantize_model.specs.stage_table`, so that the pipeline file's
schema stays a typed class and nothing else repeats the list: :func:`build_pipeline`,
:func:`stage_names`, the package's public exports and the benchmark's column names all read
:data:`STAGES`.

Importing this package imports no stage module and no torch: a stage class is imported when
:meth:`StageEntry.stage_class` is first called.
"""

from __future__ import annotations

import importlib
import os
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from auto_quantize_model.specs import FOLLOWER_METADATA, STAGE_METADATA, PipelineSpec

if TYPE_CHECKING:
    from auto_quantize_model.pipeline import Pipeline, Stage


@attrs.frozen
class StageEntry:
    """One stage of the standard pipeline."""

    table: str
    """Its table in pipeline files (``calib``)."""
    spec: type
    """The spec class its table structures into (``CalibSpec``)."""
    name: str
    """Its class name (``BuildCalibLoader``), which is also the runner's name for it."""
    module: str
    """The module holding the class (``auto_quantize_model.stages.build_calib_loader``)."""
    label: str
    """A short name for benchmark columns and logs (``calib``)."""
    optional: bool
    """Runs only when the pipeline file has its table."""
    switch: str | None = None
    """A field of the table's spec that must also be truthy for the stage to run (a second stage
    of one table, e.g. MeasureFrontier on ``[frontier] measure``); None: the table is enough."""

    def runs_in(self, spec: PipelineSpec) -> bool:
        """Whether ``spec`` runs this stage: its table is present (and its switch on)."""
        table = getattr(spec, self.table)
        return table is not None and (self.switch is None or bool(getattr(table, self.switch)))

    def stage_class(self) -> type[Stage]:
        """The stage class, imported on first use (stage modules may pull in heavy libraries)."""
        stage: type[Stage] = getattr(importlib.import_module(self.module), self.name)
        return stage

    def build(self, spec: object) -> Stage:
        """The stage configured by ``spec`` (an instance of :attr:`spec`)."""
        return self.stage_class()(spec)  # type: ignore[call-arg]


def _entries() -> tuple[StageEntry, ...]:
    hints = typing.get_type_hints(PipelineSpec)
    entries = []
    for field in attrs.fields(PipelineSpec):
        if STAGE_METADATA not in field.metadata:
            continue
        name, module, label = field.metadata[STAGE_METADATA]
        kinds = [kind for kind in typing.get_args(hints[field.name]) if kind is not type(None)]
        optional = bool(kinds)
        spec = kinds[0] if optional else hints[field.name]
        entries.append(
            StageEntry(
                table=field.name,
                spec=spec,
                name=name,
                module=f"{__name__}.{module}",
                label=label,
                optional=optional,
            )
        )
        if FOLLOWER_METADATA in field.metadata:
            name, module, label, switch = field.metadata[FOLLOWER_METADATA]
            entries.append(
                StageEntry(
                    table=field.name,
                    spec=spec,
                    name=name,
                    module=f"{__name__}.{module}",
                    label=label,
                    optional=True,
                    switch=switch,
                )
            )
    return tuple(entries)


STAGES: tuple[StageEntry, ...] = _entries()
"""Every stage of a pipeline file, in the order they run."""

STAGE_LABELS: dict[str, str] = {entry.name: entry.label for entry in STAGES}
"""Stage class name -> short label (``RunAutoQuant`` -> ``autoquant``)."""


def entry_named(name: str) -> StageEntry:
    """The registry row of stage class ``name``."""
    for entry in STAGES:
        if entry.name == name:
            return entry
    raise KeyError(f"no stage named {name}")


def active_stages(spec: PipelineSpec) -> tuple[StageEntry, ...]:
    """The stages ``spec`` runs: every stage whose table is present (optional ones may be absent)
    and whose switch, if it has one, is on."""
    return tuple(entry for entry in STAGES if entry.runs_in(spec))


def stage_names(spec: PipelineSpec) -> tuple[str, ...]:
    """The stage classes :func:`build_pipeline` would assemble, without importing them."""
    return tuple(entry.name for entry in active_stages(spec))


def build_pipeline(spec: PipelineSpec, output_dir: str | os.PathLike[str]) -> Pipeline:
    """The stages of ``spec`` in order, reports going to ``output_dir``.

    Stage modules are imported here, not at the top, so reading and checking a pipeline file
    never pays for torch.
    """
    from auto_quantize_model.pipeline import Pipeline

    spec = attrs.evolve(spec, reports=attrs.evolve(spec.reports, output_dir=os.fspath(output_dir)))
    if spec.export is not None and spec.export.output_dir is None:  # ExportCheckpoint's default folder
        spec = attrs.evolve(
            spec, export=attrs.evolve(spec.export, output_dir=os.fspath(Path(output_dir) / "export"))
        )
    stages: list[Any] = [entry.build(getattr(spec, entry.table)) for entry in active_stages(spec)]
    return Pipeline(stages)


def partial_pipeline(spec: PipelineSpec, through: str, then: Sequence[Stage] = ()) -> Pipeline:
    """The run's required stages from the start up to and including ``through``, then ``then``.

    Optional stages (validation, the frontier, the export) are left out: ``aqm export
    --checkpoint`` needs a fresh model and its calibration data (``through="BuildCalibLoader"``),
    ``aqm frontier --measure`` the restored search (``through="RunAutoQuant"``) followed by its own
    SolveBudgets and MeasureFrontier.
    """
    from auto_quantize_model.pipeline import Pipeline

    entry_named(through)  # a typo is a KeyError here, not a silently short pipeline
    stages: list[Any] = []
    for entry in STAGES:
        if not entry.optional and entry.runs_in(spec):
            stages.append(entry.build(getattr(spec, entry.table)))
        if entry.name == through:
            break
    return Pipeline([*stages, *then])
