"""``aqm bench`` flags: parsing, defaults and range checks."""

from __future__ import annotations

import argparse

import pytest

from auto_quantize_model.bench.command import add_bench_arguments, build_parser, settings_from_args
from auto_quantize_model.bench.settings import LAYOUTS, BenchSettings, ScalingSource
from auto_quantize_model.errors import ConfigError

# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def test_settings_from_args_defaults_and_parsing() -> None:
    parser = build_parser()
    defaults = settings_from_args(parser.parse_args([]))
    assert defaults.load.path == "builtin:tiny-qwen3-vl"
    assert defaults.layouts == LAYOUTS
    assert defaults.scaling == (ScalingSource("builtin", 128), ScalingSource("builtin", 512))
    assert defaults.rounds == 1
    calib, search = defaults.calib, defaults.autoquant
    assert (calib.max_samples, calib.seq_len, calib.batch_size, search.score_size) == (512, 512, 8, 128)
    assert defaults == BenchSettings(scaling=defaults.scaling)  # the flags' defaults are the specs' own
    args = parser.parse_args(
        [
            "--formats",
            "INT8_DEFAULT_CFG,FP8_DEFAULT_CFG",
            "--layouts",
            "packed",
            "reference",
            "packed",
            "--skip-scaling",
            "--skip-pipeline",
            "--rounds",
            "2",
        ]
    )
    chosen = settings_from_args(args)
    assert chosen.rounds == 2
    assert chosen.autoquant.formats == ("INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG")
    assert chosen.layouts == ("packed", "reference")
    assert chosen.scaling == ()
    assert not chosen.pipeline


@pytest.mark.parametrize("argv", [["--max-samples", "0"], ["--layouts", "bogus"], ["--batch-size", "x"]])
def test_parser_refuses_bad_values(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)


def test_a_spec_range_check_reaches_the_command_line() -> None:
    with pytest.raises(ConfigError, match=r"effective_bits: must be in \(0, 16\], got 20"):
        settings_from_args(build_parser().parse_args(["--effective-bits", "20"]))


def test_flags_register_on_a_subcommand() -> None:
    parser = argparse.ArgumentParser(prog="aqm")
    add_bench_arguments(parser.add_subparsers(dest="command").add_parser("bench"))
    args = parser.parse_args(["bench", "--model", "config:qwen3-vl-4b", "--skip-scaling", "--rounds", "2"])
    settings = settings_from_args(args)
    assert (args.command, settings.load.path, settings.scaling, settings.rounds) == (
        "bench",
        "config:qwen3-vl-4b",
        (),
        2,
    )
