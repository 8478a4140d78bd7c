"""A chosen format mix as a compressed-tensors checkpoint, read back through transformers' own loader.

:func:`export_ct_checkpoint` quantizes a fresh model with the mix's ModelOpt config (as the
ModelOpt export does: ``mtq.quantize`` calibrated on the run's batches, then ModelOpt's fusion of
sibling input ranges, which vLLM's fused q/k/v and gate/up GEMMs need as well), takes every chosen
layer's fake-quantized weight and ranges from ModelOpt's quantizers, and writes a pristine copy of
the model with compressed-tensors (``apply_quantization_config``, ``ModelCompressor.compress_model``,
``save_pretrained``, ``ModelCompressor.update_config``): compressed-tensors does the packing.

ModelOpt's symmetric quantizers compute ``round(x * bound / amax) * amax / bound``
(``_tensor_quant`` and ``_fp8_eager`` in ``modelopt/torch/quantization/tensor_quant.py``; ``bound``
is ``TensorQuantizer.maxbound``: 127 INT8, 7 INT4, 448 FP8 E4M3), and compressed-tensors'
``quantize``/``dequantize`` compute ``round(x / scale) * scale``; so a layer's ``weight_scale`` is
its weight quantizer's exported ``amax / bound`` (per output channel, per tensor, or per group of
the input dimension) and a static ``input_scale`` is the input quantizer's ``amax / bound``. The
weights given to the compressor are ModelOpt's fake-quantized ones, which lie on that grid, so the
stored codes are ModelOpt's codes.

:func:`~auto_quantize_model.backend.ct_read_back.read_back_ct` loads the folder with
``from_pretrained`` through transformers' ``CompressedTensorsHfQuantizer`` (``dequantize=True``:
dense weights on any device; activations are still fake-quantized by compressed-tensors on every
forward), checks that its loader put each scheme on exactly the chosen layers, compares every
decompressed weight with the one written and with ModelOpt's fake-quantized one, and measures the
held-out NLL.

NVFP4 is the one format whose written codes are not the fake quantizer's own output: they come from
ModelOpt's exporter arithmetic (``NVFP4QTensor``, plain torch), as ModelOpt's HF export writes them,
while on a CUDA GPU of compute capability 8.9+ the fake quantizer is a Triton kernel that divides in
another order, so a weight lying within a float rounding of an FP4 decision boundary can round to
the neighbouring value (measured on an H100, tiny model: 60 of 114,688 NVFP4 weights, the largest
0.085 of its layer's largest weight; the held-out NLL moved 4.5e-5 to 1.3e-4).
The read-back is therefore checked against the written weights (float rounding only), and the
rounding flips against the fake-quantized weights are counted and reported (more than
:data:`~auto_quantize_model.core.ct_config.FLIP_SHARE` of them fail it); the "exported" NLL is
measured with the written weights in place of the fake-quantized ones, so the NLL comparison is
like for like, and the fused fake-quant NLL is kept beside it.

Measured on CPU (tiny Qwen3-VL, float32, 16 held-out captions; transformers 5.17, compressed-tensors
0.20.1, ModelOpt 0.47): weights agree to float rounding (worst layer ~1e-7 of its largest
weight) for INT8, FP8 and INT4; held-out NLL differences are listed in
:data:`~auto_quantize_model.backend.ct_read_back.READ_BACK_NOTE`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from auto_quantize_model.backend.modelopt import export as ex
from auto_quantize_model.backend.modelopt import import_modelopt
from auto_quantize_model.core.ct_config import FP8_MAX, CtArgs, CtPlan
from auto_quantize_model.core.export_config import ExportConfig
from auto_quantize_model.errors import AqmError, ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger("auto_quantize_model")


def import_ct(module: str = "compressed_tensors") -> Any:
    """A compressed-tensors module, or a one-line ConfigError saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            "--format compressed-tensors needs the compressed-tensors package: "
            "pip install 'auto-quantize-model[ct]' (or pip install compressed-tensors)"
        ) from None


