"""What ``aqm bench`` is asked to do, built from the stages' own specs.

The benchmark runs the real stages, so its settings are their specs (:class:`LoadSpec`,
:class:`CalibSpec`, :class:`AutoQuantSpec`) plus what only a benchmark has: which layouts to
compare, the scaling sources, rounds. A knob added to a spec, its default and its range check
reach the benchmark without a second declaration here. Pure: no torch.
"""

from __future__ import annotations

import argparse
import functools
import typing
from collections.abc import Mapping
from typing import Any

import attrs

from auto_quantize_model.errors import ConfigError
from auto_quantize_model.specs import AutoQuantSpec, CalibSpec, ExtractSpec, LoadSpec

LAYOUTS = ("padded", "packed", "reference")
"""``reference``: one caption per batch, no padding (see :class:`~.harness.BuildReferenceCalib`)."""
DEFAULT_MODEL = "builtin:tiny-qwen3-vl"
DEFAULT_SCALING = ("builtin:128", "builtin:512")


@attrs.frozen
class ScalingSource:
    """A captions source for the scaling run: a file (or ``builtin``) and how many of its captions."""

    source: str
    captions: int | None = None
    """None means every caption in the file."""


SPEC_FLAGS: dict[str, tuple[type, str]] = {
    "--captions": (CalibSpec, "captions"),
    "--max-samples": (CalibSpec, "max_samples"),
    "--seq-len": (CalibSpec, "seq_len"),
    "--batch-size": (CalibSpec, "batch_size"),
    "--score-size": (AutoQuantSpec, "score_size"),
    "--effective-bits": (AutoQuantSpec, "effective_bits"),
    "--kernels": (AutoQuantSpec, "kernels"),
    "--experts": (ExtractSpec, "experts"),
    "--fused-experts": (AutoQuantSpec, "fused_experts"),
}
"""The benchmark scripts' flags that stand for one spec field each, and that field."""
SCRIPT_DEVICE = "cuda"
"""``--device`` of the scripts in ``benchmarks/``: they measure GPUs, so no ``auto`` guessing."""


@functools.cache
def _spec_keywords() -> dict[str, dict[str, Any]]:
    """argparse keywords of every :data:`SPEC_FLAGS` flag, read off its field (default, type, choices)."""
    keywords: dict[str, dict[str, Any]] = {"--device": {"default": SCRIPT_DEVICE}}
    for flag, (spec, name) in SPEC_FLAGS.items():
        hint = typing.get_type_hints(spec)[name]
        options: dict[str, Any] = {}
        if typing.get_origin(hint) is typing.Literal:
            options["choices"] = typing.get_args(hint)
        elif hint in (int, float):
            options["type"] = hint
        options["default"] = attrs.fields_dict(spec)[name].default
        keywords[flag] = options
    return keywords


def add_spec_options(
    parser: argparse.ArgumentParser, *flags: str, changes: Mapping[str, Mapping[str, Any]] | None = None
) -> None:
    """Add ``flags`` to ``parser`` in the order given, typed, defaulted and bounded as their spec fields.

    The scripts in ``benchmarks/`` each pick the settings they vary, in their own order (it is
    their ``--help``), so a spec's default or choices reach them all from one place. ``changes``:
    argparse keywords a script sets otherwise for a flag (its own default, help or ``append``).
    A flag not known here is a programming error, raised at once.
    """
    known = _spec_keywords()
    unknown = sorted({*flags, *(changes or {})} - known.keys())
    if unknown:
        raise ValueError(f"no spec option {', '.join(unknown)}; known: {', '.join(known)}")
    stray = sorted(set(changes or {}) - set(flags))
    if stray:
        raise ValueError(f"changes for {', '.join(stray)}, which are not added here")
    for flag in flags:
        parser.add_argument(flag, **{**known[flag], **(changes or {}).get(flag, {})})


def packed_calib(args: argparse.Namespace) -> CalibSpec:
    """The packed calibration of a script that added ``--captions``, ``--max-samples``, ``--seq-len``
    and ``--batch-size`` through :func:`add_spec_options`: the layout every GPU figure is timed with."""
    return CalibSpec(
        captions=args.captions,
        max_samples=args.max_samples,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        layout="packed",
    )


def parse_scaling_item(text: str) -> ScalingSource:
    """``PATH``, ``PATH:N``, ``builtin`` or ``builtin:N`` (N captions from the start of the file)."""
    source, sep, count = text.rpartition(":")
    if sep and count.isdigit():
        if not source:
            raise ConfigError(f"--scaling-captions {text!r}: a captions file is missing before ':'")
        number = int(count)
        if number <= 0:
            raise ConfigError(f"--scaling-captions {text!r}: the caption count must be > 0")
        return ScalingSource(source, number)
    return ScalingSource(text, None)


@attrs.frozen
class BenchSettings:
    """Everything ``aqm bench`` was asked to do (the command line, checked)."""

    load: LoadSpec = attrs.field(factory=lambda: LoadSpec(path=DEFAULT_MODEL))
    extract: ExtractSpec = attrs.field(factory=ExtractSpec)
    """How the language model is taken apart (``experts``: one group per MoE layer, expert or projection)."""
    calib: CalibSpec = attrs.field(factory=CalibSpec)
    """Captions, count, ``seq_len`` and batch size of every layout; each run sets its own ``layout``."""
    autoquant: AutoQuantSpec = attrs.field(factory=AutoQuantSpec)
    """Formats, method, budget and ``score_size``; each run gets its own fresh ``checkpoint``."""
    layouts: tuple[str, ...] = LAYOUTS
    scaling: tuple[ScalingSource, ...] = ()
    pipeline: bool = True
    plots: bool = True
    top_k: int = 10
    rounds: int = 1
    """Times every layout is run, round-robin; the last round is reported. The first run after
    the warm-up pays for allocator growth and first-use kernels, so speed-up claims want 2."""
