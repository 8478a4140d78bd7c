"""A chosen format mix written out as a calibrated HF checkpoint, and read back to check it.

Three steps, each usable alone (the stage and the CLI compose them):

1. the quantize config (:mod:`auto_quantize_model.backend.modelopt.quant_config`):
   :func:`~auto_quantize_model.backend.modelopt.quant_config.prepare_export` turns a per-group
   choice into an :class:`~auto_quantize_model.core.export_config.ExportConfig`, and
   :func:`~auto_quantize_model.backend.modelopt.quant_config.write_quant_config` writes it and
   reads it back through ModelOpt;
2. :func:`export_checkpoint` quantizes a fresh model with that config (``mtq.quantize``, calibrated
   on the given batches) and writes it with ModelOpt's ``export_hf_checkpoint``
   (``modelopt/torch/export/unified_export_hf.py:1495``), then checks that ``hf_quant_config.json``
   records every layer's chosen format. The exporter packs the weights *in place* (the model's
   quantized layers hold int8/fp8 weights afterwards), so the fake-quantized model is measured
   before, and afterwards the same model again with the weights decoded from the files put in
   place: the reference the read-back must meet.
3. :func:`~auto_quantize_model.backend.modelopt.read_back.read_back_nll` rebuilds the model from
   the checkpoint (:func:`load_exported`) and measures the same held-out NLL.

The loader stays beside writing: it undoes exactly the packing and scales this writer produces, and
every exported folder's README tells its user to import :func:`load_exported` from this module, so
its path is published. The check and its tolerances are in
:mod:`~auto_quantize_model.backend.modelopt.read_back`.

What runs where (ModelOpt 0.47, torch 2.13, transformers 5.17; measured on CPU): quantizing and
exporting INT8 (W8A8, W8A16), FP8 (per tensor, per channel/per token), INT4 blocks (max and
AWQ-lite) and SmoothQuant INT8 work on CPU; the exporter itself needs no GPU. NVFP4 and MX formats
need CUDA for ModelOpt's quantization kernels, so they are refused on a CPU model.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from auto_quantize_model.backend.modelopt import import_modelopt
from auto_quantize_model.backend.modelopt.quant_config import (
    HF_QUANT_CONFIG_FILE,
    is_cuda,
    raise_mismatches,
    write_readme,
)
from auto_quantize_model.core import export_config as xc
from auto_quantize_model.core.export_labels import READABLE_LABELS
from auto_quantize_model.errors import AqmError, ConfigError, InputError
from auto_quantize_model.io.atomic import atomic_write_text

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger("auto_quantize_model")

Forward = Callable[["nn.Module", Any], Any]
"""ModelOpt's ``forward_step`` shape: runs one calibration batch through the model."""

Evaluate = Callable[["nn.Module"], float]
"""Held-out NLL (nats per token) of a full model; see :func:`holdout_evaluator`."""

# --------------------------------------------------------------------------------------------------
# 2. The checkpoint
# --------------------------------------------------------------------------------------------------


@attrs.frozen
class CheckpointExport:
    """What :func:`export_checkpoint` wrote and measured."""

    directory: str
    files: tuple[str, ...]
    quant_algo: str
    """``MIXED_PRECISION`` for several formats, else the one format's label."""
    in_memory_nll: float
    """Held-out NLL of the quantized, calibrated model (nats per token); NaN without ``evaluate``."""
    exported_nll: float
    """The quantized model computing with the weights the checkpoint holds (decoded from its files,
    weight quantizers off, the calibrated activation quantizers kept): what the read-back
    (:func:`~auto_quantize_model.backend.modelopt.read_back.read_back_nll`) must reproduce. NaN
    without ``evaluate``."""
    quantize_seconds: float
    export_seconds: float
    notes: tuple[str, ...] = ()
    """What was adjusted so that the checkpoint says what it holds, one sentence each."""
    sample: Mapping[str, torch.Tensor] = attrs.field(factory=dict)
    """A few quantized layers' fake-quantized weights after the fusion (on the CPU): the read-back
    compares them with what it decodes (:data:`SAMPLE_LAYERS`)."""
    fused_nll: float = math.nan
    """The fake-quantized model after the exporter's fusion step (siblings sharing an input get one
    activation range and, for per-tensor weights, one weight range): the model the exporter rounds.
    :attr:`exported_nll` minus this is ModelOpt's exporter rounding weights otherwise than its fake
    quantizer (16-bit scales; NVFP4 on a GPU), reported, not a reading error."""


