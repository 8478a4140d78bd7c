"""The messages torchrun's workers pass through the rendezvous store: plain JSON of one declared type.

The store is a network service that authenticates nobody (:mod:`.store` says where it listens),
so whatever a worker reads from it may have been written by someone else. Every message is
therefore plain JSON, written by :func:`encode_message` and structured on arrival by the strict
:data:`~auto_quantize_model.io.convert.JSON_CONVERTER` as the one type its receiver expects
(:func:`decode_message`); anything else is one line (:class:`BadMessage`) naming the key and the
sending rank, and nothing written to the store can make a worker run code (a pickle could).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import attrs

from auto_quantize_model.errors import AqmError, ConfigError, InputError
from auto_quantize_model.io.convert import JSON_CONVERTER, json_problems, project, to_strict_json_value

if TYPE_CHECKING:
    from auto_quantize_model.app.sweep.points import PointResult

DETAIL_CHARS = 200
"""At most this much of what was wrong with a message goes into its error line (it is not ours)."""


class BadMessage(InputError):
    """A value in the store that is not the message aqm sends under its key."""


def one_line(text: str, limit: int = DETAIL_CHARS) -> str:
    """The first line of ``text``, cut at ``limit`` characters: a peer's words, kept to one line."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= limit else first[: limit - 3] + "..."


def encode_message(value: object, kind: Any) -> bytes:
    """``value`` as compact JSON by ``kind``'s rules (attrs classes as objects, tuples as lists,
    non-finite floats as the strings ``"NaN"``/``"Infinity"`` strict JSON lacks)."""
    data = to_strict_json_value(JSON_CONVERTER.unstructure(value, kind))
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def decode_message(raw: bytes, kind: Any, *, key: str, sender: int) -> Any:
    """The ``kind`` value in ``raw``, or :class:`BadMessage` naming ``key`` and the ``sender`` rank.

    Only JSON is parsed and only ``kind``'s fields are built (no class is named by the data), so
    whoever wrote the value can at worst make this worker stop with this line.
    """
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # not UTF-8, not JSON, or nested past the parser's depth
        raise bad_message(key, sender, f"not JSON: {one_line(str(err))}") from None
    try:
        return JSON_CONVERTER.structure(data, kind)
    except Exception as err:  # cattrs reports type problems as several exception kinds
        problems = json_problems(err)
        shown = "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
        raise bad_message(key, sender, one_line(shown)) from None


def bad_message(key: str, sender: int, detail: str) -> BadMessage:
    """The error for a value under ``key`` (from rank ``sender``) that is no message aqm sends,
    with what was wrong with it (``detail``, one line): also for a well-formed message whose
    content cannot be right, such as a result for a point the sweep does not have."""
    return BadMessage(
        f"the workers' store holds under {key!r} (from rank {sender}) no message aqm sends ({detail}): "
        "the store is open to the network, so someone else may have written it, or that worker runs "
        "another aqm version"
    )


@attrs.frozen
class Problem:
    """A worker's one-line error, sent to the others so every rank raises the same."""

    kind: str
    message: str
    exit_code: int

    @classmethod
    def of(cls, err: AqmError) -> Problem:
        return cls(type(err).__name__, str(err), err.exit_code)

    def error(self) -> AqmError:
        kinds: dict[str, type[AqmError]] = {"ConfigError": ConfigError, "InputError": InputError}
        err = kinds.get(self.kind, AqmError)(self.message)
        err.exit_code = self.exit_code
        return err


@attrs.frozen
class PointReport:
    """A :class:`~auto_quantize_model.app.sweep.points.PointResult` on the wire: the point is named by its
    folder, since rank 0 holds every point's spec already and need not take one from the store."""

    folder: str
    status: str
    seconds: float
    effective_bits: float | None
    top_layers: tuple[str, ...]
    reuse: str
    earlier: bool
    worker: int | None


@attrs.frozen
class WorkerReport:
    """What one worker ran: its points' results and its session's notes for the index."""

    results: tuple[PointReport, ...]
    notes: tuple[str, ...]


def point_report(result: PointResult) -> PointReport:
    return project(result, PointReport, folder=result.point.folder)
