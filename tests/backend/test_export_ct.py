"""``aqm export --format compressed-tensors``: the mix written with compressed-tensors, read by transformers.

Fast tests check the flag and the refusals before anything is loaded (the scheme of each format:
core/test_ct_config.py). The slow ones export the tiny model's INT8 W8A8 run (the session's
``tiny_default_run``) and one tiny run that mixes FP8 with max-calibrated INT4 blocks, then load
each folder with ``from_pretrained`` through transformers' own compressed-tensors quantizer, not
our code.

NVFP4: ModelOpt fake-quantizes it only with CUDA kernels, so on CPU the tiny model's NVFP4
quantizers run ModelOpt's own NVFP4 export arithmetic (``NVFP4QTensor``, plain torch) as a
registered ModelOpt quant backend; the export itself (calibration, fusion, scales, compressed-tensors'
packing, transformers' read-back) runs as it does on a GPU. The ``gpu`` test runs the same mixes
with ModelOpt's real kernels.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from auto_quantize_model.app.cli import main
from auto_quantize_model.app.run_service import RunService
from auto_quantize_model.core.export_labels import export_format
from auto_quantize_model.core.scores import NO_QUANT
from auto_quantize_model.io.manifest import manifest_to_json
from builders import TINY_DEFAULT, AqmRun, manifest

CT = "compressed-tensors"
INT8_MANIFEST = "tiny_wint8_aint8_quant_manifest.json"


def export(
    capsys: pytest.CaptureFixture[str], *argv: str, service: RunService | None = None
) -> tuple[int, str, str]:
    code = main(["export", *argv], service=service)
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("aqm: error:")]


# --------------------------------------------------------------------------------------------------
# Which formats map, and to what
# --------------------------------------------------------------------------------------------------


def test_aqm_formats_lists_the_export_formats(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["formats"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split()[-1] == "export"
    column = {line.split()[0]: re.split(r"\s{2,}", line)[-1] for line in rows[2:] if line.strip()}
    assert column["INT8_DEFAULT_CFG"] == "modelopt, compressed-tensors"
    assert column["INT4_AWQ_CFG"] == "modelopt"
    assert column["wfp8_a16"] == "compressed-tensors"
    assert column["MXFP4_DEFAULT_CFG"] == "-"
    assert column["NVFP4_DEFAULT_CFG"] == "modelopt, compressed-tensors"
    assert column["W4A16_NVFP4_CFG"] == "modelopt, compressed-tensors"


# --------------------------------------------------------------------------------------------------
# The flag
# --------------------------------------------------------------------------------------------------


def test_compressed_tensors_without_checkpoint_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code, stdout, err = export(capsys, str(tmp_path), "--output", str(out), "--format", CT)
    assert code == 2
    assert stdout == ""
    assert error_lines(err) == [
        "aqm: error: --format compressed-tensors writes a checkpoint (the weights are the format): "
        "add --checkpoint"
    ]
    assert not out.exists()


def test_an_unknown_format_is_refused_by_the_parser(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["export", str(tmp_path), "--output", str(tmp_path / "o"), "--format", "gguf"])
    assert exited.value.code == 2
    assert "invalid choice: 'gguf'" in capsys.readouterr().err


def run_of_one_format(
    tmp_path: Path, modules: list[str], fmt: str
) -> tuple[Path, list[object], Callable[[object], Any]]:
    """A finished-looking run folder whose manifest gives ``modules`` the format ``fmt``, and an export
    loader that records and refuses every load (the refusals must come before any)."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copyfile(TINY_DEFAULT, run / "pipeline.toml")
    data = manifest([(name, 1.0) for name in modules], fmt=fmt, target=8.0)
    (run / "test_scheme_quant_manifest.json").write_text(manifest_to_json(data), encoding="utf-8")
    loads: list[object] = []

    def loader(pipeline: object) -> Any:
        loads.append(pipeline)
        raise AssertionError("the model must not be loaded")

    return run, loads, loader


