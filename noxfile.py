"""Sessions for tests, lint and type checking; ``nox -s bench`` is opt-in (needs a GPU)."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

CONSTRAINTS = ("-c", "constraints.txt")


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite on CPU (GPU-marked tests skip without CUDA)."""
    session.install(*CONSTRAINTS, "-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff lint and format check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", "src", "tests", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over src, tests and this file."""
    session.install(*CONSTRAINTS, "-e", ".[dev]")
    session.run("mypy", *session.posargs)


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Packed vs padded calibration benchmark (see BENCHMARKS.md); meant for a GPU machine."""
    session.install(*CONSTRAINTS, "-e", ".")
    session.run("aqm", "bench", *session.posargs)
