"""Ctrl-C and SIGTERM at any moment: the folder's ``run.json`` always says what happened.

Two windows lost that promise before (issue 21): SIGTERM outside the run's own span killed the
process with no word (Python's default action), and a signal that landed while the final
``complete`` record was being written left ``running`` behind. So ``aqm`` turns SIGTERM into an
exception for its whole life (:func:`sigterm_unwinds`), and the few steps that settle a folder's
record run with both signals held back (:func:`signals_deferred`): a signal that arrives then is
raised once the record is written, and says so.

Standard library only: the CLI installs this before anything heavy is imported.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

_HELD = frozenset({signal.SIGINT, signal.SIGTERM})


class Interrupted(KeyboardInterrupt):
    """Ctrl-C with the message the CLI prints (what became of the folder, and how to go on)."""

    exit_code = 130

    def __init__(self, message: str = "interrupted (Ctrl-C)") -> None:
        super().__init__(message)


class Terminated(Interrupted):
    """SIGTERM: unwinds like Ctrl-C, so the record and the lock are settled; exit code 143."""

    exit_code = 143

    def __init__(self, message: str = "terminated (SIGTERM)") -> None:
        super().__init__(message)


def what_stopped(err: KeyboardInterrupt) -> str:
    """``terminated (SIGTERM)`` or ``interrupted (Ctrl-C)``, without any later explanation."""
    return "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted (Ctrl-C)"


def retold(err: KeyboardInterrupt, message: str) -> Interrupted:
    """The same kind of stop (Ctrl-C or SIGTERM) with a message saying what became of the folder."""
    return Terminated(message) if isinstance(err, Terminated) else Interrupted(message)


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` while the block runs (main thread only; else no-op)."""
    if not _on_main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextlib.contextmanager
def signals_deferred(done: str) -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back while the block settles a record; deliver them after it.

    ``done`` says what is true once the block has run (``the run in X is complete``): a signal
    held back is raised after the block as :class:`Interrupted`/:class:`Terminated` naming it, so
    the user learns that the stop came too late to lose anything. The handlers are swapped for
    ones that only take note, rather than the signals masked: a process-directed signal goes to
    any thread that does not mask it (torch keeps several), and Python would still run its
    handler on the main thread in the middle of the block. A signal ignored before stays ignored.
    """
    if not _on_main_thread():
        yield
        return
    held: list[signal.Signals] = []

    def take_note(signum: int, frame: FrameType | None) -> None:
        held.append(signal.Signals(signum))

    previous = {number: signal.signal(number, take_note) for number in _HELD}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        stops = [number for number in held if previous[number] is not signal.SIG_IGN]
        if stops:
            stopped: Interrupted = Terminated() if stops[0] == signal.SIGTERM else Interrupted()
            raise retold(stopped, f"{what_stopped(stopped)} after the end: {done}")
