"""Manifests that cannot be true, cannot be read or cannot be solved (issue 21, items 6 and 10).

Every command that reads a manifest (``aqm report``, ``frontier``, ``export``, ``diff``) refuses
such a file in one line that names the file and the group or key, and says what to do; none of
them shows a traceback. A manifest whose scores are NaN is still true (a run can produce it):
``aqm report`` renders it, the frontier and the export refuse it before solving.

The manifest under test is a run's as BuildManifest writes it (dataset, timings, fixed groups,
ModelOpt's order), made from plain scores so that no model runs.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from auto_quantize_model.app.cli import main
from auto_quantize_model.app.run_service import RunService
from auto_quantize_model.artifacts import FixedGroup, GroupScore, StageTiming
from auto_quantize_model.errors import InputError
from auto_quantize_model.io.convert import dumps_json
from auto_quantize_model.io.manifest import (
    check_manifest,
    manifest_from_dict,
    manifest_problems,
    manifest_to_dict,
)
from auto_quantize_model.io.manifest_file import read_manifest
from auto_quantize_model.manifest_records import DatasetInfo, Manifest
from auto_quantize_model.render.reports import health_markdown, regenerate_reports
from auto_quantize_model.specs import ManifestSpec
from auto_quantize_model.stages.build_manifest import build_manifest
from builders import INT8, NONE, TEST_MODEL, Entry, group, scores

W4 = "INT4_AWQ_CFG"
NAME = "t_quant_manifest.json"
SEEDS = Path(__file__).resolve().parents[1] / "data" / "seed-manifests"


def costed(name: str, weights: float, w4: float, int8: float, best: str) -> GroupScore:
    """A group offering W4, INT8 and NONE, costed as ModelOpt costs them (weights x bits / 16)."""
    entries: tuple[Entry, ...] = ((W4, 4.0, w4), (INT8, 8.0, int8), NONE)
    return group(name, *entries, best=best, costs=tuple(weights * bits / 16 for _, bits, _ in entries))


def run_manifest() -> Manifest:
    groups = (
        costed("layers.0.q", 4096.0, 0.9, 0.05, W4),
        costed("layers.0.o", 1024.0, 0.4, 0.3, "NONE"),
        costed("layers.1.q", 8192.0, 2.0, 0.01, INT8),
    )
    fixed = (FixedGroup("layers.0.mlp", 4096.0, lm=True), FixedGroup("visual.proj", 2048.0, lm=False))
    order = ("visual.proj", "layers.0.q", "layers.0.o", "layers.0.mlp", "layers.1.q")
    return build_manifest(
        scores(
            *groups,
            formats=(W4, INT8),
            effective_bits_target=9.0,
            effective_bits_lm=8.75,
            effective_bits_model=9.5,
            search_order=order,
            fixed_groups=fixed,
        ),
        ManifestSpec(scheme="t"),
        model=TEST_MODEL,
        dataset=DatasetInfo("c.txt", "ab" * 32, "packed", 64, 2, 12, 12, 500, 768, 6),
        timings=(StageTiming("LoadModel", 1.5), StageTiming("RunAutoQuant", 2.0)),
        created_at="2025-01-02T03:04:05+00:00",
        versions=(("python", "3.12.3"),),
    )


BASE: dict[str, Any] = json.loads(dumps_json(manifest_to_dict(run_manifest())))
"""The manifest as its file holds it: ranks 1..3 are layers.1.q (2.0), layers.0.q (0.9), layers.0.o (0.4)."""
TOP = "'layers.1.q' (groups[0])"

Edit = Callable[[dict[str, Any]], object]


def setting(*path: str | int, to: Any) -> Edit:
    def edit(data: dict[str, Any]) -> None:
        for key in path[:-1]:
            data = data[key]  # type: ignore[index]
        data[path[-1]] = to  # type: ignore[index]

    return edit


def deleting(key: str) -> Edit:
    return lambda data: data.pop(key)


def nan_top_scores(data: dict[str, Any]) -> None:
    """What a run that kept going with ``autoquant.allow_nonfinite`` writes: NaN ranked first."""
    data["groups"][0]["scores"][0] = "NaN"
    data["groups"][0]["importance"] = "NaN"


def swap_first_two(data: dict[str, Any]) -> None:
    first, second = data["groups"][:2]
    first["rank"], second["rank"] = 2, 1
    data["groups"][:2] = [second, first]


TEXT = dumps_json(BASE)
OK = None
EMPTY = "it ranks no group (aqm run never writes a manifest without groups)"
FIX = "the file was edited or truncated: restore it, or rerun aqm run to write it again"

Says = str | None | dict[str, str]
"""What every command's refusal says, OK where every command reads the file, or per command
(commands not named read it)."""

CASES: list[tuple[str, Edit | str | bytes, Says]] = [
    # (what, an edit of the file's data or the file's whole content, what the refusals say)
    ("no schema_version", deleting("schema_version"), "no schema_version and no layer_sensitivity"),
    ("no scheme", deleting("scheme"), "scheme is missing"),
    ("no model", deleting("model"), "model is missing"),
    ("no dataset", deleting("dataset"), "dataset is missing"),
    ("no groups", deleting("groups"), "groups is missing"),
    ("no timings", deleting("timings"), OK),
    ("no versions", deleting("versions"), OK),
    ("no validation", deleting("validation"), OK),
    ("no search_order", deleting("search_order"), OK),
    ("no fixed_groups", deleting("fixed_groups"), OK),
    ("no format_agreement", deleting("format_agreement"), OK),
    ("a list on top", "[]", "top level is a JSON list"),
    ("groups as an object", setting("groups", to={}), "groups is not a list (got an object)"),
    ("a group as a list", setting("groups", 0, to=[]), "groups[0] is not an object (got a list)"),
    ("scheme as a list", setting("scheme", to=[]), "scheme is not an object (got a list)"),
    (
        "rank as a string",
        setting("groups", 0, "rank", to="1"),
        'groups[0].rank is not an integer (got str "1")',
    ),
    (
        "bits as strings",
        setting("groups", 0, "bits", to=["4", "8", "16"]),
        "groups[0].bits[0] is not a number",
    ),
    (
        "budget as a string",
        setting("scheme", "effective_bits_target", to="9"),
        "effective_bits_target is not a number",
    ),
    (
        "satisfied as a string",
        setting("scheme", "satisfied", to="false"),
        "scheme.satisfied is not true or false",
    ),
    (
        "a score as a word",
        setting("groups", 0, "scores", 0, to="x"),
        'groups[0].scores[0] is not a number (got str "x")',
    ),
    ("no groups at all", setting("groups", to=[]), "it ranks no group"),
    ("NaN scores ranked first", nan_top_scores, {"frontier": f"group {TOP} scored NaN for {W4}"}),
    (
        "one score NaN, importance kept",
        setting("groups", 0, "scores", 0, to="NaN"),
        f"group {TOP} has importance 2.0, but its largest quantized score is NaN",
    ),
    (
        "one score -inf",
        setting("groups", 0, "scores", 0, to="-Infinity"),
        f"group {TOP} has importance 2.0, but its largest quantized score is 0.01",
    ),
    (
        "importance negative",
        setting("groups", 0, "importance", to=-1.0),
        f"group {TOP} has importance -1.0, but its largest quantized score is 2.0",
    ),
    ("importance NaN", setting("groups", 0, "importance", to="NaN"), f"group {TOP} has importance NaN"),
    ("ranks out of importance order", swap_first_two, "ranks follow importance, largest first"),
    (
        "rank 0",
        setting("groups", 0, "rank", to=0),
        f"group {TOP} has rank 0; groups must be listed by rank 1..3",
    ),
    (
        "a rank twice",
        setting("groups", 1, "rank", to=1),
        "has rank 1; groups must be listed by rank 1..3, one rank each",
    ),
    (
        "a cost negative",
        setting("groups", 0, "costs", 0, to=-1.0),
        f"group {TOP} gives format {W4} the cost -1.0 (costs[0])",
    ),
    (
        "a cost NaN",
        setting("groups", 0, "costs", 1, to="NaN"),
        f"group {TOP} gives format {INT8} the cost NaN (costs[1])",
    ),
    (
        "a cost infinite",
        setting("groups", 2, "costs", 2, to="Infinity"),
        "gives format NONE the cost Infinity (costs[2])",
    ),
    (
        "bits 0",
        setting("groups", 0, "bits", 0, to=0.0),
        f"group {TOP} gives format {W4} 0.0 bits (bits[0]); effective bits lie in (0, 16]",
    ),
    ("bits negative", setting("groups", 0, "bits", 1, to=-8.0), "-8.0 bits (bits[1])"),
    ("bits above 16", setting("groups", 0, "bits", 2, to=32.0), "gives format NONE 32.0 bits (bits[2])"),
    ("bits NaN", setting("groups", 0, "bits", 0, to="NaN"), "NaN bits (bits[0])"),
    (
        "chosen format not offered",
        setting("groups", 0, "best_format", to="FP8_DEFAULT_CFG"),
        f"group {TOP} chose format FP8_DEFAULT_CFG (best_format), which is not among its formats",
    ),
    ("a format twice", setting("groups", 0, "formats", 1, to=W4), f"group {TOP} lists format {W4} twice"),
    ("no formats", setting("groups", 0, "formats", to=[]), f"group {TOP} lists no format"),
    (
        "a score short",
        setting("groups", 0, "scores", to=[2.0]),
        f"group {TOP} has 3 formats, 3 bits, 1 scores and 3 costs",
    ),
    (
        "a group twice",
        setting("groups", 1, "name", to="layers.1.q"),
        "group 'layers.1.q' is listed twice (groups[0] and groups[1])",
    ),
    ("a group without a name", setting("groups", 0, "name", to=""), "groups[0] has an empty name"),
    (
        "a fixed group also scored",
        setting("fixed_groups", 0, "name", to="layers.0.q"),
        "fixed group 'layers.0.q' (fixed_groups[0]) is also a scored group",
    ),
    (
        "fixed weights negative",
        setting("fixed_groups", 1, "weights", to=-2048.0),
        "fixed group 'visual.proj' (fixed_groups[1]) weighs -2048.0",
    ),
    ("budget NaN (not recorded)", setting("scheme", "effective_bits_target", to="NaN"), OK),
    (
        "budget negative",
        setting("scheme", "effective_bits_target", to=-1.0),
        "scheme.effective_bits_target is -1.0; a budget lies in (0, 16]",
    ),
    (
        "budget infinite",
        setting("scheme", "effective_bits_target", to="Infinity"),
        "scheme.effective_bits_target is Infinity",
    ),
    (
        "effective bits above 16",
        setting("scheme", "effective_bits_model", to=17.0),
        "scheme.effective_bits_model is 17.0",
    ),
    ("effective bits NaN (nothing counted)", setting("scheme", "effective_bits_lm", to="NaN"), OK),
    ("total score NaN (no search ran)", setting("scheme", "total_score", to="NaN"), OK),
    ("score samples negative", setting("scheme", "score_samples", to=-1), "scheme.score_samples is -1"),
    ("sequence length negative", setting("dataset", "seq_len", to=-64), "dataset.seq_len is -64"),
    (
        "more real tokens than tokens",
        setting("dataset", "real_tokens", to=769),
        "dataset.real_tokens (769) is more than dataset.total_tokens (768)",
    ),
    (
        "a stage time negative",
        setting("timings", 1, "seconds", to=-2.0),
        "timings[1] (RunAutoQuant) took -2.0 s",
    ),
    ("a stage time NaN", setting("timings", 0, "seconds", to="NaN"), "timings[0] (LoadModel) took NaN s"),
    ("cut in half", TEXT[: len(TEXT) // 2], "is not a quant manifest (not JSON"),
    ("cut after 10 characters", TEXT[:10], "is not a quant manifest (not JSON"),
    ("last brace lost", TEXT.rstrip()[:-1], "is not a quant manifest (not JSON"),
    ("empty file", "", "is not a quant manifest (not JSON"),
    ("nested past the parser", "[" * 100_000, "its JSON nests too deeply to read"),
    ("not UTF-8", b"\xff\xfe" + TEXT.encode(), "is not a quant manifest (not UTF-8 text"),
]

EXCEPTION_NAME = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception)\b")


def write(folder: Path, content: str | bytes) -> Path:
    folder.mkdir(parents=True)
    path = folder / NAME
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def mutated(edit: Edit | str | bytes) -> str | bytes:
    if isinstance(edit, str | bytes):
        return edit
    data = copy.deepcopy(BASE)
    edit(data)
    return json.dumps(data, indent=2)


def commands(bad: Path, good: Path, out: Path) -> dict[str, list[str]]:
    return {
        "report": ["report", str(bad), "--output", str(out / "report")],
        "frontier": ["frontier", str(bad), "--bits", "8", "--output", str(out / "frontier"), "--no-plots"],
        "diff": ["diff", str(bad), str(good)],
    }


def quiet_service() -> RunService:
    """The real service with the report's plots off: the pictures are not what is fuzzed here."""
    return RunService(report_writer=functools.partial(regenerate_reports, plots=False))


