"""The one door to ModelOpt: every use of its internals lives in this folder.

``patches`` (run-time patches, each a context manager with an undo), ``state`` (reading the search
state), ``checkpoint`` (the settings record and raw-score sidecar beside ModelOpt's state file:
the resume protocol), ``search`` (one ``mtq.auto_quantize`` call under those patches), ``plan``
(what the call is asked to do) and ``formats`` (what a format name becomes for ModelOpt). All of
it was written against ModelOpt 0.47, whose private names it uses; :func:`import_modelopt`
refuses any other version before a patch could misfire. Nothing here imports torch or ModelOpt at
module level.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import threading
import warnings
from collections.abc import Iterator
from typing import Any

from auto_quantize_model.errors import ConfigError

SUPPORTED = (0, 47)
"""The ``major.minor`` of ModelOpt this adapter was written and tested for (0.47.x)."""
SUPPORTED_RANGE = ">=0.47,<0.48"

_VERSION = re.compile(r"^\s*(\d+)\.(\d+)")


def check_version(version: str) -> None:
    """Refuse a ModelOpt outside 0.47.x: the patches reach into private names of that version.

    ``version`` is ``modelopt.__version__`` (passed in so both sides of the check are testable).
    Pre-releases and local builds of 0.47 (``0.47.0rc1``, ``0.47.1+cu12``) are accepted.
    """
    match = _VERSION.match(version)
    if match is None or (int(match[1]), int(match[2])) != SUPPORTED:
        raise ConfigError(
            f"nvidia-modelopt {version} is installed, but auto-quantize-model supports {SUPPORTED_RANGE} "
            f"only (it patches internals of that version); install it with "
            f"pip install 'nvidia-modelopt{SUPPORTED_RANGE}'"
        )


def installed_version() -> str:
    """``modelopt.__version__`` (a cheap import: the top package reads package metadata only)."""
    import modelopt

    return str(modelopt.__version__)


def import_off_stack(name: str) -> Any:
    """Import ``name`` on a short-lived thread and return the module.

    Importing ModelOpt imports pulp, whose solver probes keep a traceback from import time. Its
    frames' ``f_back`` chain would pin the importing caller's locals (here: the whole model) for
    the life of the process, so a second model loaded in the same process would sit next to the
    first on the GPU. A fresh thread's stack has no caller frames to pin.
    """
    found: dict[str, Any] = {}

    def target() -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is not tested with current version of modelopt.*")
            found["module"] = importlib.import_module(name)

    thread = threading.Thread(target=target, name=f"import {name}")
    thread.start()
    thread.join()
    if "module" not in found:  # the import failed: repeat it here so its error surfaces normally
        return importlib.import_module(name)
    return found["module"]


DYNAMO_DISABLE = "TORCHDYNAMO_DISABLE"


@contextlib.contextmanager
def compile_decorators_off() -> Iterator[None]:
    """While ModelOpt is imported, its module-level ``@torch.compile`` function stays a plain function.

    Why: decorating a function with ``torch.compile`` asks the Inductor backend for its settings,
    which imports ``torch._inductor.compile_fx`` (about 540 modules; 1.5 of the 3.6 CPU seconds
    that ``import modelopt.torch.quantization`` takes on the 2-core machine). ModelOpt 0.47
    decorates one function on that import, ``algorithms._get_log_softmax_dist``: the
    KL-divergence score under tensor parallelism, which an ``aqm`` run never sets up. With
    ``TORCHDYNAMO_DISABLE=1``, ``torch.compile`` hands a function back undecorated; torch reads
    the variable only when a function is decorated, so every ``torch.compile`` after the import
    works as usual (torch's own operator tests toggle the variable around a block the same way).
    A value the user set is left as it is. Used by ``aqm``'s up-front import only: in a user's
    own process, importing ModelOpt through RunAutoQuant leaves it exactly as ModelOpt made it.
    """
    if DYNAMO_DISABLE in os.environ:
        yield
        return
    os.environ[DYNAMO_DISABLE] = "1"
    try:
        yield
    finally:
        os.environ.pop(DYNAMO_DISABLE, None)


def import_modelopt(name: str = "modelopt.torch.quantization") -> Any:
    """ModelOpt's ``name`` module, after checking the installed version is one we support."""
    check_version(installed_version())
    return import_off_stack(name)
