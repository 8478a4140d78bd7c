"""Atomic writes and copies: readable files, kept modes, nothing left behind on failure."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from pytest_mock import MockerFixture

from auto_quantize_model.errors import InputError
from auto_quantize_model.io.atomic import atomic_copy, atomic_write_bytes, atomic_write_text

# ---- atomic writes ------------------------------------------------------------------------------


def test_atomic_write_creates_readable_file(tmp_path: Path) -> None:
    target = atomic_write_text(tmp_path / "a.txt", "héllo\n")
    assert target.read_bytes() == "héllo\n".encode()
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_atomic_write_keeps_mode_of_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    target.chmod(0o600)
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_failed_rename_leaves_old_file_and_no_temp(tmp_path: Path, mocker: MockerFixture) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    mocker.patch.object(Path, "replace", side_effect=OSError("disk full"))
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_failed_write_leaves_nothing(tmp_path: Path, mocker: MockerFixture) -> None:
    mocker.patch("auto_quantize_model.io.atomic.os.fsync", side_effect=OSError("I/O error"))
    with pytest.raises(OSError, match="I/O error"):
        atomic_write_bytes(tmp_path / "b.bin", b"\x00" * 10)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_leaves_nothing(tmp_path: Path, mocker: MockerFixture) -> None:
    mocker.patch("auto_quantize_model.io.atomic.os.fsync", side_effect=KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(tmp_path / "c.txt", "x")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_into_missing_folder_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        atomic_write_text(tmp_path / "no" / "a.txt", "x")


def test_atomic_copy(tmp_path: Path, mocker: MockerFixture) -> None:
    source = tmp_path / "src.pt"
    source.write_bytes(os.urandom(3 << 20))
    copied = atomic_copy(source, tmp_path / "dst.pt")
    assert copied.read_bytes() == source.read_bytes()

    mocker.patch.object(Path, "replace", side_effect=OSError("no space"))
    with pytest.raises(OSError, match="no space"):
        atomic_copy(source, tmp_path / "other.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst.pt", "src.pt"]


def test_atomic_copy_of_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        atomic_copy(tmp_path / "nope.pt", tmp_path / "x.pt")