SAMPLE_LAYERS = 16
"""Quantized layers whose decoded weights the read-back compares with the fake-quantized ones.

A diagnostic beside the NLL check: ModelOpt's exporter rounds some weights otherwise than its fake
quantizer (16-bit scales; on a GPU its Triton NVFP4 kernel), which moves the read-back NLL without a
reading error, while a reading error (a wrong scale or packing) changes nearly every weight. A
sample keeps the copies small on a 32B model; layers with a pre-quantization scale (AWQ,
SmoothQuant) are skipped, their stored weight being the scaled one."""


def _device_of(model: nn.Module) -> str:
    for param in model.parameters():
        return str(param.device)
    return "cpu"


def _check_fresh(model: nn.Module) -> None:
    quant_nn = import_modelopt("modelopt.torch.quantization.nn")
    if any(isinstance(module, quant_nn.TensorQuantizer) for module in model.modules()):
        raise ConfigError(
            "the model already carries ModelOpt quantizers (an AutoQuant search or an earlier export in "
            "this process); export needs the unquantized model: load it again"
        )


def _check_output_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export output {out} is a file; give a folder")
    taken = [p.name for p in (out / "config.json", out / HF_QUANT_CONFIG_FILE) if p.exists()]
    taken += sorted(p.name for p in out.glob("*.safetensors")) if out.is_dir() else []
    if taken:
        raise ConfigError(
            f"export output {out} already holds a checkpoint ({taken[0]}); choose an empty folder"
        )


def _check_quantizers(model: nn.Module, config: xc.ExportConfig) -> None:
    """Every chosen layer's weight quantizer on, every other one off: what mtq.quantize really did."""
    quant_nn = import_modelopt("modelopt.torch.quantization.nn")
    chosen = {layer.module for layer in config.quantized}
    for name, module in model.named_modules():
        quantizer = getattr(module, "weight_quantizer", None)
        if not isinstance(quantizer, quant_nn.TensorQuantizer | quant_nn.SequentialQuantizer):
            continue
        enabled = bool(quantizer.is_enabled)
        if enabled != (name in chosen):
            state = "quantized" if enabled else "left unquantized"
            raise AqmError(f"mtq.quantize {state} {name}, contrary to the chosen formats")
    missing = chosen - {name for name, _ in model.named_modules()}
    if missing:
        raise ConfigError(f"the chosen layer {sorted(missing)[0]} is not a module of this model")


def _untie_quantized_head(model: nn.Module, out: Path, config: xc.ExportConfig) -> str | None:
    """Mark the embeddings untied in ``config.json`` when the exporter wrote a quantized head beside them.

    With tied embeddings and a quantized lm_head, the in-memory model computes embeddings with
    the float table and logits with the quantized copy; the exporter writes both tensors but keeps
    ``tie_word_embeddings: true``, and a loader honouring it would drop the quantized head.
    """
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    names = {id(module): name for name, module in model.named_modules()}
    head_name = names.get(id(head)) if head is not None else None
    if head_name is None or head_name not in {layer.module for layer in config.quantized}:
        return None
    path = out / "config.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    changed = False
    for section in (raw, raw.get("text_config")):
        if isinstance(section, dict) and section.get("tie_word_embeddings"):
            section["tie_word_embeddings"] = False
            changed = True
    if not changed:
        return None
    atomic_write_text(path, json.dumps(raw, indent=4) + "\n")
    return (
        f"{head_name} is quantized while its weight was tied to the input embeddings: config.json now says "
        "tie_word_embeddings false (the checkpoint holds the float embedding table and the quantized head)"
    )


def calibration_loop(
    batches: Sequence[Mapping[str, torch.Tensor]], forward: Forward
) -> Callable[[nn.Module], None]:
    """ModelOpt's ``forward_loop``: every batch, on the model's input device, through ``forward``."""
    import torch

    from auto_quantize_model.backend.lm_forward import input_device, to_device

    def loop(model: nn.Module) -> None:
        device = input_device(model)
        with torch.no_grad():
            for batch in batches:
                forward(model, to_device(batch, device))

    return loop


