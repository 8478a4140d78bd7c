"""``aqm bench`` on the command line: its flags, their checks, and the call into the harness.

``aqm`` registers these flags on its ``bench`` subcommand (:func:`add_bench_arguments`) and hands
the parsed namespace to :func:`run_bench_command`, so ``aqm --help`` lists ``bench`` like any
other command. This module is light on purpose: the CLI imports it to build its parser, and
``aqm --help`` must not pay for torch. The harness (torch, transformers, ModelOpt) is imported
only when a benchmark runs.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

from auto_quantize_model.bench.settings import (
    DEFAULT_MODEL,
    DEFAULT_SCALING,
    LAYOUTS,
    BenchSettings,
    parse_scaling_item,
)
from auto_quantize_model.core.captions import BUILTIN
from auto_quantize_model.errors import ConfigError
from auto_quantize_model.specs import AutoQuantSpec, CalibSpec, LoadSpec

DESCRIPTION = (
    "Time the padded, packed and one-caption-per-batch reference calibration layouts on one model, "
    "compare their per-layer rankings, time the whole pipeline and a scaling run."
)


def _positive_int(text: str) -> int:
    """An argparse type: the flag's own name and value appear in argparse's one-line error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {value}")
    return value


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Register every ``aqm bench`` flag on ``parser`` (the CLI's ``bench`` subparser)."""
    add = parser.add_argument
    add(
        "--model",
        default=DEFAULT_MODEL,
        help="checkpoint directory, builtin:tiny-qwen3-vl or config:qwen3-vl-4b",
    )
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    add("--attn-implementation", default=None, help="sdpa, eager... (default: transformers' choice)")
    add("--seed", type=int, default=0, help="seed of the random weights of builtin:/config: models")
    add("--captions", default=BUILTIN, help="captions file, one per line (default: bundled)")
    add("--max-samples", type=_positive_int, default=512)
    add("--seq-len", type=_positive_int, default=512)
    add("--batch-size", type=_positive_int, default=8)
    add("--score-size", type=_positive_int, default=128, help="captions to score (see the harness notes)")
    add("--formats", nargs="+", default=["INT8_DEFAULT_CFG"], help="format names (space or comma separated)")
    add("--effective-bits", type=float, default=8.0)
    add("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    add(
        "--scaling-captions",
        nargs="+",
        default=list(DEFAULT_SCALING),
        metavar="PATH[:N]",
        help="captions files for the packed scaling run, optionally with a caption count "
        f"(default: {' '.join(DEFAULT_SCALING)})",
    )
    add("--skip-scaling", action="store_true")
    add("--skip-pipeline", action="store_true", help="do not time the whole six-stage pipeline")
    add("--no-plots", action="store_true", help="whole-pipeline run without plots (faster reports)")
    add("--top-k", type=_positive_int, default=10)
    add(
        "--rounds",
        type=_positive_int,
        default=1,
        help="run the layouts round-robin this many times and report the last round (2 removes "
        "first-run effects from the speed-up)",
    )
    add("--json", type=Path, default=None, metavar="OUT.json", help="also write every number here")


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser with the same flags (``aqm bench`` as its program name)."""
    parser = argparse.ArgumentParser(prog="aqm bench", description=DESCRIPTION)
    add_bench_arguments(parser)
    return parser


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """The checked settings; a spec's own range check (e.g. effective bits) becomes a ConfigError."""
    formats = tuple(part for item in args.formats for part in item.split(",") if part)
    if not formats:
        raise ConfigError("--formats: give at least one format name")
    scaling = () if args.skip_scaling else tuple(parse_scaling_item(item) for item in args.scaling_captions)
    dtype: Any = args.dtype
    return BenchSettings(
        load=LoadSpec(
            path=args.model,
            dtype=dtype,
            device=args.device,
            attn_implementation=args.attn_implementation,
            seed=args.seed,
        ),
        calib=CalibSpec(
            captions=args.captions,
            max_samples=args.max_samples,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
        ),
        autoquant=AutoQuantSpec(
            formats=formats, effective_bits=args.effective_bits, score_size=args.score_size
        ),
        layouts=tuple(dict.fromkeys(args.layouts)),
        scaling=scaling,
        pipeline=not args.skip_pipeline,
        plots=not args.no_plots,
        top_k=args.top_k,
        rounds=args.rounds,
    )


def run_bench_command(args: argparse.Namespace) -> int:
    """Run the benchmark ``args`` describe: tables on stdout, progress on stderr; 0 on success.

    Bad settings raise :class:`~auto_quantize_model.errors.AqmError` for the caller to print
    (``aqm`` prints one line and exits with its code).
    """
    from auto_quantize_model.bench.harness import run_bench
    from auto_quantize_model.bench.results import render_report, report_to_dict

    settings = settings_from_args(args)
    with contextlib.redirect_stdout(sys.stderr):  # ModelOpt prints progress; stdout is for results
        report = run_bench(settings)
    text = render_report(report)
    if args.json is not None:
        from auto_quantize_model.io.atomic import atomic_write_text
        from auto_quantize_model.io.convert import dumps_json

        atomic_write_text(args.json, dumps_json(report_to_dict(report)))
    sys.stdout.write(text)
    if args.json is not None:
        sys.stdout.write(f"\nnumbers written to {args.json}\n")
    sys.stdout.flush()
    return 0