def run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = main(argv, service=quiet_service())
    out, err = capsys.readouterr()
    return code, out, err


def one_line_refusal(bad: Path, code: int, out: str, err: str, says: str) -> list[str]:
    """What is wrong with a refusal (empty when it is one line, naming the file, the culprit, a fix)."""
    wrong = []
    if code != InputError.exit_code:
        wrong.append(f"exit {code}")
    if err.count("\n") != 1 or not err.startswith(f"aqm: error: {bad}"):
        wrong.append("not one line naming the file")
    if says not in err:
        wrong.append(f"does not say {says!r}")
    if "aqm run" not in err:
        wrong.append("names no fix")
    if out:
        wrong.append(f"printed {out!r}")
    return wrong


@pytest.mark.slow  # renders, exports or spawns for real: slow tier (fast one under a minute)
def test_fuzzed_manifests_are_read_or_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write(tmp_path / "good", TEXT)
    failures: list[str] = []
    for number, (what, edit, expected) in enumerate(CASES):
        bad = write(tmp_path / f"case{number}", mutated(edit))
        for command, argv in commands(bad, good, tmp_path / f"out{number}").items():
            says = expected.get(command) if isinstance(expected, dict) else expected
            try:
                code, out, err = run(capsys, argv)
            except Exception as raised:  # a crash is one more finding; the other cases still run
                failures.append(f"{what} / {command}: raised {type(raised).__name__}: {raised}")
                continue
            wrong = []
            if "Traceback" in out + err or EXCEPTION_NAME.search(out + err):
                wrong.append("shows an exception")
            if says is None and (code != 0 or "aqm: error" in err):
                wrong.append(f"refused (exit {code})")
            if says is not None:
                wrong += one_line_refusal(bad, code, out, err, says)
            if wrong:
                first = (err.strip().splitlines() or [""])[-1][:300]
                failures.append(f"{what} / {command}: {', '.join(wrong)}: {first}")
    assert len(CASES) >= 30
    assert failures == [], "\n".join(failures)


