"""Reading a manifest file, ours or the previous tool's, checked by one set of rules.

Its own module because it needs both record modules (:mod:`.manifest` for ours, :mod:`.legacy`
for the previous tool's, which itself builds on ours) and every command that reads a run
(report, frontier, export, diff, sweeps) goes through it; it used to live with the report
renderer, which made the pure diff code import the renderer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from auto_quantize_model.errors import InputError
from auto_quantize_model.io.convert import read_json
from auto_quantize_model.io.legacy import legacy_manifest_from_dict, looks_like_legacy
from auto_quantize_model.io.manifest import DAMAGED, check_manifest, manifest_from_dict
from auto_quantize_model.manifest_records import Manifest

MANIFEST_SUFFIX = "_quant_manifest.json"
"""What every manifest's file name ends with (``<scheme>_quant_manifest.json``)."""

NOT_OURS = f"pass the *{MANIFEST_SUFFIX} that aqm run wrote (or the previous tool's)"
"""The fix for a JSON file that is no manifest at all (a wrong path rather than a damaged file)."""


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Ours (recognised by ``schema_version``) or the previous tool's (recognised by its shape).

    Either kind is checked by the same rules (:func:`~auto_quantize_model.io.manifest.check_manifest`)
    before it is returned, so every command refuses the same files in the same words.
    """
    source = Path(path)
    data = _parsed(source)
    if not isinstance(data, dict):
        raise InputError(
            f"{source} is not a quant manifest (top level is a JSON {type(data).__name__}, not an object); "
            f"{NOT_OURS}"
        )
    if "schema_version" in data:
        return manifest_from_dict(data, source)
    if looks_like_legacy(data):
        manifest = legacy_manifest_from_dict(data, source)
        check_manifest(manifest, source)
        return manifest
    if isinstance(data.get("layer_sensitivity"), list):
        raise InputError(
            f"{source} is not a quant manifest (it looks like a per-layer sensitivity report; "
            f"pass the *{MANIFEST_SUFFIX} next to it)"
        )
    keys = ", ".join(sorted(map(str, data))[:6]) or "none"
    raise InputError(
        f"{source} is not a quant manifest (no schema_version and no layer_sensitivity; keys: {keys}); "
        f"{NOT_OURS}"
    )


def _parsed(source: Path) -> Any:
    """The file's JSON; bytes that are not JSON text (or nest past the parser's depth) are one line
    that says the file was damaged, since aqm only ever writes it whole."""
    try:
        return read_json(source)
    except RecursionError:
        raise InputError(
            f"{source} is not a quant manifest (its JSON nests too deeply to read); {DAMAGED}"
        ) from None
    except InputError as err:
        if isinstance(err.__cause__, json.JSONDecodeError | UnicodeDecodeError):
            raise InputError(f"{err}; {DAMAGED}") from err.__cause__
        raise
