"""Routed-token counts in the manifest and the report; the rare-expert rule; both cost models.

Plain data only: the counts are written down (``builders.routing``), the groups are a 30B-A3B
shaped manifest at toy size (``builders.moe_manifest``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import attrs
import pytest

from auto_quantize_model.core.experts import experts_markdown, routed_tokens
from auto_quantize_model.errors import InputError
from auto_quantize_model.io.manifest import manifest_from_dict, manifest_to_dict, manifest_to_json
from auto_quantize_model.render.reports import render_layer_json
from builders import MOE_LAYERS, moe_manifest, routing

EXPERT = f"{MOE_LAYERS}.1.mlp.experts.2"
COUNTS = ((6, 0, 3, 3), (1, 5, 4, 2))  # 6 tokens, top-2: 12 routed per layer


def test_each_expert_group_rests_on_its_experts_tokens() -> None:
    stats = routing(*COUNTS)
    split = moe_manifest(2, 4, "expert")
    tokens = routed_tokens(split.groups, stats)
    assert tokens[f"{EXPERT}.gate_proj"] == 4
    assert tokens[f"{MOE_LAYERS}.0.mlp.experts.1.gate_proj"] == 0
    assert f"{MOE_LAYERS}.0.self_attn.q_proj" not in tokens
    assert len(tokens) == 8
    projection = routed_tokens(moe_manifest(2, 4, "projection").groups, stats)
    assert projection[f"{EXPERT}.gate_proj"] == projection[f"{EXPERT}.down_proj"] == 4
    fused = routed_tokens(moe_manifest(2, 4, "layer").groups, stats)
    assert fused == {f"{MOE_LAYERS}.0.mlp.experts": 12, f"{MOE_LAYERS}.1.mlp.experts": 12}
    assert routed_tokens(split.groups, None) == {}


def test_the_report_shows_the_tokens_beside_the_scores() -> None:
    stats = routing(*COUNTS)
    split = attrs.evolve(moe_manifest(2, 4, "expert"), routing=stats)
    text = "\n".join(experts_markdown(split.groups, stats))
    assert "the calibration's 6 real tokens (1 batches, padding left out)" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    # Layer 0's worst expert is expert 0 (importances fall along network order): 6 tokens.
    assert rows[0].split(" | ")[3:5] == ["0", "6"]
    assert rows[0].endswith("| 0 / 3 / 6 |")
    assert rows[1].endswith("| 1 / 3 / 5 |")
    fused = "\n".join(experts_markdown(moe_manifest(2, 4, "layer").groups, stats))
    assert "| 0 | 4 | 2 | 0 / 3 / 6 | 1 |" in fused  # one expert of layer 0 was sent nothing
    without = "\n".join(experts_markdown(split.groups, None))
    assert "were not counted for this run" in without
    rows_json = render_layer_json(split)["layer_sensitivity"]
    by_name = {row["layer"]: row for row in rows_json}
    assert by_name[f"{EXPERT}.gate_proj"]["routed_tokens"] == 4
    assert "routed_tokens" not in by_name["lm_head"]


def test_the_manifest_keeps_the_counts_and_older_manifests_still_read(tmp_path: Path) -> None:
    stats = routing(*COUNTS)
    built = attrs.evolve(moe_manifest(2, 4, "expert"), routing=stats)
    data = json.loads(manifest_to_json(built))
    assert data["routing"]["layers"][1]["tokens"] == [1, 5, 4, 2]
    assert manifest_from_dict(data, "m.json").routing == stats
    older = manifest_to_dict(moe_manifest(2, 4, "expert"))
    assert "routing" not in older  # left out when absent: files of dense runs stay as they were
    assert manifest_from_dict(older, "m.json").routing is None


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda layer: layer | {"tokens": [6, 0, 3, 2]},
            "routed 11 tokens; 6 tokens to top-2 experts each make 12",
        ),
        (lambda layer: layer | {"top_k": 5}, "has top_k 5 for 4 experts"),
        (lambda layer: layer | {"tokens": [13, -1, 0, 0]}, "gives an expert a negative token count"),
    ],
)
def test_counts_no_run_can_write_are_refused(edit: object, message: str) -> None:
    data = json.loads(manifest_to_json(attrs.evolve(moe_manifest(2, 4, "expert"), routing=routing(*COUNTS))))
    data["routing"]["layers"][0] = edit(data["routing"]["layers"][0])  # type: ignore[operator]
    with pytest.raises(InputError, match=re.escape("routing.layers[0] (layer 0)")) as caught:
        manifest_from_dict(data, "m.json")
    assert message in str(caught.value)
