"""Output folders: creating them with clear errors, and knowing which of their files are aqm's.

Two promises rest on this module. A path mistake (a read-only folder, a parent that is a file, a
name too long, a full disk) is one line naming the path and the OS's reason, never a traceback.
And aqm only ever removes files it wrote: ``--force`` removes exactly the files a run listed in
its ``run.json`` (an export: its ``export.json``), never through a link; a failed attempt removes
the files under aqm's own names that it added itself. A user's ``notes.txt``, pictures in
``plots/`` or a finished run kept in a sub-folder are never touched.

Only the standard library and our error types are imported: folders are checked before torch.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path

from auto_quantize_model.errors import InputError
from auto_quantize_model.io.atomic import LinkRefused
from auto_quantize_model.io.staged import link_on_the_way, recorded_files, safe_relative

RUN_FILE = "run.json"
PIPELINE_FILE = "pipeline.toml"
INDEX_NAME = "sweep-index.md"
PIPELINE_HEADER = "# Effective pipeline written by aqm"
"""First line of every ``pipeline.toml`` aqm writes; tells it apart from a user's own file."""
RUN_MARKERS = (RUN_FILE, INDEX_NAME)
"""Files whose presence means a folder already holds a run (besides any ``*_quant_manifest.json``)."""

MANIFEST_SUFFIX = "_quant_manifest.json"
SAVED_STATE_SUFFIX = "_autoquant_state.pt"
PLOTS_DIR = "plots"
PLOT_SUFFIXES = (".png", ".svg")
REPORT_NAMES = (
    "per-layer-sensitivity.md",
    "per-layer-sensitivity.json",
    "layer-sensitivity-report.md",  # the previous driver's names (aqm qwen3-lm-int8)
    "layer-sensitivity-report.json",
    "frontier.md",  # the budget frontier (render/frontier.py; its pictures go to plots/)
    "frontier.json",
)
EXPORT_DIR = "export"
"""Where a run's ``[export]`` table writes (ExportCheckpoint's default ``output_dir``)."""
EXPORT_RECORD = "export.json"
"""The file every export folder ends with; an ``export/`` without it is not aqm's."""
_EXPORT_SCRATCH = re.compile(rf"^\.{EXPORT_DIR}\.(export|replaced)-[^/]+$")
"""The scratch folders an export is written into (or an old one set aside in) before the rename
into place; left only by a killed process."""
OUTPUTS_RECORD = "aqm-outputs.json"
"""What ``aqm report --output`` and ``aqm frontier --output`` wrote into a folder of the user's
choosing: the record that lets a later command overwrite those files, and only those."""
_OWN_NAMES = frozenset({RUN_FILE, PIPELINE_FILE, INDEX_NAME, OUTPUTS_RECORD, *REPORT_NAMES})
"""Not the lock file: only its holder removes it (see :mod:`lock`)."""
_TEMP = re.compile(r"^\.(?P<name>.+?)\.[^.]+\.tmp(\.pt)?$")
"""An atomic write's temporary file (``.<name>.<random>.tmp``, ``.tmp.pt`` for the search state),
left only by a killed process."""


class OutputError(InputError):
    """An output path cannot be created or written; the message names the path and the OS's reason."""


def os_reason(err: OSError) -> str:
    return err.strerror or str(err) or type(err).__name__


def file_above(path: Path) -> Path | None:
    """The nearest ancestor of ``path`` that exists and is not a folder."""
    for parent in path.parents:
        with contextlib.suppress(OSError):
            if parent.exists():
                return None if parent.is_dir() else parent
    return None


def describe_os_error(err: OSError, fallback: Path) -> str:
    """``PATH: reason`` for an OS error, naming the file the user knows rather than a temporary one."""
    path = Path(err.filename) if isinstance(err.filename, str) else fallback
    temp = _TEMP.match(path.name)
    if temp is not None:  # an atomic write's temporary file: name the file it was to become
        path = path.with_name(temp.group("name"))
    if err.errno == errno.ENOTDIR:
        blocker = file_above(path)
        if blocker is not None:
            return f"{path}: {blocker} is a file, not a folder"
    return f"{path}: {os_reason(err)}"


def output_error(path: Path, err: OSError, doing: str = "write") -> OutputError:
    """The one-line error for an OS failure while doing something to ``path``."""
    return OutputError(f"cannot {doing} {describe_os_error(err, path)}")


