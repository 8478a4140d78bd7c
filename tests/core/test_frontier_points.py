"""The budget frontier of a run: SolveBudgets, MeasureFrontier, the manifest's record of it and
``aqm frontier`` on run folders (fast with plain data and fakes; the real model in slow tests)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import pytest

from auto_quantize_model.app.cli import main
from auto_quantize_model.app.folders import PIPELINE_FILE
from auto_quantize_model.app.frontier import FrontierRequest
from auto_quantize_model.app.lock import LOCK_NAME
from auto_quantize_model.app.run_folder import FinishedRun, locate_manifest
from auto_quantize_model.app.run_service import RunService
from auto_quantize_model.artifacts import (
    BudgetFrontier,
    FixedGroup,
    GroupScore,
    MeasuredFrontier,
    MeasuredPoint,
    ReportPaths,
    SensitivityScores,
)
from auto_quantize_model.backend.modelopt.checkpoint import STATE_FILE
from auto_quantize_model.core.frontier import (
    flag_non_monotone,
    modelopt_frontier,
)
from auto_quantize_model.core.frontier_points import (
    frontier_summary,
    measured_budgets,
    measured_frontier,
    search_method,
    search_space,
    solve_budgets,
)
from auto_quantize_model.errors import AqmError, InputError
from auto_quantize_model.frontier_records import Frontier, FrontierPoint
from auto_quantize_model.io.convert import project
from auto_quantize_model.io.manifest import manifest_from_dict, manifest_to_dict
from auto_quantize_model.io.pipeline_file import spec_from_dict, spec_to_toml
from auto_quantize_model.manifest_records import Manifest
from auto_quantize_model.pipeline import Artifacts, Pipeline
from auto_quantize_model.render.frontier import JSON_FILE, MARKDOWN_FILE, write_budget_frontier
from auto_quantize_model.render.reports import write_reports
from auto_quantize_model.specs import FrontierSpec, ManifestSpec, ReportSpec
from auto_quantize_model.stages.build_manifest import BuildManifest, build_manifest
from auto_quantize_model.stages.solve_budgets import SolveBudgets
from auto_quantize_model.stages.write_reports import WriteReports
from builders import TEST_MODEL, AqmRun, run_aqm, scores

if TYPE_CHECKING:
    from collections.abc import Sequence

W4, INT8, NONE = "W4", "INT8", "NONE"
FORMAT_BITS = ((W4, 4.0), (INT8, 8.0), (NONE, 16.0))


def scored(name: str, weights: float, raw: Sequence[float], best: str = "") -> GroupScore:
    """A group offering W4, INT8 and NONE, costed as ModelOpt costs them (weights x bits / 16)."""
    return GroupScore(
        name=name,
        module_names=(name,),
        formats=tuple(f for f, _ in FORMAT_BITS),
        bits=tuple(b for _, b in FORMAT_BITS),
        scores=tuple(raw),
        costs=tuple(weights * b / 16 for _, b in FORMAT_BITS),
        best_format=best,
    )


GROUPS = (
    scored("layers.0.q", 4096.0, (0.9, 0.05, 0.0)),
    scored("layers.0.o", 1024.0, (0.4, 0.3, 0.0)),
    scored("layers.1.q", 8192.0, (2.0, 0.01, 0.0)),
    scored("layers.1.o", 2048.0, (0.07, 0.09, 0.0)),
)
FIXED = (FixedGroup("layers.0.mlp", 4096.0, lm=True), FixedGroup("visual.proj", 2048.0, lm=False))
ORDER = ("visual.proj", "layers.0.q", "layers.0.o", "layers.0.mlp", "layers.1.q", "layers.1.o")


def with_choice(groups: Sequence[GroupScore], frontier: Frontier, budget: float) -> tuple[GroupScore, ...]:
    """``groups`` with ``best_format`` set to the frontier's choice at ``budget`` (a run that agrees)."""
    chosen = dict(zip(frontier.groups, frontier.point(budget).formats, strict=True))
    return tuple(attrs.evolve(g, best_format=chosen[g.name]) for g in groups)


def run_scores(method: str = "kl_div", target: float = 9.0) -> SensitivityScores:
    """Scores of a run over GROUPS whose best formats are the search's own at ``target``."""
    space, _ = search_space(GROUPS, method, order=ORDER, fixed=FIXED)  # type: ignore[arg-type]
    frontier = modelopt_frontier(space, (target,), workers=1)
    return scores(
        *with_choice(GROUPS, frontier, target),
        method=method,
        effective_bits_target=target,
        search_order=ORDER,
        fixed_groups=FIXED,
    )


