"""``aqm frontier RUN --max-kl K`` and ``aqm export RUN --max-kl K`` on a fake run folder.

The run folder is :func:`run_folder` (a manifest of four groups and two fixed ones, its pipeline
file and a stand-in search state, as tests/core/test_frontier_points.py builds it); the model is a
fake measurer whose held-out KL follows a known curve, KL = factor x predicted score. Its points go
into ``frontier.json`` exactly as ``aqm frontier --measure`` writes them, and ``--max-kl`` reads
them back from there.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import attrs
import pytest

from auto_quantize_model.app.cli import main
from auto_quantize_model.app.export import ExportRequest, plan_export
from auto_quantize_model.app.folders import PIPELINE_FILE
from auto_quantize_model.app.run_folder import FinishedRun
from auto_quantize_model.app.run_service import RunService
from auto_quantize_model.artifacts import (
    BudgetFrontier,
    FixedGroup,
    GroupScore,
    MeasuredFrontier,
    MeasuredPoint,
)
from auto_quantize_model.backend.modelopt.checkpoint import STATE_FILE
from auto_quantize_model.core.damage import t_quantile
from auto_quantize_model.core.frontier import solve_frontier
from auto_quantize_model.core.frontier_points import measured_budgets, measured_frontier, search_space
from auto_quantize_model.core.scores import NO_QUANT
from auto_quantize_model.io.pipeline_file import spec_from_dict, spec_to_toml
from auto_quantize_model.render.frontier import JSON_FILE, MARKDOWN_FILE
from auto_quantize_model.render.reports import write_reports
from auto_quantize_model.specs import FrontierSpec, ManifestSpec
from auto_quantize_model.stages.build_manifest import build_manifest
from builders import TEST_MODEL, scores

W4, INT8, NONE = "W4", "INT8", "NONE"
FORMAT_BITS = ((W4, 4.0), (INT8, 8.0), (NONE, 16.0))


def scored(name: str, weights: float, raw: tuple[float, float, float]) -> GroupScore:
    """A group offering W4, INT8 and NONE, costed as ModelOpt costs them (weights x bits / 16)."""
    return GroupScore(
        name=name,
        module_names=(name,),
        formats=tuple(f for f, _ in FORMAT_BITS),
        bits=tuple(b for _, b in FORMAT_BITS),
        scores=raw,
        costs=tuple(weights * b / 16 for _, b in FORMAT_BITS),
        best_format="",
    )


GROUPS = (
    scored("layers.0.q", 4096.0, (0.9, 0.05, 0.0)),
    scored("layers.0.o", 1024.0, (0.4, 0.3, 0.0)),
    scored("layers.1.q", 8192.0, (2.0, 0.01, 0.0)),
    scored("layers.1.o", 2048.0, (0.07, 0.09, 0.0)),
)
FIXED = (FixedGroup("layers.0.mlp", 4096.0, lm=True), FixedGroup("visual.proj", 2048.0, lm=False))
ORDER = ("visual.proj", "layers.0.q", "layers.0.o", "layers.0.mlp", "layers.1.q", "layers.1.o")
RUN_BUDGET = 9.0


def run_folder(tmp_path: Path, *, with_pipeline: bool = False, with_state: bool = False) -> Path:
    """A finished run folder whose manifest's best formats are the frontier's own at 9 bits."""
    space, _ = search_space(GROUPS, "gradient", order=ORDER, fixed=FIXED)
    chosen = dict(zip(*_mix(solve_frontier(space, (RUN_BUDGET,), workers=1)), strict=True))
    groups = tuple(attrs.evolve(g, best_format=chosen[g.name]) for g in GROUPS)
    run = scores(
        *groups, method="gradient", effective_bits_target=RUN_BUDGET, search_order=ORDER, fixed_groups=FIXED
    )
    folder = tmp_path / "run"
    write_reports(
        build_manifest(run, ManifestSpec(scheme="t"), model=TEST_MODEL, dataset=None), folder, plots=False
    )
    if with_pipeline:
        spec = spec_from_dict({"model": {"path": "builtin:tiny-qwen3-vl"}}, source="t")
        (folder / PIPELINE_FILE).write_text(spec_to_toml(spec, header="Effective pipeline written by aqm"))
    if with_state:
        (folder / STATE_FILE).write_bytes(b"state")
    return folder


def _mix(frontier: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return frontier.groups, frontier.point(RUN_BUDGET).formats


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


NOISE = (0.05, -0.05, 0.0)
"""ln of the measurement noise, point by point (budgets ascending): mean 0, sd 0.05."""
UPPER = 0.02 * math.exp(t_quantile(2) * 0.05 * math.sqrt(1 + 1 / 3))
"""Upper end of the 95% interval per unit score, fitted on three points of factor 0.02."""


class CurveMeasurer:
    """Measures a run folder's frontier mixes as a model whose KL is ``factor`` x predicted score."""

    def __init__(self, folder: Path, factor: float = 0.02) -> None:
        self.folder = folder
        self.factor = factor
        self.specs: list[FrontierSpec] = []

    def __call__(self, pipeline: Any, spec: FrontierSpec) -> tuple[BudgetFrontier, MeasuredFrontier]:
        self.specs.append(spec)
        solved = FinishedRun.open(self.folder).frontier(spec)
        chosen = measured_budgets(solved.frontier, spec.measure)
        points = []
        for index, point in enumerate(chosen):
            kl = self.factor * point.total_score * math.exp(NOISE[index % len(NOISE)])
            quantized = sum(f != NO_QUANT for f in point.formats)
            points.append(
                MeasuredPoint(point.budget, point.effective_bits_lm, point.total_score, kl / 2, kl, quantized)
            )
        report = measured_frontier(
            points,
            baseline_nll=3.0,
            chosen_delta_nll=0.01,
            holdout_samples=8,
            holdout_tokens=80,
            holdout_source="held.txt",
            restored_exactly=True,
            seconds=1.0,
        )
        return solved, report


