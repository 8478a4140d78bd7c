"""Where progress lines go: the package logger, to whatever ``sys.stderr`` is at the time.

stdout carries results only (summaries, tables, diffs), so a user can pipe them; every progress
and diagnostic line goes through the ``auto_quantize_model`` logger to stderr. ``aqm`` and
``aqm bench`` both call :func:`configure_logging` once per command.
"""

from __future__ import annotations

import logging
import sys

PACKAGE_LOGGER = "auto_quantize_model"

_handler: logging.Handler | None = None


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of each record, not at setup.

    ``main`` may run several times in one process (tests, notebooks) with stderr swapped in
    between; a handler holding the old stream would write into a closed file.
    """

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def configure_logging(debug: bool = False, prefix: str = "") -> None:
    """Progress lines of the package logger go to stderr; calling it again replaces, never stacks.

    ``prefix`` goes before every message (``[rank 1/2] `` for a torchrun worker, whose lines
    interleave with the others' on one terminal).
    """
    global _handler
    logger = logging.getLogger(PACKAGE_LOGGER)
    if _handler is not None:
        logger.removeHandler(_handler)
    _handler = _CurrentStderr(sys.stderr)
    _handler.setFormatter(
        logging.Formatter(f"[%(asctime)s] {prefix.replace('%', '%%')}%(message)s", datefmt="%H:%M:%S")
    )
    logger.addHandler(_handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False


def package_logger() -> logging.Logger:
    return logging.getLogger(PACKAGE_LOGGER)
