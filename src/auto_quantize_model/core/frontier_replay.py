"""ModelOpt 0.47's own format choice replayed, tie-breaks and shortfalls included.

:func:`~auto_quantize_model.core.frontier.modelopt_frontier` uses this to check that a run's
records rebuild its search (the run check of
:func:`~auto_quantize_model.core.frontier_points.solve_budgets`); the frontier aqm reports is
the exact one (:mod:`auto_quantize_model.core.frontier_exact`). How ModelOpt searches
(``modelopt/torch/quantization/algorithms.py``):

* ``gradient``: a 0/1 integer program solved by CBC through PuLP (``LPS`` in
  ``modelopt/torch/opt/searcher.py``): one binary per (group, format), one-hot rows, total cost
  at most the budget; tried again with the cost also at least 99 %, then 90 % of the budget if
  CBC reports anything but ``Optimal`` (under the ``active_moe`` cost model the floors come first:
  99 %, 90 %, then none, :data:`ACTIVE_MOE_LOWER_BOUNDS`). Equal (score, cost) pairs are common
  (FP8 clamped to INT8's score) and CBC breaks such ties by the problem's exact layout: column names
  ``z<row>_<format>`` sorted as text, rows in order. The same problem is built here, row for
  row (:func:`lp_problem`), so CBC makes the same choice; groups with one format only (disabled
  layers, a vision tower) are rows too and must stay in place, or the tie-breaks move. CBC's
  tolerances are absolute: with scores of order 1e-7 (a tiny model) it stops at its first mix
  and calls it optimal, and with larger ones it can still stop ~1 % above the optimum. ModelOpt
  keeps what CBC returns, and so does the replay.
* ``kl_div``: 100 bisection steps on a score threshold; each group takes its first format
  scoring at most the threshold. The last step's choice is kept even when an earlier one met
  the budget (``is_satisfied`` then says False). Replayed step by step.

Many CBC solves are shared among worker processes (:func:`solver_processes`, :func:`_solve_lp`),
plain subprocesses running :func:`run_worker`. PuLP is imported inside the solver only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from auto_quantize_model.core.frontier_space import SearchRow
from auto_quantize_model.errors import ConfigError
from auto_quantize_model.frontier_records import Method

LowerBounds = tuple[float | None, ...]

LOWER_BOUNDS: LowerBounds = (None, 0.99, 0.90)
"""ModelOpt's retry schedule for the gradient search (weight cost model): cost floors as budget fractions."""

ACTIVE_MOE_LOWER_BOUNDS: LowerBounds = (0.99, 0.90, None)
"""The same under ModelOpt's ``active_moe`` cost model (``_get_search_lower_bounds``): a mix
spending at least 99 % of the budget first, the unfloored search last."""

KL_DIV_STEPS = 100
"""Bisection steps of ModelOpt's threshold search."""


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
    costs: Sequence[Sequence[float]],
    scores: Sequence[Sequence[float]],
    max_weight: float,
    lower_bounds: LowerBounds = LOWER_BOUNDS,
) -> tuple[tuple[int, ...], str]:
    """CBC on :func:`lp_problem` with ModelOpt's cost-floor retries; each row's index and the status.

    The index is the first largest binary of the row, like ModelOpt's ``np.argmax``.
    """
    import pulp

    selection: tuple[int, ...] = ()
    status = "Not Solved"
    for lower in lower_bounds:
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
    job: tuple[Sequence[Sequence[float]], Sequence[Sequence[float]], Sequence[float], LowerBounds],
) -> list[tuple[tuple[int, ...], str]]:
    """Worker entry point: several budgets of one search space (a top-level function for pickling)."""
    costs, scores, max_weights, lower_bounds = job
    return [_lp_select(costs, scores, max_weight, lower_bounds) for max_weight in max_weights]


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


_WORKER_CODE = (
    "import sys; from auto_quantize_model.core.frontier_replay import run_worker; run_worker(sys.argv[1])"
)


def run_worker(job_path: str) -> None:
    """A CBC worker process: solve the budgets of a job file, print the choices as JSON.

    The job holds costs, scores and weight budgets; JSON floats round-trip exactly (``repr``),
    so the worker's problems are the parent's to the last bit.
    """
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    bounds = tuple(job.get("lower_bounds", LOWER_BOUNDS))
    results = _lp_select_many((job["costs"], job["scores"], job["max_weights"], bounds))
    sys.stdout.write(json.dumps([[list(selection), status] for selection, status in results]))


def _solve_lp(
    rows: Sequence[SearchRow],
    max_weights: Sequence[float],
    workers: int,
    lower_bounds: LowerBounds = LOWER_BOUNDS,
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
        return _lp_select_many((costs, scores, max_weights, lower_bounds))
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
                json.dumps(
                    {"costs": costs, "scores": scores, "max_weights": chunk, "lower_bounds": [*lower_bounds]}
                ),
                encoding="utf-8",
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


def replay_select(
    rows: Sequence[SearchRow],
    max_weights: Sequence[float],
    *,
    method: Method,
    workers: int | None,
    lower_bounds: LowerBounds = LOWER_BOUNDS,
) -> list[tuple[tuple[int, ...], bool]]:
    """ModelOpt's choice for each weight budget, and whether its search calls it satisfied.

    kl_div's bisection always runs here; gradient's CBC solves go to :func:`solver_processes`
    processes (``workers`` as requested, None for the default), each trying ``lower_bounds`` in
    turn as ModelOpt's cost model does."""
    if method == "kl_div":
        return [_threshold_select(rows, max_weight) for max_weight in max_weights]
    processes = solver_processes(len(rows), len(max_weights), workers)
    results = _solve_lp(rows, max_weights, processes, lower_bounds)
    return [(selection, status == "Optimal") for selection, status in results]
