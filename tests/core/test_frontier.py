"""The budget frontier: the replayed searches, their reports, and the LP problem against ModelOpt's."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest

from auto_quantize_model.core import frontier_replay
from auto_quantize_model.core.bits import model_constraint
from auto_quantize_model.core.frontier import (
    flag_non_monotone,
    modelopt_frontier,
    solve_frontier,
    step_changes,
)
from auto_quantize_model.core.frontier_replay import IN_PROCESS_BELOW, lp_problem, solver_processes
from auto_quantize_model.core.frontier_space import (
    REMAINING_LM,
    REMAINING_OTHER,
    SearchRow,
    SearchSpace,
    fixed_row,
    search_scores,
    space_from_scores,
    space_from_state,
)
from auto_quantize_model.errors import ConfigError, InputError
from auto_quantize_model.frontier_records import FrontierPoint
from auto_quantize_model.render.frontier import JSON_FILE, MARKDOWN_FILE, frontier_to_dict, write_frontier
from builders import FP8, INT8, group

# --------------------------------------------------------------------------------------------------
# Synthetic search spaces
# --------------------------------------------------------------------------------------------------

FORMATS = (("W4", 4.0), ("INT8", 8.0), ("NONE", 16.0))


def _row(name: str, weights: float, raw: Sequence[float], *, lm: bool = True) -> SearchRow:
    """A row offering W4, INT8 and NONE with ``raw`` scores (clamped as ModelOpt does)."""
    return SearchRow(
        name=name,
        formats=tuple(f for f, _ in FORMATS),
        bits=tuple(b for _, b in FORMATS),
        costs=tuple(weights * b / 16 for _, b in FORMATS),
        scores=search_scores(raw),
        weights=weights,
        lm=lm,
    )


def _space(method: str = "gradient") -> SearchSpace:
    """Six groups of different sizes, scores of order 0.01-1 (CBC's tolerances do not bite there)."""
    raws = [
        (0.9, 0.05, 0.0),
        (0.4, 0.3, 0.0),
        (2.0, 0.01, 0.0),
        (0.07, 0.09, 0.0),
        (1.3, 0.6, 0.0),
        (0.2, 0.02, 0.0),
    ]
    sizes = [4096.0, 1024.0, 8192.0, 2048.0, 4096.0, 16384.0]
    rows = tuple(
        _row(f"layers.{i}.proj", size, raw) for i, (size, raw) in enumerate(zip(sizes, raws, strict=True))
    )
    return SearchSpace(rows=rows, method="gradient" if method == "gradient" else "kl_div")


def _brute_force_best(space: SearchSpace, budget: float) -> float:
    """The lowest total search score of any mix within ``budget`` LM bits (every mix tried)."""
    limit = sum(r.weights for r in space.rows) * budget / 16
    best = math.inf
    for choice in itertools.product(*(range(len(r.formats)) for r in space.rows)):
        cost = sum(r.costs[i] for r, i in zip(space.rows, choice, strict=True))
        if cost <= limit:
            best = min(best, sum(r.scores[i] for r, i in zip(space.rows, choice, strict=True)))
    return best


def test_search_scores_clamp_like_modelopt() -> None:
    # a format may not score above the one with fewer bits before it; NONE gets the running min
    assert search_scores([0.5, 0.7, 0.0]) == (0.5, 0.5, 0.0)
    assert search_scores([0.5, 0.2, -0.1]) == (0.5, 0.2, -0.1)
    clamped = search_scores([3.0, 3.5, 1.0, 0.0])
    assert search_scores(clamped) == clamped  # idempotent: clamped manifests go through unchanged
    # ModelOpt's min(score, previous) keeps its first argument unless the second is smaller, and
    # nothing is smaller than NaN nor NaN smaller than anything: a NaN score stays, and does not spread
    first, second = search_scores([math.nan, 1.0]), search_scores([1.0, math.nan])
    assert math.isnan(first[0])
    assert first[1] == 1.0
    assert second[0] == 1.0
    assert math.isnan(second[1])


def test_gradient_frontier_is_optimal_and_monotone_on_a_well_scaled_space() -> None:
    space = _space()
    budgets = (4.0, 5.0, 6.5, 8.0, 10.0, 12.5, 16.0)
    frontier = solve_frontier(space, budgets, workers=1)
    assert [p.budget for p in frontier.points] == list(budgets)
    for point in frontier.points:
        assert point.reachable
        assert point.satisfied
        assert point.effective_bits_lm <= point.budget + 1e-9
        assert point.total_score == pytest.approx(_brute_force_best(space, point.budget), rel=1e-9, abs=1e-12)
    scores = [p.total_score for p in frontier.points]
    assert scores == sorted(scores, reverse=True)
    assert not any(p.non_monotone for p in frontier.points)
    everything = frontier.point(16.0)
    assert everything.formats == ("NONE",) * 6
    assert everything.total_score == 0.0
    assert everything.effective_bits_lm == 16.0
    cheapest = frontier.point(4.0)  # exactly the cheapest mix: reachable, W4 everywhere
    assert cheapest.formats == ("W4",) * 6
    assert frontier.min_bits_lm == 4.0
    assert frontier.format_bits == (("W4", 4.0), ("INT8", 8.0), ("NONE", 16.0))


@pytest.mark.parametrize("method", ["gradient", "kl_div"])
def test_budgets_below_the_cheapest_mix_are_unreachable(method: str) -> None:
    space = _space(method)
    frontier = solve_frontier(space, (2.0, 3.99, 16.0), workers=1)
    low, almost, top = frontier.points
    for point in (low, almost):
        assert not point.reachable
        assert not point.satisfied
        assert point.formats == ("W4",) * 6  # the cheapest mix, which reaches the minimum
        assert point.effective_bits_lm == frontier.min_bits_lm == 4.0
    assert top.reachable
    assert top.formats == ("NONE",) * 6


def test_kl_div_replays_the_threshold_bisection() -> None:
    space = _space("kl_div")
    frontier = modelopt_frontier(space, (4.0, 6.0, 9.0, 12.0, 16.0))
    assert frontier.point(16.0).formats == ("NONE",) * 6
    for point in frontier.points:
        # one threshold explains every group's pick: the first format scoring at most it
        picks = [r.formats.index(f) for r, f in zip(space.rows, point.formats, strict=True)]
        low = max((r.scores[i] for r, i in zip(space.rows, picks, strict=True)), default=-math.inf)
        for row, pick in zip(space.rows, picks, strict=True):
            assert all(score > low for score in row.scores[:pick]), (point.budget, row.name)
        # satisfied is ModelOpt's check of the last step: within the budget, or not
        within = point.effective_bits_model <= point.constraint + 1e-12
        assert point.satisfied == within


def _point(budget: float, score: float, *, reachable: bool = True) -> FrontierPoint:
    return FrontierPoint(
        budget=budget,
        constraint=budget,
        formats=("INT8",),
        effective_bits_lm=budget,
        effective_bits_model=budget,
        total_score=score,
        reachable=reachable,
        satisfied=reachable,
    )


def test_non_monotone_flags_mark_more_budget_with_a_worse_score() -> None:
    points = flag_non_monotone(
        [
            _point(4.0, 9.0, reachable=False),
            _point(5.0, 10.0),  # worse than an unreachable point: not a step of the search
            _point(6.0, 7.0),
            _point(7.0, 7.5),  # worse: flagged
            _point(8.0, 7.5),  # equal: fine
            _point(9.0, 7.5 * (1 + 1e-13)),  # rounding noise: fine
            _point(10.0, 1.0),
        ]
    )
    assert [p.non_monotone for p in points] == [False, False, False, True, False, False, False]


def test_tiny_scores_leave_cbc_short_of_the_optimum_as_in_modelopt() -> None:
    """Scores around 1e-7 (what the tiny test model scores) sit below CBC's absolute tolerances:
    CBC stops at its first mix and calls it optimal. ModelOpt's search does the same, and its
    replay reproduces it (the frontier itself is solved exactly: tests/faults/test_frontier_monotone.py);
    if a CBC release changes this, so does ModelOpt."""
    tiny = SearchSpace(
        rows=tuple(attrs.evolve(r, scores=tuple(s * 1e-7 for s in r.scores)) for r in _space().rows),
        method="gradient",
    )
    frontier = modelopt_frontier(tiny, (4.0, 6.5, 10.0, 16.0), workers=1)
    best = [_brute_force_best(tiny, p.budget) for p in frontier.points]
    assert all(p.satisfied for p in frontier.points)
    assert all(p.total_score >= b for p, b in zip(frontier.points, best, strict=True))
    assert any(p.total_score > 1.01 * b for p, b in zip(frontier.points, best, strict=True))
    assert frontier.point(16.0).formats != ("NONE",) * 6  # the well-scaled space gets all NONE here


def test_worker_processes_give_the_in_process_answer() -> None:
    space = _space()
    budgets = (4.5, 5.5, 7.0, 9.0, 11.0)
    parallel = modelopt_frontier(space, budgets, workers=2)
    serial = modelopt_frontier(space, budgets, workers=1)
    assert parallel.points == serial.points
    with pytest.raises(ConfigError, match="workers must be at least 1"):
        modelopt_frontier(space, budgets, workers=0)


def test_a_small_problem_is_solved_in_process_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker start-up (~0.6 s each) costs more than a small problem's solves."""
    space = _space()
    budgets = (4.5, 5.5, 7.0, 9.0, 11.0)
    assert len(space.rows) * len(budgets) < IN_PROCESS_BELOW
    serial = modelopt_frontier(space, budgets, workers=1)
    asked: list[int] = []
    solve_lp = frontier_replay._solve_lp

    def spy(rows: Any, max_weights: Any, workers: int, *bounds: Any) -> Any:
        asked.append(workers)
        return solve_lp(rows, max_weights, workers, *bounds)

    monkeypatch.setattr(frontier_replay, "_solve_lp", spy)
    assert modelopt_frontier(space, budgets).points == serial.points
    assert asked == [1]


def test_solver_processes_threshold_and_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "auto_quantize_model.core.frontier_replay.os.sched_getaffinity", lambda pid: set(range(8))
    )
    below = IN_PROCESS_BELOW - 1
    assert solver_processes(below, 1) == 1
    assert solver_processes(1, below) == 1
    assert solver_processes(IN_PROCESS_BELOW, 1) == 1  # one budget: nothing to share
    assert solver_processes(100, IN_PROCESS_BELOW // 100) == min(8, IN_PROCESS_BELOW // 100)
    assert solver_processes(500, 5) == 5  # no more processes than budgets
    assert solver_processes(250, 300) == 8  # one per available CPU
    assert solver_processes(17, 5, requested=2) == 2  # a requested count is obeyed, even for small problems
    assert solver_processes(17, 5, requested=9) == 5
    with pytest.raises(ConfigError, match="workers must be at least 1, got 0"):
        solver_processes(250, 300, requested=0)


def test_solve_frontier_refuses_budgets_outside_the_range() -> None:
    with pytest.raises(ConfigError, match="outside"):
        solve_frontier(_space(), (8.0, 17.0))
    with pytest.raises(ConfigError, match="no budgets"):
        solve_frontier(_space(), ())


def test_non_lm_weights_are_charged_16_bits() -> None:
    space = _space()
    vision = SearchSpace(
        rows=(fixed_row("visual.blocks.0", 8192.0, lm=False), *space.rows), method="gradient"
    )
    frontier = solve_frontier(vision, (8.0,), workers=1)
    point = frontier.point(8.0)
    assert frontier.groups == tuple(r.name for r in space.rows)  # the vision row is no column
    assert frontier.other_weights == 8192.0
    assert point.constraint == model_constraint(8.0, vision.lm_weights, 8192.0)
    lm = vision.lm_weights
    assert point.effective_bits_model == pytest.approx(
        (point.effective_bits_lm * lm + 16 * 8192.0) / (lm + 8192.0), rel=1e-12
    )
    assert point.effective_bits_lm <= 8.0 + 1e-9
    assert point.total_score == solve_frontier(space, (8.0,), workers=1).point(8.0).total_score


# --------------------------------------------------------------------------------------------------
# Building the search space from scores or from a ModelOpt state
# --------------------------------------------------------------------------------------------------


def _scored_groups() -> list[Any]:
    return [
        group(
            "model.layers.0.q_proj",
            ("INT8", 8.0, 0.5),
            ("FP8", 8.0, 0.7),
            ("NONE", 16.0, 0.0),
            costs=(4.0, 4.0, 8.0),
        ),
        group(
            "model.layers.0.o_proj",
            ("INT8", 8.0, 0.2),
            ("FP8", 8.0, 0.1),
            ("NONE", 16.0, 0.0),
            costs=(2.0, 2.0, 4.0),
        ),
    ]


def test_space_from_scores_clamps_and_pads_the_weights_it_was_not_given() -> None:
    space = space_from_scores(_scored_groups(), "gradient", lm_weights=20.0, other_weights=6.0)
    q, o, rest_lm, rest_other = space.rows
    assert q.scores == (0.5, 0.5, 0.0)  # FP8 clamped to INT8's score, as ModelOpt searched
    assert o.scores == (0.2, 0.1, 0.0)
    assert (rest_lm.name, rest_lm.weights, rest_lm.lm) == (REMAINING_LM, 8.0, True)
    assert (rest_other.name, rest_other.weights, rest_other.lm) == (REMAINING_OTHER, 6.0, False)
    assert not space.exact_order
    assert (space.lm_weights, space.other_weights) == (20.0, 6.0)
    exact = space_from_scores(_scored_groups(), "gradient")
    assert exact.exact_order
    assert len(exact.rows) == 2
    with pytest.raises(InputError, match="lm_weights = 5 is smaller than the 12 weights"):
        space_from_scores(_scored_groups(), "gradient", lm_weights=5.0)


def test_space_from_scores_places_fixed_rows_in_modelopts_order() -> None:
    disabled = fixed_row("model.layers.0.mlp", 16.0, lm=True)
    order = ("model.layers.0.q_proj", "model.layers.0.mlp", "model.layers.0.o_proj")
    space = space_from_scores(_scored_groups(), "kl_div", fixed=[disabled], order=order)
    assert tuple(r.name for r in space.rows) == order
    assert space.exact_order
    assert [r.reported for r in space.rows] == [True, False, True]
    with pytest.raises(InputError, match="must name every group"):
        space_from_scores(_scored_groups(), "kl_div", fixed=[disabled], order=order[:2])


def test_space_from_state_reads_candidate_stats() -> None:
    vision_entry: dict[str, Any] = {
        "formats": ["NONE(effective-bits: 16.0)"],
        "scores": [0],
        "costs": [64.0],
        "module_names": ["visual.proj"],
        "uncompressed_cost": 64.0,
    }
    state: dict[str, Any] = {
        "method": "kl_div",
        "candidate_stats": {
            "visual.proj.quant_recipe": vision_entry,
            "decoder.layers.0.q_proj.quant_recipe": {
                "formats": [
                    f"{INT8}(effective-bits: 8.0)",
                    f"{FP8}(effective-bits: 8.0)",
                    "NONE(effective-bits: 16.0)",
                ],
                "scores": [0.25, 0.25, 0],
                "costs": [16.0, 16.0, 32.0],
                "module_names": ["decoder.layers.0.q_proj", "decoder.layers.0.k_proj"],
            },
        },
    }
    space = space_from_state(
        state, lambda n: n.replace("decoder.", "model.", 1), lambda n: n.startswith("model.")
    )
    vision, q = space.rows
    assert (vision.name, vision.lm, vision.weights, vision.reported) == ("visual.proj", False, 64.0, False)
    assert (q.name, q.formats, q.bits, q.weights) == (
        "model.layers.0.q_proj",
        (INT8, FP8, "NONE"),
        (8.0, 8.0, 16.0),
        32.0,
    )
    assert space.method == "kl_div"
    with pytest.raises(InputError, match="method"):
        space_from_state({**state, "method": "random"})
    broken = {
        "method": "gradient",
        "candidate_stats": {"x.quant_recipe": {**vision_entry, "formats": ["NONE"]}},
    }
    with pytest.raises(InputError, match="not NAME"):
        space_from_state(broken)


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------


def test_frontier_files_hold_every_point_and_what_changed(tmp_path: Path) -> None:
    frontier = solve_frontier(_space(), (3.0, 5.0, 8.0, 16.0), workers=1)
    paths = write_frontier(frontier, tmp_path, title="synthetic", run_budget=8.0, plots=False)
    assert [p.name for p in paths] == [MARKDOWN_FILE, JSON_FILE]
    data = json.loads((tmp_path / JSON_FILE).read_text(encoding="utf-8"))
    assert data == json.loads(json.dumps(frontier_to_dict(frontier, run_budget=8.0)))
    assert data["groups"] == list(frontier.groups)
    assert [p["budget"] for p in data["points"]] == [3.0, 5.0, 8.0, 16.0]
    for record, changes in zip(data["points"], step_changes(frontier), strict=True):
        assert len(record["formats"]) == len(frontier.groups)
        assert [c["group"] for c in record["changes"]] == [c.group for c in changes]
    assert data["points"][0]["reachable"] is False
    last = data["points"][-1]
    assert {c["after"] for c in last["changes"]} == {"NONE"}
    text = (tmp_path / MARKDOWN_FILE).read_text(encoding="utf-8")
    assert "| 8 (run) |" in text
    assert "unreachable" in text
    assert "## What changes at each step" in text
    assert "→ NONE" in text


@pytest.mark.slow
def test_frontier_pictures_are_written(tmp_path: Path) -> None:
    frontier = solve_frontier(_space("kl_div"), (3.0, 4.5, 6.0, 8.0, 12.0, 16.0))
    paths = write_frontier(frontier, tmp_path, title="synthetic", run_budget=8.0)
    names = {p.name for p in paths}
    assert {
        "frontier-score.png",
        "frontier-score.svg",
        "frontier-formats.png",
        "frontier-formats.svg",
    } <= names
    assert all(p.stat().st_size > 1000 for p in paths)
    assert "![frontier-formats](frontier-formats.png)" in (tmp_path / MARKDOWN_FILE).read_text(
        encoding="utf-8"
    )
    again = tmp_path / "again"
    write_frontier(attrs.evolve(frontier, seconds=0.0), again, title="synthetic", run_budget=8.0)
    assert (again / "frontier-formats.svg").read_bytes() == (tmp_path / "frontier-formats.svg").read_bytes()


# --------------------------------------------------------------------------------------------------
# Exactness against ModelOpt 0.47 (real auto_quantize on the tiny Qwen3-VL, CPU)
# --------------------------------------------------------------------------------------------------


def _mps(problem: Any, path: Path) -> bytes:
    problem.writeMPS(str(path), rename=1)
    return path.read_bytes()


@pytest.mark.slow
def test_lp_problem_writes_modelopts_mps_file(tmp_path: Path) -> None:
    from modelopt.torch.opt.searcher import LPS

    rows = _space().rows
    costs, scores = [list(r.costs) for r in rows], [list(r.scores) for r in rows]
    for lower in (None, 0.99, 0.9):
        theirs = LPS(
            name="AutoQuantize",
            constraints={"weight": (lower * 9000.0 if lower else lower, 9000.0)},
            constraints_to_candidate_costs={"weight": costs},
            candidate_scores=scores,
        )
        variables = theirs._build_selection_vars()
        problem = theirs._build_objective_problem(variables)
        for constraint in (
            *theirs._build_one_hot_constraints(variables),
            *theirs._build_budget_constraints(variables),
        ):
            problem += constraint
        mine, _ = lp_problem(costs, scores, 9000.0, lower)
        assert _mps(mine, tmp_path / "mine.mps") == _mps(problem, tmp_path / "theirs.mps"), lower
