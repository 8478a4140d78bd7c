"""A finished run's folder, opened once for the commands that work from it (``frontier``, ``export``).

Both commands used to repeat the same steps in their own words (find the manifest, read and check
it, refuse the previous tool's manifests for model work, load ``pipeline.toml``, build the run's
first stages) and had drifted apart: export locked the folder it read, frontier did not. They
share this seam now: :func:`reading` holds the source folder's lock while a command reads it,
:meth:`FinishedRun.open` finds and checks the manifest, :meth:`FinishedRun.pipeline` and
:meth:`FinishedRun.search_state` refuse what a model-loading command cannot use, and
:meth:`FinishedRun.frontier` solves budgets from the manifest alone. The damage model behind
``--max-kl`` (:meth:`FinishedRun.damage_model`, :meth:`FinishedRun.bounded`) lives here too, so
both commands read the same measured points and refuse with the same words.

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
    from auto_quantize_model.artifacts import BudgetFrontier, MeasuredFrontier
    from auto_quantize_model.core.damage import Additivity, BoundChoice, DamageModel
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
        from auto_quantize_model.io.convert import project
        from auto_quantize_model.io.manifest import check_solvable
        from auto_quantize_model.spec_values import parse_budgets

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
        log.info(
            "frontier: %d budget(s) over %d groups (%s scores): exact least-score search, the run's own "
            "budget replayed through ModelOpt's search as a check",
            len(budgets),
            len(space.rows),
            space.method,
        )
        return solve_budgets(
            space,
            budgets,
            run_budget=manifest.scheme.effective_bits_target,
            run_choice=groups,
            workers=spec.workers,
            notes=notes,
            routing=manifest.routing,
            rare_expert_tokens=manifest.scheme.rare_expert_tokens,
            cost_model=manifest.scheme.cost_model,
        )

    # ------------------------------------------------------------------------------ measured damage

    def stored_measurements(self, *, strict: bool) -> tuple[MeasuredFrontier | None, tuple[str, ...]]:
        """The measured frontier points this run folder keeps, and where they were read.

        Two places hold them: the manifest's frontier summary (a pipeline with ``[frontier]
        measure = K``) and the folder's ``frontier.json`` (``aqm frontier RUN --measure K``,
        which writes into the run folder). Points of both are merged when they used the same
        held-out text; otherwise ``frontier.json``'s, the later, are kept. An unreadable
        ``frontier.json`` is an InputError when ``strict`` (``--max-kl`` needs its points), else
        a warning: the plain frontier rewrites that file anyway.
        """
        from auto_quantize_model.core.damage import merge_measured

        found: list[MeasuredFrontier] = []
        sources: list[str] = []
        summary = self.manifest.frontier
        if summary is not None and summary.measured is not None and summary.measured.points:
            found.append(summary.measured)
            sources.append(str(self.manifest_path))
        try:
            written = self._frontier_json_measured()
        except InputError as err:
            if strict:
                raise
            log.warning("frontier: %s; its measured points are not kept", err)
            written = None
        if written is not None and written.points:
            found.append(written)
            sources.append(str(self.folder / _frontier_json()))
        if not found:
            return None, ()
        measured = found[0]
        for later in found[1:]:
            measured = merge_measured(measured, later)
        return measured, tuple(sources)

    def _frontier_json_measured(self) -> MeasuredFrontier | None:
        from auto_quantize_model.artifacts import MeasuredFrontier
        from auto_quantize_model.io.convert import JSON_CONVERTER, json_problems, read_json

        path = self.folder / _frontier_json()
        if not path.is_file():
            return None
        data = read_json(path, "the frontier.json aqm frontier wrote")
        if not isinstance(data, dict) or data.get("measured") is None:
            return None
        try:
            return JSON_CONVERTER.structure(data["measured"], MeasuredFrontier)
        except Exception as err:  # cattrs reports every problem of the record at once
            problems = json_problems(err)
            first = problems[0] if problems else str(err)
            raise InputError(
                f"{path}: measured.{first}; rerun aqm frontier {self.folder} --measure 3 to write it again"
            ) from None

    def additivity(self) -> Additivity | None:
        """The validation's joint-vs-summed check, when the run validated with additivity on."""
        from auto_quantize_model.core.damage import additivity_of

        return additivity_of(self.manifest.validation)

    def check_measured(self, measured: MeasuredFrontier) -> None:
        """Each measured point's budget must solve, from this manifest, to the mix it measured (the
        same predicted score and bits); points of another run's scores (a ``frontier.json`` an
        earlier run left in this folder) are an InputError naming the first such point."""
        from auto_quantize_model.specs import FrontierSpec

        budgets = sorted({p.budget for p in measured.points})
        solved = self.frontier(FrontierSpec(bits=",".join(repr(b) for b in budgets), workers=1)).frontier
        for point in measured.points:
            again = solved.point(point.budget)
            if not (
                _close(again.total_score, point.predicted_score)
                and _close(again.effective_bits_lm, point.effective_bits_lm)
            ):
                raise InputError(
                    f"{self.folder}: the measured point at {point.budget:g} bits had predicted score "
                    f"{point.predicted_score:.6g}, but this run's manifest solves that budget to "
                    f"{again.total_score:.6g}: the points are another run's; {self._how()}"
                )

    def _how(self) -> str:
        return f"measure a few mixes first: aqm frontier {self.folder} --measure 3"

    def damage_model(self, measured: MeasuredFrontier | None, flag: str = "--max-kl") -> DamageModel:
        """The damage model of ``measured`` (the folder's stored points, checked against this
        manifest by :meth:`check_measured`), or one line saying how to get points:
        ``aqm frontier RUN --measure 3``."""
        from auto_quantize_model.core.damage import fit_damage

        if measured is None or not measured.points:
            raise InputError(
                f"{self.folder} has no measured frontier points: {flag} fits its damage model on them; "
                f"{self._how()}"
            )
        self.check_measured(measured)
        try:
            return fit_damage(measured.points, additivity=self.additivity())
        except InputError as err:
            raise InputError(f"{self.folder}: {err}; {self._how()}") from None

    def candidate_bits(self, bits: str | None, measured: MeasuredFrontier | None) -> str:
        """The budgets ``--max-kl`` chooses among: ``--bits``, else the run's ``[frontier] bits``, else
        the budgets of the points measured (and those between them), else one line asking for ``--bits``."""
        if bits is not None:
            return bits
        table = self.frontier_table()
        if table is not None:
            return table.bits
        written = self._frontier_json_budgets()
        if written:
            return ",".join(repr(b) for b in written)
        if measured is not None and measured.points:
            return ",".join(repr(b) for b in sorted({p.budget for p in measured.points}))
        raise InputError(f"{self.folder}: no budgets to choose among; pass --bits (e.g. --bits 4.5:16:0.25)")

    def _frontier_json_budgets(self) -> tuple[float, ...]:
        import json

        path = self.folder / _frontier_json()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            budgets = [float(point["budget"]) for point in data["points"]]
        except (OSError, ValueError, KeyError, TypeError):
            return ()
        return tuple(sorted(set(budgets)))

    def bounded(
        self, max_kl: float, bits: str | None, workers: int | None = None
    ) -> tuple[BudgetFrontier, MeasuredFrontier, DamageModel, BoundChoice]:
        """The cheapest mix whose predicted KL (upper end) is within ``max_kl``, from the stored points.

        Solves the candidate budgets (:meth:`candidate_bits`) from the manifest, fits the damage
        model and chooses (:func:`~auto_quantize_model.core.damage.choose_under_bound`); every
        refusal is one line naming ``--max-kl``. Nothing is loaded or written.
        """
        from auto_quantize_model.core.damage import choose_under_bound
        from auto_quantize_model.errors import ConfigError
        from auto_quantize_model.specs import FrontierSpec

        measured, _ = self.stored_measurements(strict=True)
        model = self.damage_model(measured)
        assert measured is not None  # damage_model refuses a run without points
        candidates = self.candidate_bits(bits, measured)
        budget_frontier = self.frontier(FrontierSpec(bits=candidates, workers=workers))
        try:
            choice = choose_under_bound(budget_frontier.frontier.points, model, max_kl)
        except ConfigError as err:
            raise ConfigError(f"--max-kl {max_kl:g}: {err}") from None
        except InputError as err:
            raise InputError(f"--max-kl {max_kl:g}: {err} (budgets {candidates})") from None
        return budget_frontier, measured, model, choice


def _close(a: float, b: float) -> bool:
    import math

    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-300)


def _frontier_json() -> str:
    from auto_quantize_model.render.frontier import JSON_FILE

    return JSON_FILE
