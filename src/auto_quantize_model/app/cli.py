"""The ``aqm`` command.

Only the standard library is imported at the top: ``aqm --help`` must answer at once and
``aqm validate`` must not pay for torch. Every command imports what it needs when it runs.

Errors the user can fix (:class:`AqmError`) print as ``aqm: error: <message>`` with the error's
exit code and no traceback (``--debug`` shows it); Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from auto_quantize_model.errors import AqmError, ConfigError, InputError, StageError

if TYPE_CHECKING:
    from auto_quantize_model.app.sweep import SweepPoint
    from auto_quantize_model.artifacts import ReportPaths
    from auto_quantize_model.io.manifest import Manifest
    from auto_quantize_model.io.pipeline_file import PipelineSpec
    from auto_quantize_model.pipeline import Artifacts

PACKAGE_LOGGER = "auto_quantize_model"
PIPELINE_FILE = "pipeline.toml"
RUN_MARKERS = ("run.json", "sweep-index.md")
"""Files whose presence means a folder already holds a run (besides any ``*_quant_manifest.json``)."""

LEGACY_SCHEME = "int8_autoquant_lm_default"
LEGACY_ALIASES = (
    ("per-layer-sensitivity.md", "layer-sensitivity-report.md"),
    ("per-layer-sensitivity.json", "layer-sensitivity-report.json"),
)
"""The previous INT8 driver's report names, written as copies of ours by ``aqm qwen3-lm-int8``."""

