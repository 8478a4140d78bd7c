"""Where the converted copy of a user's ``.gguf`` file is kept: the model cache, keyed by content.

Converting a GGUF file (transformers parses its metadata several times and dequantizes in Python)
took 54-60 s of a 4-minute CPU run for Qwen2.5-0.5B, every run. ``pypi:`` files live in our own
cache and keep their converted copy beside them (:func:`~auto_quantize_model.backend.gguf.converted_folder`);
a user's file must never get a folder written next to it, so its copy goes to
``<cache>/gguf/<sha256>.converted-<dtype>-transformers-<version>``. Keying by the file's SHA-256
rather than its path means a file edited in place is converted again, and two copies of one file
share one converted folder. Hashing reads the file once (about 1 s per GB), far less than a
conversion.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

GGUF_DIR = "gguf"
"""Sub-folder of the model cache holding converted copies of users' GGUF files."""
_CHUNK = 1 << 22


def content_sha256(file: Path) -> str:
    """The SHA-256 of ``file``'s bytes, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with file.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def content_folder(cache_dir: Path, sha256: str, dtype_name: str, transformers_version: str) -> Path:
    """The converted copy's folder for a file of this content, dtype and transformers version."""
    return cache_dir / GGUF_DIR / f"{sha256}.converted-{dtype_name}-transformers-{transformers_version}"


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (0 when it does not exist)."""
    if not folder.is_dir():
        return 0
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def size_text(count: int) -> str:
    """``517 MB``-style: decimal units, as disk tools print them."""
    value = float(count)
    for unit in ("bytes", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")
