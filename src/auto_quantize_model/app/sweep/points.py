"""Sweeps: one pipeline file, a ``[sweep]`` table, the cartesian product of runs.

Every point is structured and pre-flight checked before the first model load, so a typo in the
third value of a list fails the sweep in a second instead of after two hours of earlier points.
Once running, a failing point is recorded in ``sweep-index.md`` and the sweep goes on: on a
shared GPU, one out-of-memory setting should not throw away the others.

What points share is done once (:mod:`auto_quantize_model.app.sweep.session`): the keys below say
what a point's model, calibration batches and AutoQuant search depend on, and
:func:`reuse_order` runs the points that share them back to back.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from auto_quantize_model.app.folders import INDEX_NAME
from auto_quantize_model.errors import AqmError, ConfigError
from auto_quantize_model.io.convert import toml_value
from auto_quantize_model.io.pipeline_file import PATH_KEYS, spec_from_dict, spec_to_dict
from auto_quantize_model.io.preflight import preflight
from auto_quantize_model.specs import AutoQuantSpec, CalibSpec, ExtractSpec, LoadSpec, PipelineSpec

if TYPE_CHECKING:
    from auto_quantize_model.manifest_records import Manifest
    from auto_quantize_model.pipeline import Artifacts

log = logging.getLogger("auto_quantize_model")

_MAX_FOLDER = 96
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")

Setting = tuple[str, Any]


@attrs.frozen
class SweepPoint:
    """One combination of sweep values and the full spec it produces."""

    label: str
    """``autoquant.method=kl_div,calib.seq_len=256`` (empty for a run without a sweep)."""
    folder: str
    """Safe folder name for this point inside the sweep's output folder."""
    settings: tuple[Setting, ...]
    spec: PipelineSpec


@attrs.frozen
class PointResult:
    """What one point of a sweep produced, as shown in ``sweep-index.md``."""

    point: SweepPoint
    status: str
    """``ok`` or ``failed: <first line of the error>``."""
    seconds: float
    effective_bits: float | None = None
    top_layers: tuple[str, ...] = ()
    reuse: str = ""
    """What the point took over instead of redoing (``model copy; calibration of #1``); empty if none."""
    earlier: bool = False
    """The point was finished by an earlier run of the sweep and skipped this time."""
    worker: int | None = None
    """The torchrun worker (rank) that ran the point; None in a single-process sweep."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@attrs.frozen
class PointOutcome:
    """What a point runner may return instead of a bare manifest: the manifest and how it was made."""

    manifest: Manifest | None
    reuse: str = ""
    earlier: bool = False
    seconds: float | None = None
    """For a point finished by an earlier run: the wall time it took then (None: unknown)."""


# --------------------------------------------------------------------------------------------------
# What points share
# --------------------------------------------------------------------------------------------------

SearchKey = tuple[LoadSpec, ExtractSpec, CalibSpec, tuple[tuple[str, Any], ...]]

_BUDGET_ONLY = ("effective_bits", "checkpoint")
"""AutoQuant settings a saved search does not depend on: the budget is re-searched from the saved
scores, and the checkpoint is only where the state lives."""


def model_key(spec: PipelineSpec) -> LoadSpec:
    """Points with equal keys can run on copies of one loaded model (every load setting counts)."""
    return spec.model


def calib_key(spec: PipelineSpec) -> tuple[LoadSpec, CalibSpec]:
    """Points with equal keys calibrate on the same batches (the tokenizer comes with the model)."""
    return spec.model, spec.calib


def search_key(spec: PipelineSpec) -> SearchKey:
    """Points with equal keys differ at most in their budget: one's saved calibration and scores
    serve the others, whose search is re-solved from them (ModelOpt's resume)."""
    search = tuple(
        (field.name, getattr(spec.autoquant, field.name))
        for field in attrs.fields(AutoQuantSpec)
        if field.name not in _BUDGET_ONLY
    )
    return spec.model, spec.extract, spec.calib, search


class PointSession(Protocol):
    """Runs a sweep's points, doing once what they share (:class:`~.session.SweepSession`)."""

    def __call__(self, spec: PipelineSpec, folder: Path) -> Artifacts:
        """Run one point's spec (pointed at its folder's search state) into its folder."""

    def remember(self, spec: PipelineSpec) -> None:
        """A point an earlier run finished: what it saved may serve the points still to run."""

    def reuse_of(self, folder: Path) -> str:
        """What the point run into ``folder`` took over from others, in a few words."""

    def notes(self) -> list[str]:
        """Lines for the sweep index on what was shared so far."""

    def close(self) -> None:
        """Let go of the model and batches kept for the points."""


def reuse_order(points: Sequence[SweepPoint]) -> tuple[SweepPoint, ...]:
    """The points with those sharing a model, then a calibration, then a search back to back.

    Stable: otherwise the file's order. One model is kept in memory at a time, so a sweep whose
    first key is the budget and second the model would otherwise load the model at every point.
    """
    first: dict[object, int] = {}

    def seen(key: object) -> int:
        return first.setdefault(key, len(first))

    keyed = [
        ((seen(model_key(p.spec)), seen(calib_key(p.spec)), seen(search_key(p.spec))), i, p)
        for i, p in enumerate(points)
    ]
    return tuple(point for _, _, point in sorted(keyed, key=lambda item: (item[0], item[1])))


def format_setting_value(value: Any) -> str:
    """A sweep value as it reads in a label: strings bare, lists joined with ``+``."""
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple):
        return "+".join(format_setting_value(v) for v in value)
    return toml_value(value)


