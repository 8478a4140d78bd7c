"""The budget frontier never says more bits is worse (issue 21, item 8).

Real scores are tiny (1e-6..1e-9) and ModelOpt's CBC run has absolute tolerances: it stopped at
its first mix, so larger budgets predicted more damage and a 16-bit budget still quantized groups.
The frontier (and ``aqm export --bits``, which uses it) must give, at every budget, the mix of
least predicted score that fits, whatever the scores' scale.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence

import attrs
import pytest

from auto_quantize_model.app.run_folder import FinishedRun
from auto_quantize_model.artifacts import GroupScore
from auto_quantize_model.backend.exporting import choice_at, solve_one
from auto_quantize_model.core import frontier_exact
from auto_quantize_model.core.frontier import solve_frontier
from auto_quantize_model.core.frontier_points import search_space
from auto_quantize_model.core.frontier_space import SearchSpace
from auto_quantize_model.frontier_records import Frontier
from auto_quantize_model.spec_values import parse_budgets
from auto_quantize_model.specs import FrontierSpec
from builders import AqmRun, scores

FORMATS = (("W4", 4.0), ("INT8", 8.0), ("NONE", 16.0))
SIZES = (4096.0, 8192.0, 16384.0, 12288.0)
"""Weights per group: a few layer shapes, as a transformer repeats them."""


def scored(name: str, weights: float, w4: float, int8: float) -> GroupScore:
    """A group offering W4, INT8 and NONE (score 0), costed as ModelOpt costs them."""
    return GroupScore(
        name=name,
        module_names=(name,),
        formats=tuple(f for f, _ in FORMATS),
        bits=tuple(b for _, b in FORMATS),
        scores=(w4, int8, 0.0),
        costs=tuple(weights * b / 16 for _, b in FORMATS),
        best_format="",
    )


def tiny_groups(count: int, seed: int = 21) -> list[GroupScore]:
    """Seeded groups whose scores sit around 1e-9 (1e-10..1e-8), as a small model's do."""
    rng = random.Random(seed)
    groups = []
    for index in range(count):
        base = 10 ** rng.uniform(-10.0, -8.0)
        w4 = base * 4.0 * rng.uniform(0.8, 1.2)
        groups.append(scored(f"layers.{index}.proj", rng.choice(SIZES), w4, base * rng.uniform(0.8, 1.2)))
    return groups


def space_of(groups: Sequence[GroupScore]) -> SearchSpace:
    space, _ = search_space(groups, "gradient")
    return space


def scaled(groups: Sequence[GroupScore], factor: float) -> list[GroupScore]:
    return [attrs.evolve(g, scores=tuple(s * factor for s in g.scores)) for g in groups]


def quantized(formats: Sequence[str]) -> int:
    return sum(f != "NONE" for f in formats)


def worse_steps(frontier: Frontier) -> list[tuple[float, float, float]]:
    """(budget, score before, score after) of every step to a larger budget with a higher score."""
    return [
        (after.budget, before.total_score, after.total_score)
        for before, after in itertools.pairwise(frontier.points)
        if after.total_score > before.total_score
    ]


GRID = parse_budgets("4:16:0.1")


@pytest.mark.parametrize("factor", [1.0, 1e2, 1e4], ids=["scores~1e-9", "scores~1e-7", "scores~1e-5"])
def test_more_bits_never_predict_more_damage_at_tiny_scores(factor: float) -> None:
    """CBC stood still at ~1e-9 (one mix for every budget) and zigzagged at ~1e-7 and ~1e-5."""
    frontier = solve_frontier(space_of(scaled(tiny_groups(36), factor)), GRID)
    assert len(frontier.points) == 121
    assert worse_steps(frontier) == []
    assert not any(p.non_monotone for p in frontier.points)
    assert all(p.reachable and p.satisfied for p in frontier.points)
    assert frontier.points[0].formats == ("W4",) * 36  # 4 bits: the cheapest mix is the only one
    assert frontier.points[-1].total_score == 0.0
    assert len({p.total_score for p in frontier.points}) > 60  # the score does fall, step by step


def test_multiplying_every_score_by_1e8_changes_no_choice() -> None:
    groups = tiny_groups(36)
    small = solve_frontier(space_of(groups), GRID)
    large = solve_frontier(space_of(scaled(groups, 1e8)), GRID)
    assert [p.formats for p in large.points] == [p.formats for p in small.points]
    for big, little in zip(large.points, small.points, strict=True):
        assert big.total_score == pytest.approx(little.total_score * 1e8, rel=1e-12)
    # the choice changes along the grid: the same formats everywhere would prove nothing
    assert len({p.formats for p in small.points}) > 30


