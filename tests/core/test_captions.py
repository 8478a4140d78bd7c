"""Held-out caption files read as lines, and the bundled captions by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from auto_quantize_model.core.captions import caption_file, read_caption_file
from auto_quantize_model.errors import InputError

# --------------------------------------------------------------------------------------------
# Held-out caption files


def test_read_caption_file_skips_blank_lines_and_strips(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_text("  a cat \n\n\t\nA dog.\n", encoding="utf-8")
    assert read_caption_file(path) == ("a cat", "A dog.")
    with pytest.raises(InputError, match=r"missing\.txt"):
        read_caption_file(tmp_path / "missing.txt")


def test_builtin_names_the_package_captions() -> None:
    path = caption_file("builtin")
    assert path.parts[-3:] == ("auto_quantize_model", "data", "captions.txt")
    assert caption_file("builtin-holdout").parts[-3:] == (
        "auto_quantize_model",
        "data",
        "holdout-captions.txt",
    )
    assert caption_file("x/y.txt") == Path("x/y.txt")