def point_label(settings: Sequence[Setting]) -> str:
    return ",".join(f"{key}={format_setting_value(value)}" for key, value in settings)


def folder_name(settings: Sequence[Setting]) -> str:
    """A readable folder name that is safe on every file system (paths shortened to their name)."""
    parts = []
    for key, value in settings:
        if tuple(key.split(".")) in PATH_KEYS and isinstance(value, str):
            value = Path(value).name or value
        parts.append(f"{key}={format_setting_value(value)}")
    name = _UNSAFE.sub("_", ",".join(parts)).strip("._") or "point"
    if len(name) > _MAX_FOLDER:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[: _MAX_FOLDER - 9]}-{digest}"
    return name


def _with_settings(spec: PipelineSpec, settings: Sequence[Setting]) -> dict[str, Any]:
    raw = spec_to_dict(spec, with_sweep=False)
    for key, value in settings:
        table, name = key.split(".")
        raw.setdefault(table, {})[name] = value
    return raw


def expand_sweep(spec: PipelineSpec, *, source: str = "pipeline") -> tuple[SweepPoint, ...]:
    """Every point of the sweep, each structured and pre-flight checked.

    Without a ``[sweep]`` table this is one point (empty label) holding ``spec`` itself. All
    problems of all points are raised together; a problem shared by every point is reported once.
    """
    if not spec.sweep:
        preflight(spec, source=source)
        return (SweepPoint(label="", folder="", settings=(), spec=spec),)
    keys = list(spec.sweep)
    combos = list(itertools.product(*(spec.sweep[key] for key in keys)))
    points: list[SweepPoint] = []
    problems: dict[str, list[str]] = {}
    kinds: set[type[AqmError]] = set()
    used: set[str] = set()
    for combo in combos:
        settings = tuple(zip(keys, combo, strict=True))
        label = point_label(settings)
        try:
            point_spec = spec_from_dict(_with_settings(spec, settings), source=source)
            preflight(point_spec, source=source)
        except AqmError as err:
            kinds.add(type(err))
            for line in str(err).splitlines():
                problems.setdefault(line.removeprefix(f"{source}: "), []).append(label)
            continue
        folder = folder_name(settings)
        unique, n = folder, 2
        while unique in used:
            unique, n = f"{folder}-{n}", n + 1
        used.add(unique)
        points.append(SweepPoint(label=label, folder=unique, settings=settings, spec=point_spec))
    if problems:
        lines = []
        for line, labels in problems.items():
            where = "" if len(labels) == len(combos) else f"sweep point {'; '.join(labels)}: "
            lines.append(f"{source}: {where}{line}")
        kind = kinds.pop() if len(kinds) == 1 else ConfigError
        raise kind("\n".join(lines))
    return tuple(points)


PointRunner = Callable[[SweepPoint, Path], "Manifest | PointOutcome | None"]
"""Runs one point into its folder and returns its manifest (None when it wrote none), or a
:class:`PointOutcome` saying what it reused or that an earlier run had finished it."""
Notes = Callable[[], Sequence[str]]
"""Lines for the top of ``sweep-index.md`` (what the sweep loaded and reused so far)."""


