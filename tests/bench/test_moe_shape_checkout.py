"""``benchmarks/moe_shape_checkout.py``: a checkout with the asked-for MoE layout that aqm loads by
path, and no folder of the user's overwritten."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

from builders import benchmark_script


@pytest.fixture(scope="module")
def script() -> ModuleType:
    module: ModuleType = benchmark_script("moe_shape_checkout")
    return module


@pytest.mark.slow  # writes and loads a checkout: 6 s
def test_the_checkout_has_the_layout_and_loads_by_path(
    script: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from auto_quantize_model.artifacts import LanguageModel
    from auto_quantize_model.backend.experts import expert_layers
    from auto_quantize_model.pipeline import Pipeline
    from auto_quantize_model.specs import LoadSpec
    from auto_quantize_model.stages.extract_lm import ExtractLM
    from auto_quantize_model.stages.load_model import LoadModel

    folder = tmp_path / "moe"
    argv = [str(folder), "--layers", "3", "--experts", "16", "--top-k", "4", "--width", "32"]
    assert script.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["layers"] == 3
    assert printed["experts"] == 16
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(folder).text_config  # as transformers reads it back
    assert (text.num_hidden_layers, text.num_experts, text.num_experts_per_tok) == (3, 16, 4)
    assert (text.hidden_size, text.moe_intermediate_size) == (32, 32)

    store = Pipeline([LoadModel(LoadSpec(path=str(folder), device="cpu")), ExtractLM()]).run()
    lm = store.get(LanguageModel)
    layers = expert_layers(lm.full_model)
    assert len(lm.experts) == 3
    assert [(layer.num_experts, layer.top_k) for layer in layers] == [(16, 4)] * 3
    assert sum(p.numel() for p in lm.full_model.parameters()) == printed["parameters"]


def test_an_existing_folder_is_refused_and_left_alone(
    script: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    assert script.main([str(folder), "--layers", "1", "--experts", "2", "--top-k", "1", "--width", "16"]) == 2
    assert capsys.readouterr().err == f"error: {folder} exists; name a new folder\n"
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert script.main([str(tmp_path / "new"), "--top-k", "9", "--experts", "4"]) == 2
    assert not (tmp_path / "new").exists()
