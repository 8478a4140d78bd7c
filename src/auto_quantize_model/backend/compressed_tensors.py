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

:func:`read_back_ct` loads the folder with ``from_pretrained`` through transformers'
``CompressedTensorsHfQuantizer`` (``dequantize=True``: dense weights on any device; activations
are still fake-quantized by compressed-tensors on every forward), checks that its loader put each
scheme on exactly the chosen layers, compares every decompressed weight with the one written and
with ModelOpt's fake-quantized one, and measures the held-out NLL.

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
weight) for INT8, FP8 and INT4; held-out NLL differences are listed in :data:`READ_BACK_NOTE`.
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
from auto_quantize_model.core.ct_config import FLIP_SHARE, FP8_MAX, CtArgs, CtPlan
from auto_quantize_model.core.export_config import ExportConfig
from auto_quantize_model.errors import AqmError, ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger("auto_quantize_model")

READ_BACK_NOTE = (
    "The held-out NLL tolerance is the ModelOpt export's (5e-4 nats/token in float32, 3e-3 in 16 "
    "bits) for weight-only mixes, whose read-back is exact up to float rounding; with quantized "
    "activations it is 1e-2, because compressed-tensors rounds them differently: it divides by "
    "amax/bound where ModelOpt multiplies by bound/amax, and its INT8 codes reach -128 where "
    "ModelOpt's stop at -127 (its dynamic per-token INT8 scale is amax/127.5 too). A value on a "
    "rounding tie then lands on the other code, and a trained model amplifies such flips: on "
    "SmolLM2-135M (hidden states up to ~6000) every layer in FP8 W8A8 read back +6.3e-3 off and in "
    "INT8 W8A8 -5.5e-3, with every weight exact and layer 0's outputs equal to 1e-4 of 41."
)
"""Why a correct checkpoint does not read back to the exact NLL; measured on CPU, float32."""

ACTIVATION_TOLERANCE = 1e-2
"""The held-out NLL tolerance (nats/token) when a group quantizes activations; see READ_BACK_NOTE."""


def nll_tolerance(plan: CtPlan, dtype: str) -> float:
    """The read-back NLL tolerance of ``plan`` read back in ``dtype``: see :data:`READ_BACK_NOTE`."""
    base = ex.read_back_tolerance(dtype)
    activations = any(group.scheme.inputs is not None for group in plan.groups)
    return max(base, ACTIVATION_TOLERANCE) if activations else base


NVFP4_DTYPE_NOTE = (
    "transformers reads NVFP4 layers back in bfloat16 whatever the model's dtype (compressed-tensors "
    "0.20.1 decompresses them to bfloat16; a float32 model then fails in its first NVFP4 layer), so "
    "this checkpoint is read back, and should be loaded, with dtype=torch.bfloat16."
)
"""Why an NVFP4 checkpoint is read back in bfloat16; measured on CPU, transformers 5.17."""

WEIGHT_TOLERANCE = 1e-5
"""Largest accepted |decompressed - fake-quantized| of a layer, relative to its largest |weight|, float32.

The stored codes are ModelOpt's own, so the two differ only by how each multiplies code and scale
in float32 (measured: at most 1.0e-7 for INT8, FP8 and INT4 layers); a wrong scale convention
(amax/128 for amax/127, say) moves the worst weight by about half a step, 4e-3 for INT8."""

WEIGHT_TOLERANCE_16BIT = 2.0**-7
"""The same for bfloat16/float16 weights, where compressed-tensors keeps each scale in the weight's
dtype (2^-9 relative rounding) and the product is rounded again. Measured on an H100 (tiny model,
bfloat16): worst layer 6.0e-3 (FP8 and INT8 layers), NVFP4 layers 3.3e-3."""


def weight_tolerance(dtype: str) -> float:
    """The weight tolerance for weights of ``dtype`` (``float32``, ``bfloat16``...)."""
    return WEIGHT_TOLERANCE_16BIT if dtype in ("bfloat16", "float16") else WEIGHT_TOLERANCE


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


# --------------------------------------------------------------------------------------------------
# Reading back through transformers
# --------------------------------------------------------------------------------------------------