def run_sweep(
    points: Sequence[SweepPoint],
    output_dir: Path,
    run_point: PointRunner,
    *,
    title: str = "",
    notes: Notes | None = None,
    write_index: bool = True,
) -> tuple[PointResult, ...]:
    """Run every point into ``output_dir/<point.folder>``; failures are recorded, not raised.

    ``sweep-index.md`` is rewritten after each point, so an interrupted sweep still shows what
    finished (unless ``write_index`` is false: a torchrun worker runs only its share, and rank 0
    writes the index once from everyone's). KeyboardInterrupt is not caught: Ctrl-C stops the
    whole sweep.
    """
    from auto_quantize_model.io.atomic import atomic_write_text

    output_dir.mkdir(parents=True, exist_ok=True)
    results: list[PointResult] = []
    index = output_dir / INDEX_NAME
    for number, point in enumerate(points, start=1):
        log.info("sweep point %d/%d: %s", number, len(points), point.label)
        folder = output_dir / point.folder
        started = time.perf_counter()
        try:
            outcome = run_point(point, folder)
        except Exception as err:
            seconds = time.perf_counter() - started
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if not isinstance(err, AqmError):
                message = f"{type(err).__name__}: {message}"
            log.error("sweep point %s failed: %s", point.label, message)
            log.debug("traceback of the failed point", exc_info=True)
            results.append(PointResult(point, f"failed: {message}", seconds))
        else:
            seconds = time.perf_counter() - started
            if not isinstance(outcome, PointOutcome):
                outcome = PointOutcome(outcome)
            results.append(_result_of(point, outcome, seconds))
        if write_index:
            lines = () if notes is None else notes()
            atomic_write_text(index, render_index(results, total=len(points), title=title, notes=lines))
    return tuple(results)


def _result_of(point: SweepPoint, outcome: PointOutcome, seconds: float) -> PointResult:
    if outcome.seconds is not None:
        seconds = outcome.seconds
    manifest = outcome.manifest
    bits: float | None = None
    top: tuple[str, ...] = ()
    if manifest is not None:
        bits, top = manifest.scheme.effective_bits_lm, tuple(group.name for group in manifest.groups[:5])
    return PointResult(point, "ok", seconds, bits, top, reuse=outcome.reuse, earlier=outcome.earlier)


def _status(result: PointResult) -> str:
    if result.earlier:
        return f"{result.status} (an earlier run)"
    return f"{result.status}; {result.reuse}" if result.reuse else result.status


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_index(
    results: Sequence[PointResult], *, total: int | None = None, title: str = "", notes: Sequence[str] = ()
) -> str:
    """The Markdown table of a sweep: one row per point, failures included; ``notes`` go on top."""
    done = len(results)
    total = done if total is None else total
    failed = sum(not r.ok for r in results)
    earlier = sum(r.earlier for r in results)
    lines = [f"# Sweep{f': {title}' if title else ''}", ""]
    lines.append(
        f"{done} of {total} points run, {failed} failed"
        + (f", {earlier} finished by an earlier run." if earlier else ".")
    )
    for line in notes:
        lines += ["", line]
    workers = any(result.worker is not None for result in results)
    lines += [
        "",
        "| # | point | settings | effective bits | top-5 layers (most sensitive first) | wall time "
        + ("| worker " if workers else "")
        + "| status |",
        "|---:|---|---|---:|---|---:|" + ("---:|" if workers else "") + "---|",
    ]
    for number, result in enumerate(results, start=1):
        point = result.point
        settings = "<br>".join(f"`{key} = {_cell(toml_value(value))}`" for key, value in point.settings)
        bits = "" if result.effective_bits is None else f"{result.effective_bits:.3f}"
        top = "<br>".join(f"`{_cell(name)}`" for name in result.top_layers)
        worker = "" if not workers else f"{'' if result.worker is None else result.worker} | "
        lines.append(
            f"| {number} | [{_cell(point.folder)}]({point.folder}/) | {settings} | {bits} | {top} | "
            f"{result.seconds:.1f} s | {worker}{_cell(_status(result))} |"
        )
    return "\n".join(lines) + "\n"