def aqm(
    capsys: pytest.CaptureFixture[str], measurer: CurveMeasurer | None, *argv: str, plots: bool = False
) -> tuple[int, str, str]:
    """``aqm`` with the fake measurer; frontier pictures only where a test looks at them (seconds each)."""
    service = RunService(frontier_measurer=measurer) if measurer is not None else None
    extra = ["--no-plots"] if argv[0] == "frontier" and not plots else []
    code = main([*argv, *extra], service=service)
    out, err = capsys.readouterr()
    return code, out, err


def errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("aqm: error:")]


@pytest.fixture
def measured_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A run folder after ``aqm frontier RUN --bits 7:13:0.5 --measure 3`` (7, 10 and 13 bits measured)."""
    folder = run_folder(tmp_path, with_pipeline=True, with_state=True)
    code, _, err = aqm(
        capsys, CurveMeasurer(folder), "frontier", str(folder), "--bits", "7:13:0.5", "--measure", "3"
    )
    assert code == 0, err
    return folder


def frontier_json(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / JSON_FILE).read_text(encoding="utf-8"))
    return data


def test_measured_points_in_frontier_json_give_the_known_curve(measured_run: Path) -> None:
    data = frontier_json(measured_run)
    assert [p["budget"] for p in data["measured"]["points"]] == [7.0, 10.0, 13.0]
    assert data["damage"]["factor"] == pytest.approx(0.02, rel=1e-12)
    assert data["damage"]["log_ratio_sd"] == pytest.approx(0.05, rel=1e-12)
    by_budget = {p["budget"]: p for p in data["points"]}
    assert by_budget[9.0]["predicted_kl"]["central"] == pytest.approx(0.02 * 0.98)
    assert by_budget[9.0]["predicted_kl"]["high"] == pytest.approx(UPPER * 0.98)
    assert by_budget[9.0]["beyond_data"] is False
    text = (measured_run / MARKDOWN_FILE).read_text(encoding="utf-8")
    assert "| budget | LM bits | model bits | predicted score | predicted KL [95%] | formats |" in text
    assert "## Damage model: predicted held-out KL" in text
    assert "- KL = score x 0.02 (geometric mean of KL/score over 3 measured mix(es))" in text


@pytest.mark.slow  # renders, exports or spawns for real: slow tier (fast one under a minute)
def test_max_kl_chooses_the_cheapest_mix_whose_upper_end_is_within_the_bound(
    measured_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ("frontier", str(measured_run), "--bits", "7:13:0.5", "--max-kl", "0.03")
    code, out, err = aqm(capsys, None, *argv, plots=True)
    assert code == 0, err
    assert (measured_run / "plots" / "frontier-damage.png").is_file()
    lines = out.splitlines()
    assert lines[-2].startswith(
        "aqm: max KL 0.03: the mix at the 9-bit budget (8.842 LM bits, predicted score 0.98) "
        "predicts KL 0.0196 ["
    )
    assert lines[-2].endswith(f"the upper end {UPPER * 0.98:.4g} is within the bound")
    assert lines[-1].startswith("aqm: the next cheaper mix (8.421 LM bits) predicts KL 0.0256 [")
    assert lines[-1].endswith("its upper end is above the bound")
    bound = frontier_json(measured_run)["bound"]
    assert bound["budget"] == 9.0
    assert bound["predicted_kl"]["high"] == pytest.approx(UPPER * 0.98)
    assert bound["predicted_kl"]["high"] <= 0.03 < bound["cheaper_predicted_kl"]["high"]
    assert bound["held"] is None
    text = (measured_run / MARKDOWN_FILE).read_text(encoding="utf-8")
    assert "| 9 (run) (max KL) | 8.842 |" in text
    assert "## Cheapest mix within KL 0.03" in text
    # the earlier measurements stay in frontier.json for the next command
    assert [p["budget"] for p in frontier_json(measured_run)["measured"]["points"]] == [7.0, 10.0, 13.0]


def test_max_kl_with_measure_checks_the_chosen_mix(
    measured_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    measurer = CurveMeasurer(measured_run)
    argv = ("frontier", str(measured_run), "--bits", "7:13:0.5", "--max-kl", "0.03", "--measure", "1")
    code, out, err = aqm(capsys, measurer, *argv)
    assert code == 0, err
    (spec,) = measurer.specs
    assert spec.bits == "9.0"  # the chosen mix alone (--measure 1), and every distinct mix of it
    assert spec.measure == 2
    kl = 0.02 * 0.98 * math.exp(0.05)
    assert out.splitlines()[-1] == (
        f"aqm: measured: KL {kl:.4g}, ΔNLL {kl / 2:.4g}: the bound held (inside the predicted interval)"
    )
    data = frontier_json(measured_run)
    assert data["bound"]["held"] is True
    assert data["bound"]["measured_kl"] == pytest.approx(kl)
    assert [p["budget"] for p in data["measured"]["points"]] == [7.0, 9.0, 10.0, 13.0]  # merged


def test_a_bound_that_did_not_hold_says_so(measured_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ("frontier", str(measured_run), "--bits", "7:13:0.5", "--max-kl", "0.03", "--measure", "1")
    code, out, _ = aqm(capsys, CurveMeasurer(measured_run, factor=0.05), *argv)
    assert code == 0
    assert out.splitlines()[-1].endswith("the bound did NOT hold (OUTSIDE the predicted interval)")
    assert frontier_json(measured_run)["bound"]["held"] is False


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--max-kl", "0.0001"],
            "--max-kl 0.0001: KL bound 0.0001 is below what even the least-quantized mix predicts (12.632 LM "
            "bits: KL 0.0002 [",
        ),
    ],
)
def test_max_kl_refusals_are_one_line_and_write_nothing(
    measured_run: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    before = listing(measured_run)
    code, _, err = aqm(capsys, None, "frontier", str(measured_run), "--bits", "7:13:0.5", *argv)
    assert code != 0
    assert message in err
    assert "Traceback" not in err
    assert listing(measured_run) == before


@pytest.mark.parametrize(
    ("value", "message"),
    [("0", "must be a positive number, got '0'"), ("x", "expected a number (nats per token), got 'x'")],
)
@pytest.mark.parametrize("command", ["frontier", "export"])
def test_max_kl_must_be_a_positive_number(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, value: str, message: str
) -> None:
    with pytest.raises(SystemExit) as stop:
        main([command, str(tmp_path), "--output", str(tmp_path / "o"), "--max-kl", value])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"aqm {command}: error: argument --max-kl: {message}"


def test_a_bound_beyond_the_measured_data_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = run_folder(tmp_path, with_pipeline=True, with_state=True)
    code, _, _ = aqm(
        capsys, CurveMeasurer(folder), "frontier", str(folder), "--bits", "9:13:0.5", "--measure", "2"
    )
    assert code == 0
    code, _, err = aqm(capsys, None, "frontier", str(folder), "--bits", "7:13:0.5", "--max-kl", "0.5")
    assert code != 0
    (line,) = errors(err)
    assert line.startswith(
        "aqm: error: --max-kl 0.5: KL bound 0.5 reaches beyond the measured data: the mix at 6.737 LM bits "
        "has predicted score 3.27, above the largest measured one (0.98,"
    )
    top = 0.98 * 0.02 * math.exp(t_quantile(1) * 0.05 * math.sqrt(2) * math.sqrt(1.5))  # ln ratios ±0.05
    assert line.endswith(f"measure cheaper mixes first or lower the bound to {top:.4g}")


def test_a_run_without_measured_points_says_how_to_get_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = run_folder(tmp_path)
    for command in (
        ["frontier", str(folder), "--bits", "7:13:0.5"],
        ["frontier", str(folder)],  # no budgets either: the missing points are what to fix first
        ["export", str(folder), "--output", "x"],
    ):
        code, _, err = aqm(capsys, None, *command, "--max-kl", "0.03")
        assert code != 0
        assert errors(err) == [
            f"aqm: error: {folder} has no measured frontier points: --max-kl fits its damage model on them; "
            f"measure a few mixes first: aqm frontier {folder} --measure 3"
        ]


def test_points_of_another_runs_scores_are_refused(
    measured_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = frontier_json(measured_run)
    data["measured"]["points"][1]["predicted_score"] = 0.5  # not what this manifest solves 10 bits to
    (measured_run / JSON_FILE).write_text(json.dumps(data), encoding="utf-8")
    code, _, err = aqm(capsys, None, "frontier", str(measured_run), "--bits", "7:13:0.5", "--max-kl", "0.03")
    assert code != 0
    assert errors(err) == [
        f"aqm: error: {measured_run}: the measured point at 10 bits had predicted score 0.5, but this run's "
        f"manifest solves that budget to 0.13: the points are another run's; measure a few mixes first: "
        f"aqm frontier {measured_run} --measure 3"
    ]


def test_a_plain_solve_keeps_the_measured_points(
    measured_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, _ = aqm(capsys, None, "frontier", str(measured_run), "--bits", "8:12:1")
    assert code == 0
    data = frontier_json(measured_run)
    assert [p["budget"] for p in data["measured"]["points"]] == [7.0, 10.0, 13.0]
    assert data["measured"]["notes"][-1].startswith("these points were measured earlier")
    assert "bound" not in data
    assert data["damage"]["factor"] == pytest.approx(0.02, rel=1e-12)
    code, _, _ = aqm(capsys, None, "frontier", str(measured_run), "--bits", "8:12:1")
    notes = frontier_json(measured_run)["measured"]["notes"]
    assert sum(n.startswith("these points were measured earlier") for n in notes) == 1  # said once


def test_export_max_kl_takes_the_same_mix_from_the_frontier_budgets(
    measured_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = plan_export(ExportRequest(measured_run, tmp_path / "out", max_kl=0.03))
    assert job.budget == 9.0  # chosen among frontier.json's budgets, as aqm frontier --max-kl chose
    assert job.notes[0].startswith("max KL 0.03: the mix at the 9-bit budget (8.842 LM bits")
    assert plan_export(ExportRequest(measured_run, tmp_path / "out", max_kl=0.02)).budget == 9.5
    ranged = plan_export(ExportRequest(measured_run, tmp_path / "out", bits="10:13:0.5", max_kl=0.02))
    assert ranged.budget == 10.0  # --bits names the budgets to choose among (and the run's own, 9)
    code, _, err = aqm(
        capsys, None, "export", str(measured_run), "--output", str(tmp_path / "o"), "--max-kl", "1e-5"
    )
    assert code != 0
    (line,) = errors(err)
    assert line.startswith(
        "aqm: error: --max-kl 1e-05: KL bound 1e-05 is below what even the least-quantized mix"
    )
    assert not (tmp_path / "o").exists()
