"""Folders written whole: a scratch folder beside the target, then moved into place.

Three promises, each from issue 21 (a user lost a folder to ``aqm export --force``):

* **Only our own files are replaced.** A target that already exists keeps every file that the
  earlier aqm output did not record as its own; replacing moves the recorded files aside, moves
  the new ones in, and only then deletes what was set aside (which holds nothing but our files).
  A new file whose name is taken by a file we did not record stops everything before a byte
  moves, naming that file.
* **No link is followed.** A recorded name that reaches through a symbolic link (a planted
  ``weights -> /home/me``) is refused; so is a target that is itself a link.
* **The user's umask.** ``mkdtemp`` makes 0700 folders and some writers 0600 files; a finished
  folder gets the modes a plain ``mkdir``/``open`` would have given under the user's umask.

Only the standard library and :mod:`.atomic`: these checks run before torch is imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath

from auto_quantize_model.errors import InputError
from auto_quantize_model.io.atomic import LinkRefused


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back: there is no plain getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder: Path) -> None:
    """Give ``folder`` and everything below it the modes ``mkdir``/``open`` give under the umask.

    Executable bits of files are kept as they are (a script stays runnable); links are skipped.
    """
    mask = current_umask()
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o777 & ~mask)
        else:
            executable = path.stat().st_mode & 0o111
            path.chmod((0o666 | executable) & ~mask)


def link_on_the_way(root: Path, relative: str) -> Path | None:
    """The first symbolic link met walking from ``root`` to ``root/relative`` (itself included)."""
    path = root
    for part in PurePosixPath(relative).parts:
        path = path / part
        if path.is_symlink():
            return path
    return None


def safe_relative(name: str) -> bool:
    """Whether a recorded name stays inside its folder: relative, no ``..``, not empty."""
    pure = PurePosixPath(name)
    return bool(name) and not pure.is_absolute() and ".." not in pure.parts and pure.parts != (".",)


def files_below(folder: Path) -> list[str]:
    """Every file (or link) below ``folder`` as sorted POSIX names relative to it."""
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()
    )


def recorded_files(folder: Path, record: str) -> tuple[str, ...] | None:
    """The files an aqm output recorded as its own in ``folder/record`` (a JSON object whose
    ``files`` lists names relative to the folder); None when there is no such record.

    A record that does not read as ours (not JSON, no ``files`` list, a name that leaves the
    folder, a link in its place) counts as none: then nothing in ``folder`` is known to be aqm's.
    The record itself is always among the names.
    """
    path = folder / record
    if path.is_symlink() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list) or not all(isinstance(n, str) and safe_relative(n) for n in files):
        return None
    return tuple(sorted({*files, record}))


@contextlib.contextmanager
def scratch_beside(target: Path, kind: str) -> Iterator[Path]:
    """A new scratch folder next to ``target`` (same file system, so moves are renames); always removed.

    The parent folders are made as needed; the scratch is named ``.<target>.<kind>-<random>`` so
    that a killed process's leftover is recognisably ours.
    """
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-", dir=parent))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def refuse_links(target: Path, names: Iterable[str]) -> None:
    """Refuse when ``target`` or the way to any of ``names`` below it is a symbolic link."""
    if target.is_symlink():
        raise LinkRefused(
            f"{target} is a symbolic link; aqm writes no output through a link: give the real folder"
        )
    for name in names:
        link = link_on_the_way(target, name)
        if link is not None:
            raise LinkRefused(
                f"{link} is a symbolic link inside {target}; aqm neither writes nor removes through a "
                "link: remove the link, or choose another output folder"
            )


def place(scratch: Path, target: Path, previous: Sequence[str]) -> list[str]:
    """Move the finished ``scratch`` folder's files into ``target``; returns the names placed.

    A missing ``target`` is the scratch folder renamed. An existing one loses exactly the files of
    ``previous`` (an earlier output's record of its own files, already checked by the caller) and
    keeps everything else; a file of the new output whose name is taken by a file not in
    ``previous`` is refused before anything moves. A failure midway puts the old files back.
    """
    apply_umask(scratch)
    names = files_below(scratch)
    if not target.exists() and not target.is_symlink():
        scratch.rename(target)
        return names
    refuse_links(target, [*previous, *names])
    old = {name for name in previous if safe_relative(name)}
    for name in names:
        final = target / name
        if name not in old and (final.exists() or final.is_symlink()):
            raise InputError(
                f"{final} exists and was not written by aqm's earlier output there; aqm never overwrites "
                "it: move it away, or choose another output folder"
            )
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.replaced-", dir=target.parent))
    moved_old: list[str] = []
    moved_new: list[str] = []
    try:
        for name in sorted(old):
            if (target / name).is_file():
                _move(target / name, aside / name)
                moved_old.append(name)
        for name in names:
            _move(scratch / name, target / name)
            moved_new.append(name)
    except BaseException:
        for name in reversed(moved_new):
            with contextlib.suppress(OSError):
                _move(target / name, scratch / name)
        for name in reversed(moved_old):
            with contextlib.suppress(OSError):
                _move(aside / name, target / name)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    _remove_emptied(target, old - set(names))
    return names


def _move(source: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    source.replace(destination)


def _remove_emptied(target: Path, gone: Iterable[str]) -> None:
    """Remove the sub-folders of ``target`` that the old files left empty (never ``target`` itself)."""
    folders = {p for name in gone for p in (target / name).parents if target in p.parents}
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()