@attrs.frozen
class CtReadBack:
    """How the checkpoint read back through transformers compares with the fake-quantized model."""

    directory: str
    loader: str
    """The class and quantizer that loaded it, with the library versions."""
    in_memory_nll: float
    exported_nll: float
    read_back_nll: float
    tolerance: float
    worst_layer: str
    """The layer whose decompressed weight is furthest (relative to its largest weight) from the written."""
    weight_max_diff: float
    """That layer's max |decompressed - written|."""
    weight_relative: float
    """The same divided by the layer's largest |weight|."""
    weight_tolerance: float
    per_format: tuple[tuple[str, str, float, float], ...] = ()
    """Each format's worst layer: ``(format, layer, max |difference|, relative)``."""
    fused_nll: float = float("nan")
    """The fake-quantized model's NLL after the fusion (:attr:`CtCheckpoint.fused_nll`)."""
    flipped: int = 0
    """Decompressed weights that differ from ModelOpt's fake-quantized ones beyond the weight
    tolerance: the exporter arithmetic rounding the other way (NVFP4 on a GPU), 0 elsewhere."""
    flip_weights: int = 0
    """Weights in the layers whose written weight is not the fake-quantized one."""
    flip_relative: float = 0.0
    """The largest such difference over its layer's largest |weight|."""

    @property
    def difference(self) -> float:
        return self.read_back_nll - self.exported_nll

    @property
    def weights_ok(self) -> bool:
        return self.weight_relative <= self.weight_tolerance

    @property
    def flips_ok(self) -> bool:
        return self.flipped <= FLIP_SHARE * self.flip_weights

    @property
    def ok(self) -> bool:
        return self.weights_ok and self.flips_ok and abs(self.difference) <= self.tolerance


