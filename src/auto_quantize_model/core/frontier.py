"""The budget frontier: AutoQuant's per-group format choice re-solved for many effective-bits budgets.

One scoring pass gives every recipe group a score and a cost per format; the effective-bits budget
only enters ModelOpt's final search. This module repeats that search, with no model and no GPU,
for as many budgets as wanted, and reproduces ModelOpt 0.47's own choice, tie-breaks included.

How ModelOpt 0.47 searches (``modelopt/torch/quantization/algorithms.py``):

* Each recipe group is one row of ``candidate_stats``: its formats sorted by compression (fewest
  bits first, ``NONE`` last), ``costs`` = weights x bits / 16 and ``scores``, clamped by
  ``initialize_candidate_stats`` so that a format never scores above the one listed before it
  (``min(score, previous)``). The search sees only these clamped scores (:func:`search_scores`).
* ``run_search`` turns the budget into a weight size: ``sum(uncompressed_cost) * bits / 16``.
  ``RunAutoQuant`` passes ``bits`` = :func:`model_constraint` of the LM budget, which charges
  non-LM weights (a vision tower) 16 bits; the same is done here, so budgets are LM bits.
* ``gradient``: a 0/1 integer program solved by CBC through PuLP (``LPS`` in
  ``modelopt/torch/opt/searcher.py``): one binary per (group, format), one-hot rows, total cost
  at most the budget; tried again with the cost also at least 99 %, then 90 % of the budget if
  CBC reports anything but ``Optimal``. Equal (score, cost) pairs are common (FP8 clamped to
  INT8's score) and CBC breaks such ties by the problem's exact layout: column names
  ``z<row>_<format>`` sorted as text, rows in order. The same problem is built here, row for
  row, so CBC makes the same choice; groups with one format only (disabled layers, a vision
  tower) are rows too and must stay in place, or the tie-breaks move. CBC's tolerances are
  absolute: with scores of order 1e-7 (a tiny model) it stops at its first mix and calls it
  optimal, and with larger ones it can still stop ~1 % above the optimum. ModelOpt keeps what
  CBC returns, and so does this module (:attr:`FrontierPoint.non_monotone` shows the damage).
* ``kl_div``: 100 bisection steps on a score threshold; each group takes its first format
  scoring at most the threshold. The last step's choice is kept even when an earlier one met
  the budget (``is_satisfied`` then says False). Replayed step by step here.
* A budget below the cheapest mix is refused before calibration (``_verify_resolved_constraint``);
  here it gives an unreachable point holding the cheapest mix.

``mtq.get_auto_quantize_config(state, {"effective_bits": b})`` re-solves the same way, but
needs torch, ModelOpt and the pickled search state; this module needs plain numbers only.
PuLP is imported inside the gradient solver only.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import operator
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import attrs

from auto_quantize_model.core.bits import effective_bits, model_constraint, unquantized_weights
from auto_quantize_model.core.scores import NO_QUANT, group_name, has_quantized_format, parse_label
from auto_quantize_model.errors import ConfigError, InputError

if TYPE_CHECKING:
    from auto_quantize_model.artifacts import GroupScore

Method = Literal["gradient", "kl_div"]

LOWER_BOUNDS: tuple[float | None, ...] = (None, 0.99, 0.90)
"""ModelOpt's retry schedule for the gradient search (weight cost model): cost floors as budget fractions."""

KL_DIV_STEPS = 100
"""Bisection steps of ModelOpt's threshold search."""

FEASIBILITY_TOLERANCE = 1e-12
"""ModelOpt's slack (relative to the uncompressed size) when it checks that a budget is reachable."""

MAX_BUDGETS = 10_000
"""More budgets than this in one range is almost surely a typo'd step."""

REMAINING_LM = "(LM weights outside the groups)"
REMAINING_OTHER = "(non-LM weights)"

_BUDGET_FORMS = (
    "a number (7.5), a comma list (6,7,8.5) or a range start:stop:step (4.5:8:0.25, stop included)"
)


# --------------------------------------------------------------------------------------------------
# Budgets
# --------------------------------------------------------------------------------------------------