@pytest.mark.parametrize(
    ("fmt", "flags", "says", "hint"),
    [
        (
            "INT4_AWQ_CFG",
            ("--format", CT),
            "format INT4_AWQ_CFG cannot be exported as compressed-tensors: its awq_lite calibration",
            "export it with --format modelopt",
        ),
        (
            "W4A8_AWQ_BETA_CFG",
            (),
            "format W4A8_AWQ_BETA_CFG is written as W4A8_AWQ, which aqm's read-back cannot decode",
            "export it without --checkpoint",
        ),
    ],
)
def test_a_refused_format_in_the_mix_stops_before_the_model_is_loaded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str, flags: tuple[str, ...], says: str, hint: str
) -> None:
    modules = ["model.language_model.layers.0.mlp.down_proj", "model.language_model.layers.1.mlp.down_proj"]
    run, loads, loader = run_of_one_format(tmp_path, modules, fmt)
    out = tmp_path / "out"
    service = RunService(export_loader=loader)
    code, stdout, err = export(
        capsys, str(run), "--output", str(out), "--checkpoint", *flags, service=service
    )
    assert code == 2
    assert stdout == ""
    [line] = error_lines(err)
    assert line.startswith(f"aqm: error: group {modules[0]}: {says}")
    assert hint in line
    assert loads == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    if not flags:  # without --checkpoint the same mix is written as ModelOpt's config and recipe
        code, stdout, err = export(capsys, str(run), "--output", str(out), service=service)
        assert code == 0, err
        assert (out / "quant_config.json").is_file()
        assert loads == []


# --------------------------------------------------------------------------------------------------
# The tiny model, exported and read back by transformers
# --------------------------------------------------------------------------------------------------