@contextlib.contextmanager
def _head_per_token(head: nn.Module) -> Iterator[None]:
    """Give ``head`` 2-D inputs as ``[1, positions, hidden]`` while the held-out set is measured.

    The evaluator hands lm_head the selected positions as ``[positions, hidden]``; compressed-tensors
    0.20 keeps the first two dimensions for a per-token scale, so a 2-D input would get one scale
    for all positions, while transformers' own forward (and vLLM) gives it one per token.
    """
    flat: list[bool] = []

    def before(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        flat.append(args[0].dim() == 2)
        return (args[0].unsqueeze(0), *args[1:]) if flat[-1] else None

    def after(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return output.squeeze(0) if flat.pop() else None

    handles = [head.register_forward_pre_hook(before), head.register_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def load_ct(
    export_dir: str | Path, *, device: str = "cpu", dtype: str | None = None
) -> tuple[nn.Module, str]:
    """The folder through ``from_pretrained`` and transformers' compressed-tensors quantizer, dequantized.

    Returns the model and a description of the loader. A load that leaves weights missing,
    unexpected or mismatched is an AqmError naming the first.
    """
    import compressed_tensors
    import transformers
    from transformers import AutoConfig, CompressedTensorsConfig
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    from auto_quantize_model.backend.models import auto_class_for

    directory = str(export_dir)
    hf_config = AutoConfig.from_pretrained(directory, local_files_only=True)
    auto = auto_class_for(hf_config, directory)
    try:
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            # "quantization_config from the model will be used": only dequantize is ours, as meant.
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            model, info = auto.from_pretrained(
                directory,
                quantization_config=CompressedTensorsConfig(dequantize=True),
                dtype=dtype or "auto",
                local_files_only=True,
                output_loading_info=True,
            )
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AqmError(f"transformers could not load {directory}: {type(err).__name__}: {first}") from err
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        found = sorted(str(item) for item in info.get(key) or ())
        if found:
            raise AqmError(f"transformers loaded {directory} with {key.replace('_', ' ')}: {found[0]}")
    model.to(device)
    model.eval()
    # With dequantize=True transformers drops model.hf_quantizer after loading; name it by the method.
    method = getattr(hf_config, "quantization_config", {}).get("quant_method", "")
    quantizer = AUTO_QUANTIZER_MAPPING.get(str(method))
    loader = (
        f"{auto.__name__}.from_pretrained via {quantizer.__name__ if quantizer else 'no quantizer'} "
        f"(dequantize=True); transformers {transformers.__version__}, compressed-tensors "
        f"{compressed_tensors.__version__}"
    )
    loaded: nn.Module = model
    return loaded, loader


def _check_schemes(model: nn.Module, plan: CtPlan) -> None:
    """Every chosen layer carries its group's scheme as transformers applied it; no other layer has one."""
    from torch import nn

    wanted = plan.scheme_of()
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if not isinstance(module, nn.Linear):
            continue
        if name not in wanted:
            if scheme is not None and scheme.weights is not None:
                raise AqmError(f"transformers' loader quantized {name}, which the export left at 16 bits")
            continue
        expected = wanted[name]
        got = None if scheme is None or scheme.weights is None else scheme.weights
        if got is None or (got.num_bits, str(got.type), str(got.strategy), got.group_size) != (
            expected.weights.num_bits,
            expected.weights.type,
            expected.weights.strategy,
            expected.weights.group_size,
        ):
            raise AqmError(f"transformers' loader gave {name} {got}, the export chose {expected.weights}")
    missing = set(wanted) - {name for name, _ in model.named_modules()}
    if missing:
        raise AqmError(f"the read-back model has no module {sorted(missing)[0]}")


def read_back_ct(
    written: CtCheckpoint,
    evaluate: ex.Evaluate,
    head_path: str,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    tolerance: float | None = None,
) -> CtReadBack:
    """Load the folder with transformers (:func:`load_ct`) and compare it with the fake-quantized model.

    (a) every chosen layer's decompressed weight against the written one (the worst layer relative
    to its largest weight, within :func:`weight_tolerance`; the written weight is ModelOpt's
    fake-quantized one except for NVFP4, whose rounding flips against it are counted and bounded
    by ``FLIP_SHARE``: see the module docstring); (b) the held-out NLL
    against :attr:`CtCheckpoint.exported_nll`, within :func:`nll_tolerance`: see
    :data:`READ_BACK_NOTE` for why it is not zero. Does not raise on a difference, so the
    caller can record the numbers either way.
    """
    import torch

    if dtype is None and written.plan.holds_nvfp4:
        dtype = "bfloat16"  # see NVFP4_DTYPE_NOTE
    model, loader = load_ct(written.directory, device=device, dtype=dtype)
    _check_schemes(model, written.plan)
    worst = ("", 0.0, -1.0)
    format_of = {module: group.format for group in written.plan.groups for module in group.modules}
    per_format: dict[str, tuple[str, float, float]] = {}
    weight_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    within = weight_tolerance(weight_dtype)
    flips = ex.FlipCount(within)
    with torch.no_grad():
        for name, reference in written.reference.items():
            layer: Any = model.get_submodule(name)
            got = layer.weight.detach().float().cpu()
            if got.shape != reference.shape:
                raise AqmError(f"{name} reads back as {tuple(got.shape)}, written {tuple(reference.shape)}")
            scale = float(reference.float().abs().max())
            expected = written.written.get(name)
            if expected is not None:
                flips.add(got, reference.float())
            diff = float((got - (reference if expected is None else expected).float()).abs().max())
            relative = diff / scale if scale > 0 else diff
            if relative > worst[2]:
                worst = (name, diff, relative)
            if relative > per_format.get(format_of[name], ("", 0.0, -1.0))[2]:
                per_format[format_of[name]] = (name, diff, relative)
    with _head_per_token(model.get_submodule(head_path)):
        nll = evaluate(model)
    return CtReadBack(
        directory=written.directory,
        loader=loader,
        in_memory_nll=written.in_memory_nll,
        exported_nll=written.exported_nll,
        read_back_nll=nll,
        tolerance=nll_tolerance(written.plan, weight_dtype) if tolerance is None else tolerance,
        worst_layer=worst[0],
        weight_max_diff=worst[1],
        weight_relative=max(worst[2], 0.0),
        per_format=tuple((fmt, *found) for fmt, found in per_format.items()),
        weight_tolerance=within,
        fused_nll=written.fused_nll,
        flipped=flips.flipped,
        flip_weights=flips.weights,
        flip_relative=flips.largest,
    )
