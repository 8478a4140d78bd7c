"""What every picture aqm draws shares: log-axis limits, symlog ticks, titles with notes, saving.

The ranking pictures (:mod:`.plots`) and the frontier pictures (:mod:`.frontier_figures`) both
draw scores over many decades and save byte-stable PNG and SVG; the tools for that are here so
neither plotting module needs the other. matplotlib is imported inside the functions only.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from auto_quantize_model.io.atomic import atomic_write_bytes

PLOT_MIN = 1e-100
PLOT_MAX = 1e100
"""Magnitudes drawn as they are; smaller or larger finite ones are drawn at these edges (a log
axis's tick and colour arithmetic overflows near the ends of the float range) and counted in the
plot's title."""
DPI = 150
FORMATS = ("png", "svg")


def positive_finite(values: Iterable[float]) -> list[float]:
    return [v for v in values if math.isfinite(v) and v > 0]


def titled(header: str, notes: Sequence[str], width: int = 90) -> str:
    """``header``, then the notes in parentheses, a new line whenever one would pass ``width``
    characters (a note is never split), so a long list stays inside the figure."""
    if not notes:
        return header
    lines = [notes[0]]
    for note in notes[1:]:
        if len(lines[-1]) + 2 + len(note) > width:
            lines[-1] += ";"
            lines.append(note)
        else:
            lines[-1] += f"; {note}"
    return header + "\n(" + "\n".join(lines) + ")"


SYMLOG_TICKS_A_SIDE = 4
"""Most labelled decades on either side of 0 on a symlog axis: more would overlap on a panel."""
LINEAR_HALF_BAND = 1.0 / (1.0 - 1.0 / 10.0)
"""Decades of display width matplotlib gives each half of symlog's linear band (linscale 1, base 10)."""


def symlog_tick_values(
    linthresh: float, low: float, high: float, most: int = SYMLOG_TICKS_A_SIDE
) -> list[float]:
    """Tick positions for a symlog axis spanning [``low``, ``high``]: 0 and powers of ten of either sign.

    matplotlib's symlog locator also labels decades inside the linear band (below ``linthresh``),
    which sit a fraction of a decade from the 0 label and overlap it, and labels every decade of
    a range that spans tens of them. Here only decades at or beyond ``linthresh`` are kept, every
    ``stride``-th one (always the largest), at most ``most`` a side, so the labels never touch.
    """
    ticks = [0.0] if low <= 0.0 <= high else []
    first = math.ceil(math.log10(linthresh) - 1e-9)
    for sign, end in ((1.0, high), (-1.0, -low)):
        if end < linthresh:
            continue
        last = math.floor(math.log10(end) + 1e-9)
        if last < first:
            continue
        stride = max(1, math.ceil((last - first + 1) / most))
        # a decade sits (its distance above linthresh) + ~1.1 decades (the linear half-band) from 0:
        # keep it only that far from the 0 label as from its neighbour, or the two labels touch
        ticks += [
            sign * 10.0**k
            for k in range(last, first - 1, -stride)
            if k - math.log10(linthresh) + LINEAR_HALF_BAND >= stride - 1e-9
        ]
    return sorted(ticks)


def symlog_ticks(axis: Any, values: Sequence[float]) -> None:
    """Place :func:`symlog_tick_values` on ``axis`` (already symlog) for the range of ``values``."""
    from matplotlib.ticker import FixedLocator, NullLocator

    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return
    linthresh = axis.get_transform().linthresh
    axis.set_major_locator(FixedLocator(symlog_tick_values(linthresh, min(finite), max(finite))))
    axis.set_minor_locator(NullLocator())


def clip(value: float) -> float:
    """``value`` with its magnitude held to [PLOT_MIN, PLOT_MAX]; 0 and non-finite unchanged."""
    if value == 0 or not math.isfinite(value):
        return value
    return math.copysign(min(max(abs(value), PLOT_MIN), PLOT_MAX), value)


def clipped_note(values: Iterable[float], what: str) -> list[str]:
    count = sum(1 for v in values if math.isfinite(v) and clip(v) != v)
    return [f"{count} {what} beyond 1e±100 drawn at the edge"] if count else []


_NO_SOFTWARE: Any = {"Software": None}
"""PNG metadata as ``savefig`` gets it here: no Matplotlib version, so files compare across versions."""


def save_figure(
    figure: Any, directory: Path, stem: str, *, salt: str, dpi: int = DPI, banner: str = ""
) -> list[Path]:
    """``<stem>.png`` and ``<stem>.svg`` from one layout and one raster drawing of ``figure``.

    ``savefig`` per format would lay the figure out and draw it twice for each (a layout pass,
    then the real drawing): four passes, most of a report's plotting time. Here the figure is
    drawn once on its Agg canvas (which runs the layout), the PNG is encoded from that canvas as
    ``savefig`` would (same bytes), and the SVG drawing reuses that layout: two passes, and both
    pictures have the same layout. The figure keeps no layout engine afterwards. No dates, a
    fixed SVG id ``salt``, SVG text kept as text: the same input gives byte-identical, selectable
    files. Each file is written atomically. A ``banner`` (the random-weights warning) is put
    above everything, in red, so the picture says it even when shown without its report.
    """
    import matplotlib
    import matplotlib.image
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if banner:
        figure.suptitle(banner, color="#c00000", fontsize=8, fontweight="bold")

    canvas: Any = FigureCanvasAgg(figure)
    figure.set_dpi(dpi)
    canvas.draw()
    png = io.BytesIO()
    matplotlib.image.imsave(
        png, canvas.buffer_rgba(), format="png", origin="upper", dpi=dpi, metadata=_NO_SOFTWARE
    )
    # Laid out above: the SVG drawing keeps those positions. No engine at all (not "none", whose
    # placeholder engine still makes savefig run a layout pass first).
    with matplotlib.rc_context({"figure.autolayout": False, "figure.constrained_layout.use": False}):
        figure.set_layout_engine(None)
    svg = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": salt, "svg.fonttype": "none"}):
        figure.savefig(svg, format="svg", dpi=dpi, metadata={"Date": None})
    written = []
    for kind, data in zip(FORMATS, (png, svg), strict=True):
        written.append(atomic_write_bytes(directory / f"{stem}.{kind}", data.getvalue()))
    return written
