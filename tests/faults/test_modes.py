"""Export folders are created with the user's umask (issue 21, item 9).

``mkdtemp`` makes 0700 folders: an export written through a scratch folder used to end up 0700
(and its files 0600 where a writer used ``mkstemp``), unreadable to the group a team shares.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from auto_quantize_model.app import cli
from fakes import FakeRun, run_into, service


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_export_modes_follow_the_umask(tmp_path: Path, umask: int) -> None:
    run = tmp_path / "run"
    assert run_into(run, using=service(FakeRun(fmt="INT8_DEFAULT_CFG"))) == 0
    out = tmp_path / "exports" / "mix"
    previous = os.umask(umask)
    try:
        assert cli.main(["export", str(run), "--output", str(out)], service=service()) == 0
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.iterdir()]}
    assert modes.pop("mix") == 0o777 & ~umask
    assert modes  # the export's files
    assert set(modes.values()) == {0o666 & ~umask}
    assert stat.S_IMODE((tmp_path / "exports").stat().st_mode) == 0o777 & ~umask
