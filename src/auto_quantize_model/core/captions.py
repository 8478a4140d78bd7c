"""The one reader of captions files: calibration, held-out validation, the benchmark and preflight.

A captions file is UTF-8 text with one caption per line. Blank lines are skipped and surrounding
whitespace (including a Windows ``\\r`` and a leading byte-order mark) is not part of a caption:
it would only change the first or last token. ``builtin`` and ``builtin-holdout`` name the two
files shipped with the package (paths from :mod:`auto_quantize_model.data`). Every problem is
one :class:`~auto_quantize_model.errors.InputError` line naming the file, whoever reads it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from auto_quantize_model.data import builtin_captions_path, builtin_holdout_path
from auto_quantize_model.errors import ConfigError, InputError

BUILTIN = "builtin"
"""The captions file shipped inside the package (512 captions, the calibration default)."""
BUILTIN_HOLDOUT = "builtin-holdout"
"""128 more bundled captions, disjoint from ``builtin``: the held-out default of validation."""

Source = str | os.PathLike[str]


def caption_file(source: Source) -> Path:
    """The file a captions setting points at: a bundled file for the builtin names, else the path."""
    if str(source) == BUILTIN:
        return builtin_captions_path()
    if str(source) == BUILTIN_HOLDOUT:
        return builtin_holdout_path()
    return Path(source)


def captions_label(source: Source) -> str:
    """What stats and manifests record as the captions' origin: a builtin name or an absolute path."""
    if str(source) in (BUILTIN, BUILTIN_HOLDOUT):
        return str(source)
    return str(Path(source).resolve())


def parse_captions(text: str) -> list[str]:
    """Non-blank lines, stripped, in order (a leading byte-order mark is dropped)."""
    return [line.strip() for line in text.removeprefix("\ufeff").split("\n") if line.strip()]


def _read_bytes(source: Source) -> tuple[str, bytes]:
    path = caption_file(source)
    if str(source) in (BUILTIN, BUILTIN_HOLDOUT):
        name = f"built-in captions file {path}"
        try:
            return name, path.read_bytes()
        except OSError as err:
            raise InputError(
                f"{name} cannot be read ({err.strerror or type(err).__name__}): the package install is "
                "incomplete; reinstall it or point the setting at a captions file of your own"
            ) from err
    name = f"captions file {path}"
    if not path.exists():
        raise InputError(f"{name} does not exist")
    if path.is_dir():
        raise InputError(f"{name} is a directory, not a text file with one caption per line")
    try:
        return name, path.read_bytes()
    except OSError as err:
        raise InputError(f"{name} cannot be read: {err.strerror or type(err).__name__}") from err


def read_caption_file(source: Source) -> tuple[str, ...]:
    """Every caption of a file; an empty, blank, unreadable or non-UTF-8 file is an InputError."""
    name, raw = _read_bytes(source)
    if not raw:
        raise InputError(f"{name} is empty: expected one caption per line")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(
            f"{name} is not UTF-8: byte 0x{raw[err.start]:02x} at byte offset {err.start} ({err.reason})"
        ) from err
    found = parse_captions(text)
    if not found:
        raise InputError(f"{name} holds only blank lines: expected one caption per line")
    return tuple(found)


def read_captions(source: Source, max_samples: int, key: str = "calib.max_samples") -> tuple[str, ...]:
    """The first ``max_samples`` captions of a file.

    Asking for more captions than the file holds is an error rather than a silent shortfall:
    ``max_samples`` is what the report says was used. ``key`` names the setting in messages.
    """
    if max_samples <= 0:
        raise ConfigError(f"{key}: must be > 0, got {max_samples}")
    found = read_caption_file(source)
    if len(found) < max_samples:
        name = f"captions file {caption_file(source)}"
        raise ConfigError(
            f"{name} holds {len(found)} captions but {key} asks for {max_samples}: "
            f"lower {key} to {len(found)} or fewer, or use a larger file"
        )
    return found[:max_samples]


def captions_sha256(captions: Sequence[str]) -> str:
    """Hash of the captions actually used, one per line with a trailing newline.

    For a clean file (no blank lines, no surrounding spaces) read in full, this equals the file's
    own ``sha256sum``; in every case two runs with equal hashes saw the same text.
    """
    digest = hashlib.sha256()
    for caption in captions:
        digest.update(caption.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()