def export_checkpoint(
    model: nn.Module,
    tokenizer: Any,
    quant_config: xc.ExportConfig,
    calib_batches: Sequence[Mapping[str, torch.Tensor]],
    forward: Forward,
    output_dir: str | Path,
    *,
    evaluate: Evaluate | None = None,
) -> CheckpointExport:
    """Quantize ``model`` as ``quant_config`` says, calibrate, and write a Hugging Face checkpoint.

    ``model`` is the full, unquantized Hugging Face model (module names as in the choice); it is
    consumed: ModelOpt inserts quantizers and its exporter then packs the quantized weights in
    place. ``forward(model, batch)`` runs one calibration batch (e.g.
    :func:`~auto_quantize_model.backend.lm_forward.calibration_step_for` of the full model);
    ``evaluate`` measures the held-out NLL of the quantized model before it is packed, for the
    read-back (:mod:`~auto_quantize_model.backend.modelopt.read_back`). Writes the checkpoint
    (``config.json`` with ``quantization_config``, ``hf_quant_config.json``, safetensors), the
    tokenizer and ``README.md``, then checks that ``hf_quant_config.json`` records each layer's
    chosen format (AqmError otherwise).
    """
    out = Path(output_dir)
    device = _device_of(model)
    if quant_config.needs_cuda and not is_cuda(device):
        raise ConfigError(
            f"format {quant_config.needs_cuda[0]} cannot be exported on {device}: ModelOpt quantizes (and so "
            "exports) it only with CUDA kernels; load the model on a CUDA device"
        )
    if not calib_batches and quant_config.algorithm is not None:
        raise ConfigError(
            f"export got no calibration batches, and {quant_config.algorithm} calibration needs data"
        )
    _check_output_dir(out)
    _check_fresh(model)
    mtq = import_modelopt("modelopt.torch.quantization")
    notes: list[str] = []
    hf_config = getattr(model, "config", None)
    if hf_config is not None and not getattr(hf_config, "architectures", None):
        # The exporter reads config.architectures (None for a model built with from_config).
        hf_config.architectures = [type(model).__name__]

    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        mtq.quantize(
            model, copy.deepcopy(quant_config.quant_config), calibration_loop(calib_batches, forward)
        )
    quantize_seconds = time.perf_counter() - started
    _check_quantizers(model, quant_config)
    dtypes: dict[str, torch.dtype] = {
        layer.module: getattr(model.get_submodule(layer.module), "weight").dtype  # noqa: B009
        for layer in quant_config.quantized
    }
    in_memory = fused = exported = math.nan
    sample: dict[str, torch.Tensor] = {}
    if evaluate is not None:
        in_memory = evaluate(model)
        # The exporter first gives layers that share an input (q/k/v, gate/up) one activation
        # range and, for per-tensor weights, one weight range, as fused deployment GEMMs need;
        # doing that step here (it is idempotent, the exporter repeats it) measures what it rounds.
        fuse = import_modelopt("modelopt.torch.export.unified_export_hf").requantize_resmooth_fused_llm_layers
        with contextlib.redirect_stdout(io.StringIO()):
            fuse(model)
        fused = evaluate(model)
        sample = _sample_weights(model, quant_config)  # only a read-back compares them

    export_hf = import_modelopt("modelopt.torch.export").export_hf_checkpoint
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            export_hf(model, export_dir=str(out))
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AqmError(f"ModelOpt's HF exporter failed writing {out}: {type(err).__name__}: {first}") from err
    export_seconds = time.perf_counter() - started

    untied = _untie_quantized_head(model, out, quant_config)
    if untied is not None:
        notes.append(untied)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    hf_quant = json.loads((out / HF_QUANT_CONFIG_FILE).read_text(encoding="utf-8"))
    raise_mismatches(str(out / HF_QUANT_CONFIG_FILE), xc.checkpoint_mismatches(hf_quant, quant_config))
    if evaluate is not None:
        exported = _written_nll(model, out, hf_quant, dtypes, evaluate)
    write_readme(out, quant_config, notes)
    return CheckpointExport(
        directory=str(out),
        files=tuple(sorted(p.name for p in out.iterdir() if p.is_file())),
        quant_algo=str(hf_quant["quantization"]["quant_algo"]),
        in_memory_nll=in_memory,
        exported_nll=exported,
        quantize_seconds=quantize_seconds,
        export_seconds=export_seconds,
        notes=tuple(notes),
        sample=sample,
        fused_nll=fused,
    )


