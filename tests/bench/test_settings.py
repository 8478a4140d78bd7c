"""Benchmark settings: the scaling items and the benchmark scripts' spec flags."""

from __future__ import annotations

import argparse

import attrs
import pytest

from auto_quantize_model.bench.settings import (
    ScalingSource,
    add_spec_options,
    packed_calib,
    parse_scaling_item,
)
from auto_quantize_model.errors import ConfigError
from auto_quantize_model.specs import CalibSpec

# --------------------------------------------------------------------------------------------------
# Scaling items
# --------------------------------------------------------------------------------------------------


def test_parse_scaling_item() -> None:
    assert parse_scaling_item("builtin") == ScalingSource("builtin", None)
    assert parse_scaling_item("builtin:128") == ScalingSource("builtin", 128)
    assert parse_scaling_item("/data/c4096.txt:4096") == ScalingSource("/data/c4096.txt", 4096)
    assert parse_scaling_item("C:/data/caps.txt") == ScalingSource("C:/data/caps.txt", None)
    with pytest.raises(ConfigError, match="must be > 0"):
        parse_scaling_item("builtin:0")
    with pytest.raises(ConfigError, match="missing"):
        parse_scaling_item(":12")


# --------------------------------------------------------------------------------------------------
# Spec flags of the benchmark scripts
# --------------------------------------------------------------------------------------------------


def _parser(*flags: str, **changes: dict[str, object]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="script")
    add_spec_options(parser, *flags, changes={f"--{key.replace('_', '-')}": v for key, v in changes.items()})
    return parser


def test_spec_options_take_the_specs_defaults_types_and_choices() -> None:
    parser = _parser("--device", "--captions", "--max-samples", "--effective-bits", "--kernels", "--experts")
    assert vars(parser.parse_args([])) == {
        "device": "cuda",
        "captions": "builtin",
        "max_samples": 512,
        "effective_bits": 8.0,
        "kernels": "extension",
        "experts": "layer",
    }
    args = parser.parse_args(["--max-samples", "16", "--effective-bits", "4.5", "--experts", "projection"])
    assert (args.max_samples, args.effective_bits, args.experts) == (16, 4.5, "projection")
    kernels = next(action for action in parser._actions if "--kernels" in action.option_strings)
    assert kernels.choices == ("extension", "pytorch")
    with pytest.raises(SystemExit):
        parser.parse_args(["--kernels", "triton"])


def test_spec_options_keep_the_callers_order_and_changes() -> None:
    parser = _parser(
        "--seq-len",
        "--fused-experts",
        "--batch-size",
        seq_len={"default": 2048},
        fused_experts={"action": "append", "default": [], "help": "repeat to run each"},
    )
    flags = [action.option_strings[0] for action in parser._actions[1:]]
    assert flags == ["--seq-len", "--fused-experts", "--batch-size"]
    assert vars(parser.parse_args([])) == {"seq_len": 2048, "fused_experts": [], "batch_size": 8}
    args = parser.parse_args(["--fused-experts", "modelopt", "--fused-experts", "batched"])
    assert args.fused_experts == ["modelopt", "batched"]
    assert "repeat to run each" in parser.format_help()


def test_spec_options_refuse_unknown_flags_and_stray_changes() -> None:
    with pytest.raises(ValueError, match=r"no spec option --seq-length; known: --device, --captions"):
        _parser("--seq-length")
    with pytest.raises(ValueError, match=r"changes for --kernels, which are not added here"):
        _parser("--seq-len", kernels={"default": "pytorch"})


def test_packed_calib_reads_the_four_calibration_flags() -> None:
    parser = _parser("--captions", "--max-samples", "--seq-len", "--batch-size")
    args = parser.parse_args(["--captions", "caps.txt", "--max-samples", "96", "--seq-len", "256"])
    defaults = CalibSpec()
    assert packed_calib(args) == CalibSpec(
        captions="caps.txt", max_samples=96, seq_len=256, batch_size=defaults.batch_size, layout="packed"
    )
    assert packed_calib(parser.parse_args([])) == attrs.evolve(defaults, layout="packed")
