"""Shared fixtures. torch/transformers are imported inside fixtures so pure tests stay fast.

Plain helpers live in ``builders.py`` (values, tiny models, ``run_aqm``) and ``fakes.py``
(tokenizer, loaded model); tests import them by module name.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from auto_quantize_model.app.defaults import idle_threads_sleep
from auto_quantize_model.data import builtin_captions_path
from builders import TINY_DEFAULT, AqmProcess, AqmRun

if TYPE_CHECKING:
    from auto_quantize_model.artifacts import LoadedModel

# torch's idle OpenMP threads sleep instead of spinning, in this process as in every aqm process
# (aqm sets the same before it loads torch; the tests here load torch themselves). A spinning
# thread takes the core the working one needs whenever another process is busy: on the shared
# 2-core machine, one slow-tier run took 13.6 s for test_layer_cache's replay test and 25.6 s
# for test_packed_vs_reference with spinning threads, 1.1 s and 5.1 s without. Nothing computed
# changes (the same threads split the same work), and a value in the environment still wins.
idle_threads_sleep()


TINY_SEED = 0
"""Seed of the weights in ``tiny_checkpoint``; ``build_builtin(..., seed=TINY_SEED)`` rebuilds them."""


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``builtin:tiny-qwen3-vl`` saved by ``save_pretrained`` (weights + tokenizer); treat as read-only.

    Integration tests load it back through ``from_pretrained`` so they exercise the same path as
    a real checkpoint directory. Do not write into it: it is shared by the whole session.
    """
    from auto_quantize_model.backend.models import build_builtin
    from auto_quantize_model.sources import TINY_QWEN3_VL

    directory = tmp_path_factory.mktemp("tiny-qwen3-vl")
    loaded = build_builtin(TINY_QWEN3_VL, seed=TINY_SEED, dtype="float32", device="cpu")
    model: Any = loaded.model
    model.save_pretrained(str(directory))
    loaded.tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture
def tiny_loaded() -> LoadedModel:
    """A fresh in-memory ``builtin:tiny-qwen3-vl`` (CPU, fp32); fresh per test since stages mutate it."""
    from auto_quantize_model.backend.models import build_builtin
    from auto_quantize_model.sources import TINY_QWEN3_VL

    return build_builtin(TINY_QWEN3_VL, seed=TINY_SEED, dtype="float32", device="cpu")


@pytest.fixture
def captions_file(tmp_path: Path) -> Path:
    """The first 40 bundled captions in a temporary UTF-8 file, one per line."""
    lines = builtin_captions_path().read_text(encoding="utf-8").splitlines()[:40]
    path = tmp_path / "captions.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


TINY_DEFAULT_FIXTURE = "tiny_default_run"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the test files that read the tiny default run last, each file's tests in their order.

    The run starts with the session (``_tiny_default_process``) and takes ~15 s in its own
    process; the later its first reader comes, the more of that the other tests hide. Whole
    files move, so a module-scoped fixture is still built once.
    """
    readers = {item.path for item in items if TINY_DEFAULT_FIXTURE in getattr(item, "fixturenames", ())}
    items[:] = [item for item in items if item.path not in readers] + [
        item for item in items if item.path in readers
    ]


# Under pytest-xdist (``nox -s slow`` runs two workers) the tiny default run is started once, by
# the controller, as soon as it starts its workers, and every worker reads that one run.
SHARED_RUN_KEY = "aqm_tiny_default_dir"
SHARED_RUN_STASH = pytest.StashKey["SharedRun"]()
RETURNCODE_FILE = "aqm.returncode"


class SharedRun:
    """The controller's tiny default run; a thread writes its exit code to a file once it ends,
    which is how the workers (other processes) learn it is done. The controller does not know
    which tests the workers will select, so it starts the run whenever it starts workers (a
    selection without a reader pays ~15 s of CPU in the background for nothing)."""

    def __init__(self) -> None:
        self.cwd = Path(tempfile.mkdtemp(prefix="aqm-tiny-default-"))
        self.process = AqmProcess("run", str(TINY_DEFAULT), cwd=self.cwd)
        threading.Thread(target=self._record_exit, daemon=True).start()

    def _record_exit(self) -> None:
        code = self.process.wait().returncode
        partial = self.cwd / f"{RETURNCODE_FILE}.partial"
        partial.write_text(str(code), encoding="utf-8")
        partial.replace(self.cwd / RETURNCODE_FILE)

    def close(self) -> None:
        self.process.stop()
        shutil.rmtree(self.cwd, ignore_errors=True)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist's controller, for each worker it starts: start the shared run once, tell the worker where.

    Not under ``-m "not slow ..."`` (the fast tier): every reader of the run is a slow test, and the
    run's ~15 s of CPU would be taken from the two workers for nothing. A worker that is told no
    folder starts its own run if one of its tests asks after all (``_tiny_default_process``).
    """
    if _slow_left_out(node.config):
        return
    shared = node.config.stash.get(SHARED_RUN_STASH, None)
    if shared is None:
        shared = node.config.stash[SHARED_RUN_STASH] = SharedRun()
    node.workerinput[SHARED_RUN_KEY] = str(shared.cwd)


