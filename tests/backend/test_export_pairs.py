"""The checkpoint read-back of an image run measures on the held-out image + caption pairs.

ValidateSensitivity and MeasureFrontier measure a run calibrated on pairs on the pairs after
calibration's (:mod:`auto_quantize_model.backend.vision_holdout`); the export's read-back does too,
for both formats, each model through its own vision tower, and ``export.json`` and the README say
which data it used. The slow tests export the tiny Qwen3-VL calibrated on the bundled pairs (16
calibrate, 8 are held out) with its LM in INT8 W8A8.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from auto_quantize_model.artifacts import ExportedMix

MODELOPT, CT = "modelopt", "compressed-tensors"
LAYERS = "model.language_model.layers"
CALIBRATED = 16


def test_export_json_and_the_summary_line_say_which_data_the_read_back_used() -> None:
    from auto_quantize_model.backend.exporting import export_json, summary_line

    mix = ExportedMix(
        directory="out",
        budget=8.0,
        effective_bits_lm=8.0,
        groups=17,
        quantized_layers=28,
        formats=(("INT8_DEFAULT_CFG", 16), ("NONE", 1)),
        files=("export.json",),
        checkpoint=True,
        quant_algo="W8A8_SQ_PER_CHANNEL",
        in_memory_nll=7.25,
        exported_nll=7.25,
        read_back_nll=7.25,
        tolerance=5e-4,
        held_out="pairs",
        held_out_samples=8,
        held_out_tokens=124,
        held_out_image_tokens=540,
    )
    record = json.loads(export_json(mix))["read_back"]
    assert record["held_out"] == {"data": "pairs", "samples": 8, "scored_tokens": 124, "image_tokens": 540}
    assert "held-out NLL (8 pairs) 7.25000 in memory" in summary_line(mix)


# --------------------------------------------------------------------------------------------------
# The tiny image run, exported
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_run() -> Any:
    """LoadModel, ExtractLM and BuildCalibLoader of an image run, as ``aqm export`` runs them."""
    from auto_quantize_model.pipeline import Pipeline
    from auto_quantize_model.specs import CalibSpec, LoadSpec
    from auto_quantize_model.stages.build_calib_loader import BuildCalibLoader
    from auto_quantize_model.stages.extract_lm import ExtractLM
    from auto_quantize_model.stages.load_model import LoadModel

    calib = CalibSpec(images="builtin", max_samples=CALIBRATED, seq_len=512, batch_size=2, layout="packed")
    load = LoadSpec(path="builtin:tiny-qwen3-vl", device="cpu", dtype="float32")
    return Pipeline([LoadModel(load), ExtractLM(), BuildCalibLoader(calib)]).run()


def checkpoint_inputs(run: Any, calib: Any = None) -> Any:
    """A freshly loaded copy of the run's model (an export consumes it) with the run's data."""
    from auto_quantize_model.artifacts import CalibData, CheckpointInputs, LanguageModel, LoadedModel
    from auto_quantize_model.backend.models import load

    loaded = run.get(LoadedModel)
    return CheckpointInputs(
        load(loaded.load_spec), run.get(LanguageModel), calib if calib is not None else run.get(CalibData)
    )


def int8_choices() -> list[Any]:
    """Every decoder linear in INT8 W8A8 (q/k/v and gate/up as groups); lm_head left unquantized."""
    from auto_quantize_model.core.export_choice import GroupChoice

    choices = []
    for i in range(4):
        attn, mlp = f"{LAYERS}.{i}.self_attn", f"{LAYERS}.{i}.mlp"
        choices += [
            GroupChoice(
                f"{attn}.q_proj", (f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"), "INT8_DEFAULT_CFG"
            ),
            GroupChoice(f"{attn}.o_proj", (f"{attn}.o_proj",), "INT8_DEFAULT_CFG"),
            GroupChoice(f"{mlp}.gate_proj", (f"{mlp}.gate_proj", f"{mlp}.up_proj"), "INT8_DEFAULT_CFG"),
            GroupChoice(f"{mlp}.down_proj", (f"{mlp}.down_proj",), "INT8_DEFAULT_CFG"),
        ]
    choices.append(GroupChoice("lm_head", ("lm_head",), "NONE"))
    return choices


def held_out_layouts(run: Any) -> Any:
    """The held-out pairs' token counts, from the pair source and the processor alone."""
    from auto_quantize_model.artifacts import LoadedModel
    from auto_quantize_model.backend.vision_calib import image_mix, image_processor, pair_layouts
    from auto_quantize_model.core.image_pairs import check_pairs, read_pair_source

    loaded = run.get(LoadedModel)
    source = read_pair_source("builtin")
    pairs = check_pairs(source.pairs[CALIBRATED:])
    image_token = int(loaded.model.config.image_token_id)
    return image_mix(pair_layouts(pairs, loaded.tokenizer, image_processor(loaded), image_token, 512))


