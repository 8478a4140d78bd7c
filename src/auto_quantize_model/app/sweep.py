"""Sweeps: one pipeline file, a ``[sweep]`` table, the cartesian product of runs.

Every point is structured and pre-flight checked before the first model load, so a typo in the
third value of a list fails the sweep in a second instead of after two hours of earlier points.
Once running, a failing point is recorded in ``sweep-index.md`` and the sweep goes on: on a
shared GPU, one out-of-memory setting should not throw away the others.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from auto_quantize_model.app.folders import INDEX_NAME
from auto_quantize_model.errors import AqmError, ConfigError
from auto_quantize_model.io.convert import toml_value
from auto_quantize_model.io.pipeline_file import PATH_KEYS, spec_from_dict, spec_to_dict
from auto_quantize_model.io.preflight import preflight
from auto_quantize_model.specs import PipelineSpec

if TYPE_CHECKING:
    from auto_quantize_model.io.manifest import Manifest

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

    @property
    def ok(self) -> bool:
        return self.status == "ok"


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


PointRunner = Callable[[SweepPoint, Path], "Manifest | None"]
"""Runs one point into its folder and returns its manifest (None when it wrote none)."""


def run_sweep(
    points: Sequence[SweepPoint],
    output_dir: Path,
    run_point: PointRunner,
    *,
    title: str = "",
) -> tuple[PointResult, ...]:
    """Run every point into ``output_dir/<point.folder>``; failures are recorded, not raised.

    ``sweep-index.md`` is rewritten after each point, so an interrupted sweep still shows what
    finished. KeyboardInterrupt is not caught: Ctrl-C stops the whole sweep.
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
            manifest = run_point(point, folder)
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
            results.append(_result_of(point, manifest, seconds))
        atomic_write_text(index, render_index(results, total=len(points), title=title))
    return tuple(results)


def _result_of(point: SweepPoint, manifest: Manifest | None, seconds: float) -> PointResult:
    if manifest is None:
        return PointResult(point, "ok", seconds)
    top = tuple(group.name for group in manifest.groups[:5])
    return PointResult(point, "ok", seconds, manifest.scheme.effective_bits_lm, top)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_index(results: Sequence[PointResult], *, total: int | None = None, title: str = "") -> str:
    """The Markdown table of a sweep: one row per point, failures included."""
    done = len(results)
    total = done if total is None else total
    failed = sum(not r.ok for r in results)
    lines = [f"# Sweep{f': {title}' if title else ''}", ""]
    lines.append(f"{done} of {total} points run, {failed} failed.")
    lines += [
        "",
        "| # | point | settings | effective bits | top-5 layers (most sensitive first) | wall time "
        "| status |",
        "|---:|---|---|---:|---|---:|---|",
    ]
    for number, result in enumerate(results, start=1):
        point = result.point
        settings = "<br>".join(f"`{key} = {_cell(toml_value(value))}`" for key, value in point.settings)
        bits = "" if result.effective_bits is None else f"{result.effective_bits:.3f}"
        top = "<br>".join(f"`{_cell(name)}`" for name in result.top_layers)
        lines.append(
            f"| {number} | [{_cell(point.folder)}]({point.folder}/) | {settings} | {bits} | {top} | "
            f"{result.seconds:.1f} s | {_cell(result.status)} |"
        )
    return "\n".join(lines) + "\n"