def _written_nll(
    model: nn.Module,
    out: Path,
    hf_quant: Mapping[str, Any],
    dtypes: Mapping[str, torch.dtype],
    evaluate: Evaluate,
) -> float:
    """``evaluate`` of the quantized model computing with the weights the checkpoint in ``out`` holds.

    The read-back's reference. Comparing the loaded checkpoint with the fake-quantized model mixes
    two things: ModelOpt's exporter rounding some weights otherwise than its fake quantizer (on the
    4B with random weights on an H100 that alone was -3.4e-3 to +9.4e-3 nats, beyond any fixed
    tolerance that still catches a misread scale) and a reading error. Here each quantized layer
    gets the weight decoded from the files as :func:`load_exported` decodes it, weight quantizer
    off, while its calibrated activation quantizer stays: the loaded checkpoint must then give the
    same NLL up to float rounding, and the exporter's rounding is measured on its own. The
    exporter has packed the weights in place already, so this only replaces what nothing reads;
    ``dtypes`` are the layers' weight dtypes before packing.
    """
    import torch

    tensors = _ShardedTensors(out)
    with torch.no_grad():
        for name, record in _readable_records(out, hf_quant, tensors).items():
            module: Any = model.get_submodule(name)
            decoded = _dequantize(name, str(record["quant_algo"]), tensors, record.get("group_size"))
            device = module.weight.device
            values = decoded.to(device=device, dtype=dtypes[name])
            module.weight = torch.nn.Parameter(values, requires_grad=False)
            module.weight_quantizer.disable()
    del tensors
    return evaluate(model)


def _sample_weights(model: nn.Module, config: xc.ExportConfig) -> dict[str, torch.Tensor]:
    """The first :data:`SAMPLE_LAYERS` quantized layers' fake-quantized weights, on the CPU."""
    import torch

    sample: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for layer in config.quantized:
            module: Any = model.get_submodule(layer.module)
            if getattr(module.input_quantizer, "pre_quant_scale", None) is not None:
                continue
            sample[layer.module] = module.weight_quantizer(module.weight).detach().float().cpu()
            if len(sample) == SAMPLE_LAYERS:
                break
    return sample


# --------------------------------------------------------------------------------------------------
# 3. Reading the checkpoint back
# --------------------------------------------------------------------------------------------------


