"""What ``aqm`` sets up for its own process before the libraries load, and that it changes no result.

Three settings (see :func:`auto_quantize_model.app.defaults.import_libraries`): OpenMP threads
sleep when idle, ModelOpt's module-level ``@torch.compile`` function is left undecorated so that
importing ModelOpt does not import torch's Inductor, and the exit skips the garbage collector's
passes over the libraries' objects. All must stay inside the ``aqm`` process: a value the user
set wins, nothing is left in the environment that was not asked for, and a process that already
loaded torch is not touched.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
from pytest_mock import MockerFixture

from auto_quantize_model.app.defaults import (
    OMP_WAIT_POLICY,
    idle_threads_sleep,
    import_libraries,
)
from auto_quantize_model.backend.modelopt import DYNAMO_DISABLE

OMP = OMP_WAIT_POLICY[0]


def _without_torch(mocker: MockerFixture) -> None:
    """sys.modules as if torch had not been imported (restored after the test)."""
    mocker.patch.dict(sys.modules)
    for name in [m for m in sys.modules if m == "torch" or m.startswith("torch.")]:
        del sys.modules[name]


def test_idle_openmp_threads_sleep_when_aqm_loads_torch(
    mocker: MockerFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    _without_torch(mocker)
    monkeypatch.delenv(OMP, raising=False)
    idle_threads_sleep()
    assert os.environ[OMP] == OMP_WAIT_POLICY[1]


def test_the_users_openmp_wait_policy_wins(mocker: MockerFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    _without_torch(mocker)
    monkeypatch.setenv(OMP, "ACTIVE")
    idle_threads_sleep()
    assert os.environ[OMP] == "ACTIVE"


def test_a_process_with_torch_loaded_keeps_its_environment(
    mocker: MockerFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Too late to matter (OpenMP read its settings when torch loaded), so nothing is set."""
    mocker.patch.dict(sys.modules, {"torch": object()})
    monkeypatch.delenv(OMP, raising=False)
    idle_threads_sleep()
    assert OMP not in os.environ


def test_importing_other_libraries_sets_nothing(
    mocker: MockerFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only an import that loads torch sets the policy: a caller importing something else (a test
    of the import timing, say) keeps its environment."""
    _without_torch(mocker)
    sys.modules.pop("colorsys", None)
    monkeypatch.delenv(OMP, raising=False)
    import_libraries(("colorsys",))
    assert OMP not in os.environ


EXIT_PROBE = """\
import atexit, gc
atexit.register(lambda: print("frozen at exit", gc.get_freeze_count() > 0))
from auto_quantize_model.app.defaults import freeze_heap_at_exit
freeze_heap_at_exit()
freeze_heap_at_exit()
print("frozen before exit", gc.get_freeze_count() > 0)
"""


def test_the_heap_is_frozen_at_exit_only() -> None:
    """A fresh interpreter: nothing frozen while it runs, everything by the time the exit handlers
    registered before ours run."""
    done = subprocess.run([sys.executable, "-c", EXIT_PROBE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["frozen before exit False", "frozen at exit True"]


PROBE = """\
import json, os, sys
from auto_quantize_model.app.defaults import import_libraries
import_libraries()
import modelopt.torch.quantization.algorithms as algorithms
import torch
def compiled(f):
    return hasattr(f, "_torchdynamo_orig_callable")
inductor_at_import = "torch._inductor.compile_fx" in sys.modules
def double(x):
    return 2 * x
print(json.dumps({
    "decorated_by_modelopt": compiled(algorithms._get_log_softmax_dist),
    "inductor_at_import": inductor_at_import,
    "dynamo_disable": os.environ.get("TORCHDYNAMO_DISABLE"),
    "omp": os.environ.get("OMP_WAIT_POLICY"),
    "compile_after": compiled(torch.compile(double, dynamic=True)),
}))
"""


@pytest.mark.slow
def test_aqm_imports_modelopt_without_inductor_and_leaves_torch_compile_working() -> None:
    """A fresh process, as ``aqm run`` starts: ModelOpt's decorated function comes back plain,
    Inductor is not imported by the import, and ``torch.compile`` works as usual afterwards."""
    env = {k: v for k, v in os.environ.items() if k not in (DYNAMO_DISABLE, OMP)}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.splitlines()[-1])
    assert found == {
        "decorated_by_modelopt": False,
        "inductor_at_import": False,
        "dynamo_disable": None,
        "omp": OMP_WAIT_POLICY[1],
        "compile_after": True,
    }


# --------------------------------------------------------------------------- library imports


def test_import_libraries_times_only_what_is_missing(
    mocker: MockerFixture, caplog: pytest.LogCaptureFixture
) -> None:
    mocker.patch.dict(sys.modules)
    sys.modules.pop("colorsys", None)
    with caplog.at_level(logging.INFO, logger="auto_quantize_model"):
        assert import_libraries(("colorsys", "no_such_library_here")) > 0
    assert "colorsys" in sys.modules
    # the library that cannot be imported is left for its stage to report, and not claimed
    assert "imported colorsys in" in caplog.text
    assert "no_such_library_here" not in caplog.text
    assert import_libraries(("colorsys",)) == 0.0
