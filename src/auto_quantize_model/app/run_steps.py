"""What a single run and each point of a sweep do the same way, below both of their lifecycles.

A single run (:mod:`~auto_quantize_model.app.run_service`) and a sweep's point
(:mod:`~auto_quantize_model.app.sweep.runs`) each take a :class:`RunRequest`, record their folder's
``run.json`` through a :class:`Recorder`, run the pipeline through :func:`run_point` and read what
it produced from the artifact store. Kept here, below both, so that the sweep's lifecycle never
imports the service that dispatches to it (an import cycle works or fails depending on which
module a caller happens to load first).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from auto_quantize_model.app.defaults import AfterRun, PipelineRunner
from auto_quantize_model.app.folders import (
    RUN_FILE,
    OutputError,
    describe_os_error,
    output_error,
    pipeline_header,
    relative_names,
)
from auto_quantize_model.app.logs import PACKAGE_LOGGER
from auto_quantize_model.app.runs import (
    COMPLETE,
    FAILED,
    ForwardSteps,
    RunFolder,
    RunRecord,
    Writer,
    failure_reason,
    run_record,
    write_run,
)
from auto_quantize_model.app.signals import what_stopped
from auto_quantize_model.errors import StageError

if TYPE_CHECKING:
    from auto_quantize_model.app.sweep.points import SweepPoint
    from auto_quantize_model.app.sweep.workers import Worker
    from auto_quantize_model.manifest_records import Manifest
    from auto_quantize_model.pipeline import Artifacts
    from auto_quantize_model.specs import PipelineSpec

log = logging.getLogger(PACKAGE_LOGGER)


@attrs.frozen
class RunRequest:
    """A checked pipeline to run into ``folder``: one point, or a sweep's points."""

    spec: PipelineSpec
    """As the user wrote it (with overrides): what ``pipeline.toml`` keeps."""
    points: tuple[SweepPoint, ...]
    folder: Path
    header: str
    """Comment lines on top of ``pipeline.toml`` (source, overrides, how to repeat)."""
    title: str = ""
    force: bool = False
    command: tuple[str, ...] = ()
    after: AfterRun | None = None
    worker: Worker | None = None
    """This process's place among torchrun's workers (None: a plain, single-process run)."""

    @property
    def is_sweep(self) -> bool:
        return len(self.points) > 1 or bool(self.points[0].settings)

    @classmethod
    def of(
        cls,
        spec: PipelineSpec,
        folder: Path,
        *,
        source: str,
        overrides: Sequence[str] = (),
        force: bool = False,
        command: Sequence[str] = (),
        worker: Worker | None = None,
        after: AfterRun | None = None,
    ) -> RunRequest:
        """The request to run ``spec`` (from ``source``, with ``--set`` ``overrides``) into ``folder``:
        its sweep expanded into points, the ``pipeline.toml`` header written the one way."""
        from auto_quantize_model.app.sweep.points import expand_sweep

        return cls(
            spec,
            expand_sweep(spec, source=source),
            folder,
            header=pipeline_header(source, overrides),
            title=source,
            force=force,
            command=tuple(command),
            after=after,
            worker=worker,
        )