def _readable_records(
    directory: Path, hf_quant: Mapping[str, Any], tensors: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """:func:`_layer_records`, refusing in one line a layer whose label this module cannot decode."""
    records = _layer_records(hf_quant, tensors)
    for name, record in records.items():
        if record.get("quant_algo") not in READABLE_LABELS:
            raise ConfigError(
                f"{directory}: layer {name} is {record.get('quant_algo')}; reading it back is implemented "
                f"for {', '.join(READABLE_LABELS)} only"
            )
    return records


def _layer_records(hf_quant: Mapping[str, Any], tensors: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Layer -> its record (``quant_algo``, ``group_size``...), from either layout of hf_quant_config.json."""
    import fnmatch

    quantization = hf_quant["quantization"]
    if quantization.get("quant_algo") == xc.MIXED_PRECISION:
        return {name: dict(entry) for name, entry in quantization["quantized_layers"].items()}
    excluded = list(quantization.get("exclude_modules") or [])
    record = {k: v for k, v in quantization.items() if k in ("quant_algo", "group_size")}
    layers = {key.removesuffix(".weight_scale") for key in tensors if key.endswith(".weight_scale")}
    return {
        name: dict(record)
        for name in sorted(layers)
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in excluded)
    }


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """ModelOpt's ``pack_int4_in_uint8`` undone: ``[out/2, in]`` bytes -> ``[out, in]`` int4 values."""
    import torch

    low = (packed & 0x0F).to(torch.int16)
    high = ((packed >> 4) & 0x0F).to(torch.int16)
    low = torch.where(low >= 8, low - 16, low)
    high = torch.where(high >= 8, high - 16, high)
    return torch.stack((low, high), dim=1).reshape(packed.shape[0] * 2, packed.shape[1])


_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""The FP4 (E2M1) value of each 4-bit code."""


def _unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """NVFP4 weights ``[out, in/2]`` (two codes a byte, the even element in the low nibble) as floats."""
    import torch

    codes = torch.stack(((packed & 0x0F).long(), ((packed >> 4) & 0x0F).long()), dim=-1)
    table = torch.tensor(_E2M1, device=packed.device)
    return table[codes].reshape(packed.shape[0], packed.shape[1] * 2)


def _dequantize(
    name: str, label: str, tensors: Mapping[str, torch.Tensor], group_size: int | None
) -> torch.Tensor:
    weight = tensors[f"{name}.weight"]
    scale = tensors[f"{name}.weight_scale"].float()
    if label == "W4A16_AWQ":
        values = _unpack_int4(weight).float()
        block = int(group_size or values.shape[1] // scale.shape[-1])
        return values * scale.repeat_interleave(block, dim=-1)
    if label in ("NVFP4", "W4A16_NVFP4", "W4A8_NVFP4_FP8"):
        # W4A8_NVFP4_FP8's second scale is amax / 448, not NVFP4's amax / (6 * 448): the same
        # product of codes and both scales gives the weight back.
        values = _unpack_e2m1(weight)
        block = int(group_size or values.shape[1] // scale.shape[-1])
        global_scale = tensors[f"{name}.weight_scale_2"].float().reshape(())
        return values * scale.repeat_interleave(block, dim=-1) * global_scale
    values = weight.float()
    if scale.numel() == 1:
        return values * scale.reshape(())
    return values * scale.reshape(-1, 1)


def _input_cfg(label: str) -> tuple[dict[str, Any] | None, float]:
    """The activation quantizer a label implies, and the bound its stored scale is relative to."""
    if label == "W8A8_SQ_PER_CHANNEL":
        return {"num_bits": 8, "axis": None}, 127.0
    if label in ("FP8", "W4A8_NVFP4_FP8"):
        return {"num_bits": [4, 3], "axis": None}, 448.0
    if label == "FP8_PER_CHANNEL_PER_TOKEN":
        return {"num_bits": [4, 3], "axis": None, "type": "dynamic", "block_sizes": {-1: None}}, 448.0
    if label == "NVFP4":
        # Dynamic FP4 blocks of 16 with FP8 block scales under one global scale: the stored
        # input_scale is amax / (6 * 448) (NVFP4QTensor.get_activation_scaling_factor).
        block = {-1: 16, "type": "dynamic", "scale_bits": [4, 3]}
        return {"num_bits": [2, 1], "block_sizes": block}, 6.0 * 448.0
    return None, 1.0


class _ShardedTensors(Mapping[str, "torch.Tensor"]):
    """The tensors of a folder's ``*.safetensors`` shards by name, each read from disk when asked for.

    Both readers of a checkpoint go through it: the written-weights pass holds one layer's tensors
    at a time, and :func:`load_exported` reads each tensor once, straight into its state dict."""

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        shards = sorted(directory.glob("*.safetensors"))
        if not shards:
            raise InputError(f"{directory} holds no .safetensors weights: not an exported checkpoint")
        self._where: dict[str, Any] = {}
        for shard in shards:
            handle: Any = safe_open(str(shard), framework="pt")
            self._where.update(dict.fromkeys(handle.keys(), handle))

    def __getitem__(self, key: str) -> torch.Tensor:
        tensor: torch.Tensor = self._where[key].get_tensor(key)
        return tensor

    def __contains__(self, key: object) -> bool:
        return key in self._where  # without reading the tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def load_exported(export_dir: str | Path, *, device: str = "cpu", dtype: str | None = None) -> nn.Module:
    """The exported checkpoint as a PyTorch model that computes what the checkpoint says.

    The architecture comes from ``config.json`` (through transformers, without its quantization
    section), every unquantized tensor is loaded as written, every quantized layer's weight is
    dequantized from its stored integer/FP8 values and scales, and its activations get a ModelOpt
    fake quantizer with the stored ``input_scale`` (static) or the label's dynamic scheme;
    ``pre_quant_scale`` (SmoothQuant/AWQ) is applied to the layer's input. Formats outside
    :data:`READABLE_LABELS` are refused. ``dtype`` defaults to the checkpoint's.
    """
    import torch
    from transformers import AutoConfig

    from auto_quantize_model.backend.models import auto_class_for

    directory = Path(export_dir)
    for required in ("config.json", HF_QUANT_CONFIG_FILE):
        if not (directory / required).is_file():
            raise InputError(f"{directory} has no {required}: not a checkpoint written by export_checkpoint")
    hf_quant = json.loads((directory / HF_QUANT_CONFIG_FILE).read_text(encoding="utf-8"))
    tensors = _ShardedTensors(directory)
    records = _readable_records(directory, hf_quant, tensors)

    config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    torch_dtype = (
        getattr(torch, dtype) if dtype is not None else (getattr(config, "dtype", None) or torch.float32)
    )
    if isinstance(torch_dtype, str):
        torch_dtype = getattr(torch, torch_dtype)
    with torch.device(device):
        model = auto_class_for(config, str(directory)).from_config(config, dtype=torch_dtype)
    model.eval()

    state: dict[str, torch.Tensor] = {}
    extras: dict[str, dict[str, torch.Tensor]] = {}
    quantized_keys = {
        f"{name}.{suffix}"
        for name in records
        for suffix in ("weight", "weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale")
    }
    for name, record in records.items():
        state[f"{name}.weight"] = _dequantize(
            name, str(record["quant_algo"]), tensors, record.get("group_size")
        ).to(torch_dtype)
        extras[name] = {
            s: tensors[f"{name}.{s}"] for s in ("input_scale", "pre_quant_scale") if f"{name}.{s}" in tensors
        }
    state.update({key: value.to(torch_dtype) for key, value in tensors.items() if key not in quantized_keys})
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    really_missing = [key for key in missing if key not in tied]
    if unexpected or really_missing:
        what = f"unexpected tensor {unexpected[0]}" if unexpected else f"missing tensor {really_missing[0]}"
        raise InputError(f"{directory}: the weights do not fit the architecture in config.json ({what})")

    mtq = import_modelopt("modelopt.torch.quantization")
    entries: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
    bounds: dict[str, float] = {}
    for name, record in records.items():
        cfg, bound = _input_cfg(str(record["quant_algo"]))
        if cfg is not None:
            entries.append({"quantizer_name": f"{xc.literal_pattern(name)}.input_quantizer", "cfg": cfg})
            bounds[name] = bound
    with contextlib.redirect_stdout(io.StringIO()):
        mtq.quantize(model, {"quant_cfg": entries, "algorithm": None}, None)
    with torch.no_grad():
        for name, found in extras.items():
            quantizer = model.get_submodule(name).input_quantizer
            if "pre_quant_scale" in found:
                quantizer.pre_quant_scale = found["pre_quant_scale"].to(device=device, dtype=torch_dtype)
            if name in bounds and "input_scale" in found:
                quantizer.amax = (found["input_scale"].float() * bounds[name]).to(device)
    loaded: nn.Module = model
    return loaded


def holdout_evaluator(
    token_lists: Sequence[Sequence[int]], pad_id: int, decoder_path: str, head_path: str
) -> Evaluate:
    """Held-out NLL (nats per token, float64 log-probabilities) of a full model, by module paths.

    The same batches and loss as validation (:class:`~auto_quantize_model.backend.measure.HeldOutEval`):
    one caption per row, every real next token scored.
    """
    from auto_quantize_model.backend.lm_forward import as_tensors, input_device, to_device
    from auto_quantize_model.backend.measure import HeldOutEval
    from auto_quantize_model.core.batching import holdout_columns

    columns = holdout_columns(token_lists, pad_id)

    def evaluate(model: nn.Module) -> float:
        decoder = model.get_submodule(decoder_path) if decoder_path else model
        device = input_device(decoder)
        batches = tuple(to_device(as_tensors(c), device) for c in columns)
        result, _ = HeldOutEval(decoder, model.get_submodule(head_path), batches).run()
        return result.nll

    return evaluate