def _budget_value(text: str, part: str) -> float:
    try:
        value = float(part)
    except ValueError:
        raise ConfigError(
            f"budgets {text!r}: {part.strip()!r} is not a number; expected {_BUDGET_FORMS}"
        ) from None
    if not math.isfinite(value) or not 0.0 < value <= 16.0:
        raise ConfigError(
            f"budgets {text!r}: {part.strip()!r} is outside (0, 16]; effective bits are bits per weight"
        )
    return value


def parse_budgets(text: str) -> tuple[float, ...]:
    """Effective-bits budgets from ``7.5``, ``6,7,8.5`` or ``4.5:8:0.25`` (stop included).

    Range values after the start are ``start + i * step`` (not accumulated) rounded to 9
    decimals, so ``4.5:5:0.1`` holds 4.8 rather than 4.800000000000001 and ends at exactly 5.0;
    the stop is included when it lies within 1e-9 of a step. Returned sorted, without duplicates.
    """
    stripped = text.strip()
    if not stripped:
        raise ConfigError(f"budgets {text!r}: empty; expected {_BUDGET_FORMS}")
    if ":" in stripped:
        parts = stripped.split(":")
        if len(parts) != 3:
            raise ConfigError(f"budgets {text!r}: a range has three parts; expected {_BUDGET_FORMS}")
        start, stop = _budget_value(text, parts[0]), _budget_value(text, parts[1])
        try:
            step = float(parts[2])
        except ValueError:
            raise ConfigError(f"budgets {text!r}: step {parts[2].strip()!r} is not a number") from None
        if not math.isfinite(step) or step <= 0.0:
            raise ConfigError(
                f"budgets {text!r}: the step must be a positive number, got {parts[2].strip()!r}"
            )
        if stop < start:
            raise ConfigError(f"budgets {text!r}: start {start:g} is above stop {stop:g}")
        count = math.floor((stop - start) / step + 1e-9) + 1
        if count > MAX_BUDGETS:
            raise ConfigError(f"budgets {text!r}: {count} budgets; at most {MAX_BUDGETS} (use a larger step)")
        values = [start] + [min(round(start + index * step, 9), stop) for index in range(1, count)]
    else:
        values = [_budget_value(text, part) for part in stripped.split(",")]
    return tuple(sorted(set(values)))


# --------------------------------------------------------------------------------------------------
# The search space
# --------------------------------------------------------------------------------------------------


def search_scores(scores: Iterable[float]) -> tuple[float, ...]:
    """Scores as ModelOpt's search uses them: each one at most the one before it.

    ``initialize_candidate_stats`` keeps ``min(score, previous)`` along the format order, with
    the same argument order as here (it matters for NaN). Applied to ModelOpt's raw scores this
    gives its clamped ones bit for bit; applied to clamped scores it changes nothing, so it is
    safe on either kind of ``GroupScore.scores``.
    """
    out: list[float] = []
    previous = math.inf
    for score in scores:
        current = min(score, previous)
        out.append(current)
        previous = current
    return tuple(out)


@attrs.frozen
class SearchRow:
    """One recipe group as ModelOpt's search sees it: one row of its integer program."""

    name: str
    formats: tuple[str, ...]
    """ModelOpt's order: fewest bits first, ``NONE`` last where it may be chosen."""
    bits: tuple[float, ...]
    costs: tuple[float, ...]
    """Weights x bits / 16 per format, as ModelOpt costs them."""
    scores: tuple[float, ...]
    """Search scores (clamped as ModelOpt ran its search, see :func:`search_scores`)."""
    weights: float
    """The group's size at 16 bits (ModelOpt's ``uncompressed_cost``): the budget's denominator."""
    lm: bool = True
    """Part of the language model; non-LM rows (a vision tower) only weigh on the whole-model bits."""

    def __attrs_post_init__(self) -> None:
        sizes = {len(self.formats), len(self.bits), len(self.costs), len(self.scores)}
        if len(sizes) != 1 or not self.formats:
            raise InputError(
                f"recipe group {self.name}: formats, bits, costs and scores must have one entry per format"
            )

    @property
    def reported(self) -> bool:
        """A language-model group with a quantized format to choose: a column of the frontier."""
        return self.lm and has_quantized_format(self.formats)


