"""A finished run's folder, opened once for the commands that work from it (``frontier``, ``export``).

Both commands used to repeat the same steps in their own words (find the manifest, read and check
it, refuse the previous tool's manifests for model work, load ``pipeline.toml``, build the run's
first stages) and had drifted apart: export locked the folder it read, frontier did not. They
share this seam now: :func:`reading` holds the source folder's lock while a command reads it,
:meth:`FinishedRun.open` finds and checks the manifest, :meth:`FinishedRun.pipeline` and
:meth:`FinishedRun.search_state` refuse what a model-loading command cannot use, and
:meth:`FinishedRun.frontier` solves budgets from the manifest alone.

Only the standard library, attrs and our light modules are imported at the top.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from auto_quantize_model.app.folders import INDEX_NAME, MANIFEST_SUFFIX, PIPELINE_FILE
from auto_quantize_model.app.lock import FolderBusy, FolderLock
from auto_quantize_model.app.logs import PACKAGE_LOGGER
from auto_quantize_model.app.runs import read_run, refuse_live_owner
from auto_quantize_model.errors import InputError

if TYPE_CHECKING:
    from auto_quantize_model.artifacts import BudgetFrontier
    from auto_quantize_model.manifest_records import Manifest
    from auto_quantize_model.specs import FrontierSpec, PipelineSpec

log = logging.getLogger(PACKAGE_LOGGER)

_UNLOCKABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
"""Why a lock file cannot be made in a folder that can still be read (someone else's, read-only)."""


@contextlib.contextmanager
def reading(source: Path, command: tuple[str, ...] = (), doing: str = "read") -> Iterator[None]:
    """Hold the lock ``aqm run`` takes on the run folder behind ``source`` while it is read.

    A run writing the folder (its manifest, its search state) is refused with one line naming it,
    and no run can start there until the command has read what it needs. A folder this user
    cannot write cannot be locked, nor written by this user's runs: there only ``run.json``'s
    record of a live owner refuses. A ``source`` that does not exist is left to
    :meth:`FinishedRun.open` to word.
    """
    folder = source if source.is_dir() else source.parent
    if not folder.is_dir():
        yield
        return
    try:
        lock = FolderLock.acquire(folder, command)
    except FolderBusy as busy:
        raise _busy(busy, doing) from None
    except OSError as err:
        if err.errno not in _UNLOCKABLE:
            raise
        record = read_run(folder)
        if record is not None:
            try:
                refuse_live_owner(folder, record)
            except FolderBusy as busy:
                raise _busy(busy, doing) from None
        yield
        return
    with lock:
        yield


def _busy(busy: FolderBusy, doing: str) -> InputError:
    who = busy.holder.describe() if busy.holder is not None else "another aqm process"
    return InputError(f"{busy.folder} is in use by {who}; {doing} it once that has finished (or stop it)")


def locate_manifest(source: Path) -> Path:
    """The one manifest of a run folder, or ``source`` itself when it names a manifest file."""
    if source.is_file():
        return source
    if not source.exists():
        raise InputError(f"{source} does not exist: pass a run folder of aqm run (or a *{MANIFEST_SUFFIX})")
    if not source.is_dir():
        raise InputError(f"{source} is neither a folder nor a file: pass a run folder of aqm run")
    found = sorted(source.glob(f"*{MANIFEST_SUFFIX}"))
    if len(found) == 1:
        return found[0]
    if found:
        names = ", ".join(path.name for path in found)
        raise InputError(f"{source} holds {len(found)} manifests ({names}): pass the one to use")
    if (source / INDEX_NAME).is_file():
        raise InputError(
            f"{source} is a sweep folder: run the command on one of its points (a subfolder listed in "
            f"{INDEX_NAME})"
        )
    raise InputError(
        f"{source} holds no *{MANIFEST_SUFFIX}: not a finished run folder (an interrupted run finishes "
        f"with aqm resume {source})"
    )


@attrs.frozen(eq=False)
class FinishedRun:
    """A run folder's manifest, read and checked; what else the folder holds is read on demand."""

    manifest_path: Path
    manifest: Manifest

    @classmethod
    def open(cls, source: Path) -> FinishedRun:
        """Find the folder's manifest (or take ``source`` as one) and read it; one line if it cannot be."""
        from auto_quantize_model.io.manifest_file import read_manifest

        path = locate_manifest(source)
        return cls(path, read_manifest(path))

    @property
    def folder(self) -> Path:
        return self.manifest_path.parent

    def frontier_table(self) -> FrontierSpec | None:
        """The ``[frontier]`` table of the run's ``pipeline.toml`` (ours only), when it had one."""
        from auto_quantize_model.io.pipeline_file import load_pipeline

        toml = self.folder / PIPELINE_FILE
        if self.manifest.origin != "aqm" or not toml.is_file():
            return None
        return load_pipeline(toml).frontier

    def pipeline(self, flag: str) -> PipelineSpec:
        """The run's pipeline, for ``flag`` (``--checkpoint``, ``--measure``), which loads the run's model.

        The previous tool's manifests and folders without ``pipeline.toml`` are refused, naming
        what to do instead.
        """
        from auto_quantize_model.io.pipeline_file import load_pipeline

        if self.manifest.origin != "aqm":
            raise InputError(
                f"{self.folder}: {flag} needs a run folder of aqm run (its {PIPELINE_FILE}); this manifest "
                f"is the previous tool's: go on without {flag}"
            )
        toml = self.folder / PIPELINE_FILE
        if not toml.is_file():
            raise InputError(
                f"{self.folder} has no {PIPELINE_FILE}: {flag} loads the run's model from it; point it at "
                "the folder aqm run wrote"
            )
        return load_pipeline(toml)

    def search_state(self, pipeline: PipelineSpec, flag: str) -> Path:
        """The run's saved search state, which ``flag`` restores; one line when there is none."""
        from auto_quantize_model.backend.modelopt.checkpoint import STATE_FILE, checkpoint_file

        checkpoint = pipeline.autoquant.checkpoint
        state = Path(checkpoint_file(checkpoint)) if checkpoint is not None else self.folder / STATE_FILE
        if not state.is_file():
            raise InputError(
                f"{state} does not exist: {flag} restores the run's saved search state; run the pipeline "
                f"again (aqm run {self.folder / PIPELINE_FILE} --output NEW_FOLDER) to make one"
            )
        return state

    def frontier(self, spec: FrontierSpec) -> BudgetFrontier:
        """The frontier of the manifest: its groups, ModelOpt's order and fixed groups, no model.

        The manifest is checked before anything is solved (``check_solvable``: a NaN score is
        named here, not by the solver's traceback).
        """
        from auto_quantize_model.artifacts import GroupScore
        from auto_quantize_model.core.frontier_points import search_method, search_space, solve_budgets
        from auto_quantize_model.core.frontier_replay import solver_processes
        from auto_quantize_model.io.convert import project
        from auto_quantize_model.io.manifest import check_solvable
        from auto_quantize_model.specs import parse_budgets

        where, manifest = self.manifest_path, self.manifest
        check_solvable(manifest, where)
        groups = [project(group, GroupScore) for group in manifest.groups]
        try:
            space, notes = search_space(
                groups,
                search_method(manifest.scheme.method, str(where)),
                order=manifest.search_order,
                fixed=manifest.fixed_groups,
                groups_in_order=False,
            )
        except InputError as err:
            message = str(err)
            raise InputError(message if message.startswith(str(where)) else f"{where}: {message}") from None
        if manifest.origin == "legacy":
            notes = (
                *notes,
                "the previous tool's manifest does not say which groups belong to the language model: "
                "budgets are bits over every costed weight, as its own auto_quantize_bits were",
            )
        budgets = parse_budgets(spec.bits)
        if space.method == "gradient":
            log.info(
                "frontier: %d budget(s) over %d groups: one CBC solve each (about 0.25 s per budget on one "
                "core), %d process(es)",
                len(budgets),
                len(space.rows),
                solver_processes(len(space.rows), len(budgets), spec.workers),
            )
        else:
            log.info(
                "frontier: %d budget(s) over %d groups (kl_div bisection, no solver)",
                len(budgets),
                len(space.rows),
            )
        return solve_budgets(
            space,
            budgets,
            run_budget=manifest.scheme.effective_bits_target,
            run_choice=groups,
            workers=spec.workers,
            notes=notes,
        )