@attrs.frozen
class Recorder:
    """Writes one run's ``run.json`` as it moves from running to complete or failed.

    It takes the text writer rather than whoever runs the pipeline, so that a test's full disk
    reaches the record the same way it reaches every other file.
    """

    text_writer: Writer
    run: RunFolder
    spec: PipelineSpec
    command: Sequence[str]
    sweep: bool = False
    """The record of a sweep's own folder (its points keep records of their own)."""

    def write(
        self,
        status: str,
        files: Sequence[Path],
        *,
        device: str | None = None,
        forward_steps: ForwardSteps | None = None,
        seconds: tuple[tuple[str, float], ...] | None = None,
    ) -> Path:
        record: RunRecord = run_record(
            self.run,
            self.spec,
            status,
            command=self.command,
            files=relative_names(self.run.path, files),
            device=device,
            forward_steps=forward_steps,
            seconds=seconds,
        )
        if self.sweep:
            record = attrs.evolve(record, sweep=True)
        try:
            return write_run(self.run.path, record, self.text_writer)
        except OSError as err:
            raise output_error(self.run.path / RUN_FILE, err) from None

    def write_complete(
        self,
        store: Artifacts,
        written: Sequence[Path],
        state: Sequence[Path],
        *,
        imports: float | None = None,
    ) -> Path:
        """Record ``complete``, listing what the run wrote, the search state beside it and ``run.json``.

        The search state is listed although no report names it: only a file the record lists is
        one that ``--force`` may remove later. ``imports``: the seconds spent importing the
        libraries, shown before the stages' own (a sweep's point has none of its own).
        """
        files = [*written, *(p for p in state if p not in written), self.run.path / RUN_FILE]
        manifest = manifest_of(store)
        seconds = _stage_seconds(store)
        if imports is not None:
            seconds = (("library_imports", round(imports, 3)), *seconds)
        return self.write(
            COMPLETE,
            files,
            device=manifest.model.device if manifest is not None else None,
            forward_steps=_forward_steps(store),
            seconds=seconds,
        )

    def write_failure(self, err: BaseException, files: Sequence[Path]) -> None:
        """Record ``failed: <reason>``; if even that cannot be written, say so and let ``err`` go on."""
        try:
            self.write(f"{FAILED}: {failure_reason(err)}", files)
        except Exception as secondary:
            log.error(
                "could not record the failure in %s (%s); the next run will find it interrupted",
                self.run.path / RUN_FILE,
                secondary,
            )


def run_point(runner: PipelineRunner, spec: PipelineSpec, folder: Path) -> Artifacts:
    """Run one point; an OS error inside a stage becomes one line naming the path and reason."""
    try:
        return runner(spec, folder)
    except StageError as err:
        if isinstance(err.cause, OSError):
            raise StageError(err.stage, OutputError(describe_os_error(err.cause, folder))) from err
        raise


def interrupted_run(err: KeyboardInterrupt, folder: Path, *, saved: bool) -> str:
    """What a stopped run left, and how to go on: the line the CLI prints."""
    if saved:
        return (
            f"{what_stopped(err)}: {folder} keeps the saved calibration and scores; `aqm resume {folder}` "
            "goes on from them"
        )
    return (
        f"{what_stopped(err)}: nothing computed was kept in {folder} (no calibration had been saved yet); "
        f"`aqm resume {folder}` starts the run again"
    )


# --------------------------------------------------------------------------- what a run produced


def report_files(store: Artifacts) -> list[Path]:
    from auto_quantize_model.artifacts import ReportPaths

    paths = store.find(ReportPaths)
    return [] if paths is None else [Path(name) for name in paths.files]


def manifest_of(store: Artifacts) -> Manifest | None:
    from auto_quantize_model.manifest_records import Manifest

    return store.find(Manifest)


def _forward_steps(store: Artifacts) -> ForwardSteps | None:
    from auto_quantize_model.artifacts import SensitivityScores

    scores = store.find(SensitivityScores)
    if scores is None or scores.calib_forward_steps is None:
        return None
    return ForwardSteps(calibration=scores.calib_forward_steps, scoring=scores.score_forward_steps or 0)


def _stage_seconds(store: Artifacts) -> tuple[tuple[str, float], ...]:
    from auto_quantize_model.artifacts import RunTimings

    timings = store.find(RunTimings)
    return tuple((t.stage, round(t.seconds, 3)) for t in (timings.stages if timings else ()))


def print_summary(
    folder: Path,
    files: Sequence[Path],
    manifest: Manifest | None = None,
    *,
    seconds: float = 0.0,
    imports: float = 0.0,
) -> None:
    """The files a command wrote and the scheme it found, on stdout (the results, not the log).

    ``seconds`` is the whole run, ``imports`` the part of it spent importing the libraries, shown
    apart so that it does not read as stage time; a command that ran no pipeline
    (``--report-only``) passes neither.
    """
    split = f" (importing libraries {imports:.1f} s, the stages {seconds - imports:.1f} s)" if imports else ""
    print(f"aqm: done in {seconds:.1f} s{split}; {len(files)} files in {folder}:")
    for path in files:
        print(f"  {path}")
    if manifest is not None:
        scheme = manifest.scheme
        print(
            f"aqm: scheme {scheme.name}: effective bits {scheme.effective_bits_lm:.3f} "
            f"(target {scheme.effective_bits_target:g}), {len(manifest.groups)} groups ranked"
        )
        for group in manifest.groups[:5]:
            print(f"  #{group.rank} {group.name} (importance {group.importance:.4g})")
