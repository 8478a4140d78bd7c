"""The ``aqm`` command: argument parsing and thin commands over an injected run service.

Only the standard library is imported at the top: ``aqm --help`` must answer at once and
``aqm validate`` must not pay for torch. Every command imports what it needs when it runs.
Commands parse, read and check their inputs, then hand the work to a
:class:`~auto_quantize_model.app.run_service.RunService` (``main(argv, service=...)`` takes one,
which is how tests inject fakes); everything that touches an output folder happens there.

Errors the user can fix (:class:`AqmError`) print as ``aqm: error: <message>`` with the error's
exit code and no traceback (``--debug`` shows it); Ctrl-C exits with 130, SIGTERM during a run
with 143.
"""

from __future__ import annotations

import argparse
import math
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from auto_quantize_model.app.signals import Interrupted, sigterm_unwinds, what_stopped
from auto_quantize_model.errors import AqmError, InputError, StageError

if TYPE_CHECKING:
    from auto_quantize_model.app.run_service import RunService
    from auto_quantize_model.app.sweep.workers import Worker
    from auto_quantize_model.specs import PipelineSpec


def _output_for(args_output: str | None, spec: PipelineSpec, stem: str) -> Path:
    from auto_quantize_model.app.folders import new_run_dir

    if args_output:
        return Path(args_output)
    if spec.reports.output_dir is not None:
        return Path(spec.reports.output_dir)
    return new_run_dir(stem)


# --------------------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace, service: RunService) -> int:
    from auto_quantize_model.app.run_steps import RunRequest
    from auto_quantize_model.io.pipeline_file import load_pipeline

    spec = load_pipeline(args.file, args.set)
    folder = _output_for(args.output, spec, Path(args.file).stem)
    request = RunRequest.of(
        spec,
        folder,
        source=args.file,
        overrides=args.set,
        force=args.force,
        command=args.command_line,
        worker=args.worker,
    )
    return service.run(request)


def cmd_resume(args: argparse.Namespace, service: RunService) -> int:
    from auto_quantize_model.app.folders import PIPELINE_FILE
    from auto_quantize_model.app.run_steps import RunRequest
    from auto_quantize_model.app.runs import COMPLETE, read_run
    from auto_quantize_model.io.pipeline_file import load_pipeline

    folder = Path(args.folder)
    record = read_run(folder)
    if record is None or not (folder / PIPELINE_FILE).is_file():
        raise InputError(f"{folder}: not a run folder (no run.json and {PIPELINE_FILE} written by aqm run)")
    if record.status == COMPLETE and not args.force:
        raise InputError(f"{folder}: the run is already complete; nothing to resume (--force runs it again)")
    file = str(folder / PIPELINE_FILE)
    # a sweep skips its finished points and resumes the rest
    request = RunRequest.of(
        load_pipeline(file),
        folder,
        source=file,
        force=args.force,
        command=args.command_line,
        worker=args.worker,
    )
    return service.run(request)


def cmd_validate(args: argparse.Namespace, service: RunService) -> int:
    from auto_quantize_model.app.sweep.points import expand_sweep
    from auto_quantize_model.io.pipeline_file import load_pipeline
    from auto_quantize_model.stages import stage_names

    spec = load_pipeline(args.file, args.set)
    points = expand_sweep(spec, source=args.file)
    print(f"{args.file}: OK")
    print(f"  stages: {' -> '.join(stage_names(spec))}")
    if len(points) > 1 or points[0].settings:
        print(f"  sweep: {len(points)} points")
        for point in points:
            print(f"    {point.label}")
    return 0


def cmd_report(args: argparse.Namespace, service: RunService) -> int:
    paths = service.outputs.report(Path(args.manifest), Path(args.output) if args.output else None)
    print(f"aqm: {len(paths.files)} files in {paths.directory}:")
    for name in paths.files:
        print(f"  {name}")
    return 0


