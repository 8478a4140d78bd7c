"""What ``aqm bench`` is asked to do, built from the stages' own specs.

The benchmark runs the real stages, so its settings are their specs (:class:`LoadSpec`,
:class:`CalibSpec`, :class:`AutoQuantSpec`) plus what only a benchmark has: which layouts to
compare, the scaling sources, rounds. A knob added to a spec, its default and its range check
reach the benchmark without a second declaration here. Pure: no torch.
"""

from __future__ import annotations

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
