"""``aqm pipelines ls|cp``: the example pipelines, found in the package or the checkout, copied safely."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from auto_quantize_model.app.cli import main
from auto_quantize_model.app.pipelines_cmd import (
    PACKAGED,
    REPOSITORY,
    copy_pipeline,
    list_pipelines,
    pipelines_folder,
    summary,
)
from auto_quantize_model.errors import InputError
from builders import REPO

TINY = REPO / "pipelines" / "tiny-qwen3-vl.toml"


def test_ls_lists_every_example_with_the_first_sentence_of_its_comment(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["pipelines", "ls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == sorted(p.stem for p in (REPO / "pipelines").glob("*.toml"))
    tiny = next(line for line in lines if line.startswith("tiny-qwen3-vl "))
    assert (
        tiny.split(None, 1)[1] == "Tiny end to end run: a few seconds on a laptop CPU, nothing to download."
    )
    sweep = next(line for line in lines if line.startswith("qwen3-vl-4b-sweep8 "))
    assert sweep.endswith("(random weights, seeded), for timing one GPU against several.")  # two lines joined


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("# One line. Then more.\n[model]\n", "One line."),
        ("# Two lines that\n# make one sentence. And more\n", "Two lines that make one sentence."),
        ("#\n# After a blank comment line\n#\n# a new paragraph is left out\n", "After a blank comment line"),
        ("# Version 1.5 of it, e.g. this\n", "Version 1.5 of it, e.g. this"),
        ("# Use it, e.g. on a laptop. Then more\n", "Use it, e.g. on a laptop."),
        ("[model]\n# not a header\n", ""),
    ],
)
def test_summary_is_the_opening_comments_first_sentence(text: str, expected: str) -> None:
    assert summary(text) == expected


def test_cp_copies_one_file_into_a_folder_or_to_a_file_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pipelines", "cp", "tiny-qwen3-vl", str(tmp_path)]) == 0
    written = tmp_path / "tiny-qwen3-vl.toml"
    assert written.read_bytes() == TINY.read_bytes()
    assert capsys.readouterr().out == f"aqm: wrote {written}; check it with: aqm validate {written}\n"
    mine = tmp_path / "mine.toml"
    assert main(["pipelines", "cp", "tiny-qwen3-vl.toml", str(mine)]) == 0
    assert mine.read_bytes() == TINY.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.toml", "tiny-qwen3-vl.toml"]


def test_cp_defaults_to_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["pipelines", "cp", "smollm2-135m"]) == 0
    assert (tmp_path / "smollm2-135m.toml").read_bytes() == (
        REPO / "pipelines" / "smollm2-135m.toml"
    ).read_bytes()


def test_cp_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mine = tmp_path / "tiny-qwen3-vl.toml"
    mine.write_text("# my edits\n", encoding="utf-8")
    for dest in (tmp_path, mine):
        assert main(["pipelines", "cp", "tiny-qwen3-vl", str(dest)]) == 2
        assert capsys.readouterr().err == (
            f"aqm: error: {mine} already exists; choose another destination or remove it first\n"
        )
    assert mine.read_text(encoding="utf-8") == "# my edits\n"


@pytest.mark.parametrize(
    ("name", "dest", "message"),
    [
        ("tiny-qwen3", ".", "no example pipeline named 'tiny-qwen3'; did you mean tiny-qwen3-vl? "),
        (
            "nothing-like-it",
            ".",
            "no example pipeline named 'nothing-like-it'; `aqm pipelines ls` lists them",
        ),
        ("tiny-qwen3-vl", "missing/x.toml", "missing is not a folder; create it first"),
    ],
)
def test_cp_refuses_in_one_line_naming_the_culprit(
    name: str, dest: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pipelines", "cp", name, str(tmp_path / dest)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aqm: error: ")
    assert message in err
    assert err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


class UnwritableItem:
    """A packaged file whose content cannot be written (a str for a binary file): the write fails."""

    name = "broken.toml"

    def read_bytes(self) -> Any:
        return "not bytes"


class FakeFolder:
    def iterdir(self) -> list[UnwritableItem]:
        return [UnwritableItem()]


def test_a_failed_copy_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        copy_pipeline("broken", tmp_path, FakeFolder())  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_the_package_copy_wins_and_the_checkout_is_the_fallback(tmp_path: Path) -> None:
    packaged = tmp_path / "site" / "auto_quantize_model" / PACKAGED
    checkout = tmp_path / "repo" / "pipelines"
    checkout.mkdir(parents=True)
    (checkout / "a.toml").write_text("# From the checkout.\n", encoding="utf-8")
    assert pipelines_folder(packaged, checkout) == checkout
    packaged.mkdir(parents=True)
    (packaged / "b.toml").write_text("# From the wheel.\n", encoding="utf-8")
    (packaged / "notes.txt").write_text("not a pipeline", encoding="utf-8")
    assert pipelines_folder(packaged, checkout) == packaged
    assert list_pipelines(packaged) == [("b", "From the wheel.")]
    with pytest.raises(InputError, match=r"^no example pipelines found: .* reinstall auto-quantize-model$"):
        pipelines_folder(tmp_path / "none", tmp_path / "neither")


def test_the_wheel_maps_the_top_level_folder_to_the_one_looked_up() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    force = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    assert force == {"pipelines": f"auto_quantize_model/{PACKAGED}"}
    assert REPOSITORY == REPO / "pipelines"
