"""Error types that the CLI turns into one line and a non-zero exit code.

Anything raised as an :class:`AqmError` is the user's to fix (a path, a key, a value); the
message must name the culprit. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class AqmError(Exception):
    """A problem the user can fix; ``str(err)`` is the whole message, one line."""

    exit_code: int = 2


class ConfigError(AqmError):
    """A pipeline file, an override or a stage parameter is wrong."""


class WiringError(AqmError):
    """A stage needs an artifact that no earlier stage produces and nobody supplied."""


class InputError(AqmError):
    """A file or directory named by the user is missing or unreadable."""


class StageError(AqmError):
    """A stage failed while running; the message names the stage.

    The original exception is kept as ``__cause__`` so ``--debug`` can show it.
    """

    exit_code = 1

    def __init__(self, stage: str, cause: BaseException) -> None:
        self.stage = stage
        self.cause = cause
        if isinstance(cause, AqmError):
            self.exit_code = cause.exit_code
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        super().__init__(f"stage {stage} failed: {detail}")
