"""``aqm diff``: the two manifests found on disk and compared by :mod:`auto_quantize_model.core.diff`.

Finding a run folder's manifest and reading it are file work, so they live here rather than
beside the pure comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from auto_quantize_model.core.diff import diff_manifests, render_diff_markdown
from auto_quantize_model.errors import InputError
from auto_quantize_model.io.manifest_file import MANIFEST_SUFFIX, read_manifest

if TYPE_CHECKING:
    from auto_quantize_model.manifest_records import Manifest

MANIFEST_GLOB = f"*{MANIFEST_SUFFIX}"


def resolve_manifest_path(path: Path) -> Path:
    """A manifest file as given, or the single ``*_quant_manifest.json`` inside a run folder."""
    if path.is_file():
        return path
    if not path.exists():
        raise InputError(f"{path}: no such file or folder (expected a run folder or a manifest JSON)")
    found = sorted(path.glob(MANIFEST_GLOB))
    if not found:
        raise InputError(f"{path}: no {MANIFEST_GLOB} in this folder; pass the manifest file itself")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise InputError(f"{path}: several manifests ({names}); pass the one to compare")
    return found[0]


def _label(manifest: Manifest, path: Path) -> str:
    return manifest.scheme.name or path.stem.removesuffix("_quant_manifest")


def diff_paths(a: Path, b: Path, ks: Sequence[int] = (10, 25, 50), moved: int = 15, level: int = 2) -> str:
    """``aqm diff``: read two manifests (run folders or files) and return the diff as Markdown.

    Runs are labelled by scheme name; when both share one, by file path instead.
    """
    path_a, path_b = resolve_manifest_path(a), resolve_manifest_path(b)
    manifest_a, manifest_b = read_manifest(path_a), read_manifest(path_b)
    label_a, label_b = _label(manifest_a, path_a), _label(manifest_b, path_b)
    if label_a == label_b:
        label_a, label_b = str(path_a), str(path_b)
    diff = diff_manifests(manifest_a, manifest_b, ks=ks, moved=moved)
    return render_diff_markdown(diff, label_a, label_b, level=level)