# --------------------------------------------------------------------------------------------------
# The search space of a run's records
# --------------------------------------------------------------------------------------------------


def test_the_recorded_order_places_fixed_groups_among_the_scored_ones() -> None:
    space, notes = search_space(GROUPS, "gradient", order=ORDER, fixed=FIXED)
    assert [row.name for row in space.rows] == list(ORDER)
    assert space.exact_order
    assert notes == ()
    assert [row.reported for row in space.rows] == [False, True, True, False, True, True]
    assert space.other_weights == 2048.0  # the vision row weighs on the whole-model bits only
    assert space.lm_weights == 4096.0 + 1024.0 + 4096.0 + 8192.0 + 2048.0


def test_without_the_order_a_manifest_frontier_says_it_may_break_ties_differently() -> None:
    space, notes = search_space(GROUPS, "gradient", groups_in_order=False)
    assert not space.exact_order
    assert len(notes) == 1
    assert "order is not recorded" in notes[0]
    # scores listed in ModelOpt's order (SensitivityScores) need no order when nothing is fixed
    in_order, none = search_space(GROUPS, "gradient")
    assert in_order.exact_order
    assert none == ()


def test_an_order_that_does_not_name_every_row_is_ignored_with_a_note() -> None:
    space, notes = search_space(GROUPS, "gradient", order=ORDER[:-1], fixed=FIXED)
    assert not space.exact_order
    assert "ignored" in notes[0]


def test_none_only_groups_of_the_previous_tools_manifests_become_fixed_rows() -> None:
    vision = GroupScore("visual.blocks.0", ("visual.blocks.0",), (NONE,), (16.0,), (0.0,), (512.0,), "")
    space, _ = search_space((vision, *GROUPS), "gradient", order=(vision.name, *(g.name for g in GROUPS)))
    assert space.exact_order
    assert space.rows[0].name == vision.name
    assert not space.rows[0].reported
    assert space.rows[0].weights == 512.0


# --------------------------------------------------------------------------------------------------
# Solving budgets and checking the run's own choice
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gradient", "kl_div"])
def test_the_runs_budget_is_solved_too_and_matches_the_runs_choice(method: str) -> None:
    run = run_scores(method, target=9.0)
    space, _ = search_space(run.groups, method, order=ORDER, fixed=FIXED)  # type: ignore[arg-type]
    result = solve_budgets(space, (6.0, 12.0), run_budget=9.0, run_choice=run.groups, workers=1)
    assert [p.budget for p in result.frontier.points] == [6.0, 9.0, 12.0]
    assert result.run_budget == 9.0
    assert result.run_checked
    assert result.run_mismatches == ()
    assert any("run's own budget 9 was added" in note for note in result.notes)


def test_a_choice_other_than_the_runs_is_named() -> None:
    run = run_scores()
    space, _ = search_space(run.groups, "kl_div", order=ORDER, fixed=FIXED)
    at_run = modelopt_frontier(space, (9.0,)).point(9.0)
    wrong = next(f for f in (W4, INT8, NONE) if f != at_run.formats[0])
    altered = (attrs.evolve(run.groups[0], best_format=wrong), *run.groups[1:])
    result = solve_budgets(space, (9.0,), run_budget=9.0, run_choice=altered)
    assert result.run_checked
    assert result.run_mismatches == (f"layers.0.q: {at_run.formats[0]} != {wrong}",)
    assert any("differ from ModelOpt's choice" in note for note in result.notes)


def test_an_unrecorded_choice_is_not_compared() -> None:
    space, _ = search_space(GROUPS, "kl_div", order=ORDER, fixed=FIXED)
    result = solve_budgets(space, (9.0,), run_budget=9.0, run_choice=GROUPS)  # best_format ""
    assert not result.run_checked
    assert frontier_summary(result, None).run_matches is None


def test_solve_budgets_stage_reads_scores_only() -> None:
    run = run_scores("gradient")
    result = SolveBudgets(FrontierSpec(bits="5:13:2", workers=1)).run(Artifacts.of([run]))
    assert isinstance(result, BudgetFrontier)
    assert [p.budget for p in result.frontier.points] == [5.0, 7.0, 9.0, 11.0, 13.0]
    assert result.frontier.groups == tuple(g.name for g in GROUPS)
    assert result.frontier.exact_order
    assert result.run_checked
    assert result.run_mismatches == ()


