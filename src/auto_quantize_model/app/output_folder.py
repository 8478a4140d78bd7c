"""One output folder held by one command: made as needed, locked, written, cleaned after a failure.

``aqm run`` (single, sweep) and the commands that write from a finished run (``report``,
``frontier``) share these steps; they used to be private methods of the run service, which made
the output commands depend on the whole run lifecycle.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs

from auto_quantize_model.app.folders import (
    OutputError,
    aqm_files,
    make_folder,
    os_reason,
    output_error,
    remove_files,
    remove_made,
)
from auto_quantize_model.app.lock import FolderLock
from auto_quantize_model.app.logs import PACKAGE_LOGGER
from auto_quantize_model.app.runs import Writer

log = logging.getLogger(PACKAGE_LOGGER)


@attrs.frozen
class Claim:
    """A folder made (as far as needed) and locked for one command."""

    folder: Path
    made: tuple[Path, ...]
    lock: FolderLock

    @property
    def created(self) -> bool:
        return bool(self.made) and self.made[-1] == self.folder


@contextlib.contextmanager
def claim(folder: Path, command: Sequence[str]) -> Iterator[Claim]:
    """Make ``folder`` and hold its lock for the block; the folders made are removed if left empty."""
    made = make_folder(folder)
    try:
        lock = FolderLock.acquire(folder, tuple(command))
    except OSError as err:
        remove_made(made)
        raise OutputError(f"cannot write in output folder {folder}: {os_reason(err)}") from None
    except BaseException:
        remove_made(made)
        raise
    try:
        with lock:
            yield Claim(folder, tuple(made), lock)
    finally:
        remove_made(made)  # only the empty ones: a command that wrote nothing leaves nothing


def write_file(writer: Writer, path: Path, text: str) -> Path:
    """Write ``text`` through ``writer``; an OS failure is one line naming ``path``."""
    try:
        return writer(path, text)
    except OSError as err:
        raise output_error(path, err) from None


def clean_after_failure(folder: Path, before: frozenset[Path], keep: Sequence[Path]) -> None:
    """Remove the files of aqm's that this attempt added, except ``keep``; never anything else."""
    doomed = [p for p in aqm_files(folder) if p not in before and p not in keep]
    for path in remove_files(folder, doomed):
        log.warning("could not remove %s after the failure", path)
