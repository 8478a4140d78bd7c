"""The previous tool's format matrix in our grammar: which of its combinations run, and why not the rest.

It crossed 16 weight x activation pairs with 9 granularity overlays (and 3 calibration sizes). In
our grammar (:mod:`auto_quantize_model.core.format_grammar`) every combination is a name; some are
refused by ModelOpt 0.47 (FP4 is NVFP4's blocks of 16 only), some make no sense (activation
overlays of weight-only pairs) and many are another spelling of one already listed (the INT8
default is per output channel). ``pipelines/qwen3-vl-4b-format-matrix.toml`` is this table
written out; a test keeps the two in agreement.
"""

from __future__ import annotations

import attrs

from auto_quantize_model.core.format_grammar import parse_custom

WEIGHTS = ("fp4", "fp8", "int4", "int8")
"""Weight types of the previous tool's pairs (FP4 = NVFP4)."""
ACTIVATIONS = ("16", "fp8", "int8", "int4")
"""Activation types of its pairs (16 = weights only); it marked INT4 activations experimental."""


@attrs.frozen
class Overlay:
    """A granularity overlay: replaces the pair's default weight and/or activation granularity."""

    name: str
    description: str
    weight: str | None = None
    """Weight granularity in our grammar (``pt``, ``pc``...); None keeps the pair's default."""
    activation: str | None = None
    """Activation granularity (``tensor``, ``token``); None keeps the pair's default."""


OVERLAYS = (
    Overlay("default", "each type's default granularity"),
    Overlay("w-per-tensor", "weights per tensor", weight="pt"),
    Overlay("w-per-channel", "weights per output channel", weight="pc"),
    Overlay("w-per-input-channel", "weights per input channel", weight="pic"),
    Overlay("w-groups-64", "weights in groups of 64", weight="b64"),
    Overlay("w-groups-128", "weights in groups of 128", weight="b128"),
    Overlay("a-per-tensor", "activations per tensor, static", activation="tensor"),
    Overlay("a-per-token", "activations per token, dynamic", activation="token"),
    Overlay("match-channel-token", "weights per output channel + activations per token", "pc", "token"),
)

CALIB_SIZES = (16, 128, 512)
"""Captions the previous tool calibrated (and scored) on."""


@attrs.frozen
class MatrixEntry:
    """One pair under one overlay: the format it names, or why it is not run."""

    weight: str
    activation: str
    overlay: Overlay
    format: str | None
    """The canonical grammar name to score; None when skipped."""
    skipped: str | None = None
    """Why not: no activations to overlay, refused by ModelOpt (the reason), or the same format as
    an earlier overlay of the pair."""

    @property
    def pair(self) -> str:
        return f"w{self.weight}_a{self.activation}"


def _name(weight: str, activation: str, overlay: Overlay) -> str:
    act = (
        "a16"
        if activation == "16"
        else f"a{activation}" + (f"-{overlay.activation}" if overlay.activation else "")
    )
    return f"w{weight}" + (f"-{overlay.weight}" if overlay.weight else "") + f"_{act}"


def matrix() -> tuple[MatrixEntry, ...]:
    """Every pair x overlay, pairs in the previous tool's order, overlays in :data:`OVERLAYS` order."""
    entries: list[MatrixEntry] = []
    for weight in WEIGHTS:
        for activation in ACTIVATIONS:
            seen: dict[str, str] = {}
            for overlay in OVERLAYS:
                entries.append(_entry(weight, activation, overlay, seen))
    return tuple(entries)


def _entry(weight: str, activation: str, overlay: Overlay, seen: dict[str, str]) -> MatrixEntry:
    if activation == "16" and overlay.activation is not None and overlay.weight is None:
        return MatrixEntry(weight, activation, overlay, None, "weights only: no activations to overlay")
    spec = parse_custom(_name(weight, activation, overlay))
    assert spec is not None, (weight, activation, overlay)
    if spec.refused is not None:
        return MatrixEntry(weight, activation, overlay, None, f"refused: {spec.refused}")
    if spec.name in seen:
        return MatrixEntry(
            weight, activation, overlay, None, f"same format as {seen[spec.name]} ({spec.name})"
        )
    seen[spec.name] = overlay.name
    return MatrixEntry(weight, activation, overlay, spec.name)


def pair_formats() -> tuple[tuple[str, ...], ...]:
    """The formats of each pair that are run, one tuple per pair (the sweep's values)."""
    by_pair: dict[str, list[str]] = {}
    for entry in matrix():
        found = by_pair.setdefault(entry.pair, [])
        if entry.format is not None:
            found.append(entry.format)
    return tuple(tuple(formats) for formats in by_pair.values())