# --------------------------------------------------------------------------------------------------
# Which points are measured, and what the measurements say (pure)
# --------------------------------------------------------------------------------------------------


def _point(budget: float, formats: tuple[str, ...], *, reachable: bool = True) -> FrontierPoint:
    return FrontierPoint(budget, budget, formats, budget, budget, 16.0 - budget, reachable, reachable)


def _frontier(points: Sequence[FrontierPoint]) -> Frontier:
    return Frontier(
        method="gradient",
        groups=("a", "b"),
        points=tuple(points),
        format_bits=((INT8, 8.0), (NONE, 16.0)),
        min_bits_lm=8.0,
        min_bits_model=8.0,
        lm_weights=2.0,
        other_weights=0.0,
        exact_order=True,
        seconds=0.0,
    )


def test_measured_budgets_are_distinct_reachable_mixes_spread_over_the_range() -> None:
    frontier = _frontier(
        [
            _point(6.0, (INT8, INT8), reachable=False),
            _point(8.0, (INT8, INT8)),
            _point(9.0, (INT8, INT8)),  # the same mix again: measured once, at 8
            _point(10.0, (INT8, NONE)),
            _point(11.0, (NONE, INT8)),
            _point(12.0, (INT8, NONE)),  # CBC came back to an earlier mix
            _point(16.0, (NONE, NONE)),  # quantizes nothing: the baseline itself
        ]
    )
    assert [p.budget for p in measured_budgets(frontier, 2)] == [8.0, 11.0]
    assert [p.budget for p in measured_budgets(frontier, 3)] == [8.0, 10.0, 11.0]
    assert [p.budget for p in measured_budgets(frontier, 9)] == [8.0, 10.0, 11.0]
    assert [p.budget for p in measured_budgets(frontier, 1)] == [10.0]
    assert measured_budgets(frontier, 0) == ()


def _measured(budget: float, bits: float, predicted: float, nll: float, kl: float) -> MeasuredPoint:
    return MeasuredPoint(budget, bits, predicted, nll, kl, quantized_groups=1)


def _report(points: Sequence[MeasuredPoint], restored: bool = True) -> MeasuredFrontier:
    return measured_frontier(
        points,
        baseline_nll=3.0,
        chosen_delta_nll=0.01,
        holdout_samples=8,
        holdout_tokens=80,
        holdout_source="held.txt",
        restored_exactly=restored,
        seconds=1.0,
    )


def test_measured_frontier_flags_more_bits_with_more_damage_and_ranks_the_prediction() -> None:
    report = _report(
        [
            _measured(12.0, 12.0, 0.2, 0.05, 0.010),  # given out of order: sorted by budget
            _measured(8.0, 8.0, 0.9, 0.30, 0.050),
            _measured(10.0, 10.0, 0.5, 0.08, 0.020),
            _measured(14.0, 14.0, 0.1, 0.07, 0.002),  # more bits, more measured damage
        ]
    )
    assert [p.budget for p in report.points] == [8.0, 10.0, 12.0, 14.0]
    assert [p.non_monotone for p in report.points] == [False, False, False, True]
    assert report.spearman_kl == pytest.approx(1.0)
    assert report.spearman_nll == pytest.approx(0.8)
    assert report.notes == ()


def test_too_few_points_for_a_correlation_and_a_failed_restore_are_noted() -> None:
    report = _report([_measured(8.0, 8.0, 0.9, 0.3, 0.05)], restored=False)
    assert math.isnan(report.spearman_nll)
    assert any("fewer than 2 measured points" in note for note in report.notes)
    assert any("did not come back bit-exactly" in note for note in report.notes)


# --------------------------------------------------------------------------------------------------
# Reports: flags, unreachable budgets, measured points
# --------------------------------------------------------------------------------------------------


def flagged_frontier() -> BudgetFrontier:
    """A frontier with two unreachable budgets, one non-monotone step and three measured points."""
    run = run_scores("gradient")
    space, _ = search_space(run.groups, "gradient", order=ORDER, fixed=FIXED)
    result = solve_budgets(space, (2.0, 4.5, 7.0, 11.0), run_budget=9.0, run_choice=run.groups, workers=1)
    points = list(result.frontier.points)
    # a step like ModelOpt's kl_div bisection (or CBC on tiny scores) makes: more bits, worse score
    points[-1] = attrs.evolve(points[-1], total_score=points[-2].total_score * 2 + 1.0)
    frontier = attrs.evolve(result.frontier, points=flag_non_monotone(points))
    return attrs.evolve(result, frontier=frontier)