@attrs.frozen
class SearchSpace:
    """Every row of ModelOpt's search, in its ``candidate_stats`` order, and its method."""

    rows: tuple[SearchRow, ...]
    method: Method
    exact_order: bool = True
    """False when rows with one format had to be placed without knowing ModelOpt's order; the
    budget arithmetic is still exact, but CBC may break ties between equal formats differently."""

    @property
    def lm_weights(self) -> float:
        return functools.reduce(operator.add, (r.weights for r in self.rows if r.lm), 0.0)

    @property
    def other_weights(self) -> float:
        return functools.reduce(operator.add, (r.weights for r in self.rows if not r.lm), 0.0)


def _number(value: Any) -> float:
    """A float from a Python number or a one-element tensor (ModelOpt stores both)."""
    item = getattr(value, "item", None)
    return float(item() if callable(item) else value)


def _label(recipe: object) -> tuple[str, float]:
    try:
        return parse_label(str(recipe))
    except ValueError as err:
        raise InputError(f"search state: {err}") from None


def space_from_state(
    state: Mapping[str, Any],
    name_map: Callable[[str], str] = lambda name: name,
    is_lm: Callable[[str], bool] = lambda name: True,
) -> SearchSpace:
    """The exact search space of a ModelOpt search state (``mtq.auto_quantize``'s second result
    or its ``checkpoint=`` file, already unpickled).

    Reads ``method`` and ``candidate_stats`` (formats, clamped scores, costs, module names,
    ``uncompressed_cost``) and nothing else, so any state with those keys works. Names go
    through ``name_map`` (e.g. ``TextLM`` names to full-model names); a group is LM when
    ``is_lm`` holds for all its mapped module names.
    """
    stats: Mapping[str, Mapping[str, Any]] = state["candidate_stats"]
    method = str(state.get("method", ""))
    if method not in ("gradient", "kl_div"):
        raise InputError(f"the search state's method is {method!r}; expected 'gradient' or 'kl_div'")
    rows = []
    for key, entry in stats.items():
        name = name_map(group_name(key))
        labels = [_label(recipe) for recipe in entry["formats"]]
        names = tuple(label for label, _ in labels)
        costs = tuple(_number(cost) for cost in entry["costs"])
        if "uncompressed_cost" in entry:
            weights = _number(entry["uncompressed_cost"])
        else:  # states saved before ModelOpt recorded it: the NONE cost
            weights = costs[names.index(NO_QUANT)]
        modules = [name_map(m) for m in entry.get("module_names", ())] or [name]
        rows.append(
            SearchRow(
                name=name,
                formats=names,
                bits=tuple(bits for _, bits in labels),
                costs=costs,
                scores=tuple(_number(score) for score in entry["scores"]),
                weights=weights,
                lm=all(is_lm(m) for m in modules),
            )
        )
    return SearchSpace(rows=tuple(rows), method="gradient" if method == "gradient" else "kl_div")


def fixed_row(name: str, weights: float, *, lm: bool) -> SearchRow:
    """A group ModelOpt could only leave unquantized (disabled layers, vision): a one-format row."""
    return SearchRow(
        name=name,
        formats=(NO_QUANT,),
        bits=(16.0,),
        costs=(weights,),
        scores=(0.0,),
        weights=weights,
        lm=lm,
    )


def _row_from_group(group: GroupScore) -> SearchRow:
    weights = unquantized_weights(group)
    return SearchRow(
        name=group.name,
        formats=group.formats,
        bits=group.bits,
        costs=group.costs,
        scores=search_scores(group.scores),
        weights=weights,
        lm=True,
    )


