"""``aqm pipelines ls|cp``: the example pipeline files, listed and copied out of the installed package.

The files live at the top of the repository (``pipelines/``, where the README's commands point)
and the wheel carries them inside the package as ``auto_quantize_model/pipelines`` (hatch's
``force-include``), so a pip-installed ``aqm`` can hand out a starting point without a checkout.
An editable install has no such folder in its package, so the repository's own folder is used.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.resources
import re
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from auto_quantize_model.errors import InputError

if TYPE_CHECKING:
    from auto_quantize_model.app.run_service import RunService

PACKAGED = "pipelines"
"""The folder inside the installed package (``auto_quantize_model/pipelines``) that holds them."""
REPOSITORY = Path(__file__).resolve().parents[3] / "pipelines"
"""``pipelines/`` beside ``src/`` in a checkout: where an editable install finds them."""
SUFFIX = ".toml"
_SENTENCE_END = re.compile(r"(?<!e\.g)(?<!i\.e)\. ")


def pipelines_folder(packaged: Traversable | None = None, repository: Path = REPOSITORY) -> Traversable:
    """Where the example pipelines are: inside the installed package, else in the checkout."""
    inside = packaged if packaged is not None else importlib.resources.files("auto_quantize_model") / PACKAGED
    if inside.is_dir():
        return inside
    if repository.is_dir():
        return repository
    raise InputError(
        "no example pipelines found: the installed package has no auto_quantize_model/pipelines and "
        f"there is no {repository}; reinstall auto-quantize-model"
    )


def pipeline_files(folder: Traversable) -> dict[str, Traversable]:
    """Name (file name without ``.toml``) -> file, sorted by name."""
    found = {item.name.removesuffix(SUFFIX): item for item in folder.iterdir() if item.name.endswith(SUFFIX)}
    return dict(sorted(found.items()))


def summary(text: str) -> str:
    """The first sentence of a file's opening comment: what the pipeline is for.

    The comment's lines are joined until a blank comment line or the first ``. `` (not the one of
    ``e.g.``/``i.e.``); a first line alone would often stop mid-sentence. Empty when the file does
    not open with a comment.
    """
    words: list[str] = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        content = line.lstrip("#").strip()
        if not content:
            if words:
                break
            continue
        words.append(content)
        joined = " ".join(words)
        end = _SENTENCE_END.search(joined)
        if end is not None:
            return joined[: end.start() + 1]
    return " ".join(words)


def list_pipelines(folder: Traversable) -> list[tuple[str, str]]:
    """``(name, summary)`` of every example pipeline, by name."""
    return [
        (name, summary(item.read_text(encoding="utf-8"))) for name, item in pipeline_files(folder).items()
    ]


def copy_pipeline(name: str, dest: Path, folder: Traversable) -> Path:
    """Copy the pipeline ``name`` to ``dest`` (a folder: ``dest/NAME.toml``); the path written.

    Never replaces a file: an existing target is refused, and the copy is created exclusively, so
    a file appearing meanwhile is not overwritten either. A failed write removes what it created.
    """
    files = pipeline_files(folder)
    stem = name.removesuffix(SUFFIX)
    if stem not in files:
        close = difflib.get_close_matches(stem, list(files), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise InputError(f"no example pipeline named {name!r}; {hint}`aqm pipelines ls` lists them")
    target = dest / f"{stem}{SUFFIX}" if dest.is_dir() else dest
    if target.exists():
        raise InputError(f"{target} already exists; choose another destination or remove it first")
    if not target.parent.is_dir():
        raise InputError(f"{target.parent} is not a folder; create it first or choose another destination")
    content = files[stem].read_bytes()
    try:
        out = target.open("xb")
    except FileExistsError:
        raise InputError(f"{target} already exists; choose another destination or remove it first") from None
    except OSError as err:
        raise InputError(f"{target}: cannot create the copy ({err.strerror or err})") from None
    try:
        with out:
            out.write(content)
    except BaseException as err:
        target.unlink(missing_ok=True)  # ours: created exclusively above
        if isinstance(err, OSError):
            raise InputError(f"{target}: cannot write the copy ({err.strerror or err})") from None
        raise
    return target


def cmd_pipelines(args: argparse.Namespace, service: RunService) -> int:
    folder = pipelines_folder()
    if args.action == "ls":
        rows = list_pipelines(folder)
        width = max((len(name) for name, _ in rows), default=0)
        for name, text in rows:
            print(f"{name.ljust(width)}  {text}".rstrip())
        return 0
    written = copy_pipeline(args.name, Path(args.dest), folder)
    print(f"aqm: wrote {written}; check it with: aqm validate {written}")
    return 0


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``aqm pipelines ls`` and ``aqm pipelines cp NAME [DEST]``."""
    # --debug goes on the actions only: a value the outer parser read would be reset by theirs
    pipelines = sub.add_parser("pipelines", help="list the example pipeline files, or copy one to edit")
    actions = pipelines.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("ls", parents=[common], help="name and purpose of every example pipeline")
    cp = actions.add_parser(
        "cp", parents=[common], help="copy one example pipeline (never over an existing file)"
    )
    cp.add_argument("name", help="a name from `aqm pipelines ls` (e.g. tiny-qwen3-vl)")
    cp.add_argument("dest", nargs="?", default=".", help="a file or an existing folder (default: here)")
    pipelines.set_defaults(func=cmd_pipelines)