def test_nan_scores_are_reported_but_never_solved(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = copy.deepcopy(BASE)
    nan_top_scores(data)
    bad = write(tmp_path / "run", json.dumps(data))
    says = (
        f"{bad}: group {TOP} scored NaN for {W4}: no budget can be solved with a non-finite score "
        "(aqm report lists every such group under score health); rerun aqm run"
    )

    code, _, err = run(capsys, ["report", str(bad), "--output", str(tmp_path / "report")])
    assert (code, err) == (0, "")
    markdown = (tmp_path / "report" / "per-layer-sensitivity.md").read_text(encoding="utf-8")
    assert "- **Non-finite scores (NaN/Inf):** 1 group, their rank is meaningless — `layers.1.q`" in markdown

    for argv in (
        ["frontier", str(bad), "--bits", "8", "--output", str(tmp_path / "frontier")],
        ["frontier", str(bad), "--bits", "8", "--measure", "2"],  # before the missing pipeline.toml
        ["export", str(bad.parent), "--output", str(tmp_path / "export")],
    ):
        code, out, err = run(capsys, argv)
        assert code == InputError.exit_code, err
        assert err.startswith(f"aqm: error: {says}"), err
        assert err.count("\n") == 1, err  # refused before the solver announced anything
        assert out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "run"]
    assert sorted(p.name for p in bad.parent.iterdir()) == [NAME]