def reload(fmt: str, folder: Path) -> Any:
    if fmt == MODELOPT:
        from auto_quantize_model.backend.modelopt.export import load_exported

        return load_exported(folder)
    from auto_quantize_model.backend.ct_read_back import load_ct

    return load_ct(folder)[0]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", [MODELOPT, CT])
def test_an_image_run_reads_back_on_its_held_out_pairs(image_run: Any, fmt: str, tmp_path: Path) -> None:
    import attrs

    from auto_quantize_model.artifacts import CalibData, LoadedModel
    from auto_quantize_model.backend.exporting import export_mix
    from auto_quantize_model.backend.locate import extract_language_model
    from auto_quantize_model.backend.modelopt.export import holdout_evaluator
    from auto_quantize_model.backend.vision_holdout import held_out_eval
    from auto_quantize_model.core.validation import held_out_set
    from auto_quantize_model.specs import ExtractSpec, ValidateSpec

    out = tmp_path / "export"
    mix = export_mix(
        int8_choices(),
        out,
        budget=8.0,
        effective_bits_lm=8.0,
        checkpoint=checkpoint_inputs(image_run),
        checkpoint_format=fmt,
    )
    expected = held_out_layouts(image_run)
    assert expected.pairs == 8  # the 24 bundled pairs after the 16 calibration took
    assert (mix.held_out, mix.held_out_samples) == ("pairs", 8)
    assert (mix.held_out_tokens, mix.held_out_image_tokens) == (
        expected.caption_tokens,
        expected.image_tokens,
    )
    assert expected.image_tokens > 0
    record = json.loads((out / "export.json").read_text(encoding="utf-8"))["read_back"]
    assert record["held_out"] == {
        "data": "pairs",
        "samples": 8,
        "scored_tokens": expected.caption_tokens,
        "image_tokens": expected.image_tokens,
    }
    assert "on held-out pairs: 8 (image + caption chat turns" in (out / "README.md").read_text(
        encoding="utf-8"
    )
    assert record["ok"] is True
    assert abs(mix.read_back_nll - mix.exported_nll) <= mix.tolerance

    # The read-back figure is validation's measurement of the reloaded model on the same pairs ...
    loaded = image_run.get(LoadedModel)
    calib = image_run.get(CalibData)
    model = reload(fmt, out)
    lm = extract_language_model(model, loaded.tokenizer, ExtractSpec())
    spec = ValidateSpec(holdout_samples=8)
    held, evaluator = held_out_eval(spec, calib, attrs.evolve(loaded, model=model), lm)
    assert len(held.token_lists) == 8
    assert evaluator.run()[0].nll == pytest.approx(mix.read_back_nll, rel=1e-12)
    # ... and not the held-out captions' NLL of the same model (which a read-back on captions
    # equals to float rounding; random tiny weights put both near ln(vocabulary), 8.7e-3 apart)
    captions = held_out_set(ValidateSpec(), calib, loaded.tokenizer)
    on_captions = holdout_evaluator(captions.token_lists, lm.pad_token_id, lm.prefix, lm.head_name)(model)
    assert abs(on_captions - mix.read_back_nll) > 1e-3