def test_rendered_frontier_flags_unreachable_budgets_and_non_monotone_steps(tmp_path: Path) -> None:
    budget_frontier = flagged_frontier()
    measured = _report(
        [_measured(7.0, 6.9, 0.9, 0.30, 0.05), _measured(9.0, 8.8, 0.5, 0.40, 0.02)]  # measured step
    )
    paths = write_budget_frontier(budget_frontier, tmp_path, title="t", measured=measured, plots=False)
    assert {p.name for p in paths} == {MARKDOWN_FILE, JSON_FILE}
    text = (tmp_path / MARKDOWN_FILE).read_text(encoding="utf-8")
    assert "2 budget(s) below the cheapest mix (unreachable" in text
    assert "1 non-monotone step(s): more budget, worse predicted score (at 11)" in text
    assert "| 2 | " in text
    assert "| unreachable |" in text
    assert "| 11 | " in text
    assert "| non-monotone |" in text
    assert "the re-solve is ModelOpt's choice in every group" in text
    assert "## Measured on held-out captions" in text
    assert "1 measured non-monotone step(s), more bits and more damage, at 9." in text
    data = json.loads((tmp_path / JSON_FILE).read_text(encoding="utf-8"))
    assert [p["reachable"] for p in data["points"]] == [False, False, True, True, True]
    assert [p["non_monotone"] for p in data["points"]] == [False, False, False, False, True]
    assert data["run_budget"] == 9.0
    assert data["run_matches"] is True
    assert [p["non_monotone"] for p in data["measured"]["points"]] == [False, True]
    summary = frontier_summary(budget_frontier, measured)
    assert summary.unreachable == (2.0, 4.5)
    assert summary.non_monotone == (11.0,)
    assert summary.run_matches is True


# --------------------------------------------------------------------------------------------------
# The spec, the manifest and the pipeline stages
# --------------------------------------------------------------------------------------------------


def test_the_manifest_keeps_order_fixed_groups_and_summary_and_omits_them_when_absent() -> None:
    run = run_scores("gradient")
    budget_frontier = flagged_frontier()
    manifest = build_manifest(
        run, ManifestSpec(scheme="t"), model=TEST_MODEL, dataset=None, frontier=budget_frontier
    )
    data = json.loads(json.dumps(manifest_to_dict(manifest)))
    assert data["search_order"] == list(ORDER)
    assert data["fixed_groups"][1] == {"name": "visual.proj", "weights": 2048.0, "lm": False}
    assert data["frontier"]["unreachable"] == [2.0, 4.5]
    assert manifest_from_dict(data, "m.json") == manifest
    plain = build_manifest(scores(*GROUPS), ManifestSpec(scheme="t"), model=TEST_MODEL, dataset=None)
    assert not {"search_order", "fixed_groups", "frontier"} & set(manifest_to_dict(plain))


def test_solve_budgets_between_scores_and_reports(tmp_path: Path) -> None:
    store = Pipeline(
        [
            SolveBudgets(FrontierSpec(bits="6:12:3", workers=1)),
            BuildManifest(ManifestSpec(scheme="t")),
            WriteReports(ReportSpec(output_dir=str(tmp_path), plots=False)),
        ],
        supplied=[run_scores("gradient")],
    ).run()
    manifest = store.get(Manifest)
    assert manifest.frontier is not None
    assert manifest.frontier.budgets == 3
    assert manifest.frontier.run_matches is True
    files = {Path(name).name for name in store.get(ReportPaths).files}
    assert {MARKDOWN_FILE, JSON_FILE, "t_quant_manifest.json"} <= files
    assert (tmp_path / MARKDOWN_FILE).is_file()


# --------------------------------------------------------------------------------------------------
# aqm frontier on run folders (fakes for the model)
# --------------------------------------------------------------------------------------------------