def space_from_scores(
    groups: Sequence[GroupScore],
    method: Method,
    *,
    lm_weights: float | None = None,
    other_weights: float = 0.0,
    fixed: Sequence[SearchRow] = (),
    order: Sequence[str] = (),
) -> SearchSpace:
    """The search space rebuilt from ``SensitivityScores``/manifest groups (no ModelOpt state).

    ``groups`` are the LM groups with formats to choose; their scores may be ModelOpt's raw or
    clamped ones (:func:`search_scores` makes both the search's). ``fixed`` are one-format rows
    (:func:`fixed_row`) and ``order`` every row's name in ModelOpt's order; without them the
    budget is still exact when ``lm_weights``/``other_weights`` (counted as in
    ``RunAutoQuant``) say how much the groups leave out: that remainder becomes 16-bit rows at
    the end, and ``exact_order`` is False because CBC's tie-breaks depend on where rows sit.
    """
    rows = [_row_from_group(group) for group in groups] + list(fixed)
    if order:
        by_name = {row.name: row for row in rows}
        missing = sorted(set(order) - set(by_name))
        unplaced = sorted(set(by_name) - set(order))
        if missing or unplaced or len(by_name) != len(rows):
            raise InputError(
                "the search order must name every group and fixed row once "
                f"(not found: {missing[:3]}, not ordered: {unplaced[:3]})"
            )
        rows = [by_name[name] for name in order]
    exact = bool(order) or not fixed
    covered_lm = functools.reduce(operator.add, (r.weights for r in rows if r.lm), 0.0)
    covered_other = functools.reduce(operator.add, (r.weights for r in rows if not r.lm), 0.0)
    for what, given, covered, name, lm in (
        ("lm_weights", lm_weights, covered_lm, REMAINING_LM, True),
        ("other_weights", other_weights, covered_other, REMAINING_OTHER, False),
    ):
        if given is None:
            continue
        rest = given - covered
        if rest < -0.5:
            raise InputError(
                f"{what} = {given:g} is smaller than the {covered:g} weights of the groups given; "
                "pass the count RunAutoQuant used (or leave it out)"
            )
        if rest > 0.5:
            rows.append(fixed_row(name, float(round(rest)), lm=lm))
            exact = False
    if not any(row.reported for row in rows):
        raise InputError("no language-model group has a quantized format: there is no frontier to solve")
    return SearchSpace(rows=tuple(rows), method=method, exact_order=exact)


# --------------------------------------------------------------------------------------------------
# The two searchers
# --------------------------------------------------------------------------------------------------


def lp_problem(
    costs: Sequence[Sequence[float]],
    scores: Sequence[Sequence[float]],
    max_weight: float,
    lower: float | None,
) -> tuple[Any, list[list[Any]]]:
    """ModelOpt's ``LPS`` problem for one budget and cost floor, built the same way.

    Same variable names (``z<row>_<format>``: PuLP sorts columns by name), same constraint
    order, coefficients entered as ``variable * number`` (PuLP drops zero terms that way), so
    the MPS file CBC reads is byte-identical to ModelOpt's and CBC breaks ties the same way.
    Returns the PuLP problem and its binaries per row.
    """
    import pulp  # type: ignore[import-untyped]

    variables = [
        [pulp.LpVariable(f"z{row}_{col}", lowBound=0, upBound=1, cat=pulp.LpBinary) for col in range(len(rc))]
        for row, rc in enumerate(costs)
    ]
    pairs = list(zip(variables, scores, costs, strict=True))
    problem = pulp.LpProblem(name="AutoQuantize", sense=pulp.LpMinimize)
    problem += (pulp.lpSum(z * s for zs, ss, _ in pairs for z, s in zip(zs, ss, strict=True)), "L")
    for zs in variables:
        problem += pulp.lpSum(zs) == 1
    total = pulp.lpSum(z * c for zs, _, cs in pairs for z, c in zip(zs, cs, strict=True))
    problem += total <= max_weight
    if lower is not None:
        problem += total >= lower * max_weight
    return problem, variables


def _lp_select(
    costs: Sequence[Sequence[float]], scores: Sequence[Sequence[float]], max_weight: float
) -> tuple[tuple[int, ...], str]:
    """CBC on :func:`lp_problem` with ModelOpt's cost-floor retries; each row's index and the status.

    The index is the first largest binary of the row, like ModelOpt's ``np.argmax``.
    """
    import pulp

    selection: tuple[int, ...] = ()
    status = "Not Solved"
    for lower in LOWER_BOUNDS:
        problem, variables = lp_problem(costs, scores, max_weight, lower)
        problem.solve(pulp.PULP_CBC_CMD(msg=False))
        status = pulp.LpStatus[problem.status]
        selection = tuple(_first_largest([z.varValue or 0.0 for z in zs]) for zs in variables)
        if status == "Optimal":
            break
    return selection, status


def _first_largest(values: Sequence[float]) -> int:
    best = 0
    for index, value in enumerate(values):
        if value > values[best]:
            best = index
    return best


def _lp_select_many(
    job: tuple[Sequence[Sequence[float]], Sequence[Sequence[float]], Sequence[float]],
) -> list[tuple[tuple[int, ...], str]]:
    """Worker entry point: several budgets of one search space (a top-level function for pickling)."""
    costs, scores, max_weights = job
    return [_lp_select(costs, scores, max_weight) for max_weight in max_weights]


