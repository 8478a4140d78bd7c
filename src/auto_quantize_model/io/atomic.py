"""Writing files so that a crash never leaves half of one.

The bytes go to a temporary file in the destination's own folder (same file system, so the
final ``os.replace`` is a rename), are flushed and fsync'ed, then renamed over the destination.
A reader sees the old file or the new one, never a torn one; on any failure the temporary file
is removed and the destination is untouched. A destination that is a symbolic link is refused,
never written through (issue 21: a planted link must not carry a write out of the folder).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from auto_quantize_model.errors import InputError

_NEW_FILE_MODE = 0o644
"""Mode of newly created files (``mkstemp`` would leave 0600); an existing file keeps its mode."""

# --------------------------------------------------------------------------------------------
# Atomic writes


class LinkRefused(InputError):
    """A path aqm would write, create or remove goes through a symbolic link; the message names it."""


def own_folder(path: Path) -> Path:
    """Make the sub-folder ``path`` of an output folder (``plots/``), refusing one that is a link.

    A planted ``plots -> /elsewhere`` would otherwise carry every picture out of the folder.
    """
    if path.is_symlink():
        raise LinkRefused(
            f"{path} is a symbolic link; aqm writes nothing through a link: remove the link, or choose "
            "another output folder"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


def fsync_path(directory: Path) -> None:
    """Flush a file, or a folder's entries (which makes a rename durable), to disk.

    Some file systems cannot fsync a folder; that is fine, and left alone.
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_target(path: Path) -> Iterator[IO[bytes]]:
    """Yield a temp file next to ``path``; on clean exit it replaces ``path``, else it vanishes."""
    directory = path.parent
    if path.is_symlink():
        raise LinkRefused(
            f"{path} is a symbolic link; aqm writes no file through a link: remove the link, or choose "
            "another output folder"
        )
    if not directory.is_dir():
        raise InputError(f"cannot write {path}: folder {directory} does not exist")
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = _NEW_FILE_MODE
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        tmp.chmod(mode)
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_path(directory)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path written."""
    target = Path(path)
    with _atomic_target(target) as handle:
        handle.write(data)
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` atomically; no newline translation, so files are identical on every OS."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Copy a (possibly large) file atomically, streaming instead of reading it whole."""
    source = Path(src)
    if not source.is_file():
        raise InputError(f"cannot copy {source}: no such file")
    target = Path(dst)
    with source.open("rb") as reader, _atomic_target(target) as handle:
        shutil.copyfileobj(reader, handle, length=1 << 20)
    return target
