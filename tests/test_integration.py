"""Every stage on CPU with the real transformers classes and real ModelOpt.

The fast tier's one real run is the README's first command, ``aqm run pipelines/tiny-qwen3-vl.toml``
in a fresh interpreter (the session's ``tiny_default_run``): all seven stages, library imports,
plots and run record included. The slow tier adds the other formats, methods and scopes through
the Python API: the tiny Qwen3-VL is saved with ``save_pretrained`` and reloaded through
``from_pretrained`` (the ``tiny_checkpoint`` fixture), so the load path is the one a real
checkout takes.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from auto_quantize_model.artifacts import LanguageModel, SensitivityScores
from auto_quantize_model.io.manifest_file import read_manifest
from auto_quantize_model.manifest_records import Manifest
from builders import AqmRun, six_stages

PREFIX = "model.language_model"
TARGET_BITS = 12.0


def _expected_groups(layers: int) -> set[str]:
    kinds = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
    return {f"{PREFIX}.layers.{i}.{kind}" for i in range(layers) for kind in kinds} | {"lm_head"}


def _markdown_ranking(text: str) -> list[tuple[int, str]]:
    """(rank, group) of the rows under the ``## Ranked groups`` heading, up to the next heading:
    other tables (validation's measured groups) have rows of the same shape."""
    section = re.search(r"^## Ranked groups\n(.*?)(?=^#{1,2} |\Z)", text, flags=re.M | re.S)
    assert section is not None, "per-layer-sensitivity.md has no '## Ranked groups' section"
    row = r"^\| (\d+) \| `([^`]+)`(?: \+ [^|]+)? \|"  # a fused group lists its other modules after the name
    return [(int(m[1]), m[2]) for m in re.finditer(row, section[1], flags=re.M)]


def test_tiny_default_through_the_command_line(tiny_default_run: AqmRun) -> None:
    run = tiny_default_run
    assert run.returncode == 0, run.stderr
    folder = run.folder
    record = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    assert record["status"] == "complete"
    assert record["forward_steps"]["calibration"] > 0
    assert record["forward_steps"]["scoring"] > 0

    manifest = read_manifest(folder / "tiny_wint8_aint8_quant_manifest.json")
    assert {g.name for g in manifest.groups} == _expected_groups(layers=4)
    assert [g.rank for g in manifest.groups] == list(range(1, len(manifest.groups) + 1))
    importances = [g.importance for g in manifest.groups]
    assert all(math.isfinite(value) for value in importances)
    assert importances == sorted(importances, reverse=True)
    assert manifest.scheme.satisfied
    assert manifest.scheme.effective_bits_lm is not None
    assert manifest.scheme.effective_bits_lm <= manifest.scheme.effective_bits_target + 1e-6
    assert manifest.validation is not None
    assert manifest.validation.restored_exactly

    markdown = (folder / "per-layer-sensitivity.md").read_text(encoding="utf-8")
    assert _markdown_ranking(markdown) == [(g.rank, g.name) for g in manifest.groups]
    assert sorted(p.suffix for p in (folder / "plots").iterdir()) == [".png"] * 3 + [".svg"] * 3


@pytest.mark.slow
@pytest.mark.parametrize(
    ("formats", "method", "scope"),
    [
        # INT8, gradient, language model: the tiny default, run by the fast tier's test above
        (("FP8_DEFAULT_CFG",), "kl_div", "language_model"),
        (("INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"), "gradient", "full_model"),
        (("INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"), "kl_div", "full_model"),
    ],
)
def test_six_stages_end_to_end(
    tiny_checkpoint: Path, tmp_path: Path, formats: tuple[str, ...], method: str, scope: str
) -> None:
    out = tmp_path / "run"
    store = six_stages(
        tiny_checkpoint,
        out,
        device="cpu",
        formats=formats,
        method=method,
        scope=scope,
        max_samples=48,
        score_size=16,
        scheme="it",
        state=tmp_path / "state.pt",
    )
    lm = store.get(LanguageModel)
    scores = store.get(SensitivityScores)
    manifest = store.get(Manifest)
    layers = int(getattr(lm.module, "config").num_hidden_layers)  # noqa: B009

    # every LM linear group scored, with every asked format, and nothing from the vision tower
    assert {g.name for g in scores.groups} == _expected_groups(layers)
    assert all(set(formats) <= set(g.formats) for g in scores.groups)
    assert not [n for g in scores.groups for n in g.module_names if ".visual" in n]
    assert all(math.isfinite(s) for g in scores.groups for s in g.scores)
    enabled_in_vision = [
        name
        for name, module in lm.full_model.named_modules()
        if name.startswith("model.visual") and getattr(module, "is_enabled", False)
    ]
    assert enabled_in_vision == []
    assert scores.method == method
    assert scores.scope == scope

    # the budget holds over the LM, whatever the vision tower weighs
    assert scores.effective_bits_lm <= TARGET_BITS + 1e-6
    if scope == "full_model":
        assert scores.effective_bits_model > scores.effective_bits_lm  # vision costed at 16 bits

    # one ranking, everywhere: in memory, the manifest on disk, the JSON and the Markdown report
    ranking = [(g.rank, g.name) for g in manifest.groups]
    assert [r for r, _ in ranking] == list(range(1, len(ranking) + 1))
    on_disk = read_manifest(out / "it_quant_manifest.json")
    assert [(g.rank, g.name) for g in on_disk.groups] == ranking
    layer_json = json.loads((out / "per-layer-sensitivity.json").read_text(encoding="utf-8"))
    assert [(row["rank"], row["layer"]) for row in layer_json["layer_sensitivity"]] == ranking
    markdown = (out / "per-layer-sensitivity.md").read_text(encoding="utf-8")
    assert _markdown_ranking(markdown) == ranking
    importances = [g.importance for g in manifest.groups]
    assert importances == sorted(importances, reverse=True)
    assert (out / "it_autoquant_state.pt").is_file()
