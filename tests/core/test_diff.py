"""Run diffs on hand-made manifests with hand-checked figures, and on the previous tool's real ones."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from auto_quantize_model.app.diff import diff_paths, resolve_manifest_path
from auto_quantize_model.core.diff import RankMove, TopKOverlap, diff_manifests, render_diff_markdown
from auto_quantize_model.errors import InputError
from auto_quantize_model.manifest_records import Manifest
from builders import SEEDS, manifest

INT8 = "wint8_aint8/wint8_aint8_autoquant_lm_quant_manifest.json"
FP8 = "wfp8_afp8/wfp8_afp8_autoquant_lm_quant_manifest.json"
INT8_OLD_LAYOUT = "int8_lm_default_legacy/int8_autoquant_lm_default_quant_manifest.json"


LM = "model.language_model.layers.0."
# A is one of our runs: names carry "model.", plus a vision group offering NONE only.
RUN_A = manifest(
    scheme="run_a",
    groups=[
        (LM + "mlp.down_proj", 5.0),  # a
        ("model.language_model.layers.9.mlp.down_proj", 4.5),  # only in A
        (LM + "mlp.gate_proj", 4.0),  # b
        (LM + "self_attn.q_proj", 3.0),  # c
        (LM + "self_attn.o_proj", 2.0),  # d
        ("lm_head", 1.0),  # e
    ],
    unquantized=("model.visual.blocks.0.attn.qkv",),
)
# B is the previous tool's older layout: no "model." prefix; one group of its own at manifest rank 5.
OLD = "language_model.layers.0."
RUN_B = manifest(
    scheme="run_b",
    groups=[
        (OLD + "mlp.down_proj", 50.0),  # a
        (OLD + "self_attn.q_proj", 40.0),  # c
        ("lm_head", 20.0),  # e
        (OLD + "mlp.gate_proj", 10.0),  # b
        ("language_model.layers.1.mlp.down_proj", 5.0),  # only in B
        (OLD + "self_attn.o_proj", 1.0),  # d
    ],
)


def test_hand_checked_diff() -> None:
    d = diff_manifests(RUN_A, RUN_B, ks=(2, 3, 10), moved=3)
    # Common groups a..e. Ranks among them: A = a1 b2 c3 d4 e5, B = a1 c2 e3 b4 d5 (B's own group
    # at manifest rank 5 does not push d to 6, and A's at rank 2 does not push b to 3).
    assert d.common == 5
    assert d.names_normalised
    # d = (0, 2, 1, 1, 2), sum d² = 10, rho = 1 - 6*10 / (5*24) = 0.5
    assert d.spearman == pytest.approx(0.5)
    # B's order read in A's ranks is 1, 4, 2, 5, 3: 3 inversions among 10 pairs, tau = (7-3)/10
    assert d.kendall == pytest.approx(0.4)
    # top-2 {a,b} vs {a,c}; top-3 {a,b,c} vs {a,c,e}; top-10 is capped at the 5 common groups
    assert d.top_k == (TopKOverlap(2, 1, 2), TopKOverlap(3, 2, 3), TopKOverlap(10, 5, 5))
    assert [t.fraction for t in d.top_k] == [0.5, pytest.approx(2 / 3), 1.0]
    # Moves: b +2 and e -2 (b first: its best rank, 2, beats e's 3), then c -1 ahead of d +1.
    assert d.moved == (
        RankMove(LM + "mlp.gate_proj", 2, 4, 4.0, 10.0),
        RankMove("lm_head", 5, 3, 1.0, 20.0),
        RankMove(LM + "self_attn.q_proj", 3, 2, 3.0, 40.0),
    )
    assert [m.delta for m in d.moved] == [2, -2, -1]
    assert d.only_a == ("model.language_model.layers.9.mlp.down_proj",)
    assert d.only_b == ("language_model.layers.1.mlp.down_proj",)
    assert (d.unranked_a, d.unranked_b) == (1, 0)


def test_diff_is_antisymmetric_where_it_should_be() -> None:
    forward = diff_manifests(RUN_A, RUN_B)
    backward = diff_manifests(RUN_B, RUN_A)
    assert backward.spearman == pytest.approx(forward.spearman)
    assert backward.kendall == pytest.approx(forward.kendall)
    assert (backward.only_a, backward.only_b) == (forward.only_b, forward.only_a)
    assert sorted(m.delta for m in backward.moved) == sorted(-m.delta for m in forward.moved)


def test_identical_runs() -> None:
    d = diff_manifests(RUN_A, RUN_A)
    assert d.spearman == pytest.approx(1.0)
    assert d.kendall == pytest.approx(1.0)
    assert d.moved == ()
    assert d.only_a == d.only_b == ()
    assert all(t.shared == t.size == 6 for t in d.top_k)


def test_names_matched_exactly_when_stripping_would_merge_groups() -> None:
    # "model.x" and "x" in one run are two groups; stripping "model." would fold them into one.
    clash = manifest(scheme="clash", groups=[("model.lm_head", 2.0), ("lm_head", 1.0)])
    d = diff_manifests(clash, manifest(scheme="plain", groups=[("lm_head", 3.0), ("other", 1.0)]))
    assert not d.names_normalised
    assert d.common == 1
    assert d.only_a == ("model.lm_head",)
    assert d.only_b == ("other",)
    assert math.isnan(d.spearman)  # one common group: no correlation to speak of


def test_markdown() -> None:
    d = diff_manifests(RUN_A, RUN_B, ks=(2, 3), moved=2)
    text = render_diff_markdown(d, "INT8", "FP8")
    lines = text.splitlines()
    assert lines[0] == "## Ranking diff: INT8 (A) vs FP8 (B)"
    assert "5 groups are ranked in both runs (names matched without a leading `model.`)" in text
    assert "left out: 1 in A, 0 in B." in text
    assert "| Spearman rho (importance) | 0.500 |" in lines
    assert "| Kendall tau-b (importance) | 0.400 |" in lines
    assert "| top-2 overlap | 1/2 (50%) |" in lines
    assert "| top-3 overlap | 2/3 (67%) |" in lines
    assert f"| `{LM}mlp.gate_proj` | 2 | 4 | +2 | 4.000e+00 | 1.000e+01 |" in lines
    assert "| `lm_head` | 5 | 3 | -2 | 1.000e+00 | 2.000e+01 |" in lines
    assert "**Only in INT8 (1):** `model.language_model.layers.9.mlp.down_proj`" in lines
    assert "**Only in FP8 (1):** `language_model.layers.1.mlp.down_proj`" in lines
    assert text.endswith("\n")
    assert not text.endswith("\n\n")


def test_markdown_with_nothing_moved_and_undefined_coefficients() -> None:
    single = manifest(scheme="single", groups=[("lm_head", 1.0)])
    text = render_diff_markdown(diff_manifests(single, single), "A", "B", level=3)
    assert text.startswith("### Ranking diff: A (A) vs B (B)\n")
    assert "| Spearman rho (importance) | n/a |" in text
    assert "No group changed rank." in text
    assert "**Only in A:** none" in text


def test_resolve_manifest_path(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(InputError, match=r"no \*_quant_manifest.json"):
        resolve_manifest_path(run)
    first = run / "x_quant_manifest.json"
    first.write_text("{}")
    assert resolve_manifest_path(run) == first
    assert resolve_manifest_path(first) == first
    (run / "y_quant_manifest.json").write_text("{}")
    with pytest.raises(InputError, match="several manifests"):
        resolve_manifest_path(run)
    with pytest.raises(InputError, match="no such file or folder"):
        resolve_manifest_path(tmp_path / "missing")


def test_diff_paths_on_our_manifests(tmp_path: Path) -> None:
    from auto_quantize_model.io.manifest import manifest_to_json

    folder_a = tmp_path / "a"
    folder_a.mkdir()
    (folder_a / "run_a_quant_manifest.json").write_text(manifest_to_json(RUN_A))
    file_b = tmp_path / "run_b_quant_manifest.json"
    file_b.write_text(manifest_to_json(RUN_B))
    text = diff_paths(folder_a, file_b, ks=(2,), moved=2)
    assert text.startswith("## Ranking diff: run_a (A) vs run_b (B)\n")
    assert "| Spearman rho (importance) | 0.500 |" in text
    # Same scheme on both sides: labelled by path so the reader can tell them apart.
    same = diff_paths(file_b, file_b)
    assert f"## Ranking diff: {file_b} (A) vs {file_b} (B)" in same


def _legacy(relative: str) -> Manifest:
    from auto_quantize_model.io.legacy import legacy_manifest_from_dict

    path = SEEDS / relative
    return legacy_manifest_from_dict(json.loads(path.read_text()), path)


def test_real_int8_vs_fp8() -> None:
    d = diff_manifests(_legacy(INT8), _legacy(FP8))
    # 36 layers x 4 recipe groups + lm_head are ranked; the 105 vision groups offer NONE only.
    assert d.common == 145
    assert (d.unranked_a, d.unranked_b) == (105, 105)
    assert d.only_a == d.only_b == ()
    assert d.names_normalised
    assert -1.0 <= d.spearman <= 1.0
    assert -1.0 <= d.kendall <= 1.0
    assert d.spearman > 0.5  # the two formats agree broadly (0.93 in this run), not exactly
    assert [(t.k, t.size) for t in d.top_k] == [(10, 10), (25, 25), (50, 50)]
    assert all(0 <= t.shared <= t.size for t in d.top_k)
    assert len(d.moved) == 15
    deltas = [abs(m.delta) for m in d.moved]
    assert deltas == sorted(deltas, reverse=True)
    assert deltas[-1] > 0


def test_real_old_and_new_layout_of_one_int8_run_agree() -> None:
    # The older file names groups without "model.", scores the vision tower 0 and has no lm_head;
    # with names normalised, its 144 decoder groups pair up with the newer file's and rank identically.
    d = diff_manifests(_legacy(INT8_OLD_LAYOUT), _legacy(INT8))
    assert d.common == 144
    assert d.spearman == pytest.approx(1.0)
    assert d.kendall == pytest.approx(1.0)
    assert len(d.only_a) == 105
    assert all(name.startswith("visual.") for name in d.only_a)
    assert d.only_b == ("lm_head",)


def test_real_diff_paths_markdown() -> None:
    text = diff_paths(SEEDS / "wint8_aint8", SEEDS / FP8)
    assert text.startswith("## Ranking diff: wint8_aint8_autoquant_lm (A) vs wfp8_afp8_autoquant_lm (B)\n")
    assert "145 groups are ranked in both runs" in text
    assert text.count("\n| `") == 15  # the rows of the moved-most table