def _threshold_select(rows: Sequence[SearchRow], max_weight: float) -> tuple[tuple[int, ...], bool]:
    """ModelOpt's kl_div search: bisection on a score threshold, 100 steps, the last step kept."""
    all_scores = [score for row in rows for score in row.scores]
    if not all_scores:
        return (), False
    low, high = min(all_scores), max(all_scores)
    threshold = (low + high) / 2.0
    selection: tuple[int, ...] = ()
    total = 0.0
    for _ in range(KL_DIV_STEPS):
        picked = []
        total = 0.0
        for row in rows:
            index = 0
            for candidate, score in enumerate(row.scores):
                if score <= threshold:
                    index = candidate
                    break
            picked.append(index)
            total += row.costs[index]
        selection = tuple(picked)
        if total <= max_weight:
            high = threshold
        else:
            low = threshold
        threshold = (low + high) / 2.0
    return selection, total <= max_weight


def _cheapest(rows: Sequence[SearchRow]) -> tuple[int, ...]:
    """Each row's cheapest format (lower search score, then ModelOpt's order, on equal cost)."""
    return tuple(min(zip(row.costs, row.scores, range(len(row.costs)), strict=True))[2] for row in rows)


# --------------------------------------------------------------------------------------------------
# The frontier
# --------------------------------------------------------------------------------------------------


@attrs.frozen
class FrontierPoint:
    """ModelOpt's choice at one budget and what it reaches."""

    budget: float
    """Asked-for effective bits over the language model's weights."""
    constraint: float
    """Effective bits over every costed weight: what ModelOpt is given (:func:`model_constraint`)."""
    formats: tuple[str, ...]
    """Chosen format of every :attr:`Frontier.groups` entry, in that order."""
    effective_bits_lm: float
    effective_bits_model: float
    total_score: float
    """Predicted damage: the sum of the chosen formats' search scores (ModelOpt's ``best["score"]``)."""
    reachable: bool
    """False when even the cheapest mix exceeds the budget; the point then holds that mix."""
    satisfied: bool
    """ModelOpt's ``is_satisfied``: CBC proved an optimum (gradient) or the last threshold fits (kl_div)."""
    non_monotone: bool = False
    """This budget is above the previous point's and the predicted score is worse (higher)."""


@attrs.frozen
class Frontier:
    """Per-group formats and predicted scores over a range of budgets, from one scoring pass."""

    method: Method
    groups: tuple[str, ...]
    """The LM groups with a quantized format to choose, in ModelOpt's order."""
    points: tuple[FrontierPoint, ...]
    """One per budget, budgets ascending."""
    format_bits: tuple[tuple[str, float], ...]
    """Every format the groups choose from and its bits, fewest bits first (``NONE`` last)."""
    min_bits_lm: float
    """The fewest LM effective bits any mix reaches (every group on its cheapest format)."""
    min_bits_model: float
    lm_weights: float
    other_weights: float
    exact_order: bool
    """See :attr:`SearchSpace.exact_order`."""
    seconds: float
    """Wall time of the solve (CBC runs included)."""

    def point(self, budget: float) -> FrontierPoint:
        """The point of ``budget`` (to 1e-9), for looking up e.g. the run's own budget."""
        for candidate in self.points:
            if abs(candidate.budget - budget) <= 1e-9:
                return candidate
        raise KeyError(f"no frontier point at {budget:g} bits")


@attrs.frozen
class FormatChange:
    """A group whose format differs from the previous budget's point."""

    group: str
    before: str
    after: str


def step_changes(frontier: Frontier) -> tuple[tuple[FormatChange, ...], ...]:
    """Per point, the groups whose format changed since the previous point (none for the first)."""
    out: list[tuple[FormatChange, ...]] = [()] if frontier.points else []
    for previous, current in itertools.pairwise(frontier.points):
        out.append(
            tuple(
                FormatChange(name, before, after)
                for name, before, after in zip(
                    frontier.groups, previous.formats, current.formats, strict=True
                )
                if before != after
            )
        )
    return tuple(out)


def _sequential_sum(values: Iterable[float]) -> float:
    """Left-to-right float sum from 0, as ModelOpt accumulates costs and scores (``sum`` may
    compensate rounding on newer Pythons, which would differ in the last bit)."""
    return functools.reduce(operator.add, values, 0)