@attrs.frozen(eq=False)
class CtCheckpoint:
    """What :func:`export_ct_checkpoint` wrote, and what the read-back must reproduce."""

    directory: str
    plan: CtPlan
    reference: Mapping[str, torch.Tensor]
    """Every chosen layer's fake-quantized weight as ModelOpt computed it (on the CPU)."""
    in_memory_nll: float
    exported_nll: float
    """After ModelOpt's fusion of sibling ranges, with the written weights: what the checkpoint holds."""
    fused_nll: float
    """After the fusion, fake-quantized: equal to :attr:`exported_nll` unless a written weight differs."""
    quantize_seconds: float
    export_seconds: float
    notes: tuple[str, ...] = ()
    written: Mapping[str, torch.Tensor] = attrs.field(factory=dict)
    """The chosen layers whose written weight is not :attr:`reference` (NVFP4), on the CPU."""


def _head_name(model: nn.Module) -> str | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        return None
    return next((name for name, module in model.named_modules() if module is head), None)


def _untie_head(model: nn.Module, chosen: set[str]) -> str | None:
    """Mark tied embeddings untied when the head is quantized (the table itself stays in float)."""
    head = _head_name(model)
    if head is None or head not in chosen:
        return None
    config = getattr(model, "config", None)
    sections = [config, getattr(config, "get_text_config", lambda: None)()]
    changed = False
    for section in sections:
        if section is not None and getattr(section, "tie_word_embeddings", False):
            section.tie_word_embeddings = False
            changed = True
    if not changed:
        return None
    return (
        f"{head} is quantized while its weight was tied to the input embeddings: config.json says "
        "tie_word_embeddings false (the checkpoint holds the float embedding table and the quantized head)"
    )


