"""ModelOpt's side of export on CPU with the tiny Qwen3-VL: mixes quantized, exported by ModelOpt's own
exporter and loaded back; NVFP4 needs CUDA (``gpu`` test)."""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from auto_quantize_model.core import export_config as xc
from auto_quantize_model.core.export_choice import (
    GroupChoice,
    choices_from_groups,
)
from auto_quantize_model.core.export_labels import export_format
from auto_quantize_model.errors import AqmError, ConfigError, InputError
from builders import FP8, INT8

LAYERS = "model.language_model.layers"


def layer_choices(attention: str, mlp: str, head: str, layers: int = 4) -> list[GroupChoice]:
    """ModelOpt's recipe groups of the tiny Qwen3-VL (q/k/v and gate/up together) on three formats;
    odd layers' o_proj stays NONE so every mix has unquantized layers too."""
    choices: list[GroupChoice] = []
    for i in range(layers):
        attn = f"{LAYERS}.{i}.self_attn"
        mlp_path = f"{LAYERS}.{i}.mlp"
        choices += [
            GroupChoice(f"{attn}.q_proj", (f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"), attention),
            GroupChoice(f"{attn}.o_proj", (f"{attn}.o_proj",), "NONE" if i % 2 else attention),
            GroupChoice(f"{mlp_path}.gate_proj", (f"{mlp_path}.gate_proj", f"{mlp_path}.up_proj"), mlp),
            GroupChoice(f"{mlp_path}.down_proj", (f"{mlp_path}.down_proj",), mlp),
        ]
    choices.append(GroupChoice("lm_head", ("lm_head",), head))
    return choices


# --------------------------------------------------------------------------------------------------
# With ModelOpt (CPU)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_presets_come_from_modelopt_and_cuda_formats_are_refused_on_cpu() -> None:
    import modelopt.torch.quantization.config as presets

    from auto_quantize_model.backend.modelopt import quant_config as qc

    found = qc.format_configs(["INT8_DEFAULT_CFG", "wfp8_afp8", "NONE"])
    assert found["INT8_DEFAULT_CFG"] == presets.INT8_DEFAULT_CFG
    assert found["INT8_DEFAULT_CFG"] is not presets.INT8_DEFAULT_CFG  # a copy: nothing edits ModelOpt's
    assert set(found) == {"INT8_DEFAULT_CFG", "wfp8_afp8"}
    choices = layer_choices("NVFP4_DEFAULT_CFG", FP8, "NONE")
    with pytest.raises(ConfigError, match=r"^format NVFP4_DEFAULT_CFG cannot be exported on cpu: .*CUDA"):
        qc.prepare_export(choices, device="cpu")
    assert qc.prepare_export(choices, device="cuda:0").needs_cuda == ("NVFP4_DEFAULT_CFG",)


@pytest.mark.slow
def test_written_files_are_accepted_by_modelopt_and_quantize_the_chosen_layers(tmp_path: Path) -> None:
    import modelopt.torch.quantization as mtq

    from auto_quantize_model.backend.modelopt import quant_config as qc
    from auto_quantize_model.backend.models import build_builtin
    from auto_quantize_model.sources import TINY_QWEN3_VL

    model = build_builtin(TINY_QWEN3_VL, seed=0, dtype="float32", device="cpu").model
    choices = layer_choices(INT8, "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "wfp8-pc_afp8-token")
    config = qc.prepare_export(
        choices, vision_prefixes=("model.visual",), known_modules=qc.linear_modules(model)
    )
    files = qc.write_quant_config(config, tmp_path)  # reads both back itself (YAML via load_recipe)
    assert files.layers == len(config.layers) == 4 * 7 + 1
    readme = Path(files.readme_path).read_text(encoding="utf-8")
    assert "quant_recipe.yaml" in readme
    assert "load_exported" not in readme  # no checkpoint in this folder
    from_json = xc.read_quant_config(Path(files.json_path).read_text(encoding="utf-8"))
    mtq.quantize(model, from_json, None)  # weight-only + dynamic formats need no calibration data
    enabled = {
        name
        for name, module in model.named_modules()
        if getattr(getattr(module, "weight_quantizer", None), "is_enabled", False)
    }
    assert enabled == {layer.module for layer in config.quantized}
    head: Any = model.get_submodule("lm_head")
    assert head.input_quantizer.is_enabled
    assert head.input_quantizer.block_sizes == {-1: None}  # one scale per token
    up: Any = model.get_submodule(f"{LAYERS}.0.mlp.up_proj")
    assert up.weight_quantizer.block_sizes == {-1: 128, "type": "static"}
    assert not up.input_quantizer.is_enabled


def tiny_export(
    tmp_path: Path,
    choices: Sequence[GroupChoice],
    *,
    calib_captions: int = 32,
    device: str = "cpu",
    dtype: str = "float32",
) -> tuple[Any, Any, Any, Any]:
    """The tiny model quantized with ``choices`` and exported; returns (config, result, evaluate, lm)."""
    from auto_quantize_model.backend.lm_forward import as_tensors, calibration_step_for
    from auto_quantize_model.backend.locate import extract_language_model
    from auto_quantize_model.backend.modelopt import export as ex
    from auto_quantize_model.backend.modelopt import quant_config as qc
    from auto_quantize_model.backend.models import build_builtin
    from auto_quantize_model.core.batching import encode, holdout_columns, scorable
    from auto_quantize_model.core.captions import read_caption_file
    from auto_quantize_model.data import builtin_captions_path
    from auto_quantize_model.sources import TINY_QWEN3_VL
    from auto_quantize_model.specs import ExtractSpec

    loaded = build_builtin(TINY_QWEN3_VL, seed=0, dtype=dtype, device=device)  # type: ignore[arg-type]
    lm = extract_language_model(loaded.model, loaded.tokenizer, ExtractSpec())
    config = qc.prepare_export(
        choices,
        device=device,
        vision_prefixes=lm.vision_modules,
        known_modules=qc.linear_modules(loaded.model),
    )
    captions = read_caption_file(builtin_captions_path())
    calib = scorable(encode(loaded.tokenizer, captions[:calib_captions]), 64)
    held_out = scorable(encode(loaded.tokenizer, captions[-64:]), 64)
    batches = [as_tensors(c) for c in holdout_columns(calib, lm.pad_token_id)]
    evaluate = ex.holdout_evaluator(held_out, lm.pad_token_id, lm.prefix, lm.head_name)
    out = tmp_path / "export"
    qc.write_quant_config(config, out)
    result = ex.export_checkpoint(
        loaded.model,
        loaded.tokenizer,
        config,
        batches,
        calibration_step_for(lm, loaded.model),
        out,
        evaluate=evaluate,
    )
    return config, result, evaluate, lm


@pytest.mark.slow
def test_int8_fp8_mix_exports_a_mixed_precision_checkpoint_that_reads_back(tmp_path: Path) -> None:
    from auto_quantize_model.backend.modelopt import export as ex
    from auto_quantize_model.backend.modelopt import read_back as rb

    config, result, evaluate, _ = tiny_export(tmp_path, layer_choices(INT8, FP8, INT8))
    out = Path(result.directory)
    assert result.quant_algo == "MIXED_PRECISION"
    for name in (
        "quant_config.json",
        "quant_recipe.yaml",
        "README.md",
        "config.json",
        "hf_quant_config.json",
        "model.safetensors",
        "tokenizer.json",
    ):
        assert name in result.files, name
    hf_quant = json.loads((out / "hf_quant_config.json").read_text(encoding="utf-8"))
    layers = hf_quant["quantization"]["quantized_layers"]
    assert layers[f"{LAYERS}.0.self_attn.k_proj"] == {"quant_algo": "W8A8_SQ_PER_CHANNEL"}
    assert layers[f"{LAYERS}.2.mlp.up_proj"] == {"quant_algo": "FP8"}
    assert layers["lm_head"] == {"quant_algo": "W8A8_SQ_PER_CHANNEL"}
    assert f"{LAYERS}.1.self_attn.o_proj" not in layers
    assert xc.checkpoint_mismatches(hf_quant, config) == ()
    hf_config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert hf_config["quantization_config"]["quant_algo"] == "MIXED_PRECISION"
    assert hf_config["quantization_config"]["quantized_layers"] == layers
    # The quantized head sits beside the float embedding table: the config must not say "tied".
    assert hf_config["tie_word_embeddings"] is False
    assert hf_config["text_config"]["tie_word_embeddings"] is False
    assert any("tie_word_embeddings false" in note for note in result.notes)
    assert "tie_word_embeddings false" in (out / "README.md").read_text(encoding="utf-8")

    back = rb.read_back_nll(result, evaluate)
    assert math.isfinite(back.in_memory_nll)
    assert back.ok, back
    print(f"float32 INT8 + FP8 read-back: {back}")
    # like for like: the loaded checkpoint against the quantized model computing with the written
    # weights (measured 0.0); ModelOpt's exporter rounding apart (one tied FP8 weight: +3.0e-5)
    assert abs(back.difference) <= 1e-6, back
    assert 0.0 < abs(back.exporter_shift) <= rb.READ_BACK_TOLERANCE, back
    # the sampled layers decode to the fake-quantized weights but for rare rounding ties
    assert back.sampled_layers == len(result.sample) == ex.SAMPLE_LAYERS
    assert back.flip_weights == sum(t.numel() for t in result.sample.values())
    assert back.flipped <= back.flip_weights // 1000, back

    # A checkpoint with one wrong scale is caught by the same check.
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(broken / "model.safetensors"))
    tensors[f"{LAYERS}.0.mlp.down_proj.weight_scale"] *= 1.5
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    wrong = rb.read_back_nll(ex.CheckpointExport(**{**_fields(result), "directory": str(broken)}), evaluate)
    assert not wrong.ok  # measured 1.9e-3, with every other tensor intact
    # and the weight sample shows it: nearly every weight of that layer is off
    down = result.sample[f"{LAYERS}.0.mlp.down_proj"]
    assert wrong.flipped - back.flipped >= 0.9 * int((down != 0).sum())


def _fields(result: Any) -> dict[str, Any]:
    import attrs

    return attrs.asdict(result, recurse=False)


@pytest.mark.slow
def test_one_format_exports_with_exclusions_and_int4_reads_back_exactly(tmp_path: Path) -> None:
    from auto_quantize_model.backend.modelopt import read_back as rb

    int4 = "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"
    config, result, evaluate, _ = tiny_export(tmp_path, layer_choices(int4, int4, "NONE"))
    hf_quant = json.loads((Path(result.directory) / "hf_quant_config.json").read_text(encoding="utf-8"))
    quantization = hf_quant["quantization"]
    assert (result.quant_algo, quantization["group_size"]) == ("W4A16_AWQ", 128)
    assert any(fnmatch.fnmatchcase("lm_head", p) for p in quantization["exclude_modules"])
    assert xc.checkpoint_mismatches(hf_quant, config) == ()
    assert result.notes == ()  # lm_head is NONE: the embeddings stay tied
    back = rb.read_back_nll(result, evaluate)
    assert abs(back.difference) < 1e-6  # weight-only INT4 dequantizes exactly (measured 4e-9)


@pytest.mark.slow
@pytest.mark.parametrize(("attention", "mlp", "head"), [(INT8, FP8, "NONE"), (FP8, FP8, FP8)])
def test_a_bfloat16_export_reads_back_like_for_like_and_the_exporter_rounding_apart(
    tmp_path: Path, attention: str, mlp: str, head: str
) -> None:
    from auto_quantize_model.backend.modelopt import read_back as rb

    _, result, evaluate, _ = tiny_export(tmp_path, layer_choices(attention, mlp, head), dtype="bfloat16")
    back = rb.read_back_nll(result, evaluate)
    print(
        f"bfloat16 read-back, {attention} + {mlp} + head {head}: {back}, exporter {back.exporter_shift:+.1e}"
    )
    assert back.tolerance == rb.READ_BACK_TOLERANCE
    assert back.dtype == "bfloat16"
    # the written weights in the quantized model and the loaded checkpoint: the same computation
    assert abs(back.difference) <= 1e-6, back
    # ModelOpt's exporter rounds with 16-bit scales: the written model is not the fake-quantized one
    # (measured +5.3e-5 for INT8 + FP8, -7.3e-4 for FP8 everywhere)
    assert back.exporter_shift != 0.0
    assert abs(back.exporter_shift) <= rb.READ_BACK_TOLERANCE_16BIT, back
    assert abs(back.fusion_shift) <= rb.READ_BACK_TOLERANCE, back
    assert back.sampled_layers > 0
    assert back.flipped <= back.flip_weights // 20, back  # the exporter's 16-bit scales: a few
    assert rb.read_back_tolerance("float32") == rb.READ_BACK_TOLERANCE < rb.READ_BACK_TOLERANCE_16BIT


@pytest.mark.slow
def test_export_refuses_a_used_folder_and_a_quantized_model(tmp_path: Path) -> None:
    from auto_quantize_model.backend.modelopt import export as ex
    from auto_quantize_model.backend.modelopt import quant_config as qc
    from auto_quantize_model.backend.modelopt import read_back as rb
    from auto_quantize_model.backend.models import build_builtin
    from auto_quantize_model.sources import TINY_QWEN3_VL

    loaded = build_builtin(TINY_QWEN3_VL, seed=0, dtype="float32", device="cpu")
    config = qc.prepare_export(layer_choices(INT8, INT8, "NONE"))
    used = tmp_path / "used"
    used.mkdir()
    (used / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(
        ConfigError, match=r"already holds a checkpoint \(config\.json\); choose an empty folder"
    ):
        ex.export_checkpoint(loaded.model, None, config, [{}], lambda m, b: None, used)
    with pytest.raises(ConfigError, match="needs data"):
        ex.export_checkpoint(loaded.model, None, config, [], lambda m, b: None, tmp_path / "new")
    import modelopt.torch.quantization as mtq

    mtq.quantize(loaded.model, copy.deepcopy(qc.format_configs([INT8])[INT8]), None)
    with pytest.raises(ConfigError, match="already carries ModelOpt quantizers"):
        ex.export_checkpoint(loaded.model, None, config, [{}], lambda m, b: None, tmp_path / "new")
    with pytest.raises(InputError, match=r"has no config\.json"):
        ex.load_exported(tmp_path / "new")
    with pytest.raises(AqmError, match="pass evaluate="):
        rb.read_back_nll(
            ex.CheckpointExport(str(tmp_path), (), "FP8", math.nan, math.nan, 0.0, 0.0), lambda m: 0.0
        )


@pytest.mark.slow
def test_the_runs_own_choice_gives_modelopts_get_auto_quantize_config(tmp_path: Path) -> None:
    """Our config and ModelOpt's ``get_auto_quantize_config`` of the same search quantize alike."""
    import modelopt.torch.quantization as mtq
    import torch

    from auto_quantize_model.artifacts import LanguageModel, SensitivityScores
    from auto_quantize_model.backend.modelopt import quant_config as qc
    from auto_quantize_model.backend.modelopt.plan import textlm_name_map
    from auto_quantize_model.pipeline import Pipeline
    from auto_quantize_model.specs import AutoQuantSpec, CalibSpec, ExtractSpec, LoadSpec
    from auto_quantize_model.stages.build_calib_loader import BuildCalibLoader
    from auto_quantize_model.stages.extract_lm import ExtractLM
    from auto_quantize_model.stages.load_model import LoadModel
    from auto_quantize_model.stages.run_autoquant import RunAutoQuant

    state_path = tmp_path / "state.pt"
    store = Pipeline(
        [
            LoadModel(LoadSpec(path="builtin:tiny-qwen3-vl", device="cpu")),
            ExtractLM(ExtractSpec()),
            BuildCalibLoader(CalibSpec(max_samples=32, seq_len=64, batch_size=4)),
            RunAutoQuant(
                AutoQuantSpec(
                    formats=(INT8, FP8), effective_bits=11.0, score_size=16, checkpoint=str(state_path)
                )
            ),
        ]
    ).run()
    scores = store.get(SensitivityScores)
    lm = store.get(LanguageModel)
    chosen = {g.best_format for g in scores.groups}
    assert "NONE" in chosen
    assert chosen & {INT8, FP8}  # a real mix of quantized and unquantized groups
    config = qc.prepare_export(choices_from_groups(scores.groups))

    # The state file is written after scoring, before the search: ModelOpt re-solves it for the
    # run's budget (in language_model scope the constraint is the LM budget itself).
    state = torch.load(state_path, weights_only=False)
    theirs = mtq.get_auto_quantize_config(state, {"effective_bits": scores.effective_bits_target})
    full_name = textlm_name_map(lm.prefix, lm.head_name)
    for entry in theirs["quant_cfg"]:
        module, _, attr = entry["quantizer_name"].rpartition(".")
        if module:
            entry["quantizer_name"] = f"{full_name(module)}.{attr}"
    configs = qc.format_configs([INT8, FP8])
    # ModelOpt leaves out attributes at their defaults (axis None): compare through its schema.
    problems = xc.config_mismatches(theirs, config, configs, canonical=qc.modelopt_canonical)
    assert problems == (), problems[:3]
    assert xc.config_mismatches(theirs, config, configs) != ()  # ... which the plain spelling cannot
    assert xc.config_mismatches(config.quant_config, config, configs) == ()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize(
    ("attention", "mlp", "head", "dtype"),
    [
        ("NVFP4_DEFAULT_CFG", FP8, "NONE", "bfloat16"),
        ("NVFP4_DEFAULT_CFG", FP8, "NONE", "float32"),
        ("W4A16_NVFP4_CFG", INT8, INT8, "bfloat16"),
        ("wfp4_afp4", FP8, "NONE", "bfloat16"),  # the grammar's NVFP4 spellings: same labels
        ("wfp4_afp8", INT8, "NONE", "bfloat16"),  # W4A8_NVFP4_FP8, group 16
    ],
)
def test_nvfp4_mixes_export_and_read_back_on_cuda(
    tmp_path: Path, attention: str, mlp: str, head: str, dtype: str
) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from auto_quantize_model.backend.modelopt import read_back as rb

    config, result, evaluate, _ = tiny_export(
        tmp_path, layer_choices(attention, mlp, head), device="cuda", dtype=dtype
    )
    hf_quant = json.loads((Path(result.directory) / "hf_quant_config.json").read_text(encoding="utf-8"))
    layers = hf_quant["quantization"]["quantized_layers"]
    assert result.quant_algo == "MIXED_PRECISION"
    assert layers[f"{LAYERS}.0.self_attn.q_proj"]["quant_algo"] == export_format(attention).label
    assert layers[f"{LAYERS}.0.self_attn.q_proj"]["group_size"] == 16
    assert xc.checkpoint_mismatches(hf_quant, config) == ()
    back = rb.read_back_nll(result, evaluate, device="cuda")
    print(f"{attention} + {mlp} + head {head} ({dtype}): {back}, difference {back.difference:.3g}")
    assert back.ok, back


def test_an_awq_alpha_step_exports_like_its_preset() -> None:
    import attrs

    from auto_quantize_model.backend.modelopt import quant_config as qc

    coarse = "W4A8_AWQ_BETA_CFG:alpha_step=0.25"
    preset = export_format("W4A8_AWQ_BETA_CFG")
    assert attrs.evolve(export_format(coarse), name="W4A8_AWQ_BETA_CFG") == preset
    configs = qc.format_configs([coarse, "W4A8_AWQ_BETA_CFG"])
    assert configs[coarse]["algorithm"] == {"method": "awq_lite", "alpha_step": 0.25}
    assert configs[coarse]["quant_cfg"] == configs["W4A8_AWQ_BETA_CFG"]["quant_cfg"]
    assert xc.algorithm_method(configs[coarse]["algorithm"]) == "awq_lite"
