"""A model spread over devices (``model.device_map``, ``model.max_memory``), on a one-device CPU.

What is real and what is faked:

* spec and pipeline-file checks, the placement summary: real (no torch needed for most);
* the placed build of ``builtin:tiny-qwen3-vl``: real transformers and accelerate, every module on
  ``cpu`` (the only device here). The layout is varied instead of the devices: one key for the
  whole model, a key per layer listed in reverse, a strategy; and a single layer is re-initialised
  alone, to show its weights depend on its name and the seed only, not on the build order;
* the plumbing across devices (inputs to the first shard, lm_head chunks to lm_head's device):
  FAKES. A fake decoder and a fake lm_head whose accelerate-style hook names the ``meta`` device
  record where their inputs arrive; no second real device exists on this machine;
* the end-to-end run: real (ModelOpt AutoQuant INT8 with gradient scores and validation) on two
  layouts of the same placed CPU model, whose manifests must agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from auto_quantize_model.backend.models import load
from auto_quantize_model.backend.sharding import (
    initialize,
    layers_per_device,
    module_seed,
    owner_of,
    placement_summary,
)
from auto_quantize_model.errors import ConfigError
from auto_quantize_model.sources import TINY_QWEN3_VL
from auto_quantize_model.specs import LoadSpec
from builders import comparable_manifest

LAYERS = 4  # tiny-qwen3-vl's decoder layers


# --------------------------------------------------------------------------------------------------
# placement summaries (pure)
# --------------------------------------------------------------------------------------------------


def test_summary_collapses_layer_runs() -> None:
    layers = "model.language_model.layers"
    placement = {
        "model.visual": "cuda:0",
        "model.language_model.embed_tokens": "cuda:0",
        **{f"{layers}.{i}": "cuda:0" for i in range(3)},
        **{f"{layers}.{i}": "cuda:1" for i in range(3, 6)},
        f"{layers}.7": "cuda:1",
        "lm_head": "cuda:1",
    }
    assert placement_summary(placement) == (
        "cuda:0: model.visual, model.language_model.embed_tokens, model.language_model.layers.0-2; "
        "cuda:1: model.language_model.layers.3-5, model.language_model.layers.7, lm_head"
    )
    assert layers_per_device(placement) == {"cuda:0": 3, "cuda:1": 4}
    assert placement_summary({"": "cpu"}) == "cpu: (all)"


def test_owner_is_the_longest_covering_key() -> None:
    placement = {"": "cpu", "model.layers.1": "cuda:1", "model.layers.10": "cuda:0"}
    assert owner_of("model.layers.1.mlp.weight", placement) == "model.layers.1"
    assert owner_of("model.layers.10.mlp.weight", placement) == "model.layers.10"
    assert owner_of("model.layers.2.mlp.weight", placement) == ""
    assert owner_of("x", {"model": "cpu"}) is None


def test_module_seeds_depend_on_seed_and_name_only() -> None:
    assert module_seed(0, "lm_head") == module_seed(0, "lm_head")
    assert len({module_seed(0, "lm_head"), module_seed(1, "lm_head"), module_seed(0, "model.norm")}) == 3


# --------------------------------------------------------------------------------------------------
# (b) weights that do not depend on the layout
# --------------------------------------------------------------------------------------------------


def _state(spec: LoadSpec) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in load(spec).model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, different[:5]


@pytest.mark.slow
def test_placed_weights_depend_on_names_not_layout() -> None:
    whole = _state(LoadSpec(TINY_QWEN3_VL, device_map={"": "cpu"}))
    _same(whole, _state(LoadSpec(TINY_QWEN3_VL, device_map={"": "cpu"})))
    per_layer = {f"model.language_model.layers.{i}": "cpu" for i in reversed(range(LAYERS))}
    _same(whole, _state(LoadSpec(TINY_QWEN3_VL, device_map={**per_layer, "lm_head": "cpu", "": "cpu"})))
    _same(whole, _state(LoadSpec(TINY_QWEN3_VL, device_map="auto")))
    other_seed = _state(LoadSpec(TINY_QWEN3_VL, device_map={"": "cpu"}, seed=1))
    assert not torch.equal(
        whole["model.language_model.layers.0.mlp.up_proj.weight"],
        other_seed["model.language_model.layers.0.mlp.up_proj.weight"],
    )


def test_one_layer_initialised_alone_gets_the_same_weights() -> None:
    loaded = load(LoadSpec(TINY_QWEN3_VL, device_map={"": "cpu"}))
    layer = "model.language_model.layers.2"
    before = {n: t.clone() for n, t in loaded.model.get_submodule(layer).state_dict().items()}
    with torch.no_grad():
        for param in loaded.model.get_submodule(layer).parameters():
            param.fill_(7.0)
    names = {
        name for name, _ in loaded.model.named_modules() if name == layer or name.startswith(f"{layer}.")
    }
    initialize(loaded.model, 0, names)  # alone, and children in the order the set hands them
    _same(before, dict(loaded.model.get_submodule(layer).state_dict()))


def test_placed_model_matches_the_plain_build_in_everything_not_random() -> None:
    placed = load(LoadSpec(TINY_QWEN3_VL, device_map={"": "cpu"}))
    plain = load(LoadSpec(TINY_QWEN3_VL, device="cpu"))
    model: Any = placed.model
    assert model.hf_device_map == {"": "cpu"}
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # still tied
    plain_buffers = dict(plain.model.named_buffers())
    for name, buffer in placed.model.named_buffers():  # rotary inv_freq, recomputed by _init_weights
        assert torch.equal(buffer, plain_buffers[name]), name
    plain_params = dict(plain.model.named_parameters())
    for name, param in placed.model.named_parameters():
        assert param.dtype == plain_params[name].dtype
        if "norm" in name:  # ones, whatever the seed
            assert torch.equal(param, plain_params[name]), name
        else:
            assert float(param.detach().std()) == pytest.approx(
                float(plain_params[name].detach().std()), rel=0.2, abs=1e-6
            ), name
    assert (placed.device, placed.devices) == ("cpu", "")


def test_placement_errors_name_the_module(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"model\.device_map: builtin:tiny-qwen3-vl has no module 'lm_heads'"
    ):
        load(LoadSpec(TINY_QWEN3_VL, device_map={"lm_heads": "cpu", "": "cpu"}))
    with pytest.raises(
        ConfigError, match=r"model\.device_map: nothing places lm_head\.weight of builtin:tiny-qwen3-vl"
    ):
        load(LoadSpec(TINY_QWEN3_VL, device_map={"model": "cpu"}))
    with pytest.raises(ConfigError, match=r"does not fit the memory allowed \(model\.max_memory\)"):
        load(LoadSpec(TINY_QWEN3_VL, device_map="sequential", max_memory={"cpu": "1MB"}))


# --------------------------------------------------------------------------------------------------
# (d) the pipeline on a placed model
# --------------------------------------------------------------------------------------------------


def _run(tmp_path: Path, name: str, device_map: Any) -> dict[str, Any]:
    from auto_quantize_model.pipeline import Pipeline
    from auto_quantize_model.specs import (
        AutoQuantSpec,
        CalibSpec,
        ExtractSpec,
        ManifestSpec,
        ReportSpec,
        ValidateSpec,
    )
    from auto_quantize_model.stages.build_calib_loader import BuildCalibLoader
    from auto_quantize_model.stages.build_manifest import BuildManifest
    from auto_quantize_model.stages.extract_lm import ExtractLM
    from auto_quantize_model.stages.load_model import LoadModel
    from auto_quantize_model.stages.run_autoquant import RunAutoQuant
    from auto_quantize_model.stages.validate_sensitivity import ValidateSensitivity
    from auto_quantize_model.stages.write_reports import WriteReports

    out = tmp_path / name
    Pipeline(
        [
            LoadModel(LoadSpec(TINY_QWEN3_VL, device_map=device_map)),
            ExtractLM(ExtractSpec()),
            BuildCalibLoader(CalibSpec(max_samples=12, seq_len=32, batch_size=2)),
            RunAutoQuant(AutoQuantSpec(formats=("INT8_DEFAULT_CFG",), effective_bits=12.0, score_size=8)),
            ValidateSensitivity(ValidateSpec(k=2, holdout_samples=8)),
            BuildManifest(ManifestSpec(scheme="t")),
            WriteReports(ReportSpec(output_dir=str(out), plots=False)),
        ]
    ).run()
    return comparable_manifest(out)


@pytest.mark.slow
def test_pipeline_ranking_is_the_same_for_any_layout(tmp_path: Path) -> None:
    whole = _run(tmp_path, "whole", {"": "cpu"})
    per_layer = {f"model.language_model.layers.{i}": "cpu" for i in range(LAYERS)}
    split = _run(tmp_path, "split", {**per_layer, "lm_head": "cpu", "": "cpu"})
    assert whole["groups"]
    assert whole["groups"] == split["groups"]  # ranking, scores and formats
    assert _without_seconds(whole) == _without_seconds(split)


def _without_seconds(value: Any) -> Any:
    """The manifest less its wall times (validation records how long its passes took)."""
    if isinstance(value, dict):
        return {k: _without_seconds(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_seconds(v) for v in value]
    return value