def test_the_full_budget_quantizes_nothing() -> None:
    # the last group is dead: INT8 scores exactly what NONE does, so quantizing it is "free"
    groups = [*tiny_groups(36), scored("layers.dead.proj", 4096.0, 1e-9, 0.0)]
    frontier = solve_frontier(space_of(groups), (15.95, 16.0))
    top = frontier.point(16.0)
    assert top.formats == ("NONE",) * 37
    assert top.total_score == 0.0
    assert top.effective_bits_lm == 16.0
    # a hair below, the free group alone makes room (it saves 2048 of the 368640 weights' 16 bits)
    below = frontier.point(15.95)
    picked = zip(frontier.groups, below.formats, strict=True)
    assert [(name, fmt) for name, fmt in picked if fmt != "NONE"] == [("layers.dead.proj", "INT8")]
    assert below.total_score == 0.0


def _least_scores(groups: Sequence[GroupScore], budgets: Sequence[float]) -> list[float]:
    """Every mix tried: the least summed score within each budget (LM bits over all weights)."""
    limit_of = {b: sum(g.costs[-1] for g in groups) * b / 16 for b in budgets}
    best = dict.fromkeys(budgets, math.inf)
    for choice in itertools.product(range(len(FORMATS)), repeat=len(groups)):
        cost = sum(g.costs[i] for g, i in zip(groups, choice, strict=True))
        score = sum(g.scores[i] for g, i in zip(groups, choice, strict=True))
        for budget, limit in limit_of.items():
            if cost <= limit * (1 + 1e-12) and score < best[budget]:
                best[budget] = score
    return [best[b] for b in budgets]


def test_every_budget_gets_the_least_score_any_mix_reaches() -> None:
    groups = tiny_groups(9, seed=8)
    budgets = parse_budgets("4:16:0.5")
    frontier = solve_frontier(space_of(groups), budgets)
    least = _least_scores(groups, budgets)
    assert [p.total_score for p in frontier.points] == pytest.approx(least, rel=1e-12, abs=0.0)


def test_a_format_scored_nan_is_never_chosen() -> None:
    groups = tiny_groups(12)
    groups[3] = attrs.evolve(groups[3], scores=(math.nan, *groups[3].scores[1:]))
    frontier = solve_frontier(space_of(groups), parse_budgets("6:16:0.5"))
    picked = {p.formats[3] for p in frontier.points}
    assert "W4" not in picked
    assert all(math.isfinite(p.total_score) and p.satisfied for p in frontier.points)
    assert worse_steps(frontier) == []


def test_a_search_cut_short_still_never_predicts_more_damage(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scores proportional to the weights saved make every mix of one size score alike: the
    search gives up past its work limit (made tiny here) and keeps the best mix it has."""
    rng = random.Random(3)
    groups = []
    for index in range(30):
        weights = float(rng.randint(1000, 30000))
        groups.append(scored(f"layers.{index}.proj", weights, 1e-13 * weights * 12, 1e-13 * weights * 8))
    monkeypatch.setattr(frontier_exact, "SEARCH_WORK", 200)
    frontier = solve_frontier(space_of(groups), GRID)
    assert worse_steps(frontier) == []
    assert quantized(frontier.points[-1].formats) == 0
    assert all(p.effective_bits_lm <= p.budget + 1e-9 for p in frontier.points)
    assert any(not p.satisfied for p in frontier.points)  # the limit was reached


def test_aqm_export_takes_the_frontiers_mix_at_each_budget() -> None:
    """``aqm export --bits`` and the ExportCheckpoint stage solve one budget at a time."""
    groups = tiny_groups(36)
    run = scores(*groups, effective_bits_target=9.0)
    frontier = solve_frontier(space_of(groups), GRID)
    exported = []
    for budget in (6.0, 9.0, 12.0, 14.5, 16.0):
        choices, bits = choice_at(solve_one(run, budget), budget, run.groups)
        formats = tuple(choice.format for choice in choices)
        assert formats == frontier.point(budget).formats, budget
        assert bits == frontier.point(budget).effective_bits_lm
        exported.append(sum(g.scores[g.formats.index(f)] for g, f in zip(groups, formats, strict=True)))
    assert exported == sorted(exported, reverse=True)
    assert quantized(formats) == 0  # 16 bits
    assert bits == 16.0


def test_the_tiny_default_runs_frontier_never_says_more_bits_is_worse(tiny_default_run: AqmRun) -> None:
    """The README's tiny run (scores ~1e-8) over its README frontier grid, 8:16:0.25."""
    assert tiny_default_run.returncode == 0, tiny_default_run.stderr[-2000:]
    run = FinishedRun.open(tiny_default_run.folder)
    manifest = run.manifest
    result = run.frontier(FrontierSpec(bits="8:16:0.25", workers=1))
    frontier = result.frontier
    assert len(frontier.points) == 33
    assert worse_steps(frontier) == []
    assert not any(p.non_monotone for p in frontier.points)
    assert quantized(frontier.point(16.0).formats) == 0
    # the records still rebuild ModelOpt's own search: its replay is the run's choice
    assert result.run_checked
    assert result.run_mismatches == ()
    at_run = frontier.point(manifest.scheme.effective_bits_target)
    assert at_run.total_score <= manifest.scheme.total_score
    if at_run.total_score < manifest.scheme.total_score:
        assert any("ModelOpt's search stopped short of the best mix" in note for note in result.notes)