def pytest_unconfigure(config: pytest.Config) -> None:
    shared = config.stash.get(SHARED_RUN_STASH, None)
    if shared is not None:
        shared.close()


def _slow_left_out(config: pytest.Config) -> bool:
    """Whether ``-m`` reads ``not slow`` or ``not slow and ...`` (the fast tier's expression)."""
    expression = " ".join(str(config.getoption("markexpr", "") or "").split())
    return expression == "not slow" or expression.startswith("not slow and ")


def _shared_run_dir(config: pytest.Config) -> Path | None:
    """The folder of the controller's run when this process is an xdist worker, else None."""
    found = getattr(config, "workerinput", {}).get(SHARED_RUN_KEY)
    return None if found is None else Path(found)


def _read_shared_run(folder: Path, timeout: float = 600) -> AqmRun:
    deadline = time.monotonic() + timeout
    while not (folder / RETURNCODE_FILE).is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the shared tiny default run in {folder} did not end in {timeout:.0f} s")
        time.sleep(0.2)
    return AqmRun(
        ("run", str(TINY_DEFAULT)),
        folder,
        int((folder / RETURNCODE_FILE).read_text(encoding="utf-8")),
        (folder / "aqm.stdout").read_text(encoding="utf-8", errors="replace"),
        (folder / "aqm.stderr").read_text(encoding="utf-8", errors="replace"),
    )


@pytest.fixture(scope="session", autouse=True)
def _tiny_default_process(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AqmProcess | None]:
    """Start the tiny default run at the session's first test when a later test will need it.

    It then runs in its own process while the tests before its first user run here: on a
    2-core machine that hides most of its ~30 s of CPU (library imports, AutoQuant, plots)
    behind the pure tests instead of adding it to the session's wall time. A session that
    ends without waiting for it kills it. An xdist worker starts none: it reads the controller's.
    """
    needed = any(TINY_DEFAULT_FIXTURE in getattr(item, "fixturenames", ()) for item in request.session.items)
    if _shared_run_dir(request.config) is not None:
        needed = False
    process = (
        AqmProcess("run", str(TINY_DEFAULT), cwd=tmp_path_factory.mktemp("tiny-default")) if needed else None
    )
    yield process
    if process is not None:
        process.stop()


@pytest.fixture(scope="session")
def tiny_default_run(
    request: pytest.FixtureRequest,
    _tiny_default_process: AqmProcess | None,
    tmp_path_factory: pytest.TempPathFactory,
) -> AqmRun:
    """``aqm run pipelines/tiny-qwen3-vl.toml`` (the README's first command), once per session.

    It runs in a fresh interpreter from an empty folder, so the run folder is the default
    ``runs/<time>-tiny-qwen3-vl`` (:attr:`AqmRun.folder`). Every stage runs for real: library
    imports, ModelOpt AutoQuant, validation, plots. The process starts with the session's first
    test (``_tiny_default_process``), or with the xdist controller; this fixture waits for it. It
    does not judge the run: tests assert on ``returncode`` themselves. Treat the folder as
    read-only: it is shared by every test (and xdist worker) that asks for it; copy it
    (``shutil.copytree``) to change anything.
    """
    shared = _shared_run_dir(request.config)
    if shared is not None:
        return _read_shared_run(shared)
    process = _tiny_default_process
    if process is None:  # requested dynamically (getfixturevalue): start it now
        process = AqmProcess("run", str(TINY_DEFAULT), cwd=tmp_path_factory.mktemp("tiny-default"))
    return process.wait()