def run_folder(tmp_path: Path, *, with_pipeline: bool = False, with_state: bool = False) -> Path:
    """A finished run folder: the manifest of ``run_scores`` (and its pipeline file and state)."""
    folder = tmp_path / "run"
    manifest = build_manifest(
        run_scores("gradient"), ManifestSpec(scheme="t"), model=TEST_MODEL, dataset=None
    )
    write_reports(manifest, folder, plots=False)
    if with_pipeline:
        spec = spec_from_dict({"model": {"path": "builtin:tiny-qwen3-vl"}}, source="t")
        (folder / PIPELINE_FILE).write_text(spec_to_toml(spec, header="Effective pipeline written by aqm"))
    if with_state:
        (folder / STATE_FILE).write_bytes(b"state")
    return folder


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["missing"], "missing does not exist: pass a run folder of aqm run"),
        (["empty"], "empty holds no *_quant_manifest.json: not a finished run folder"),
        (["run", "--bits", "8:4:1"], "--bits: budgets '8:4:1': start 8 is above stop 4"),
        (["run"], "no budgets given and its pipeline.toml has no [frontier] bits; pass --bits"),
        (["run", "--bits", "8", "--measure", "2"], "has no pipeline.toml: --measure loads the run's model"),
    ],
)
def test_aqm_frontier_refuses_with_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    folder = run_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    before = listing(tmp_path)
    code = main(["frontier", str(tmp_path / argv[0]), *argv[1:]])
    err = capsys.readouterr().err
    assert code != 0
    assert message in err
    assert err.count("\n") == 1
    assert "Traceback" not in err
    assert listing(tmp_path) == before
    assert not (folder / MARKDOWN_FILE).exists()


def test_measure_needs_the_runs_search_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = run_folder(tmp_path, with_pipeline=True)
    assert main(["frontier", str(folder), "--bits", "8", "--measure", "2"]) != 0
    assert f"{folder / STATE_FILE} does not exist: --measure restores the run's saved search state" in (
        capsys.readouterr().err
    )


def test_locate_manifest_names_every_candidate(tmp_path: Path) -> None:
    folder = run_folder(tmp_path)
    shutil.copy(folder / "t_quant_manifest.json", folder / "u_quant_manifest.json")
    with pytest.raises(InputError, match="holds 2 manifests"):
        locate_manifest(folder)
    assert locate_manifest(folder / "t_quant_manifest.json").name == "t_quant_manifest.json"


def test_frontier_of_a_manifest_is_the_runs_choice_at_its_budget(tmp_path: Path) -> None:
    folder = run_folder(tmp_path)
    result = FinishedRun.open(folder).frontier(FrontierSpec(bits="5:13:0.5", workers=1))
    assert result.frontier.exact_order  # the manifest carries ModelOpt's order and fixed groups
    assert len(result.frontier.points) == 17
    assert result.run_checked
    assert result.run_mismatches == ()


class FakeMeasurer:
    """Stands in for the model: returns a measured frontier (or fails), recording what it got."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[tuple[Any, FrontierSpec]] = []

    def __call__(self, pipeline: Any, spec: FrontierSpec) -> tuple[BudgetFrontier, MeasuredFrontier]:
        self.calls.append((pipeline, spec))
        assert Path(pipeline.autoquant.checkpoint).read_bytes() == b"state"  # a copy of the run's
        if self.fail:
            raise AqmError("the model could not be loaded")
        frontier = flagged_frontier()
        return frontier, _report([_measured(7.0, 6.9, 0.9, 0.3, 0.05), _measured(11.0, 10.9, 0.2, 0.1, 0.01)])


def test_measured_frontier_of_a_run_folder_through_the_service(tmp_path: Path) -> None:
    folder = run_folder(tmp_path, with_pipeline=True, with_state=True)
    measurer = FakeMeasurer()
    service = RunService(frontier_measurer=measurer)
    paths = service.outputs.frontier(
        FrontierRequest(folder, bits="6:12:1", measure=2, workers=1, plots=False)
    ).paths
    ((pipeline, spec),) = measurer.calls
    assert spec == FrontierSpec(bits="6:12:1", measure=2, workers=1)
    assert Path(pipeline.autoquant.checkpoint).parent != folder  # the run folder is only read
    assert {p.name for p in paths} == {MARKDOWN_FILE, JSON_FILE}
    assert all(p.is_file() and folder in p.parents for p in paths)
    assert "## Measured on held-out captions" in (folder / MARKDOWN_FILE).read_text(encoding="utf-8")
    assert not (folder / LOCK_NAME).exists()
    assert not list(folder.glob(".aqm-frontier-*"))


def test_a_failed_measurement_leaves_the_folder_as_it_was(tmp_path: Path) -> None:
    folder = run_folder(tmp_path, with_pipeline=True, with_state=True)
    before = listing(folder)
    service = RunService(frontier_measurer=FakeMeasurer(fail=True))
    with pytest.raises(AqmError, match="could not be loaded"):
        service.outputs.frontier(FrontierRequest(folder, bits="6:12:1", measure=2))
    assert listing(folder) == before


# --------------------------------------------------------------------------------------------------
# The tiny default run (real ModelOpt) and the model restored after measuring
# --------------------------------------------------------------------------------------------------


def modelopt_point(manifest: Manifest, budget: float) -> FrontierPoint:
    """ModelOpt's own search replayed from a manifest alone, as the run check replays it."""
    groups = [project(group, GroupScore) for group in manifest.groups]
    space, _ = search_space(
        groups,
        search_method(manifest.scheme.method, "manifest"),
        order=manifest.search_order,
        fixed=manifest.fixed_groups,
        groups_in_order=False,
    )
    return modelopt_frontier(space, (budget,), workers=1).point(budget)


