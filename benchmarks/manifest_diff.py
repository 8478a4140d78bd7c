"""Compare two run folders' manifests and layer reports, ignoring what changes run to run.

The house-keeping pass of issue 25 promised unchanged outputs; this is the check behind that
claim (BENCHMARKS.md): run the tiny default with the code before and after, then

    python benchmarks/manifest_diff.py runs/before runs/after

prints every differing value (timings, timestamps and library versions left out) and exits 1
when there is any.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

IGNORED = frozenset({"timings", "created_at", "seconds", "versions"})
"""Keys whose values differ between any two runs of the same code."""


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """``path: a vs b`` for every leaf value that differs (dict keys in :data:`IGNORED` skipped)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            if key in IGNORED:
                continue
            if key not in a or key not in b:
                out.append(f"{path}.{key}: only in {'the second' if key in b else 'the first'}")
            else:
                out += differences(a[key], b[key], f"{path}.{key}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} items"]
        return [
            line
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for line in differences(x, y, f"{path}[{i}]")
        ]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    args = parser.parse_args(argv)
    found = 0
    for pattern in ("*_quant_manifest.json", "per-layer-sensitivity.json"):
        (a,) = sorted(args.first.glob(pattern))
        (b,) = sorted(args.second.glob(pattern))
        lines = differences(json.loads(a.read_text("utf-8")), json.loads(b.read_text("utf-8")))
        print(f"{a.name}: {len(lines)} difference(s)")
        for line in lines:
            print(f"  {line}")
        found += len(lines)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
