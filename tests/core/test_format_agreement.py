"""Several formats in one run: each format's own top-k, what is sensitive under every format vs only some."""

from __future__ import annotations

import json
import math
from pathlib import Path

import attrs
import pytest

from auto_quantize_model.app import cli
from auto_quantize_model.artifacts import GroupScore
from auto_quantize_model.core.format_agreement import default_k, format_agreement, format_agreement_markdown
from auto_quantize_model.core.scores import rank_order
from auto_quantize_model.io.manifest import manifest_from_dict, manifest_to_json
from auto_quantize_model.manifest_records import FormatAgreement, Manifest
from auto_quantize_model.render.reports import render_markdown
from auto_quantize_model.specs import ManifestSpec
from auto_quantize_model.stages.build_manifest import build_manifest
from builders import FP8, INT8, NONE, TEST_MODEL, TINY_DEFAULT, group, scores

W4 = "wint4-b128_a16"

# Six groups; the three formats agree on "a" and "b" (top 2 everywhere), disagree below.
#          INT8   FP8    W4
SCORES = {
    "a": (9.0, 8.0, 90.0),
    "b": (7.0, 9.0, 80.0),
    "c": (6.0, 1.0, 10.0),  # INT8 only
    "d": (1.0, 5.0, 20.0),  # FP8 only
    "e": (2.0, 2.0, 70.0),  # W4 only
    "f": (5.0, 4.0, 60.0),  # INT8 and W4 at k = 4
}


def three_format_groups() -> list[GroupScore]:
    return [
        group(name, (INT8, 8.0, s8), (FP8, 8.0, sf), (W4, 4.0, s4), NONE)
        for name, (s8, sf, s4) in SCORES.items()
    ]


def test_one_format_has_no_summary() -> None:
    groups = [group(name, (INT8, 8.0, s8), NONE) for name, (s8, _, _) in SCORES.items()]
    assert format_agreement(groups) is None
    assert format_agreement_markdown(None) == []


def test_each_format_ranked_by_its_own_score() -> None:
    summary = format_agreement(three_format_groups(), k=4)
    assert summary is not None
    assert summary.formats == (INT8, FP8, W4)
    assert [(t.format, t.groups, t.scored) for t in summary.top] == [
        (INT8, ("a", "b", "c", "f"), 6),
        (FP8, ("b", "a", "d", "f"), 6),
        (W4, ("a", "b", "e", "f"), 6),
    ]
    # a: places 1, 2, 1 (mean 4/3); b: 2, 1, 2 (5/3); f: 4 everywhere
    assert summary.every == ("a", "b", "f")
    assert [(g.name, g.formats, g.best_rank) for g in summary.some] == [
        ("c", (INT8,), 3),
        ("d", (FP8,), 3),
        ("e", (W4,), 3),
    ]
    assert summary.unique_to(INT8) == ("c",)
    assert summary.unique_to(W4) == ("e",)
    pairs = {(p.first, p.second): p for p in summary.pairs}
    assert set(pairs) == {(INT8, FP8), (INT8, W4), (FP8, W4)}
    assert pairs[INT8, FP8].shared_top == 3
    # INT8 and W4 order the six groups a, b, c, f, e, d and a, b, e, f, d, c
    assert pairs[INT8, W4].spearman == pytest.approx(1 - 6 * (0 + 0 + 9 + 0 + 1 + 4) / (6 * 35))


def test_shared_by_some_but_not_all_lists_its_formats() -> None:
    summary = format_agreement(three_format_groups(), k=3)
    assert summary is not None
    assert summary.every == ("a", "b")
    assert [(g.name, g.formats) for g in summary.some] == [("c", (INT8,)), ("d", (FP8,)), ("e", (W4,))]
    summary = format_agreement(three_format_groups(), k=2)
    assert summary is not None
    assert (summary.every, summary.some) == (("a", "b"), ())


def test_nan_ranks_first_and_is_left_out_of_the_correlation() -> None:
    groups = [
        *three_format_groups(),
        group("z", (INT8, 8.0, math.nan), (FP8, 8.0, 0.0), (W4, 4.0, 0.0), NONE),
    ]
    summary = format_agreement(groups, k=1)
    assert summary is not None
    assert summary.top[0].groups == ("z",)
    pair = next(p for p in summary.pairs if (p.first, p.second) == (INT8, FP8))
    assert math.isfinite(pair.spearman)


def test_groups_missing_a_format_are_ranked_where_scored() -> None:
    """A group scored under fewer formats (a fixed vision group, a disabled layer) ranks only there."""
    groups = [*three_format_groups(), group("v", (INT8, 8.0, 100.0), NONE)]
    summary = format_agreement(groups, k=1)
    assert summary is not None
    assert [t.groups for t in summary.top] == [("v",), ("b",), ("a",)]
    assert [t.scored for t in summary.top] == [7, 6, 6]