@pytest.mark.slow
def test_the_tiny_default_runs_choice_is_the_frontiers_at_its_budget(tiny_default_run: AqmRun) -> None:
    assert tiny_default_run.returncode == 0, tiny_default_run.stderr[-2000:]
    run = FinishedRun.open(tiny_default_run.folder)
    manifest = run.manifest
    assert manifest.search_order  # RunAutoQuant records ModelOpt's order
    result = run.frontier(FrontierSpec(bits="8:16:0.5"))
    point = modelopt_point(manifest, manifest.scheme.effective_bits_target)
    by_name = {group.name: group.best_format for group in manifest.groups}
    assert point.formats == tuple(by_name[name] for name in result.frontier.groups)
    assert point.effective_bits_lm == manifest.scheme.effective_bits_lm
    assert result.run_checked
    assert result.run_mismatches == ()
    # the frontier is the exact optimum: never worse than ModelOpt's choice (CBC stops short here)
    assert result.frontier.point(manifest.scheme.effective_bits_target).total_score <= point.total_score


@pytest.mark.slow
def test_aqm_frontier_on_the_tiny_default_run_folder(tiny_default_run: AqmRun, tmp_path: Path) -> None:
    folder = tiny_default_run.folder
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    done = run_aqm("frontier", str(folder), "--bits", "8:16:0.16", "--output", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads((tmp_path / JSON_FILE).read_text(encoding="utf-8"))
    assert len(data["points"]) == 51
    assert data["run_matches"] is True
    assert data["seconds"] < 60
    assert (tmp_path / "plots" / "frontier-formats.png").is_file()
    assert "exact least-score search" in done.stderr
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before


@pytest.mark.slow
def test_a_full_model_manifest_with_fixed_groups_re_solves_to_modelopts_choice() -> None:
    """Vision rows and a disabled LM layer are fixed rows inside ModelOpt's order, and INT8 and FP8
    tie on clamped scores: the manifest alone must still give back every group's format."""
    from auto_quantize_model.specs import AutoQuantSpec, CalibSpec, ExtractSpec, LoadSpec
    from auto_quantize_model.stages.build_calib_loader import BuildCalibLoader
    from auto_quantize_model.stages.extract_lm import ExtractLM
    from auto_quantize_model.stages.load_model import LoadModel
    from auto_quantize_model.stages.run_autoquant import RunAutoQuant

    store = Pipeline(
        [
            LoadModel(LoadSpec(path="builtin:tiny-qwen3-vl", device="cpu")),
            ExtractLM(ExtractSpec(scope="full_model")),
            BuildCalibLoader(CalibSpec(max_samples=16, seq_len=64, batch_size=4)),
            RunAutoQuant(
                AutoQuantSpec(
                    formats=("INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"),
                    effective_bits=11.0,
                    score_size=8,
                    disabled_layers=("model.language_model.layers.1.mlp.*",),
                )
            ),
            BuildManifest(ManifestSpec(scheme="full")),
        ]
    ).run()
    data = json.loads(json.dumps(manifest_to_dict(store.get(Manifest))))
    manifest = manifest_from_dict(data, "full_quant_manifest.json")  # what a run folder holds
    fixed = {group.name: group.lm for group in manifest.fixed_groups}
    assert True in fixed.values()  # the disabled MLP
    assert False in fixed.values()  # the vision tower
    result = FinishedRun(Path("full") / "full_quant_manifest.json", manifest).frontier(
        FrontierSpec(bits="9:15:1", workers=1)
    )
    assert result.frontier.exact_order
    assert result.frontier.other_weights > 0
    point = modelopt_point(manifest, 11.0)
    by_name = {group.name: group.best_format for group in manifest.groups}
    assert point.formats == tuple(by_name[name] for name in result.frontier.groups)
    assert point.effective_bits_model == manifest.scheme.effective_bits_model
    assert result.run_checked
    assert result.run_mismatches == ()
    assert result.frontier.point(11.0).total_score <= point.total_score