def damage_vision(folder: Path) -> int:
    """Scale the vision merger's output projection in the written checkpoint by 16; returns tensors changed.

    The language model's tensors are untouched, so only a read-back that runs the checkpoint's own
    vision tower on pictures can see it.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    (shard,) = sorted(folder.glob("*.safetensors"))
    with safe_open(str(shard), "pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    hit = [key for key in tensors if key.startswith("model.visual.merger.linear_fc2.")]
    for key in hit:
        tensors[key] = tensors[key] * 16.0
    save_file(tensors, str(shard), metadata=metadata)
    return len(hit)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", [MODELOPT, CT])
def test_vision_weights_written_wrong_fail_the_read_back(image_run: Any, fmt: str, tmp_path: Path) -> None:
    """A fault only pictures reveal: the read-back is off, where the held-out captions see nothing."""
    from auto_quantize_model.backend import compressed_tensors as ct
    from auto_quantize_model.backend import ct_read_back as ctb
    from auto_quantize_model.backend.export_check import export_check
    from auto_quantize_model.backend.modelopt import export as ex
    from auto_quantize_model.backend.modelopt import quant_config as qc
    from auto_quantize_model.backend.modelopt import read_back as rb
    from auto_quantize_model.core.ct_config import ct_export_format, plan_ct
    from auto_quantize_model.core.export_labels import export_format
    from auto_quantize_model.core.validation import held_out_set
    from auto_quantize_model.specs import ValidateSpec

    inputs = checkpoint_inputs(image_run)
    fresh, lm = inputs.fresh, inputs.lm
    config = qc.prepare_export(
        int8_choices(),
        device="cpu",
        vision_prefixes=lm.vision_modules,
        known_modules=qc.linear_modules(fresh.model),
        exportable=ct_export_format if fmt == CT else export_format,
    )
    check = export_check(inputs)
    assert (check.data.kind, check.data.samples) == ("pairs", 8)
    captions = held_out_set(ValidateSpec(), inputs.calib, fresh.tokenizer)
    on_captions = ex.holdout_evaluator(captions.token_lists, lm.pad_token_id, lm.prefix, lm.head_name)
    batches, step, out = inputs.calib.batches, check.calibration_step, tmp_path / "export"
    written: Any
    if fmt == MODELOPT:
        written = ex.export_checkpoint(
            fresh.model, fresh.tokenizer, config, batches, step, out, evaluate=check.evaluate
        )
    else:
        plan = plan_ct(config, qc.linear_modules(fresh.model))
        written = ct.export_ct_checkpoint(
            fresh.model, fresh.tokenizer, config, plan, batches, step, out, evaluate=check.evaluate
        )
    captions_before = on_captions(reload(fmt, out))
    assert damage_vision(out) == 2  # weight and bias
    assert on_captions(reload(fmt, out)) == captions_before  # captions alone cannot tell

    back: Any
    if fmt == MODELOPT:
        back = rb.read_back_nll(written, check.evaluate)
    else:
        back = ctb.read_back_ct(written, check.evaluate, check.head_path)
    assert back.ok is False
    assert abs(back.difference) > 2 * back.tolerance


@pytest.mark.slow
def test_an_image_run_without_pairs_left_reads_back_on_captions(image_run: Any) -> None:
    """Calibration took every bundled pair: captions instead, and a note that says why."""
    from auto_quantize_model.artifacts import LanguageModel, LoadedModel
    from auto_quantize_model.backend.export_check import export_check
    from auto_quantize_model.backend.measure import HeldOutEval
    from auto_quantize_model.backend.vision_calib import image_calib_data
    from auto_quantize_model.core.image_pairs import check_pairs, pairs_sha256, read_pair_source
    from auto_quantize_model.specs import CalibSpec

    loaded, lm = image_run.get(LoadedModel), image_run.get(LanguageModel)
    pairs = check_pairs(read_pair_source("builtin").pairs)
    assert len(pairs) == 24
    spec = CalibSpec(images="builtin", max_samples=24, seq_len=512, batch_size=2, layout="packed")
    every = image_calib_data(
        loaded, pairs, spec, pad_id=lm.pad_token_id, label="builtin", sha256=pairs_sha256(pairs), ranges=False
    )
    check = export_check(checkpoint_inputs(image_run, every))
    assert (check.data.kind, check.data.samples, check.data.image_tokens) == ("captions", 64, 0)
    assert check.data.tokens == HeldOutEval.on(lm, check.held_out.token_lists).run()[0].tokens
    assert check.held_out.notes[0] == (
        "the read-back measured held-out captions (builtin-holdout), not pairs: calib.images builtin has "
        "24 pairs and calibration used all 24; add pairs to read back on image + caption turns"
    )


@pytest.mark.slow
def test_a_text_run_still_reads_back_on_its_held_out_captions() -> None:
    """Captions as before: the same evaluator the export always had, recorded as captions."""
    from auto_quantize_model.artifacts import CalibData, CheckpointInputs, LanguageModel, LoadedModel
    from auto_quantize_model.backend.export_check import export_check
    from auto_quantize_model.backend.measure import HeldOutEval
    from auto_quantize_model.backend.modelopt.export import holdout_evaluator
    from auto_quantize_model.core.validation import held_out_set
    from auto_quantize_model.pipeline import Pipeline
    from auto_quantize_model.specs import CalibSpec, LoadSpec, ValidateSpec
    from auto_quantize_model.stages.build_calib_loader import BuildCalibLoader
    from auto_quantize_model.stages.extract_lm import ExtractLM
    from auto_quantize_model.stages.load_model import LoadModel

    load = LoadSpec(path="builtin:tiny-qwen3-vl", device="cpu", dtype="float32")
    calib = CalibSpec(captions="builtin", max_samples=16, seq_len=64, batch_size=4)
    run = Pipeline([LoadModel(load), ExtractLM(), BuildCalibLoader(calib)]).run()
    loaded, lm, data = run.get(LoadedModel), run.get(LanguageModel), run.get(CalibData)
    check = export_check(CheckpointInputs(loaded, lm, data, ValidateSpec(holdout_samples=32)))
    captions = held_out_set(ValidateSpec(holdout_samples=32), data, loaded.tokenizer).token_lists
    assert check.held_out.token_lists == captions
    tokens = HeldOutEval.on(lm, captions).run()[0].tokens
    assert (check.data.kind, check.data.samples, check.data.tokens, check.data.image_tokens) == (
        "captions",
        32,
        tokens,
        0,
    )
    before = holdout_evaluator(captions, lm.pad_token_id, lm.prefix, lm.head_name)(loaded.model)
    assert check.evaluate(loaded.model) == before