def _expected_ranges(args: CtArgs, weight: torch.Tensor) -> int:
    rows, columns = weight.shape
    if args.strategy == "channel":
        return int(rows)
    if args.strategy == "group":
        return int(rows) * (int(columns) // int(args.group_size or columns))
    return 1


@attrs.frozen(eq=False)
class LayerTensors:
    """What compressed-tensors is given for one chosen layer, and what the read-back must reproduce."""

    weight: torch.Tensor
    """On the format's grid of ``weight_scale`` (and ``weight_global_scale``): the compressor packs it."""
    reference: torch.Tensor
    """The weight the fake-quantized model computed with (ModelOpt's quantizer applied to it)."""
    weight_scale: torch.Tensor
    weight_global_scale: torch.Tensor | None = None
    """NVFP4: ``6 * 448 / amax``, compressed-tensors' inverse of ModelOpt's ``weight_scale_2``."""
    input_scale: torch.Tensor | None = None
    input_global_scale: torch.Tensor | None = None
    """NVFP4 W4A4: ``6 * 448 / amax`` of the calibrated input range (the blocks are dynamic)."""


def _weight_ranges(name: str, weight_q: Any, args: CtArgs, weight: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        # An all-zero weight row (a padding token's row of a tied head) gets a stand-in positive
        # range; its codes are zero whatever the scale, so ModelOpt's warning says nothing here.
        warnings.filterwarnings("ignore", message=r".*amax entries of this TensorQuantizer are zero")
        amax = weight_q.export_amax()
    expected = _expected_ranges(args, weight)
    if amax is None or amax.numel() != expected:
        found = "no" if amax is None else str(amax.numel())
        raise AqmError(
            f"{name}: ModelOpt's weight quantizer holds {found} ranges, the compressed-tensors "
            f"{args.strategy} scheme needs {expected}"
        )
    result: torch.Tensor = amax
    return result


def nvfp4_weight(weight: torch.Tensor, amax: torch.Tensor, block: int) -> tuple[torch.Tensor, ...]:
    """ModelOpt's NVFP4 export arithmetic (``NVFP4QTensor``, plain torch, any device) for one weight.

    ``amax`` is the weight quantizer's per-tensor range. Returns the dequantized weight (the
    codes times their scales, float32), the FP8 block scales as float32 and compressed-tensors'
    global scale ``6 * 448 / amax`` (float32, shape ``[1]``). These are the codes and block scales
    ModelOpt's own HF exporter writes for the layer.
    """
    import torch

    qtensor = import_modelopt("modelopt.torch.quantization.qtensor").NVFP4QTensor
    scale_2 = amax.float().reshape(()) / (6.0 * FP8_MAX)
    block_scale, _ = qtensor.get_weights_scaling_factor(weight, block, scale_2)
    packed, _, _ = qtensor.quantize(weight, block, block_scale, scale_2)
    values = packed.dequantize(
        dtype=torch.float32, scale=block_scale, double_scale=scale_2, block_sizes={-1: block}
    )
    return values, block_scale.float(), (1.0 / scale_2).reshape(1)


def _layer_tensors(name: str, module: Any, args: CtArgs, inputs: CtArgs | None) -> LayerTensors:
    """A chosen layer's weight on its grid, the fake-quantized reference and its scales."""
    import torch

    weight_q, input_q = module.weight_quantizer, module.input_quantizer
    if not weight_q.is_enabled:
        raise AqmError(f"{name}: ModelOpt left its weight quantizer off, contrary to the chosen format")
    amax = _weight_ranges(name, weight_q, args, module.weight)
    with torch.no_grad():
        fake = weight_q(module.weight).detach()
    if bool(input_q.is_enabled) != (inputs is not None):
        state = "on" if input_q.is_enabled else "off"
        raise AqmError(f"{name}: ModelOpt's input quantizer is {state}, contrary to the chosen format")
    input_scale = input_global = None
    if inputs is not None and inputs.static_input:
        input_amax = input_q.export_amax()
        if input_amax is None or input_amax.numel() != 1:
            raise AqmError(f"{name}: ModelOpt calibrated no per-tensor input range for its static scheme")
        if inputs.strategy == "tensor_group":
            input_global = inputs.global_bound / input_amax.float().reshape(1)
        else:
            input_scale = input_amax.float().reshape(1) / inputs.bound
    if args.strategy == "tensor_group":
        with torch.no_grad():
            values, block_scale, global_scale = nvfp4_weight(
                module.weight.detach(), amax, int(args.group_size or 16)
            )
        return LayerTensors(
            weight=values.to(fake.dtype),
            reference=fake,
            weight_scale=block_scale,
            weight_global_scale=global_scale,
            input_global_scale=input_global,
        )
    return LayerTensors(
        weight=fake, reference=fake, weight_scale=amax.float() / args.bound, input_scale=input_scale
    )


def _build_ct_config(plan: CtPlan) -> Any:
    """compressed-tensors' QuantizationConfig of ``plan``, each group's packing checked against its own."""
    import torch

    quantization = import_ct("compressed_tensors.quantization")
    infer = import_ct("compressed_tensors.compressors.format").infer_module_format
    config = quantization.QuantizationConfig.model_validate(plan.quantization_config())
    for group in plan.groups:
        scheme = config.config_groups[group.format]
        inferred = infer(torch.nn.Linear, scheme.model_copy(update={"format": None})).value
        if inferred != group.scheme.compression:
            raise AqmError(
                f"compressed-tensors packs {group.format} as {inferred}, not {group.scheme.compression}: "
                "the installed compressed-tensors is not the one this export was checked with (0.20)"
            )
    return config


def export_ct_checkpoint(
    model: nn.Module,
    tokenizer: Any,
    config: ExportConfig,
    plan: CtPlan,
    calib_batches: Sequence[Mapping[str, torch.Tensor]],
    forward: ex.Forward,
    output_dir: str | Path,
    *,
    evaluate: ex.Evaluate,
) -> CtCheckpoint:
    """Quantize ``model`` with ``config`` as ModelOpt would, then write ``plan`` with compressed-tensors.

    ``model`` is the full, unquantized model and is consumed (ModelOpt inserts quantizers). A
    pristine deep copy is taken first, since the checkpoint must hold plain modules: peak memory is
    about twice the model. Writes ``config.json`` (with compressed-tensors' ``quantization_config``),
    the safetensors and the tokenizer into ``output_dir``.
    """
    import torch

    out = Path(output_dir)
    ex._check_output_dir(out)
    ex._check_fresh(model)
    quantization = import_ct("compressed_tensors.quantization")
    compressor_cls = import_ct("compressed_tensors.compressors").ModelCompressor
    ct_config = _build_ct_config(plan)
    if not calib_batches and config.algorithm is not None:
        raise ConfigError(f"export got no calibration batches, and {config.algorithm} calibration needs data")
    hf_config = getattr(model, "config", None)
    if hf_config is not None and not getattr(hf_config, "architectures", None):
        hf_config.architectures = [type(model).__name__]  # ModelOpt's fusion step reads it
    pristine = copy.deepcopy(model)

    mtq = import_modelopt("modelopt.torch.quantization")
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        mtq.quantize(model, copy.deepcopy(config.quant_config), ex.calibration_loop(calib_batches, forward))
    quantize_seconds = time.perf_counter() - started
    ex._check_quantizers(model, config)
    in_memory = evaluate(model)
    fuse = import_modelopt("modelopt.torch.export.unified_export_hf").requantize_resmooth_fused_llm_layers
    with contextlib.redirect_stdout(io.StringIO()):
        fuse(model)
    fused = evaluate(model)

    started = time.perf_counter()
    schemes = plan.scheme_of()
    tensors = {
        name: _layer_tensors(name, model.get_submodule(name), scheme.weights, scheme.inputs)
        for name, scheme in schemes.items()
    }
    differing = {name: on for name, on in tensors.items() if not torch.equal(on.weight, on.reference)}
    exported = fused
    if differing:
        with _written_weights(model, differing):
            exported = evaluate(model)
    written = {name: layer.weight.to("cpu", copy=True) for name, layer in differing.items()}
    notes: list[str] = []
    untied = _untie_head(pristine, set(schemes))
    if untied is not None:
        notes.append(untied)
    with torch.no_grad():
        for name, layer in tensors.items():
            # A new Parameter: the head's weight may be the embedding table's too.
            weight = torch.nn.Parameter(layer.weight.clone(), requires_grad=False)
            pristine.get_submodule(name).weight = weight
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bars
        quantization.apply_quantization_config(pristine, ct_config)
    with torch.no_grad():
        for name, layer in tensors.items():
            module: Any = pristine.get_submodule(name)
            for key in ("weight_scale", "weight_global_scale", "input_scale", "input_global_scale"):
                value = getattr(layer, key)
                if value is not None:
                    target = getattr(module, key)
                    target.copy_(value.reshape(target.shape))
    reference = {name: layer.reference.to("cpu", copy=True) for name, layer in tensors.items()}
    del tensors
    compressor = compressor_cls(quantization_config=ct_config)
    with contextlib.redirect_stderr(io.StringIO()):
        compressor.compress_model(pristine)
        save: Any = pristine.save_pretrained
        save(str(out))
    compressor.update_config(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    export_seconds = time.perf_counter() - started
    return CtCheckpoint(
        directory=str(out),
        plan=plan,
        reference=reference,
        in_memory_nll=in_memory,
        exported_nll=exported,
        fused_nll=fused,
        written=written,
        quantize_seconds=quantize_seconds,
        export_seconds=export_seconds,
        notes=tuple(notes),
    )


@contextlib.contextmanager
def _written_weights(model: nn.Module, layers: Mapping[str, LayerTensors]) -> Iterator[None]:
    """The quantized model computing with ``layers``' written weights, weight quantizers off.

    Each module gets a new Parameter (its own Parameter object comes back after): a tied head's
    weight is the embedding table's too, and the table stays in float in the checkpoint.
    """
    import torch

    kept: list[tuple[Any, torch.Tensor]] = []
    try:
        for name, layer in layers.items():
            module: Any = model.get_submodule(name)
            own = module._parameters["weight"]
            kept.append((module, own))
            values = layer.weight.to(device=own.device, dtype=own.dtype)
            module.weight = torch.nn.Parameter(values, requires_grad=False)
            module.weight_quantizer.disable()
        yield
    finally:
        for module, own in kept:
            module.weight = own
            module.weight_quantizer.enable()