def make_folder(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents; returns the folders made, outermost first.

    The list lets a failed run remove exactly the folders it made (:func:`remove_made`).
    """
    try:
        if path.exists():
            if not path.is_dir():
                raise OutputError(f"output {path} exists and is not a folder")
            return []
        missing = [path]
        missing += [p for p in path.parents if not p.exists()]
    except OSError as err:  # e.g. a name too long for the file system
        raise output_error(path, err, "create output folder") from None
    made: list[Path] = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            if folder.is_dir():
                continue  # made by someone else meanwhile: theirs, not ours
            remove_made(made)
            raise OutputError(
                f"cannot create output folder {path}: {folder} is a file, not a folder"
            ) from None
        except OSError as err:
            remove_made(made)
            raise output_error(path, err, "create output folder") from None
        made.append(folder)
    return made


def remove_made(made: Sequence[Path]) -> None:
    """Remove the folders of :func:`make_folder`, innermost first, each only if empty."""
    for folder in reversed(made):
        with contextlib.suppress(OSError):
            folder.rmdir()


def check_output_dir(path: Path, force: bool) -> None:
    """Refuse to write into a folder that already holds another run, unless ``force``.

    A run is recognised by a ``run.json``, a ``sweep-index.md`` or a ``*_quant_manifest.json``;
    an empty or unrelated folder is fine to use, except that a ``pipeline.toml`` aqm did not write
    is never overwritten (``--force`` or not): it is most likely the user's source file.
    """
    try:
        if not path.exists():
            return
        if not path.is_dir():
            raise OutputError(f"output {path} exists and is not a folder")
        found = [name for name in RUN_MARKERS if (path / name).exists()]
        found += sorted(p.name for p in path.glob(f"*{MANIFEST_SUFFIX}"))
    except OSError as err:
        raise output_error(path, err, "read output folder") from None
    if found and not force:
        raise InputError(
            f"output folder {path} already holds a run ({found[0]}); pass --force to write over it, "
            "or choose another --output"
        )
    toml = path / PIPELINE_FILE
    if toml.is_file() and not is_aqm_pipeline(toml):
        raise InputError(
            f"{toml} was not written by aqm, and aqm writes the run's effective pipeline under that name; "
            "choose another --output"
        )


def new_run_dir(stem: str, base: Path | None = None) -> Path:
    """``runs/<date>-<time>-<stem>`` under the working directory, never an existing folder."""
    root = (base if base is not None else Path.cwd()) / "runs"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate = root / f"{stamp}-{stem}"
    number = 2
    while candidate.exists():
        candidate = root / f"{stamp}-{stem}-{number}"
        number += 1
    return candidate


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("auto-quantize-model")
    except PackageNotFoundError:
        return "unknown"


def pipeline_header(source: str, overrides: Sequence[str] = ()) -> str:
    """The comment on top of a written ``pipeline.toml``; its first line marks the file as aqm's."""
    now = datetime.now().isoformat(timespec="seconds")
    lines = [f"{PIPELINE_HEADER.removeprefix('# ')} {package_version()} on {now}.", f"Source: {source}"]
    lines += [f"Override: --set {text}" for text in overrides]
    lines.append("Repeat this run with: aqm run pipeline.toml --output NEW_FOLDER")
    return "\n".join(lines)


# --------------------------------------------------------------------------- aqm's own files


def is_aqm_pipeline(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(len(PIPELINE_HEADER)).decode("utf-8", errors="replace") == PIPELINE_HEADER
    except OSError:
        return False


@functools.cache
def _state_names() -> tuple[str, tuple[str, ...], str]:
    """The search-state file names, from the resume protocol that writes them (a torch-free module)."""
    from auto_quantize_model.backend.modelopt import checkpoint

    sides = (checkpoint.SETTINGS_SUFFIX, checkpoint.RAW_SCORES_SUFFIX)
    return checkpoint.STATE_FILE, sides, checkpoint.CORRUPT_SUFFIX


def is_aqm_name(name: str) -> bool:
    """Whether a file of this name in a run folder can only have been written by aqm."""
    state, sides, corrupt = _state_names()
    temp = _TEMP.match(name)
    if temp is not None:
        name = temp.group("name")
    name = name.removesuffix(corrupt)  # a state file set aside as unreadable
    if name in _OWN_NAMES or name == state or name.endswith((MANIFEST_SUFFIX, SAVED_STATE_SUFFIX)):
        return True
    stem = next((name.removesuffix(s) for s in sides if name.endswith(s)), None)
    return stem is not None and stem.endswith(".pt")


def _point_folders(folder: Path, points: Iterable[str] | None) -> Iterator[Path]:
    children = folder.iterdir() if points is None else (folder / name for name in points)
    for child in children:
        if child.is_dir() and not child.is_symlink() and is_aqm_pipeline(child / PIPELINE_FILE):
            yield child


def aqm_files(folder: Path, listed: Iterable[str] = (), points: Iterable[str] | None = None) -> list[Path]:
    """The files in ``folder`` under names only aqm writes, with ``listed`` (relative paths, from
    ``run.json``) and the files of sweep point folders (``points``: only those sub-folders; None:
    any sub-folder holding aqm's ``pipeline.toml``). Sorted, existing only.

    This is a guess by name, good for telling which files one attempt added (a failed run removes
    those); ``--force`` removes only what a record lists (:func:`recorded_own_files`).
    """
    found: set[Path] = set()
    root = folder.resolve()
    for name in listed:
        path = folder / name
        if root in path.resolve().parents and (path.is_file() or path.is_symlink()):
            found.add(path)
    if not folder.is_dir():
        return sorted(found)
    for child in folder.iterdir():
        if (child.is_file() or child.is_symlink()) and is_aqm_name(child.name):
            found.add(child)
    # a user's own pipeline file under aqm's name is theirs, whatever a record says
    found = {p for p in found if p.name != PIPELINE_FILE or is_aqm_pipeline(p)}
    plots = folder / PLOTS_DIR
    if plots.is_dir() and not plots.is_symlink():
        found.update(p for p in plots.iterdir() if p.is_file() and p.suffix in PLOT_SUFFIXES)
    found.update(_export_files(folder))
    for point in _point_folders(folder, points):
        found.update(aqm_files(point))
    return sorted(found)


def _export_files(folder: Path) -> list[Path]:
    """The files of a run's ``export/`` folder that its ``export.json`` records, and those of the
    scratch folders a killed export left beside it: a failed run removes them too."""
    found = export_scratch_files(folder)
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink() and child.name == EXPORT_DIR:
            recorded = recorded_files(child, EXPORT_RECORD) or ()
            found.extend(child / name for name in recorded if link_on_the_way(child, name) is None)
    return [p for p in found if p.is_file() or p.is_symlink()]


def export_scratch_files(folder: Path) -> list[Path]:
    """The files of the scratch folders (``.export.export-*``, ``.export.replaced-*``) that a killed
    export left in ``folder``: aqm makes them under these names alone, and nothing else lives there."""
    found: list[Path] = []
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink() and _EXPORT_SCRATCH.match(child.name) is not None:
            found.extend(p for p in child.rglob("*") if p.is_file() or p.is_symlink())
    return found


def recorded_own_files(folder: Path, listed: Iterable[str]) -> list[Path]:
    """The files of ``listed`` (a record's relative names) that exist in ``folder``, reached without
    passing through a link; a name that leaves the folder or meets a link is refused, naming it.

    This is all that ``--force`` removes: a record is the only proof that aqm wrote a file.
    """
    found: list[Path] = []
    for name in listed:
        if not safe_relative(name):
            raise InputError(
                f"{folder / RUN_FILE} lists {name!r}, which is outside the folder; the record was edited: "
                "remove what you no longer need by hand, or choose another --output"
            )
        link = link_on_the_way(folder, name)
        if link is not None and link != folder / name:
            raise LinkRefused(
                f"{link} is a symbolic link inside {folder}; aqm removes nothing through a link: remove the "
                "link, or choose another --output"
            )
        path = folder / name
        if path.is_symlink() or path.is_file():
            found.append(path)
    return found


def refuse_foreign_files(folder: Path, names: Iterable[str]) -> None:
    """Refuse to write ``names`` into ``folder`` where one exists that no aqm record lists as its own.

    The records are the folder's :data:`OUTPUTS_RECORD` (earlier ``report``/``frontier`` outputs)
    and its ``run.json`` (a run folder's own files). A link in a name's place is refused as such.
    """
    try:
        ours = set(recorded_files(folder, OUTPUTS_RECORD) or ()) | set(recorded_files(folder, RUN_FILE) or ())
        taken = [
            (folder / name, name)
            for name in names
            if (folder / name).is_symlink() or (folder / name).exists()
        ]
    except OSError as err:  # a name too long, a parent that is a file: the writer words it the same way
        raise output_error(folder, err, "read output folder") from None
    for path, name in taken:
        if path.is_symlink():
            raise LinkRefused(
                f"{path} is a symbolic link; aqm writes no file through a link: remove the link, or choose "
                "another --output"
            )
        if name not in ours:
            raise InputError(
                f"{path} exists and was not written by aqm; aqm never overwrites it: move it away, or choose "
                "another --output"
            )


def outputs_record(folder: Path, files: Iterable[Path]) -> str:
    """The new :data:`OUTPUTS_RECORD` text: the files recorded before plus ``files``."""
    names = set(recorded_files(folder, OUTPUTS_RECORD) or ()) | set(relative_names(folder, files))
    names.discard(OUTPUTS_RECORD)
    return json.dumps({"files": sorted(names)}, indent=1) + "\n"


def foreign_run_files(folder: Path) -> list[str]:
    """Run files in ``folder`` that no ``run.json`` of aqm vouches for (another tool's, or a copy)."""
    try:
        names = [name for name in RUN_MARKERS if (folder / name).exists()]
        names += sorted(p.name for p in folder.glob(f"*{MANIFEST_SUFFIX}"))
    except OSError:
        return []
    return names


def remove_files(folder: Path, files: Iterable[Path]) -> list[Path]:
    """Remove ``files``, then every folder below ``folder`` that this left empty; returns the files
    that could not be removed (their OS errors are the caller's to report)."""
    stuck: list[Path] = []
    parents: set[Path] = set()
    for path in files:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            stuck.append(path)
            continue
        parents.update(p for p in path.parents if folder in p.parents)
    for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            parent.rmdir()
    return stuck


def relative_names(folder: Path, files: Iterable[Path]) -> tuple[str, ...]:
    """``files`` as POSIX paths relative to ``folder`` (those outside it are left out), in order."""
    names: list[str] = []
    for path in files:
        with contextlib.suppress(ValueError):
            name = Path(os.path.relpath(path, folder)).as_posix()
            if not name.startswith("../") and name not in names:
                names.append(name)
    return tuple(names)