_handler: logging.Handler | None = None


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of each record, not at setup.

    ``main`` may run several times in one process (tests, notebooks) with stderr swapped in
    between; a handler holding the old stream would write into a closed file.
    """

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure_logging(debug: bool = False) -> None:
    """Progress lines of the package logger go to stderr; stdout carries results only."""
    global _handler
    logger = logging.getLogger(PACKAGE_LOGGER)
    if _handler is not None:
        logger.removeHandler(_handler)
    _handler = _CurrentStderr(sys.stderr)
    _handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%H:%M:%S"))
    logger.addHandler(_handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("auto-quantize-model")
    except PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------- output folders


def check_output_dir(path: Path, force: bool) -> None:
    """Refuse to write into a folder that already holds another run, unless ``force``.

    A run is recognised by a ``run.json``, a ``sweep-index.md`` or a ``*_quant_manifest.json``;
    an empty or unrelated folder is fine to use.
    """
    if not path.exists():
        return
    if not path.is_dir():
        raise InputError(f"output {path} exists and is not a folder")
    found = [name for name in RUN_MARKERS if (path / name).exists()]
    found += sorted(p.name for p in path.glob("*_quant_manifest.json"))
    if found and not force:
        raise InputError(
            f"output folder {path} already holds a run ({found[0]}); pass --force to write over it, "
            "or choose another --output"
        )


def new_run_dir(stem: str, base: Path | None = None) -> Path:
    """``runs/<date>-<time>-<stem>`` under the working directory, never an existing folder."""
    root = (base if base is not None else Path.cwd()) / "runs"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate = root / f"{stamp}-{stem}"
    number = 2
    while candidate.exists():
        candidate = root / f"{stamp}-{stem}-{number}"
        number += 1
    return candidate


def _cleanup_after_failure(folder: Path, created: bool, written: Sequence[Path]) -> None:
    """Remove what this command wrote when the run produced nothing else.

    When a stage left something (a search checkpoint, a partial report), the folder and its
    ``pipeline.toml`` stay: they say how to repeat the run.
    """
    if not folder.is_dir():
        return
    others = [p for p in folder.iterdir() if p not in written]
    if others:
        return
    for path in written:
        path.unlink(missing_ok=True)
    if created:
        with contextlib.suppress(OSError):
            folder.rmdir()


# --------------------------------------------------------------------------- running


def _header(source: str, overrides: Sequence[str]) -> str:
    now = datetime.now().isoformat(timespec="seconds")
    lines = [
        f"Effective pipeline written by aqm {package_version()} on {now}.",
        f"Source: {source}",
    ]
    lines += [f"Override: --set {text}" for text in overrides]
    lines.append("Repeat this run with: aqm run pipeline.toml --output NEW_FOLDER")
    return "\n".join(lines)


HEAVY_LIBRARIES = ("torch", "transformers", "modelopt.torch.quantization")


def import_libraries() -> float:
    """Import torch, transformers and ModelOpt before the first stage; seconds spent (0 if loaded).

    They would otherwise be imported inside LoadModel and RunAutoQuant, and their 16-21 s in a
    fresh process on the lent H100 image (more than the six stages there) would read as stage
    time. Imported here, the stage timings are the work itself and the import cost is reported on
    its own line. A library that fails to import is left for its stage to report as a one-line
    error.
    """
    missing = [name for name in HEAVY_LIBRARIES if name not in sys.modules]
    if not missing:
        return 0.0
    from auto_quantize_model.backend.modelopt.autoquant import import_off_stack

    started = time.perf_counter()
    imported: list[str] = []
    for name in missing:
        try:
            # ModelOpt on its own thread, like RunAutoQuant: see import_off_stack
            import_off_stack(name) if name.startswith("modelopt") else importlib.import_module(name)
        except ImportError:
            continue
        imported.append(name)
    seconds = time.perf_counter() - started
    if imported:
        logging.getLogger(PACKAGE_LOGGER).info("imported %s in %.1f s", ", ".join(imported), seconds)
    return seconds


def _run_one(spec: PipelineSpec, folder: Path) -> Artifacts:
    """Run ``spec`` into ``folder``; running out of GPU memory becomes a one-line error."""
    from auto_quantize_model.app.runs import is_out_of_memory, out_of_memory_error
    from auto_quantize_model.io.pipeline_file import build_pipeline

    try:
        # ModelOpt prints progress on stdout; stdout is for results (the summary), so route it away
        with contextlib.redirect_stdout(sys.stderr):
            return build_pipeline(for_folder(spec, folder), folder).run()
    except StageError as err:
        if is_out_of_memory(err.cause):
            raise out_of_memory_error(err.stage, spec) from err
        raise


def _written_files(store: Artifacts) -> list[Path]:
    from auto_quantize_model.artifacts import ReportPaths

    paths = store.find(ReportPaths)
    return [] if paths is None else report_files(paths)


def report_files(paths: ReportPaths) -> list[Path]:
    return [Path(name) for name in paths.files]


STATE_FILE = "autoquant_search_state.pt"


def for_folder(spec: PipelineSpec, folder: Path) -> PipelineSpec:
    """The spec as run in ``folder``: ModelOpt's search state is always saved there.

    The checkpoint goes into the run folder (never shared between runs), so rerunning into the
    same folder resumes; ``pipeline.toml`` keeps the spec as the user wrote it, so repeating it
    into a new folder starts a fresh search.
    """
    import attrs

    if spec.autoquant.checkpoint is None:
        autoquant = attrs.evolve(spec.autoquant, checkpoint=str(folder / STATE_FILE))
        return attrs.evolve(spec, autoquant=autoquant)
    return spec


def _manifest_of(store: Artifacts) -> Manifest | None:
    from auto_quantize_model.io.manifest import Manifest

    return store.find(Manifest)


def _print_summary(
    folder: Path, files: Sequence[Path], seconds: float, manifest: Manifest | None, imports: float = 0.0
) -> None:
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


def execute(
    spec: PipelineSpec,
    points: Sequence[SweepPoint],
    folder: Path,
    *,
    header: str,
    title: str,
    after: Callable[[Path, list[Path]], list[Path]] | None = None,
    force: bool = False,
    command: Sequence[str] = (),
) -> int:
    """Run a checked pipeline (one point or a whole sweep) into ``folder``; returns the exit code.

    ``after`` may add files once a single run succeeded (the legacy driver's report aliases).
    A single run checks ``folder`` itself (fresh, resumable or refused: :mod:`runs`); a sweep's
    folder must have been checked with :func:`check_output_dir`.
    """
    from auto_quantize_model.io.atomic import atomic_write_text
    from auto_quantize_model.io.pipeline_file import spec_to_toml

    if len(points) == 1 and not points[0].settings:
        return _execute_single(
            spec, points[0].spec, folder, header=header, force=force, after=after, command=command
        )
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    toml_path = folder / PIPELINE_FILE
    atomic_write_text(toml_path, spec_to_toml(spec, header=header))
    started = time.perf_counter()
    try:
        import_libraries()
        return _execute_sweep(points, folder, header=header, started=started, title=title)
    except BaseException:
        _cleanup_after_failure(folder, created, [toml_path])
        raise


def _execute_single(
    spec: PipelineSpec,
    point: PipelineSpec,
    folder: Path,
    *,
    header: str,
    force: bool,
    after: Callable[[Path, list[Path]], list[Path]] | None,
    command: Sequence[str],
) -> int:
    """One run with its ``run.json``; reruns into an interrupted run's folder resume it.

    A failure that leaves nothing worth keeping (no search state yet) removes what this command
    wrote, the folder too if it made it; a later failure keeps the folder, marked
    ``failed: <reason>``, so that the same command resumes it.
    """
    from auto_quantize_model.app.runs import (
        COMPLETE,
        FAILED,
        RUNNING,
        failure_reason,
        open_run_folder,
        read_run,
        run_record,
        write_run,
    )
    from auto_quantize_model.artifacts import RunTimings, SensitivityScores
    from auto_quantize_model.io.atomic import atomic_write_text
    from auto_quantize_model.io.pipeline_file import spec_to_toml

    run = open_run_folder(folder, spec, force)
    previous = read_run(folder) if run.resume else None
    folder.mkdir(parents=True, exist_ok=True)
    toml_path = folder / PIPELINE_FILE
    if run.resume:
        logging.getLogger(PACKAGE_LOGGER).info(
            "resuming the interrupted run in %s (saved calibration and scores are reused)", folder
        )
    else:
        atomic_write_text(toml_path, spec_to_toml(spec, header=header))
    own = [toml_path, folder / "run.json"]
    write_run(folder, run_record(run, spec, RUNNING, command=command, previous=previous))
    started = time.perf_counter()
    try:
        imports = import_libraries()
        store = _run_one(point, folder)
    except BaseException as err:
        if run.resume or run.worth_keeping(own):
            reason = f"{FAILED}: {failure_reason(err)}"
            write_run(folder, run_record(run, spec, reason, command=command, previous=previous))
            if not isinstance(err, KeyboardInterrupt):
                logging.getLogger(PACKAGE_LOGGER).info(
                    "the run folder %s is kept; the same command resumes it", folder
                )
        else:
            _cleanup_after_failure(folder, run.created, [*own, folder / (STATE_FILE + ".settings.json")])
        raise
    files = [toml_path, *_written_files(store)]
    if after is not None:
        files += after(folder, files)
    manifest = _manifest_of(store)
    scores = store.find(SensitivityScores)
    steps = None
    if scores is not None and scores.calib_forward_steps is not None:
        steps = {"calibration": scores.calib_forward_steps, "scoring": scores.score_forward_steps or 0}
    device = manifest.model.device if manifest is not None else None
    timings = store.find(RunTimings)
    record = run_record(
        run,
        spec,
        COMPLETE,
        command=command,
        device=device,
        forward_steps=steps,
        previous=previous,
        seconds={
            "library_imports": round(imports, 3),
            **{t.stage: round(t.seconds, 3) for t in (timings.stages if timings else ())},
        },
    )
    files.append(write_run(folder, record))
    _print_summary(folder, files, time.perf_counter() - started, manifest, imports)
    return 0


def _execute_sweep(
    points: Sequence[SweepPoint], folder: Path, *, header: str, started: float, title: str
) -> int:
    import attrs

    from auto_quantize_model.app.sweep import INDEX_NAME, run_sweep
    from auto_quantize_model.io.atomic import atomic_write_text
    from auto_quantize_model.io.pipeline_file import spec_to_toml

    def run_point(point: SweepPoint, point_dir: Path) -> Manifest | None:
        spec = point.spec
        if spec.autoquant.checkpoint is not None:
            # Points must never share a search state: each gets its own next to its outputs.
            name = Path(spec.autoquant.checkpoint).name
            spec = attrs.evolve(
                spec, autoquant=attrs.evolve(spec.autoquant, checkpoint=str(point_dir / name))
            )
        point_dir.mkdir(parents=True, exist_ok=True)
        point_header = f"{header}\nSweep point: {point.label}"
        atomic_write_text(point_dir / PIPELINE_FILE, spec_to_toml(spec, header=point_header))
        return _manifest_of(_run_one(spec, point_dir))

    results = run_sweep(points, folder, run_point, title=title)
    seconds = time.perf_counter() - started
    print(f"aqm: sweep done in {seconds:.1f} s; index: {folder / INDEX_NAME}")
    for result in results:
        print(f"  {result.status:<8} {result.point.folder}  ({result.seconds:.1f} s)")
    failed = [r for r in results if not r.ok]
    if failed:
        print(
            f"aqm: error: {len(failed)} of {len(results)} sweep points failed; see {folder / INDEX_NAME}",
            file=sys.stderr,
        )
        return 1
    return 0


def _output_for(args_output: str | None, spec: PipelineSpec, stem: str) -> Path:
    if args_output:
        return Path(args_output)
    if spec.reports.output_dir is not None:
        return Path(spec.reports.output_dir)
    return new_run_dir(stem)


def check_captions(points: Sequence[SweepPoint]) -> None:
    """Read every captions file before any model loads: empty, blank, not UTF-8 or too short fail now."""
    from auto_quantize_model.core.batching import read_captions

    seen: set[tuple[str, int]] = set()
    for point in points:
        key = (point.spec.calib.captions, point.spec.calib.max_samples)
        if key not in seen:
            seen.add(key)
            read_captions(*key)


def cmd_run(args: argparse.Namespace) -> int:
    from auto_quantize_model.app.sweep import expand_sweep
    from auto_quantize_model.io.pipeline_file import load_pipeline

    spec = load_pipeline(args.file, args.set)
    points = expand_sweep(spec, source=args.file)
    check_captions(points)
    folder = _output_for(args.output, spec, Path(args.file).stem)
    if len(points) > 1 or points[0].settings:
        check_output_dir(folder, args.force)
    return execute(
        spec,
        points,
        folder,
        header=_header(args.file, args.set),
        title=args.file,
        force=args.force,
        command=args.command_line,
    )


def cmd_resume(args: argparse.Namespace) -> int:
    from auto_quantize_model.app.runs import COMPLETE, read_run
    from auto_quantize_model.app.sweep import expand_sweep
    from auto_quantize_model.io.pipeline_file import load_pipeline

    folder = Path(args.folder)
    record = read_run(folder)
    if record is None or not (folder / PIPELINE_FILE).is_file():
        raise InputError(f"{folder}: not a run folder (no run.json and {PIPELINE_FILE} written by aqm run)")
    if record["status"] == COMPLETE and not args.force:
        raise InputError(f"{folder}: the run is already complete; nothing to resume (--force runs it again)")
    file = str(folder / PIPELINE_FILE)
    spec = load_pipeline(file)
    points = expand_sweep(spec, source=file)
    if len(points) > 1 or points[0].settings:
        raise InputError(f"{folder}: resuming a sweep is not supported; rerun the points that failed")
    check_captions(points)
    return execute(
        spec,
        points,
        folder,
        header=_header(file, ()),
        title=file,
        force=args.force,
        command=args.command_line,
    )


def cmd_validate(args: argparse.Namespace) -> int:
    from auto_quantize_model.app.sweep import expand_sweep
    from auto_quantize_model.io.pipeline_file import load_pipeline, stage_names

    spec = load_pipeline(args.file, args.set)
    points = expand_sweep(spec, source=args.file)
    print(f"{args.file}: OK")
    print(f"  stages: {' -> '.join(stage_names(spec))}")
    if len(points) > 1 or points[0].settings:
        print(f"  sweep: {len(points)} points")
        for point in points:
            print(f"    {point.label}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from auto_quantize_model.render.reports import regenerate_reports

    paths = regenerate_reports(Path(args.manifest), Path(args.output) if args.output else None)
    print(f"aqm: {len(paths.files)} files in {paths.directory}:")
    for path in report_files(paths):
        print(f"  {path}")
    return 0


def cmd_formats(args: argparse.Namespace) -> int:
    from auto_quantize_model.core.formats import CUSTOM_GRAMMAR, all_formats

    rows = [("name", "bits", "weights", "activations", "runs on")]
    refused: list[str] = []
    for info in all_formats():
        if info.refused is not None:
            where = "not usable (see below)"
            refused.append(f"  {info.name}: {info.refused}")
        else:
            where = "CUDA only" if info.needs_cuda else "CPU and CUDA"
        rows.append((info.name, f"{info.bits:g}", info.weights, info.activations, where))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for number, row in enumerate(rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        if number == 0:
            print("  ".join("-" * width for width in widths))
    print(f"\nYour own weight/activation pairs: {CUSTOM_GRAMMAR}")
    if refused:
        print("\nListed but refused for AutoQuant here:")
        print("\n".join(refused))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from auto_quantize_model.core.diff import diff_paths

    text = diff_paths(Path(args.a), Path(args.b))
    if args.output:
        from auto_quantize_model.io.atomic import atomic_write_text

        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text)
        print(f"aqm: wrote {out}")
    else:
        sys.stdout.write(text)
    return 0


# --------------------------------------------------------------------------- previous tool's driver

_LEGACY_FLAGS = {
    "model.path": "--model-dir",
    "model.device": "--device",
    "calib.captions": "--captions-path",
    "calib.max_samples": "--max-calib-samples",
    "calib.seq_len": "--calib-seq-len",
    "calib.batch_size": "--batch-size",
    "autoquant.effective_bits": "--effective-bits",
    "autoquant.score_size": "--auto-quantize-score-size",
}


def _in_flag_terms(err: AqmError) -> AqmError:
    """Name the flag the user typed next to the pipeline key in each line of ``err``."""
    text = str(err)
    for key, flag in _LEGACY_FLAGS.items():
        text = text.replace(f"{key}:", f"{flag} ({key}):")
    if text == str(err) or type(err) not in {ConfigError, InputError, AqmError}:
        return err
    return type(err)(text)


def legacy_raw_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline the previous LM-only INT8 driver ran, as a raw table (before path resolution)."""
    return {
        "model": {"path": args.model_dir, "device": args.device},
        "extract": {"scope": "language_model"},
        "calib": {
            "captions": args.captions_path,
            "max_samples": args.max_calib_samples,
            "seq_len": args.calib_seq_len,
            "batch_size": args.batch_size,
            "layout": args.layout,
        },
        "autoquant": {
            "formats": ["INT8_DEFAULT_CFG"],
            "method": "gradient",
            "effective_bits": args.effective_bits,
            "score_size": args.auto_quantize_score_size,
        },
        "manifest": {"scheme": LEGACY_SCHEME},
        "reports": {"save_state": True},
    }


def _legacy_aliases(folder: Path, files: list[Path]) -> list[Path]:
    from auto_quantize_model.io.atomic import atomic_copy

    written = []
    for ours, theirs in LEGACY_ALIASES:
        if (folder / ours).is_file():
            written.append(atomic_copy(folder / ours, folder / theirs))
    return written


def _find_manifest(folder: Path) -> Path:
    preferred = folder / f"{LEGACY_SCHEME}_quant_manifest.json"
    if preferred.is_file():
        return preferred
    found = sorted(folder.glob("*_quant_manifest.json"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise InputError(f"--report-only: no *_quant_manifest.json in {folder}")
    raise InputError(
        f"--report-only: several manifests in {folder} ({', '.join(p.name for p in found)}); "
        f"use aqm report MANIFEST"
    )


def cmd_qwen3_lm_int8(args: argparse.Namespace) -> int:
    if args.report_only:
        if not args.output_dir:
            raise InputError("--report-only needs --output-dir (the folder holding the manifest)")
        from auto_quantize_model.render.reports import read_manifest, regenerate_reports

        folder = Path(args.output_dir)
        manifest_path = _find_manifest(folder)
        if read_manifest(manifest_path).origin == "legacy":
            raise InputError(
                f"{manifest_path} was written by the previous tool and its reports sit next to it; "
                f"regenerate them elsewhere with: aqm report {manifest_path} --output DIR"
            )
        paths = regenerate_reports(manifest_path, folder)
        files = report_files(paths)
        files += _legacy_aliases(folder, files)
        _print_summary(folder, files, 0.0, None)
        return 0
    if not args.model_dir:
        raise InputError("--model-dir is required (a Qwen3-VL checkpoint folder), unless --report-only")

    from auto_quantize_model.app.sweep import expand_sweep
    from auto_quantize_model.io.pipeline_file import resolve_paths, spec_from_dict

    source = "aqm qwen3-lm-int8"
    folder = Path(args.output_dir) if args.output_dir else new_run_dir("qwen3-lm-int8")
    raw = legacy_raw_spec(args)
    # The search state lives under its final name, so WriteReports has nothing to copy.
    raw["autoquant"]["checkpoint"] = str(folder / f"{LEGACY_SCHEME}_autoquant_state.pt")
    raw = resolve_paths(raw, Path.cwd())
    try:
        spec = spec_from_dict(raw, source=source)
        points = expand_sweep(spec, source=source)
    except AqmError as err:
        raise _in_flag_terms(err) from None
    if len(points) > 1 or points[0].settings:
        check_output_dir(folder, args.force)
    return execute(
        spec,
        points,
        folder,
        header=_header(source, ()),
        title=source,
        after=_legacy_aliases,
        force=args.force,
        command=args.command_line,
    )


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")

    parser = argparse.ArgumentParser(
        prog="aqm",
        description="Per-layer quantization sensitivity of (vision-)language models with ModelOpt AutoQuant.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add_set(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a setting, value in TOML syntax (e.g. calib.seq_len=256); repeatable",
        )

    run = sub.add_parser("run", parents=[common], help="run a pipeline file (or a sweep)")
    run.add_argument("file", help="pipeline TOML file, e.g. pipelines/tiny-qwen3-vl.toml")
    add_set(run)
    run.add_argument("--output", metavar="DIR", help="output folder (default: runs/<time>-<file name>)")
    run.add_argument("--force", action="store_true", help="write into a folder that already holds a run")
    run.set_defaults(func=cmd_run)

    resume = sub.add_parser(
        "resume", parents=[common], help="finish an interrupted run, reusing its calibration and scores"
    )
    resume.add_argument("folder", help="the run folder (holds run.json and pipeline.toml)")
    resume.add_argument("--force", action="store_true", help="run a complete run again from scratch")
    resume.set_defaults(func=cmd_resume)

    validate = sub.add_parser(
        "validate", parents=[common], help="check a pipeline file and its inputs, loading no model"
    )
    validate.add_argument("file")
    add_set(validate)
    validate.set_defaults(func=cmd_validate)

    report = sub.add_parser(
        "report", parents=[common], help="regenerate the Markdown/JSON reports from a manifest"
    )
    report.add_argument("manifest", help="a *_quant_manifest.json (ours or the previous tool's)")
    report.add_argument("--output", metavar="DIR", help="where to write (default: next to the manifest)")
    report.set_defaults(func=cmd_report)

    sub.add_parser(
        "bench",
        add_help=False,
        help="packed vs padded calibration benchmark, one process, one model (aqm bench --help)",
    )
    formats = sub.add_parser("formats", parents=[common], help="list every format name and where it runs")
    formats.set_defaults(func=cmd_formats)

    diff = sub.add_parser("diff", parents=[common], help="compare two runs (manifests or run folders)")
    diff.add_argument("a")
    diff.add_argument("b")
    diff.add_argument("--output", metavar="FILE", help="write the Markdown here instead of stdout")
    diff.set_defaults(func=cmd_diff)

    legacy = sub.add_parser(
        "qwen3-lm-int8",
        parents=[common],
        help="the previous tool's LM-only INT8 driver, same flags",
        description=(
            "INT8 W8A8 (INT8_DEFAULT_CFG) AutoQuant sensitivity of the Qwen3-VL language model with the "
            f"previous driver's flags and file names (scheme {LEGACY_SCHEME}). Calibration uses the padded "
            "layout by default, like the previous tool, so scores compare with its numbers; "
            "--layout packed is faster."
        ),
    )
    legacy.add_argument("--model-dir", help="Hugging Face checkpoint folder")
    legacy.add_argument("--output-dir", help="output folder (default: runs/<time>-qwen3-lm-int8)")
    legacy.add_argument("--captions-path", default="builtin", help="captions text file (default: bundled)")
    legacy.add_argument("--max-calib-samples", type=int, default=512)
    legacy.add_argument("--calib-seq-len", type=int, default=512)
    legacy.add_argument("--batch-size", type=int, default=8)
    legacy.add_argument("--device", default="cuda")
    legacy.add_argument("--effective-bits", type=float, default=8.0)
    legacy.add_argument("--auto-quantize-score-size", type=int, default=128)
    legacy.add_argument("--report-only", action="store_true", help="regenerate reports from the manifest")
    legacy.add_argument("--layout", choices=("padded", "packed"), default="padded")
    legacy.add_argument("--force", action="store_true", help="write into a folder that already holds a run")
    legacy.set_defaults(func=cmd_qwen3_lm_int8)
    return parser


def _print_error(err: AqmError, debug: bool) -> None:
    if debug:
        traceback.print_exception(err)
    for line in str(err).splitlines() or [type(err).__name__]:
        print(f"aqm: error: {line}", file=sys.stderr)
    if isinstance(err, StageError) and not isinstance(err.cause, AqmError) and not debug:
        print("aqm: (run again with --debug for the traceback)", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["bench"]:
        # the benchmark owns its flags (``aqm bench --help`` lists them)
        from auto_quantize_model.bench import harness as bench

        return bench.main(given[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    debug = bool(args.debug)
    args.command_line = ["aqm", *(sys.argv[1:] if argv is None else argv)]
    configure_logging(debug)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        print("aqm: interrupted", file=sys.stderr)
        return 130
    except AqmError as err:
        _print_error(err, debug)
        return err.exit_code
    finally:
        sys.stdout.flush()
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
