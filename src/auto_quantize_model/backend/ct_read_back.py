"""A compressed-tensors checkpoint read back through transformers' own loader, and compared.

:func:`read_back_ct` loads the folder that
:func:`~auto_quantize_model.backend.compressed_tensors.export_ct_checkpoint` wrote with
``from_pretrained`` through transformers' ``CompressedTensorsHfQuantizer``, checks that
its loader put each scheme on exactly the chosen layers, compares every decompressed weight with the
written one (and counts NVFP4's rounding flips against the fake-quantized model), and measures the
held-out NLL. Apart from the writer because it depends on transformers' loader, not on
compressed-tensors' compressor, and carries its own tolerances.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from auto_quantize_model.backend.compressed_tensors import CtCheckpoint
from auto_quantize_model.backend.modelopt import export as ex
from auto_quantize_model.backend.modelopt import read_back as rb
from auto_quantize_model.core.ct_config import FLIP_SHARE, CtPlan
from auto_quantize_model.errors import AqmError

if TYPE_CHECKING:
    from torch import nn

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
    base = rb.read_back_tolerance(dtype)
    activations = any(group.scheme.inputs is not None for group in plan.groups)
    return max(base, ACTIVATION_TOLERANCE) if activations else base


NVFP4_DTYPE_NOTE = (
    "transformers reads NVFP4 layers back in bfloat16 whatever the model's dtype (compressed-tensors "
    "0.20.1 decompresses them to bfloat16; a float32 model then fails in its first NVFP4 layer), so "
    "this checkpoint is read back, and should be loaded, with dtype=torch.bfloat16."
)
"""Why an NVFP4 checkpoint is read back in bfloat16; measured on CPU, transformers 5.17."""

# --------------------------------------------------------------------------------------------------
# Reading back through transformers
# --------------------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class CtReadBack(rb.NllCheck):
    """How the checkpoint read back through transformers compares with the model that was written.

    Flips are counted over every layer whose written weight is not the fake-quantized one (NVFP4
    on a GPU: the exporter's codes); 0 elsewhere.
    """

    loader: str
    """The class and quantizer that loaded it, with the library versions."""
    worst_layer: str
    """The layer whose decompressed weight is furthest (relative to its largest weight) from the written."""
    weight_max_diff: float
    """That layer's max |decompressed - written|."""
    weight_relative: float
    """The same divided by the layer's largest |weight|."""
    weight_tolerance: float
    per_format: tuple[tuple[str, str, float, float], ...] = ()
    """Each format's worst layer: ``(format, layer, max |difference|, relative)``."""

    @property
    def weights_ok(self) -> bool:
        return self.weight_relative <= self.weight_tolerance

    @property
    def flips_ok(self) -> bool:
        return self.flipped <= FLIP_SHARE * self.flip_weights

    @property
    def ok(self) -> bool:
        return self.weights_ok and self.flips_ok and super().ok


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
    to its largest weight, within ``rb.weight_tolerance``; the written weight is ModelOpt's
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
    within = rb.weight_tolerance(weight_dtype)
    flips = rb.FlipCount(within)
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