def test_formats_listed_in_the_runs_order() -> None:
    """ModelOpt lists a group's formats by size; the summary follows the run's own order."""
    groups = [
        group(name, (W4, 4.0, s4), (FP8, 8.0, sf), (INT8, 8.0, s8), NONE)
        for name, (s8, sf, s4) in SCORES.items()
    ]
    assert format_agreement(groups) == format_agreement(groups, order=(W4, FP8))
    summary = format_agreement(groups, order=(INT8, FP8, W4, "not scored"))
    assert summary is not None
    assert summary.formats == (INT8, FP8, W4)
    assert summary == format_agreement(three_format_groups())


def test_default_k() -> None:
    assert [default_k(n) for n in (3, 5, 20, 50, 51, 145, 2000)] == [3, 5, 5, 5, 6, 15, 200]
    with pytest.raises(ValueError, match="k must be >= 1"):
        format_agreement(three_format_groups(), k=0)


def _manifest(groups: list[GroupScore]) -> Manifest:
    return build_manifest(
        scores(*groups, formats=(INT8, FP8, W4)),
        ManifestSpec(scheme="three"),
        model=TEST_MODEL,
        dataset=None,
    )


def test_manifest_carries_the_summary_and_reads_it_back() -> None:
    manifest = _manifest(three_format_groups())
    assert isinstance(manifest.format_agreement, FormatAgreement)
    assert manifest.format_agreement == format_agreement(manifest.groups, order=(INT8, FP8, W4))
    data = json.loads(manifest_to_json(manifest))
    assert data["format_agreement"]["k"] == 5  # six groups: at least 5
    assert manifest_from_dict(data, "m.json") == manifest
    one = build_manifest(
        scores(group("a", (INT8, 8.0, 1.0), NONE)), ManifestSpec(scheme="one"), model=TEST_MODEL, dataset=None
    )
    assert one.format_agreement is None
    assert "format_agreement" not in json.loads(manifest_to_json(one)), (
        "one-format manifests stay as they were"
    )


def test_markdown_section() -> None:
    manifest = _manifest(three_format_groups())
    text = render_markdown(manifest)
    assert "## Sensitive under every format vs only some" in text
    lines = text.splitlines()
    header = lines.index(f"| Rank | `{INT8}` | `{FP8}` | `{W4}` |")
    assert lines[header + 2] == "| #1 | `a` | `b` | `a` |"
    # at k = 5, "e" (places 5, 5, 3) joins; "d" is in FP8's and W4's lists, "c" in INT8's alone
    assert "**In the top 5 under every format (4):** `a`, `b`, `f`, `e`" in text
    assert f"| `d` | `{FP8}`, `{W4}` | 3 |" in text
    assert f"- `{INT8}`: `c`" in text
    assert f"- `{FP8}`: none" in text
    # a manifest written before the summary existed gets the section from its groups
    assert render_markdown(attrs.evolve(manifest, format_agreement=None)) == text


@pytest.mark.slow
def test_three_formats_in_one_pass_on_the_tiny_default(tmp_path: Path) -> None:
    """INT8, FP8 and INT4 weight-only scored in one AutoQuant search (CPU), reported per format.

    ``aqm run`` in this process: nothing here is about a fresh interpreter, which would only add
    library imports.
    """
    formats = [INT8, FP8, W4]
    out = tmp_path / "out"
    settings = [
        f"autoquant.formats={json.dumps(formats)}",
        "manifest.scheme=tiny_three",
        "reports.plots=false",
    ]
    argv = ["run", str(TINY_DEFAULT), "--output", str(out)]
    assert cli.main([*argv, *(part for setting in settings for part in ("--set", setting))]) == 0
    data = json.loads((out / "tiny_three_quant_manifest.json").read_text(encoding="utf-8"))
    manifest = manifest_from_dict(data, "tiny_three")
    assert manifest.scheme.formats == tuple(formats)
    summary = manifest.format_agreement
    assert summary is not None
    assert summary.formats == tuple(formats)
    assert summary.k == default_k(len(manifest.groups))
    for entry in summary.top:  # each list is that format's own order of the manifest's scores
        named = [(g.name, g.scores[g.formats.index(entry.format)]) for g in manifest.groups]
        order = [named[i][0] for i in rank_order([score for _, score in named])]
        assert entry.groups == tuple(order[: summary.k])
    tops = {name for entry in summary.top for name in entry.groups}
    assert tops == set(summary.every) | {g.name for g in summary.some}
    assert len(summary.pairs) == 3
    text = (out / "per-layer-sensitivity.md").read_text(encoding="utf-8")
    assert "## Sensitive under every format vs only some" in text
    assert f"| Rank | `{INT8}` | `{FP8}` | `{W4}` |" in text
    # one scoring pass for all three formats, each format calibrated once
    record = json.loads((out / "run.json").read_text(encoding="utf-8"))
    steps = record["forward_steps"]
    assert steps["scoring"] == manifest.scheme.score_steps
    assert steps["calibration"] == len(formats) * (manifest.scheme.calib_steps or 0)