IN_PROCESS_BELOW = 2000
"""Rows x budgets below which the default solves every budget in this process.

A worker process costs about 0.6 s to start (a fresh interpreter importing PuLP), and a solve
costs roughly 1 ms per row x budget (measured on 2 cores: 17 rows x 17 budgets, 0.5 s in
process and 1.2 s with 2 workers; 17 x 60, 2.0 s against 2.6 s; 250 x 60, 18 s against 15 s).
Below this size the workers' start-up eats what they would save."""


def solver_processes(rows: int, budgets: int, requested: int | None = None) -> int:
    """Processes that share ``budgets`` CBC solves of ``rows`` rows each.

    A requested count is obeyed (capped at one per budget); by default a problem smaller than
    :data:`IN_PROCESS_BELOW` is solved here and a larger one gets one process per available CPU.
    """
    if requested is not None:
        if requested < 1:
            raise ConfigError(f"workers must be at least 1, got {requested}")
        return min(requested, max(budgets, 1))
    if rows * budgets < IN_PROCESS_BELOW:
        return 1
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(available, budgets))


_WORKER_CODE = "import sys; from auto_quantize_model.core.frontier import run_worker; run_worker(sys.argv[1])"


def run_worker(job_path: str) -> None:
    """A CBC worker process: solve the budgets of a job file, print the choices as JSON.

    The job holds costs, scores and weight budgets; JSON floats round-trip exactly (``repr``),
    so the worker's problems are the parent's to the last bit.
    """
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    results = _lp_select_many((job["costs"], job["scores"], job["max_weights"]))
    sys.stdout.write(json.dumps([[list(selection), status] for selection, status in results]))


def _solve_lp(
    rows: Sequence[SearchRow], max_weights: Sequence[float], workers: int
) -> list[tuple[tuple[int, ...], str]]:
    """CBC for every budget, in several worker processes when there is more than one budget.

    Each solve is a PuLP model build and MPS file (tens of ms of Python, holding the GIL) and
    a CBC process (tens to hundreds of ms), so the budgets are shared among fresh Python
    processes rather than threads. They are started as plain subprocesses, not through
    ``multiprocessing``: that would re-run an unguarded calling script, or fork a process
    holding torch's threads and CUDA. Budgets are dealt round-robin, since the hard ones
    (close to the cheapest mix) sit together.
    """
    costs = [list(row.costs) for row in rows]
    scores = [list(row.scores) for row in rows]
    if workers <= 1 or len(max_weights) <= 1:
        return _lp_select_many((costs, scores, max_weights))
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    out: list[tuple[tuple[int, ...], str]] = [((), "")] * len(max_weights)
    with tempfile.TemporaryDirectory(prefix="aqm-frontier-") as scratch:
        processes = []
        for start in range(workers):
            job = Path(scratch) / f"job-{start}.json"
            chunk = list(max_weights[start::workers])
            job.write_text(
                json.dumps({"costs": costs, "scores": scores, "max_weights": chunk}), encoding="utf-8"
            )
            command = [sys.executable, "-c", _WORKER_CODE, str(job)]
            processes.append(
                subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            )
        for start, process in enumerate(processes):
            stdout, stderr = process.communicate()
            if process.returncode != 0:
                tail = stderr.strip().splitlines()[-1:] or ["no message"]
                raise RuntimeError(f"frontier CBC worker failed (exit {process.returncode}): {tail[0]}")
            for offset, (selection, status) in enumerate(json.loads(stdout)):
                out[start + offset * workers] = (tuple(int(i) for i in selection), str(status))
    return out


def _point(
    space: SearchSpace,
    reported: Sequence[int],
    budget: float,
    constraint: float,
    selection: Sequence[int],
    *,
    reachable: bool,
    satisfied: bool,
) -> FrontierPoint:
    rows = space.rows
    costs = [row.costs[index] for row, index in zip(rows, selection, strict=True)]
    total_weights = _sequential_sum(row.weights for row in rows)
    lm_cost = _sequential_sum(cost for row, cost in zip(rows, costs, strict=True) if row.lm)
    return FrontierPoint(
        budget=budget,
        constraint=constraint,
        formats=tuple(rows[i].formats[selection[i]] for i in reported),
        effective_bits_lm=effective_bits(lm_cost, space.lm_weights),
        effective_bits_model=(_sequential_sum(costs) / total_weights) * 16,
        total_score=float(_sequential_sum(row.scores[i] for row, i in zip(rows, selection, strict=True))),
        reachable=reachable,
        satisfied=satisfied,
    )


