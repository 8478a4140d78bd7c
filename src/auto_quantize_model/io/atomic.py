"""Writing files so that a crash never leaves half of one, and the manifest's JSON form.

Atomic writes: the bytes go to a temporary file in the destination's own folder (same file
system, so the final ``os.replace`` is a rename), are flushed and fsync'ed, then renamed over the
destination. A reader sees the old file or the new one, never a torn one; on any failure the
temporary file is removed and the destination is untouched.

JSON and non-finite floats: Python's ``json`` happily writes ``NaN``/``Infinity`` tokens, which are
not JSON and break ``jq``, browsers and most other readers. We write strict JSON instead: a
non-finite float becomes the string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``. Readers accept
those strings wherever a float is expected (and Python's bare tokens too, since ``json.loads``
parses them), so NaN and infinities round-trip exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import cattrs

from auto_quantize_model.errors import InputError
from auto_quantize_model.io.manifest import SCHEMA_VERSION, Manifest

NONFINITE_TO_STR: dict[float, str] = {math.inf: "Infinity", -math.inf: "-Infinity"}
STR_TO_NONFINITE: dict[str, float] = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}

_NEW_FILE_MODE = 0o644
"""Mode of newly created files (``mkstemp`` would leave 0600); an existing file keeps its mode."""

VersionPairs = tuple[tuple[str, str], ...]


# --------------------------------------------------------------------------------------------
# Atomic writes


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable; some file systems cannot fsync a folder, which is fine."""
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
    _fsync_dir(directory)


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


# --------------------------------------------------------------------------------------------
# JSON


def to_strict_json_value(value: Any) -> Any:
    """Plain JSON data with every non-finite float replaced by its string spelling."""
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        return NONFINITE_TO_STR.get(value, value)
    if isinstance(value, dict):
        return {key: to_strict_json_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_strict_json_value(item) for item in value]
    return value


def dumps_json(value: Any) -> str:
    """Strict, human-readable JSON (indented, UTF-8 kept as is, trailing newline)."""
    return json.dumps(to_strict_json_value(value), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _structure_float(value: Any, _: type) -> float:
    if isinstance(value, bool):
        raise TypeError(f"expected a number, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and value in STR_TO_NONFINITE:
        return STR_TO_NONFINITE[value]
    raise TypeError(f"expected a number, got {value!r}")


def _strict(kind: type) -> Callable[[Any, type], Any]:
    def structure(value: Any, _: type) -> Any:
        # bool is an int subclass; a manifest saying ``"rank": true`` is broken, not rank 1.
        if type(value) is not kind:
            raise TypeError(f"expected {kind.__name__}, got {value!r}")
        return value

    return structure


def _unstructure_versions(pairs: VersionPairs) -> dict[str, str]:
    return dict(pairs)


def _structure_versions(value: Any, _: type) -> VersionPairs:
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = [tuple(item) for item in value]
    else:
        raise TypeError(f"expected an object of name -> version, got {value!r}")
    pairs: list[tuple[str, str]] = []
    for item in items:
        if len(item) != 2 or not all(isinstance(part, str) for part in item):
            raise TypeError(f"expected name/version strings, got {item!r}")
        pairs.append((item[0], item[1]))
    return tuple(pairs)


def make_converter() -> cattrs.Converter:
    """The one converter for manifests: strict types, no unknown keys, versions as an object."""
    converter = cattrs.Converter(forbid_extra_keys=True)
    converter.register_structure_hook(float, _structure_float)
    for kind in (int, str, bool):
        converter.register_structure_hook(kind, _strict(kind))
    is_versions: Callable[[Any], bool] = lambda t: t == VersionPairs  # noqa: E731
    converter.register_unstructure_hook_func(is_versions, _unstructure_versions)
    converter.register_structure_hook_func(is_versions, _structure_versions)
    return converter


CONVERTER = make_converter()


def manifest_to_dict(manifest: Manifest) -> dict[str, Any]:
    """Plain data (floats may still be non-finite; :func:`dumps_json` spells those out)."""
    data: dict[str, Any] = CONVERTER.unstructure(manifest)
    return data


def manifest_to_json(manifest: Manifest) -> str:
    return dumps_json(manifest_to_dict(manifest))


def manifest_from_dict(data: Any, source_path: str | os.PathLike[str]) -> Manifest:
    """Structure one of our manifests, refusing other schema versions and malformed content.

    ``source_path`` only names the file in error messages.
    """
    if not isinstance(data, dict):
        raise InputError(f"{source_path} is not a quant manifest (top level is not a JSON object)")
    version = data.get("schema_version")
    if type(version) is not int:
        raise InputError(
            f"{source_path} is not a quant manifest (schema_version is {version!r}, expected an integer)"
        )
    if version != SCHEMA_VERSION:
        raise InputError(
            f"{source_path}: unknown manifest schema_version {version}; this aqm reads schema_version "
            f"{SCHEMA_VERSION}"
            + (" (the file is newer: upgrade auto-quantize-model)" if version > SCHEMA_VERSION else "")
        )
    try:
        manifest = CONVERTER.structure(data, Manifest)
    except Exception as err:  # cattrs raises ClassValidationError (an ExceptionGroup) or plain errors
        if isinstance(err, cattrs.BaseValidationError):
            details = "; ".join(cattrs.transform_error(err))
        else:
            details = str(err) or type(err).__name__
        raise InputError(f"{source_path} is not a valid quant manifest: {details}") from err
    ranks = [group.rank for group in manifest.groups]
    if ranks != list(range(1, len(ranks) + 1)):
        raise InputError(
            f"{source_path} is not a valid quant manifest: groups must be listed by rank 1..{len(ranks)}"
        )
    return manifest


def read_json(path: str | os.PathLike[str], what: str = "a quant manifest") -> Any:
    """Parse a JSON file; missing files and broken JSON become one-line user errors about ``what``."""
    source = Path(path)
    if not source.is_file():
        state = "is a folder" if source.is_dir() else "does not exist"
        raise InputError(f"{source} {state}: expected {what} (a JSON file)")
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{source} is not {what} (not UTF-8 text: {err.reason})") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{source} is not {what} (not JSON: {err.msg} at line {err.lineno})") from err