def cmd_formats(args: argparse.Namespace, service: RunService) -> int:
    from auto_quantize_model.core.ct_config import export_formats_of
    from auto_quantize_model.core.export_labels import READABLE_LABELS, export_format
    from auto_quantize_model.core.format_grammar import CUSTOM_GRAMMAR
    from auto_quantize_model.core.formats import FORMAT_OPTIONS, all_formats

    rows = [("name", "bits", "weights", "activations", "runs on", "export")]
    refused: list[str] = []
    not_exported: list[str] = []
    unchecked: list[str] = []
    for info in all_formats():
        if info.refused is not None:
            where = "not usable (see below)"
            refused.append(f"  {info.name}: {info.refused}")
        else:
            where = "CUDA only" if info.needs_cuda else "CPU and CUDA"
            exported = export_format(info.name)
            if exported.refused is not None:
                not_exported.append(f"  {info.name}: {exported.refused}")
            elif exported.label not in READABLE_LABELS:
                unchecked.append(f"  {info.name} ({exported.label})")
        taken = ", ".join(export_formats_of(info.name)) if info.refused is None else ""
        rows.append((info.name, f"{info.bits:g}", info.weights, info.activations, where, taken or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for number, row in enumerate(rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        if number == 0:
            print("  ".join("-" * width for width in widths))
    print(f"\nYour own weight/activation pairs: {CUSTOM_GRAMMAR}")
    print(f"\nOptions: {FORMAT_OPTIONS}")
    if refused:
        print("\nListed but refused for AutoQuant here:")
        print("\n".join(refused))
    if not_exported:
        print("\nUsable for AutoQuant but not exportable (aqm export refuses them):")
        print("\n".join(not_exported))
    if unchecked:
        print(
            "\nExported in ModelOpt's format without --checkpoint only (aqm's read-back cannot decode "
            "their labels, so a checkpoint of them is refused before any work):"
        )
        print("\n".join(unchecked))
    return 0


def cmd_bench(args: argparse.Namespace, service: RunService) -> int:
    return service.bench_runner(args)


def cmd_frontier(args: argparse.Namespace, service: RunService) -> int:
    from auto_quantize_model.app.frontier import FrontierRequest

    request = FrontierRequest(
        source=Path(args.run),
        bits=args.bits,
        output=Path(args.output) if args.output else None,
        measure=args.measure,
        workers=args.workers,
        plots=not args.no_plots,
        command=tuple(args.command_line),
        max_kl=args.max_kl,
    )
    written = service.outputs.frontier(request)
    print(f"aqm: frontier: {len(written.paths)} files:")
    for path in written.paths:
        print(f"  {path}")
    for line in written.answer:
        print(f"aqm: {line}")
    return 0


def cmd_export(args: argparse.Namespace, service: RunService) -> int:
    from auto_quantize_model.app.export import ExportRequest
    from auto_quantize_model.backend.exporting import summary_line

    request = ExportRequest(
        source=Path(args.run),
        output=Path(args.output),
        bits=args.bits,
        checkpoint=args.checkpoint,
        force=args.force,
        command=tuple(args.command_line),
        format=args.format,
        max_kl=args.max_kl,
    )
    print(f"aqm: {summary_line(service.outputs.export(request))}")
    return 0


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _kl_bound(text: str) -> float:
    """``--max-kl``: a positive, finite KL in nats per held-out token."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number (nats per token), got {text!r}") from None
    if not math.isfinite(value) or value <= 0.0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


MAX_KL_HELP = (
    "the cheapest mix whose predicted held-out KL to the unquantized model (nats per token; the upper "
    "end of its 95%% interval) is at most K, from a damage model fitted on the run's measured frontier "
    "points (aqm frontier RUN --measure 3 makes them)"
)


def cmd_diff(args: argparse.Namespace, service: RunService) -> int:
    from auto_quantize_model.app.diff import diff_paths

    text = diff_paths(Path(args.a), Path(args.b))
    if args.output:
        out = service.outputs.write_output(Path(args.output), text)
        print(f"aqm: wrote {out}")
    else:
        sys.stdout.write(text)
    return 0


# --------------------------------------------------------------------------- parser


def build_parser(*, bench_flags: bool = True) -> argparse.ArgumentParser:
    """The ``aqm`` parser; ``bench_flags=False`` leaves the benchmark's flags (and their imports,
    a few hundred ms) out, for a command line that is not ``aqm bench``."""
    from auto_quantize_model.app import legacy_driver, pipelines_cmd
    from auto_quantize_model.app.folders import package_version

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
    run.add_argument(
        "--force",
        action="store_true",
        help="start over in a folder that holds a finished run (removes that run's files, only those)",
    )
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

    bench = sub.add_parser(
        "bench",
        parents=[common],
        help="packed vs padded calibration benchmark, one process, one model (aqm bench --help)",
    )
    if bench_flags:
        from auto_quantize_model.bench.command import DESCRIPTION, add_bench_arguments

        bench.description = DESCRIPTION
        add_bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    formats = sub.add_parser("formats", parents=[common], help="list every format name and where it runs")
    formats.set_defaults(func=cmd_formats)

    frontier = sub.add_parser(
        "frontier",
        parents=[common],
        help="re-solve a finished run at many effective-bits budgets (no model; --measure K uses it)",
        description=(
            "Re-solve ModelOpt's search of a finished run at many effective-bits budgets (bits per LM "
            "weight), from its manifest alone: every group's format, the bits reached and the predicted "
            "score per budget, non-monotone steps and unreachable budgets flagged. Writes frontier.md, "
            "frontier.json and plots/frontier-*.png|svg. The gradient method runs CBC once per budget "
            "(about 0.25 s each on one core, spread over the CPUs); kl_div needs no solver. --measure K "
            "loads the run's model, restores its saved search state and measures K of the mixes on "
            "held-out captions (minutes on a CPU for a small model)."
        ),
    )
    frontier.add_argument(
        "run", metavar="RUN_DIR", help="a run folder of aqm run (or a *_quant_manifest.json)"
    )
    frontier.add_argument(
        "--bits",
        metavar="BUDGETS",
        help="budgets: a range START:STOP:STEP (stop included, e.g. 4.5:8:0.25), a list 6,7,8.5 or one "
        "number (default: the run's [frontier] bits)",
    )
    frontier.add_argument("--output", metavar="DIR", help="where to write (default: the run folder)")
    frontier.add_argument(
        "--measure",
        metavar="K",
        type=_count(0),
        default=0,
        help="also apply K of the mixes, spread over the range, and measure dNLL/KL (needs the model)",
    )
    frontier.add_argument(
        "--workers",
        metavar="N",
        type=_count(1),
        help="CBC processes for the gradient method (default: one per CPU; in process for small problems)",
    )
    frontier.add_argument("--no-plots", action="store_true", help="write frontier.md/json only")
    frontier.add_argument(
        "--max-kl",
        metavar="K",
        type=_kl_bound,
        help=MAX_KL_HELP + "; with --measure the chosen mix is measured and the bound checked",
    )
    frontier.set_defaults(func=cmd_frontier)

    export = sub.add_parser(
        "export",
        parents=[common],
        help="write a finished run's mix at one budget as a ModelOpt config (--checkpoint: a checkpoint)",
        description=(
            "Solve a finished run's format mix at one effective-bits budget (the frontier solver, from the "
            "manifest; the run's own budget by default) and write it as quant_config.json (mtq.quantize "
            "accepts it), quant_recipe.yaml (a ModelOpt PTQ recipe), README.md and export.json, both "
            "config files read back. --checkpoint also loads the run's model again, quantizes and "
            "calibrates it on the run's calibration batches, writes it with ModelOpt's Hugging Face "
            "exporter and checks that it reads back to the same held-out NLL."
        ),
    )
    export.add_argument("run", metavar="RUN_DIR", help="a run folder of aqm run (or a *_quant_manifest.json)")
    export.add_argument(
        "--bits",
        metavar="B",
        help="effective-bits budget over the LM weights (default: the run's own); with --max-kl, the "
        "budgets to choose among (START:STOP:STEP or a list; default: the run's frontier budgets)",
    )
    export.add_argument("--output", metavar="DIR", required=True, help="the export folder (new or empty)")
    export.add_argument(
        "--checkpoint", action="store_true", help="also write the calibrated checkpoint and read it back"
    )
    export.add_argument(
        "--format",
        choices=("modelopt", "compressed-tensors"),
        default="modelopt",
        help="checkpoint format: ModelOpt's HF export (default) or compressed-tensors (vLLM's; needs "
        "--checkpoint and the ct extra; read back through transformers' own loader)",
    )
    export.add_argument("--force", action="store_true", help="replace an existing, non-empty DIR")
    export.add_argument("--max-kl", metavar="K", type=_kl_bound, help=MAX_KL_HELP)
    export.set_defaults(func=cmd_export)

    diff = sub.add_parser("diff", parents=[common], help="compare two runs (manifests or run folders)")
    diff.add_argument("a")
    diff.add_argument("b")
    diff.add_argument("--output", metavar="FILE", help="write the Markdown here instead of stdout")
    diff.set_defaults(func=cmd_diff)

    pipelines_cmd.add_parser(sub, common)
    legacy_driver.add_parser(sub, common)
    return parser


SPREAD_COMMANDS = ("run", "resume")
"""The commands torchrun may start several workers of: they spread a sweep's points."""


def _worker(command: str) -> Worker | None:
    """This process's place among torchrun's workers (None for a plain run), its GPU narrowed.

    Only a sweep spreads over workers; any other command started N times would do its work N
    times (or fight over its folder), so it is refused on every rank alike.
    """
    import os

    from auto_quantize_model.app.sweep.workers import narrow_visible_gpus, worker_from_env
    from auto_quantize_model.errors import ConfigError

    worker = worker_from_env(os.environ)
    if worker is None:
        return None
    if command not in SPREAD_COMMANDS:
        raise ConfigError(
            f"aqm {command} runs in one process; start it without torchrun (torchrun spreads the points "
            f"of `aqm run` and `aqm resume` over its {worker.world_size} workers)"
        )
    narrow_visible_gpus(worker, os.environ)
    return worker


def _print_error(err: AqmError, debug: bool, prefix: str = "") -> None:
    if debug:
        traceback.print_exception(err)
    for line in str(err).splitlines() or [type(err).__name__]:
        print(f"{prefix}aqm: error: {line}", file=sys.stderr)
    if isinstance(err, StageError) and not isinstance(err.cause, AqmError) and not debug:
        print("aqm: (run again with --debug for the traceback)", file=sys.stderr)


def _nothing_kept(err: KeyboardInterrupt) -> str:
    """A stop before any record was settled: every command removes what it had begun writing."""
    return f"{what_stopped(err)} before anything was kept; nothing of this command was written"


def main(argv: Sequence[str] | None = None, *, service: RunService | None = None) -> int:
    """``aqm``; ``service`` replaces the real run service (tests pass fakes)."""
    given = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(bench_flags=given[:1] == ["bench"])
    args = parser.parse_args(given)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    debug = bool(args.debug)
    args.command_line = ["aqm", *given]
    from auto_quantize_model.app.logs import configure_logging

    prefix = ""
    try:
        args.worker = _worker(args.command)
        prefix = "" if args.worker is None else f"[{args.worker.name}] "
    except AqmError as err:
        configure_logging(debug)
        _print_error(err, debug, "[torchrun worker] ")
        return err.exit_code
    configure_logging(debug, prefix)
    try:
        with sigterm_unwinds():  # SIGTERM anywhere in the command unwinds like Ctrl-C
            if service is None:
                from auto_quantize_model.app.run_service import RunService

                service = RunService()
            code: int = args.func(args, service)
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (signals.Terminated)
        said = str(err) if isinstance(err, Interrupted) and str(err) != what_stopped(err) else ""
        print(f"{prefix}aqm: {said or _nothing_kept(err)}", file=sys.stderr)
        return int(getattr(err, "exit_code", 130))
    except AqmError as err:
        _print_error(err, debug, prefix)
        return err.exit_code
    finally:
        sys.stdout.flush()
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