def flag_non_monotone(points: Sequence[FrontierPoint]) -> tuple[FrontierPoint, ...]:
    """Mark each point (budgets ascending) whose predicted score is worse than the previous one's.

    Only steps between reachable points count (below the cheapest mix every point is the same
    mix); differences within 1e-9 relative are summation noise between equal mixes, not a step.
    """
    out = list(points[:1])
    for previous, current in itertools.pairwise(points):
        worse = current.total_score > previous.total_score and not math.isclose(
            current.total_score, previous.total_score, rel_tol=1e-9, abs_tol=0.0
        )
        flagged = previous.reachable and current.reachable and worse
        out.append(attrs.evolve(current, non_monotone=flagged))
    return tuple(out)


def solve_frontier(space: SearchSpace, budgets: Iterable[float], *, workers: int | None = None) -> Frontier:
    """ModelOpt's format choice at every budget (LM effective bits), as its own search would make it.

    Budgets are sorted and deduplicated. Each gradient budget is one CBC solve (0.1-0.5 s for
    250 groups x 5 formats), shared among ``workers`` subprocesses (default: in this process for
    a small problem, else one per available CPU, see :func:`solver_processes`; 1 solves in this
    process); measured for 299 budgets x 250 groups x 5 formats: 28 s on one core, 2.6 s on 16.
    kl_div needs no CBC and always runs here (1.7-4.8 s for the same).
    """
    started = time.perf_counter()
    ordered = sorted({float(b) for b in budgets})
    if not ordered:
        raise ConfigError("no budgets to solve")
    for budget in ordered:
        if not math.isfinite(budget) or not 0.0 < budget <= 16.0:
            raise ConfigError(f"budget {budget:g} is outside (0, 16]; effective bits are bits per weight")
    rows = space.rows
    reported = [i for i, row in enumerate(rows) if row.reported]
    if not reported:
        raise InputError("no language-model group has a quantized format: there is no frontier to solve")
    lm_weights, other_weights = space.lm_weights, space.other_weights
    total_weights = _sequential_sum(row.weights for row in rows)
    cheapest = _cheapest(rows)
    min_cost = _sequential_sum(row.costs[i] for row, i in zip(rows, cheapest, strict=True))

    plans = []
    for budget in ordered:
        constraint = model_constraint(budget, lm_weights, other_weights)
        max_weight = total_weights * (constraint / 16.0)
        reachable = min_cost <= max_weight + total_weights * FEASIBILITY_TOLERANCE
        plans.append((budget, constraint, max_weight, reachable))

    solved: dict[float, tuple[tuple[int, ...], bool]] = {}
    todo = sorted({max_weight for _, _, max_weight, reachable in plans if reachable})
    if space.method == "gradient":
        results = _solve_lp(rows, todo, solver_processes(len(rows), len(todo), workers))
        solved = {mw: (sel, status == "Optimal") for mw, (sel, status) in zip(todo, results, strict=True)}
    else:
        solved = {mw: _threshold_select(rows, mw) for mw in todo}

    points = []
    for budget, constraint, max_weight, reachable in plans:
        selection, satisfied = solved[max_weight] if reachable else (cheapest, False)
        points.append(
            _point(space, reported, budget, constraint, selection, reachable=reachable, satisfied=satisfied)
        )
    cheapest_point = _point(space, reported, 0.0, 0.0, cheapest, reachable=False, satisfied=False)
    seen: dict[str, float] = {}
    for i in reported:
        for name, bits in zip(rows[i].formats, rows[i].bits, strict=True):
            seen.setdefault(name, bits)
    return Frontier(
        method=space.method,
        groups=tuple(rows[i].name for i in reported),
        points=flag_non_monotone(points),
        format_bits=tuple(sorted(seen.items(), key=lambda item: (item[0] == NO_QUANT, item[1]))),
        min_bits_lm=cheapest_point.effective_bits_lm,
        min_bits_model=cheapest_point.effective_bits_model,
        lm_weights=lm_weights,
        other_weights=other_weights,
        exact_order=space.exact_order,
        seconds=time.perf_counter() - started,
    )