def read_back_with_transformers(folder: Path) -> Any:
    """``from_pretrained`` as a user would call it (compressed weights, decompressed on first use)."""
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(folder))
    ids = torch.tensor([[3, 17, 42, 99, 5, 8]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return model, logits


def check_export(folder: Path, choice: dict[str, str]) -> dict[str, Any]:
    """The folder's quantization_config lists exactly ``choice`` (module -> format); returns export.json."""
    import torch

    record = json.loads((folder / "export.json").read_text(encoding="utf-8"))
    assert record["format"] == CT
    back = record["read_back"]
    assert back["ok"] is True
    # 1e-2 with quantized activations (READ_BACK_NOTE); the tiny model reads back within 5e-4.
    assert back["tolerance"] == 1e-2
    assert abs(back["difference"]) <= 5e-4
    assert back["weights"]["relative"] <= back["weights"]["tolerance"] == 1e-5
    assert "CompressedTensorsHfQuantizer" in back["loader"]
    quant = json.loads((folder / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    assert quant["quant_method"] == CT
    assert quant["quantization_status"] == "compressed"
    chosen = {fmt for fmt in choice.values() if fmt != NO_QUANT}
    assert set(quant["config_groups"]) == chosen
    per_format = back["weights"]["per_format"]
    assert set(per_format) == chosen
    assert all(found["relative"] <= back["weights"]["tolerance"] for found in per_format.values())
    assert max(found["relative"] for found in per_format.values()) == back["weights"]["relative"]
    for fmt, group in quant["config_groups"].items():
        assert sorted(group["targets"]) == sorted(m for m, f in choice.items() if f == fmt)
    assert {m for m, f in choice.items() if f == NO_QUANT} <= set(quant["ignore"])
    assert not set(quant["ignore"]) & {m for m, f in choice.items() if f != NO_QUANT}
    model, logits = read_back_with_transformers(folder)
    assert torch.isfinite(logits).all()
    assert logits.shape[-1] == model.config.get_text_config().vocab_size
    assert "vllm serve" in (folder / "README.md").read_text(encoding="utf-8")
    result: dict[str, Any] = record
    return result


def manifest_choice(folder: Path, name: str) -> dict[str, str]:
    """Every module's format at the run's budget as the frontier picks it (what aqm export writes:
    the least predicted score, which can beat ModelOpt's own choice)."""
    from auto_quantize_model.app.run_folder import FinishedRun
    from auto_quantize_model.specs import FrontierSpec

    run = FinishedRun.open(folder / name)
    budget = run.manifest.scheme.effective_bits_target
    frontier = run.frontier(FrontierSpec(bits=repr(budget), workers=1)).frontier
    chosen = dict(zip(frontier.groups, frontier.point(budget).formats, strict=True))
    return {
        module: chosen.get(group.name, NO_QUANT)
        for group in run.manifest.groups
        for module in group.module_names
    }


@pytest.mark.slow
def test_int8_w8a8_run_exports_and_transformers_reads_it_back(
    tiny_default_run: AqmRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tiny_default_run.returncode == 0, tiny_default_run.stderr
    folder = tiny_default_run.folder
    out = tmp_path / "ct"
    code, stdout, _ = export(capsys, str(folder), "--output", str(out), "--checkpoint", "--format", CT)
    assert code == 0
    assert "int-quantized compressed-tensors checkpoint" in stdout
    assert "ok)" in stdout
    record = check_export(out, manifest_choice(folder, INT8_MANIFEST))
    quant = json.loads((out / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    group = quant["config_groups"]["INT8_DEFAULT_CFG"]
    assert (group["format"], group["weights"]["strategy"], group["input_activations"]["dynamic"]) == (
        "int-quantized",
        "channel",
        False,
    )
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as tensors:
        target = group["targets"][0]
        assert str(tensors.get_tensor(f"{target}.weight").dtype) == "torch.int8"
        assert tensors.get_tensor(f"{target}.input_scale").numel() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]  # no scratch folder left
    assert record["files"] == sorted(p.name for p in out.iterdir())


@pytest.fixture(scope="module")
def fp8_int4_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run over FP8 and max-calibrated INT4 blocks at 8 bits: its mix holds both and NONE."""
    folder = tmp_path_factory.mktemp("fp8-int4") / "run"
    code = main(
        [
            "run",
            str(TINY_DEFAULT),
            "--output",
            str(folder),
            "--set",
            'autoquant.formats=["FP8_DEFAULT_CFG", "wint4-b128_a16"]',
            "--set",
            "autoquant.effective_bits=8.0",
            "--set",
            'manifest.scheme="tiny_fp8_int4"',
        ]
    )
    assert code == 0
    return folder


@pytest.mark.slow
def test_fp8_and_int4_mix_exports_as_mixed_precision_and_reads_back(
    fp8_int4_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    choice = manifest_choice(fp8_int4_run, "tiny_fp8_int4_quant_manifest.json")
    assert set(choice.values()) == {"FP8_DEFAULT_CFG", "wint4-b128_a16", NO_QUANT}
    out = tmp_path / "ct"
    code, stdout, _ = export(capsys, str(fp8_int4_run), "--output", str(out), "--checkpoint", "--format", CT)
    assert code == 0
    assert "mixed-precision compressed-tensors checkpoint" in stdout
    check_export(out, choice)
    quant = json.loads((out / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    assert quant["format"] == "mixed-precision"
    int4 = quant["config_groups"]["wint4-b128_a16"]
    assert (int4["format"], int4["weights"]["num_bits"], int4["weights"]["group_size"]) == (
        "pack-quantized",
        4,
        128,
    )
    assert int4["input_activations"] is None
    fp8 = quant["config_groups"]["FP8_DEFAULT_CFG"]
    assert (fp8["format"], fp8["weights"]["type"], fp8["input_activations"]["strategy"]) == (
        "float-quantized",
        "float",
        "tensor",
    )
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as tensors:
        names = set(tensors.keys())
        packed = int4["targets"][0]
        assert {f"{packed}.weight_packed", f"{packed}.weight_shape", f"{packed}.weight_scale"} <= names
        assert f"{packed}.weight" not in names
        assert str(tensors.get_tensor(f"{fp8['targets'][0]}.weight").dtype) == "torch.float8_e4m3fn"


# --------------------------------------------------------------------------------------------------
# NVFP4 (nvfp4-pack-quantized): the tiny model on CPU through ModelOpt's own NVFP4 arithmetic
# --------------------------------------------------------------------------------------------------

NVFP4_REFERENCE = "aqm-test-nvfp4-reference"
LAYERS = "model.language_model.layers"


def nvfp4_reference(inputs: Any, quantizer: Any) -> Any:
    """ModelOpt's NVFP4 fake quantization on CPU: its export arithmetic applied and undone.

    Blocks of 16 along the last dimension, each scaled by an FP8 E4M3 scale under the quantizer's
    per-tensor range (its ``amax``), as ModelOpt's CUDA kernel and its exporter both compute.
    """
    from auto_quantize_model.backend.compressed_tensors import nvfp4_weight

    shape = inputs.shape
    values, _, _ = nvfp4_weight(inputs.reshape(-1, shape[-1]), quantizer.amax, quantizer.block_sizes[-1])
    return values.reshape(shape).to(inputs.dtype)


@pytest.fixture
def nvfp4_on_cpu() -> Any:
    from modelopt.torch.quantization.nn.modules import tensor_quantizer as tq

    tq.register_quant_backend(NVFP4_REFERENCE, nvfp4_reference)
    yield NVFP4_REFERENCE
    tq.unregister_quant_backend(NVFP4_REFERENCE)


def nvfp4_choices(attention: str, mlp: str, head: str) -> list[Any]:
    """The tiny Qwen3-VL's groups (q/k/v and gate/up together) on three formats; odd o_proj NONE."""
    from auto_quantize_model.core.export_choice import GroupChoice

    choices = []
    for i in range(4):
        attn, mlp_path = f"{LAYERS}.{i}.self_attn", f"{LAYERS}.{i}.mlp"
        choices += [
            GroupChoice(f"{attn}.q_proj", (f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"), attention),
            GroupChoice(f"{attn}.o_proj", (f"{attn}.o_proj",), NO_QUANT if i % 2 else attention),
            GroupChoice(f"{mlp_path}.gate_proj", (f"{mlp_path}.gate_proj", f"{mlp_path}.up_proj"), mlp),
            GroupChoice(f"{mlp_path}.down_proj", (f"{mlp_path}.down_proj",), mlp),
        ]
    choices.append(GroupChoice("lm_head", ("lm_head",), head))
    return choices


def export_tiny_ct(
    out: Path, choices: list[Any], *, device: str, dtype: str, backend: str | None = None
) -> tuple[Any, Any]:
    """The tiny model quantized with ``choices``, written as compressed-tensors and read back.

    ``backend`` names a registered ModelOpt quant backend for the FP4 quantizers (None: ModelOpt's
    own kernels, CUDA only). Returns (the written checkpoint, the read-back figures).
    """
    import attrs

    from auto_quantize_model.backend import compressed_tensors as ct
    from auto_quantize_model.backend import ct_read_back as rb
    from auto_quantize_model.backend.lm_forward import as_tensors, calibration_step_for
    from auto_quantize_model.backend.locate import extract_language_model
    from auto_quantize_model.backend.modelopt import export as ex
    from auto_quantize_model.backend.modelopt import quant_config as qc
    from auto_quantize_model.backend.models import build_builtin
    from auto_quantize_model.core.batching import encode, holdout_columns, scorable
    from auto_quantize_model.core.captions import read_caption_file
    from auto_quantize_model.core.ct_config import ct_export_format, plan_ct
    from auto_quantize_model.data import builtin_captions_path
    from auto_quantize_model.sources import TINY_QWEN3_VL
    from auto_quantize_model.specs import ExtractSpec

    loaded = build_builtin(TINY_QWEN3_VL, seed=0, dtype=dtype, device=device)  # type: ignore[arg-type]
    lm = extract_language_model(loaded.model, loaded.tokenizer, ExtractSpec())
    config = qc.prepare_export(
        choices,
        device="cuda",  # what the checkpoint is made for; on CPU the FP4 quantizers run ``backend``
        vision_prefixes=lm.vision_modules,
        known_modules=qc.linear_modules(loaded.model),
        exportable=ct_export_format,
    )
    if backend is not None:

        def on_backend(entry: dict[str, Any]) -> dict[str, Any]:
            cfg = entry.get("cfg")
            if isinstance(cfg, dict) and tuple(cfg.get("num_bits") or ()) == (2, 1):
                return {**entry, "cfg": {**cfg, "backend": backend}}
            return entry

        quant = dict(config.quant_config)
        quant["quant_cfg"] = [on_backend(entry) for entry in quant["quant_cfg"]]
        config = attrs.evolve(config, quant_config=quant)
    captions = read_caption_file(builtin_captions_path())
    calib = scorable(encode(loaded.tokenizer, captions[:32]), 64)
    held_out = scorable(encode(loaded.tokenizer, captions[-64:]), 64)
    batches = [as_tensors(c) for c in holdout_columns(calib, lm.pad_token_id)]
    evaluate = ex.holdout_evaluator(held_out, lm.pad_token_id, lm.prefix, lm.head_name)
    plan = plan_ct(config, qc.linear_modules(loaded.model))
    written = ct.export_ct_checkpoint(
        loaded.model,
        loaded.tokenizer,
        config,
        plan,
        batches,
        calibration_step_for(lm, loaded.model),
        out,
        evaluate=evaluate,
    )
    return written, rb.read_back_ct(written, evaluate, lm.head_name, device=device)


def check_nvfp4_folder(
    out: Path, written: Any, back: Any, nvfp4: dict[str, str], *, exact: float = 1e-6
) -> None:
    """Each NVFP4 group (format -> one of its layers) holds compressed-tensors' packing, and
    transformers reads the folder back within tolerance; its decompressed NVFP4 weights are the
    written codes within ``exact`` of the layer's largest weight."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    assert back.ok, back
    assert back.tolerance == 1e-2  # activations quantized (READ_BACK_NOTE); bfloat16 alone: 3e-3
    assert abs(back.difference) <= 3e-3  # measured 4.8e-4 on CPU
    assert back.weight_tolerance == 2.0**-7
    per_format = {fmt: relative for fmt, _, _, relative in back.per_format}
    quant = json.loads((out / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    for fmt, layer in nvfp4.items():
        assert per_format[fmt] <= exact, per_format  # the same codes and scales as ModelOpt's exporter
        group = quant["config_groups"][fmt]
        activations = export_format(fmt).label == "NVFP4"
        assert group["format"] == "nvfp4-pack-quantized"
        assert (group["weights"]["strategy"], group["weights"]["group_size"]) == ("tensor_group", 16)
        assert (group["input_activations"] or {}).get("dynamic") == ("local" if activations else None)
        assert layer in group["targets"]
        with safe_open(str(out / "model.safetensors"), "pt") as tensors:
            names = set(tensors.keys())
            packed = tensors.get_tensor(f"{layer}.weight_packed")
            scales = tensors.get_tensor(f"{layer}.weight_scale")
            global_scale = tensors.get_tensor(f"{layer}.weight_global_scale")
        rows, columns = written.reference[layer].shape
        assert (packed.dtype, tuple(packed.shape)) == (torch.uint8, (rows, columns // 2))
        assert (scales.dtype, tuple(scales.shape)) == (torch.float8_e4m3fn, (rows, columns // 16))
        # The global scale is ModelOpt's weight_scale_2 inverted (6 * 448 / amax): the block
        # holding the layer's largest weight gets FP8's largest scale, 448.
        assert float(scales.float().max()) == 448.0
        assert global_scale.dtype == torch.float32
        assert f"{layer}.weight" not in names
        assert (f"{layer}.input_global_scale" in names) == activations
    model = AutoModelForImageTextToText.from_pretrained(str(out), dtype=torch.bfloat16)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[3, 17, 42, 99, 5, 8]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_nvfp4_mix_exports_as_nvfp4_pack_quantized_and_reads_back_on_cpu(
    nvfp4_on_cpu: str, tmp_path: Path
) -> None:
    out = tmp_path / "ct"
    choices = nvfp4_choices("NVFP4_DEFAULT_CFG", "W4A16_NVFP4_CFG", "FP8_DEFAULT_CFG")
    written, back = export_tiny_ct(out, choices, device="cpu", dtype="bfloat16", backend=nvfp4_on_cpu)
    check_nvfp4_folder(
        out,
        written,
        back,
        {"NVFP4_DEFAULT_CFG": f"{LAYERS}.0.self_attn.q_proj", "W4A16_NVFP4_CFG": f"{LAYERS}.0.mlp.down_proj"},
    )
    assert written.plan.compression == "mixed-precision"


FP4_STEPS = (
    (0.25, 0.0, 0.5),
    (0.75, 0.5, 1.0),
    (1.25, 1.0, 1.5),
    (1.75, 1.5, 2.0),
    (2.5, 2.0, 3.0),
    (3.5, 3.0, 4.0),
    (5.0, 4.0, 6.0),
)
"""FP4 (E2M1) decision boundaries with the grid values below and above them."""


def nvfp4_flipping(margin: float) -> Any:
    """ModelOpt's NVFP4 arithmetic, except that a value within ``margin`` of an FP4 decision boundary
    (in units of its block scale) rounds to the other side: a stand-in for a fake quantizer that
    divides in another order than the exporter (ModelOpt's Triton kernel on a GPU), with more flips."""

    def backend(inputs: Any, quantizer: Any) -> Any:
        import torch

        from auto_quantize_model.backend.compressed_tensors import nvfp4_weight

        shape, block = inputs.shape, quantizer.block_sizes[-1]
        rows = inputs.reshape(-1, shape[-1]).float()
        values, block_scale, global_scale = nvfp4_weight(rows, quantizer.amax, block)
        step = (block_scale / global_scale).repeat_interleave(block, dim=-1)
        scaled = rows.abs() / step
        codes = values.abs() / step
        for bound, below, above in FP4_STEPS:
            codes = torch.where((scaled > bound - margin) & (scaled <= bound), above, codes)
            codes = torch.where((scaled > bound) & (scaled < bound + margin), below, codes)
        return (torch.sign(rows) * codes * step).reshape(shape).to(inputs.dtype)

    return backend


def export_flipping(out: Path, margin: float) -> tuple[list[Any], Any, Any]:
    """The tiny model's weight-only NVFP4 mix exported with :func:`nvfp4_flipping` as fake quantizer."""
    from modelopt.torch.quantization.nn.modules import tensor_quantizer as tq

    name = f"aqm-test-nvfp4-flipping-{margin}"
    tq.register_quant_backend(name, nvfp4_flipping(margin))
    try:
        choices = nvfp4_choices("W4A16_NVFP4_CFG", "W4A16_NVFP4_CFG", NO_QUANT)
        written, back = export_tiny_ct(out, choices, device="cpu", dtype="bfloat16", backend=name)
    finally:
        tq.unregister_quant_backend(name)
    return choices, written, back


@pytest.mark.slow
def test_nvfp4_codes_that_round_otherwise_than_the_fake_quantizer_are_counted_not_failed(
    tmp_path: Path,
) -> None:
    """The checkpoint holds ModelOpt's exporter codes; where the fake quantizer rounded a weight the
    other way, the read-back still matches the written weights, and the flips are counted."""
    from auto_quantize_model.backend.compressed_tensors import nvfp4_weight
    from auto_quantize_model.backend.export_ct import flip_lines
    from auto_quantize_model.backend.models import build_builtin
    from auto_quantize_model.core.ct_config import FLIP_SHARE
    from auto_quantize_model.sources import TINY_QWEN3_VL

    choices, written, back = export_flipping(tmp_path / "ct", 0.002)
    assert back.ok, back
    assert back.weight_relative <= 1e-6  # the decompressed weights are the written codes
    # the flips, counted apart: the fake-quantized weight against the exporter's codes of the
    # same original weight (the tiny model is rebuilt from its seed; siblings sharing an input
    # share one per-tensor range after ModelOpt's fusion)
    original: Any = build_builtin(TINY_QWEN3_VL, seed=0, dtype="bfloat16", device="cpu").model
    siblings = {module: choice.module_names for choice in choices for module in choice.module_names}
    flips = weights = 0
    for name, reference in written.reference.items():
        weight = original.get_submodule(name).weight.detach()
        amax = max(original.get_submodule(m).weight.detach().float().abs().max() for m in siblings[name])
        codes, _, _ = nvfp4_weight(weight, amax, 16)
        scale = float(reference.float().abs().max())
        flips += int(((reference.float() - codes.to(reference.dtype).float()).abs() > 2.0**-7 * scale).sum())
        weights += reference.numel()
    assert set(written.written) == set(written.reference)
    assert (back.flipped, back.flip_weights) == (flips, weights)
    assert 0 < back.flipped <= FLIP_SHARE * weights
    assert 0 < back.flip_relative <= 0.5  # one FP4 step of a block: at most 2 of the block's 6
    assert back.exported_nll != back.fused_nll
    assert abs(back.difference) <= 3e-3
    (line,) = flip_lines(back)
    assert f"{back.flipped:,} of {back.flip_weights:,} weights" in line
    assert f"({back.exported_nll - back.fused_nll:+.1e})" in line


@pytest.mark.slow
def test_a_checkpoint_too_far_from_the_scored_model_fails_its_read_back(tmp_path: Path) -> None:
    """Flips beyond FLIP_SHARE (a fake quantizer on another grid than the export) fail the read-back,
    though every weight reads back as written."""
    import attrs

    from auto_quantize_model.artifacts import ExportedMix
    from auto_quantize_model.backend.export_ct import failure_line, weights_record
    from auto_quantize_model.core.ct_config import FLIP_SHARE

    _, _, back = export_flipping(tmp_path / "ct", 0.05)
    assert back.weights_ok
    assert abs(back.difference) <= back.tolerance
    assert back.flipped > FLIP_SHARE * back.flip_weights
    assert not back.flips_ok
    assert not back.ok
    mix = attrs.evolve(
        ExportedMix(
            directory="d",
            budget=4.5,
            effective_bits_lm=4.5,
            groups=1,
            quantized_layers=1,
            formats=(),
            files=(),
            checkpoint=True,
        ),
        flipped_weights=back.flipped,
        flip_weights=back.flip_weights,
        ok=back.ok,
    )
    assert weights_record(mix)["flips"]["ok"] is False
    line = failure_line(mix, tmp_path / "out")
    assert f"{back.flipped:,} of {back.flip_weights:,} NVFP4 weights" in line
    assert "not the model that was scored" in line
    assert "\n" not in line


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize(
    ("attention", "mlp", "head"),
    [
        ("NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG", NO_QUANT),
        ("W4A16_NVFP4_CFG", "INT8_DEFAULT_CFG", "INT8_DEFAULT_CFG"),
    ],
)
def test_nvfp4_mixes_export_as_compressed_tensors_and_read_back_on_cuda(
    tmp_path: Path, attention: str, mlp: str, head: str
) -> None:
    """ModelOpt's own NVFP4 kernels quantize; the weights it computed with must read back exactly."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    out = tmp_path / "ct"
    written, back = export_tiny_ct(out, nvfp4_choices(attention, mlp, head), device="cuda", dtype="bfloat16")
    print(f"{attention} + {mlp} + head {head}: {back}")
    # On CUDA compressed-tensors decompresses NVFP4 in bfloat16 (code x scale rounded once more):
    # measured on an H100, the worst NVFP4 weight 3.3e-3 of its layer's largest, half a bfloat16 step
    check_nvfp4_folder(out, written, back, {attention: f"{LAYERS}.0.self_attn.q_proj"}, exact=2.0**-7)
    # ModelOpt's Triton kernel rounded some weights otherwise than its exporter's codes: counted, one
    # FP4 step at most (H100: 60 of 114,688 weights, the largest 0.085 of the layer's largest weight)
    assert back.flipped < back.flip_weights // 100
    assert back.flip_relative <= 0.5
    assert abs(back.exported_nll - back.fused_nll) <= 1e-3  # H100: +1.3e-4 and +4.5e-5
