"""A user's ``.gguf`` file is converted once: its converted copy is kept in the model cache, keyed by
the file's content, with its size in the log; nothing is written beside the user's file."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from auto_quantize_model.backend import gguf as gguf_backend
from auto_quantize_model.backend.gguf_cache import GGUF_DIR, content_sha256, folder_bytes, size_text
from test_gguf import TinyGguf, _copy_of, tiny  # noqa: F401  (the module-scoped fixture)


def load(file: Path, cache: Path) -> Any:
    model, _ = gguf_backend.load_gguf(file, dtype="float32", device="cpu", cache_dir=cache)
    return model


def kept(cache: Path) -> list[Path]:
    return sorted((cache / GGUF_DIR).iterdir()) if (cache / GGUF_DIR).is_dir() else []


def test_a_users_gguf_is_converted_once_and_kept_in_the_cache_by_content(
    tmp_path: Path,
    tiny: TinyGguf,  # noqa: F811
    mocker: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import torch

    file = _copy_of(tiny, tmp_path / "mine")
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger=gguf_backend.__name__)
    first = load(file, cache)
    (folder,) = kept(cache)
    assert folder.name.startswith(content_sha256(file) + ".converted-float32-transformers-")
    assert sorted(p.name for p in file.parent.iterdir()) == [file.name]  # nothing beside the user's file
    on_disk = size_text(folder_bytes(folder))
    assert f"kept the converted copy of {file} in {folder} ({on_disk} on disk;" in caplog.text

    parse = mocker.spy(gguf_backend, "read_token_info")
    elsewhere = _copy_of(tiny, tmp_path / "copy")  # the same bytes under another path
    again = load(elsewhere, cache)
    assert parse.call_count == 0  # not converted again: the content is the key
    assert f"loaded {elsewhere} from its converted copy {folder} ({on_disk} on disk)" in caplog.text
    assert kept(cache) == [folder]
    expected = first.state_dict()
    assert {
        name: torch.equal(value, expected[name]) for name, value in again.state_dict().items()
    } == dict.fromkeys(expected, True)


def test_a_file_changed_in_place_is_converted_again(
    tmp_path: Path,
    tiny: TinyGguf,  # noqa: F811
    mocker: Any,
) -> None:
    file = _copy_of(tiny, tmp_path / "mine")
    cache = tmp_path / "cache"
    load(file, cache)
    with file.open("ab") as grown:  # GGUF readers ignore trailing bytes; the content differs
        grown.write(b"\0" * 32)
    parse = mocker.spy(gguf_backend, "read_token_info")
    load(file, cache)
    assert parse.call_count == 1
    assert len(kept(cache)) == 2


def test_a_copy_with_another_record_is_converted_again(
    tmp_path: Path,
    tiny: TinyGguf,  # noqa: F811
    mocker: Any,
) -> None:
    file = _copy_of(tiny, tmp_path / "mine")
    cache = tmp_path / "cache"
    load(file, cache)
    (folder,) = kept(cache)
    marker = folder / gguf_backend.CONVERTED_MARKER
    record = json.loads(marker.read_text(encoding="utf-8"))
    marker.write_text(json.dumps({**record, "size": 1}), encoding="utf-8")
    parse = mocker.spy(gguf_backend, "read_token_info")
    load(file, cache)
    assert parse.call_count == 1
    assert json.loads(marker.read_text(encoding="utf-8")) == record


def test_an_unwritable_cache_costs_a_conversion_not_the_run(
    tmp_path: Path,
    tiny: TinyGguf,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    file = _copy_of(tiny, tmp_path / "mine")
    cache = tmp_path / "cache"
    cache.write_text("a file where the cache folder should be")
    caplog.set_level(logging.INFO, logger=gguf_backend.__name__)
    assert load(file, cache) is not None
    assert "the next run converts again" in caplog.text


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 bytes"), (999, "999 bytes"), (517_000_000, "517.0 MB"), (16_200_000_000, "16.2 GB")],
)
def test_size_text(count: int, text: str) -> None:
    assert size_text(count) == text