def test_a_manifest_without_groups_is_refused_by_every_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ours = write(tmp_path / "ours", json.dumps({**BASE, "groups": []}))
    legacy = {
        "scheme": {
            "name": "x",
            "quant_formats": [INT8],
            "auto_quantize_method": "gradient",
            "auto_quantize_bits": 8.0,
            "auto_quantize_score_size": 8,
        },
        "model": {"id": "m"},
        "autoquant_state": {"constraints": {"effective_bits": 8.0}, "score": 0.0, "is_satisfied": True},
        "layer_sensitivity": {},
    }
    theirs = write(tmp_path / "theirs", json.dumps(legacy))
    good = write(tmp_path / "good", TEXT)
    for bad in (ours, theirs):
        argvs = [*commands(bad, good, tmp_path / "out").values(), ["diff", str(good), str(bad)]]
        for argv in argvs:
            code, out, err = run(capsys, argv)
            assert code == InputError.exit_code, (argv, err)
            assert err == f"aqm: error: {bad}: {EMPTY}; {FIX}\n"
            assert out == ""
    assert not (tmp_path / "out").exists()


def test_the_health_of_no_groups_is_not_a_pass() -> None:
    section = health_markdown(())
    assert section == "## Score health\n\nThe manifest ranks no group: there are no scores to check.\n"
    assert "passed" not in section


def test_every_problem_is_counted_and_the_first_named(tmp_path: Path) -> None:
    data = copy.deepcopy(BASE)
    data["groups"][0]["costs"][0] = -1.0
    data["groups"][2]["bits"][0] = 0.0
    data["timings"][0]["seconds"] = -1.0
    path = write(tmp_path / "run", json.dumps(data))
    with pytest.raises(InputError) as caught:
        read_manifest(path)
    assert str(caught.value) == (
        f"{path}: group {TOP} gives format {W4} the cost -1.0 (costs[0]); a cost counts weights and is a "
        f"finite number >= 0 (and 2 more problem(s)); {FIX}"
    )


def test_manifests_of_real_runs_have_no_problems() -> None:
    """The rules refuse only what no run writes: our runs' manifests and the previous tool's pass."""
    ours = run_manifest()
    assert list(manifest_problems(ours)) == []
    check_manifest(ours, "ours.json")
    nan_first = copy.deepcopy(BASE)
    nan_top_scores(nan_first)
    assert math.isnan(manifest_from_dict(nan_first, "m.json").groups[0].importance)
    seeds = sorted(SEEDS.rglob("*_quant_manifest.json"))
    assert len(seeds) == 3
    for seed in seeds:
        assert list(manifest_problems(read_manifest(seed))) == [], seed
