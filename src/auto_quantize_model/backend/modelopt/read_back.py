"""The exported checkpoint loaded back (:func:`~auto_quantize_model.backend.modelopt.export.load_exported`)
and compared with the model that was written: held-out NLL like for like, and a
sample of decoded weights against the fake-quantized ones.

Apart from the writer (:mod:`auto_quantize_model.backend.modelopt.export`) because it is the check,
not the checkpoint: its tolerances are measured figures, and the compressed-tensors read-back
(:mod:`auto_quantize_model.backend.ct_read_back`) shares them and :class:`FlipCount`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import attrs

from auto_quantize_model.backend.modelopt.export import CheckpointExport, Evaluate, load_exported
from auto_quantize_model.errors import ConfigError

if TYPE_CHECKING:
    import torch

READ_BACK_TOLERANCE = 5e-4
"""Largest accepted |NLL(read back) - NLL(written)| in nats per token, float32 models.

Used as is by the compressed-tensors read-back (:mod:`~auto_quantize_model.backend.ct_read_back`),
whose "written" model carries the exported scales. Not zero, because ModelOpt rounds twice: its
exporter stores ``w / s`` rounded with ``s = amax / maxbound``, while the fake quantizer rounds
``w * (maxbound / amax)``; a value exactly on a rounding tie can land on either side, and
activation ranges come back as ``input_scale * maxbound``, one float rounding off. Measured on the
tiny model (float32, 64 held-out captions) against the fake-quantized model: INT4 weight-only 4e-9,
INT8 W8A8 6e-6, W8A16 + FP8 per-token 5e-6, SmoothQuant 2e-5, INT8 + FP8 mixes 5e-5 to 9e-5, FP8
everywhere 1.2e-4. One FP8 layer's weight scale off by 1.5x, everything else intact, moved it
1.9e-3 (the tests check this is caught); a misread format or packing moves it far more.

ModelOpt's own format is checked tighter, like for like, at this figure whatever the dtype: its
"written" model computes with the weights decoded from the files (:attr:`CheckpointExport.exported_nll`),
so only the reading is left to differ (0.0 for the tiny model's FP8 mix in bfloat16 on CPU) and the
exporter's rounding is reported apart (:attr:`ReadBack.exporter_shift`)."""

READ_BACK_TOLERANCE_16BIT = 3e-3
"""The compressed-tensors read-back's tolerance for bfloat16/float16 weights, where the exporter rounds
more than the fake quantizer, and ModelOpt's exporter rounding beyond which a ModelOpt-format export
says so in a warning.

With 16-bit weights ModelOpt's exporter derives each weight scale from the 16-bit ``amax`` and
stores it rounded to that precision (``0.00018310546875`` = 3 x 2^-14 for an FP8 layer of the tiny
model), while the fake quantizer divides by the same ``amax`` in float32; the two grids differ by
up to 2^-9 relative, so thousands of weights round the other way (12,402 of the tiny model's FP8
weights). Replacing them with the in-memory values gives back the in-memory NLL exactly, so the
checkpoint is read correctly; it is the exporter's own rounding. Measured (tiny model, bfloat16,
CPU): INT8 + FP8 +5.3e-5 and FP8 everywhere -7.3e-4 in the eighth wave (1.5e-4 and 1.8e-3 in an
earlier one), INT4 weight-only 3.7e-4; NVFP4 + FP8 1.1e-3 on an H200;
the 4B with random weights on an H100 read back -3.4e-3 (INT8 + FP8) and +9.4e-3 (NVFP4 + FP8)
from the fake-quantized model, exporter rounding and reading not yet told apart there."""


WEIGHT_TOLERANCE = 1e-5
"""Largest accepted |read back - reference| of a weight, relative to its layer's largest |weight|, float32.

The stored codes are ModelOpt's own, so the two differ only by how each multiplies code and scale
in float32 (measured: at most 1.0e-7 for INT8, FP8 and INT4 layers); a wrong scale convention
(amax/128 for amax/127, say) moves the worst weight by about half a step, 4e-3 for INT8. Also the
bound beyond which a weight counts as flipped (:class:`FlipCount`)."""

WEIGHT_TOLERANCE_16BIT = 2.0**-7
"""The same for bfloat16/float16 weights, where compressed-tensors keeps each scale in the weight's
dtype (2^-9 relative rounding) and the product is rounded again. Measured on an H100 (tiny model,
bfloat16): worst layer 6.0e-3 (FP8 and INT8 layers), NVFP4 layers 3.3e-3."""


def _is_16bit(dtype: str) -> bool:
    return dtype in ("bfloat16", "float16")


def read_back_tolerance(dtype: str) -> float:
    """The compressed-tensors tolerance for a checkpoint whose weights are in ``dtype``."""
    return READ_BACK_TOLERANCE_16BIT if _is_16bit(dtype) else READ_BACK_TOLERANCE


def weight_tolerance(dtype: str) -> float:
    """The weight tolerance for weights of ``dtype`` (``float32``, ``bfloat16``...)."""
    return WEIGHT_TOLERANCE_16BIT if _is_16bit(dtype) else WEIGHT_TOLERANCE


@attrs.frozen(kw_only=True)
class NllCheck:
    """What both formats' read-backs measure, in nats per token on one held-out set.

    ``in_memory`` (the calibrated fake-quantized model) -> ``fused`` (after ModelOpt's fusion of
    sibling ranges) -> ``exported`` (computing with the weights the checkpoint holds) ->
    ``read_back`` (the checkpoint loaded by the format's reader). Only the last step is the check;
    the others say what the exporter itself changed.
    """

    directory: str
    in_memory_nll: float
    exported_nll: float
    """The quantized model computing with the written weights."""
    read_back_nll: float
    tolerance: float
    fused_nll: float = math.nan
    flipped: int = 0
    """Compared weights off the fake-quantized value by more than :func:`weight_tolerance`: the
    exporter rounding otherwise (or a reading error, if nearly all are)."""
    flip_weights: int = 0
    """Weights compared for flips."""
    flip_relative: float = 0.0
    """The largest such difference over its layer's largest |weight|."""

    @property
    def difference(self) -> float:
        """Read back minus what was written; float rounding only when the checkpoint is right."""
        return self.read_back_nll - self.exported_nll

    @property
    def fusion_shift(self) -> float:
        """What ModelOpt's fusion of sibling ranges (q/k/v, gate/up) changed, before packing."""
        return self.fused_nll - self.in_memory_nll

    @property
    def exporter_shift(self) -> float:
        """What ModelOpt's exporter rounding the weights otherwise than its fake quantizer changed."""
        return self.exported_nll - self.fused_nll

    @property
    def ok(self) -> bool:
        return abs(self.difference) <= self.tolerance

    def figures(self) -> dict[str, Any]:
        """The :class:`~auto_quantize_model.artifacts.ExportedMix` fields both formats fill alike."""
        return {
            "in_memory_nll": self.in_memory_nll,
            "fused_nll": self.fused_nll,
            "exported_nll": self.exported_nll,
            "read_back_nll": self.read_back_nll,
            "tolerance": self.tolerance,
            "ok": self.ok,
            "flipped_weights": self.flipped,
            "flip_weights": self.flip_weights,
            "flip_relative": self.flip_relative,
        }


@attrs.frozen(kw_only=True)
class ReadBack(NllCheck):
    """The ModelOpt-format checkpoint read back by :func:`load_exported`; flips counted over a sample."""

    dtype: str = ""
    """The loaded weights' dtype (``bfloat16``...)."""
    sampled_layers: int = 0
    """Layers whose decoded weights were compared with the fake-quantized ones (:data:`SAMPLE_LAYERS`)."""


def read_back_nll(
    exported: CheckpointExport,
    evaluate: Evaluate,
    *,
    tolerance: float | None = None,
    device: str = "cpu",
    dtype: str | None = None,
) -> ReadBack:
    """Load the checkpoint as its README says (:func:`load_exported`) and measure ``evaluate`` on it.

    ``evaluate`` must be the one given to :func:`export_checkpoint`. The result says whether
    the checkpoint reproduces the model computing with the written weights within ``tolerance``
    (default: :data:`READ_BACK_TOLERANCE`); it does not raise, so a caller can report the numbers
    either way.
    """
    if math.isnan(exported.exported_nll):
        raise ConfigError("no in-memory NLL to compare with: pass evaluate= to export_checkpoint")
    import torch

    model = load_exported(exported.directory, device=device, dtype=dtype)
    weight_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if tolerance is None:
        tolerance = READ_BACK_TOLERANCE
    flips = FlipCount(weight_tolerance(weight_dtype))
    with torch.no_grad():
        for name, reference in exported.sample.items():
            layer: Any = model.get_submodule(name)
            flips.add(layer.weight.detach().float().cpu(), reference)
    return ReadBack(
        directory=exported.directory,
        in_memory_nll=exported.in_memory_nll,
        exported_nll=exported.exported_nll,
        read_back_nll=evaluate(model),
        tolerance=tolerance,
        fused_nll=exported.fused_nll,
        dtype=weight_dtype,
        sampled_layers=len(exported.sample),
        flipped=flips.flipped,
        flip_weights=flips.weights,
        flip_relative=flips.largest,
    )


@attrs.define
class FlipCount:
    """Read-back weights off the fake-quantized ones by more than ``within`` of their layer's largest."""

    within: float
    flipped: int = 0
    weights: int = 0
    largest: float = 0.0
    """The largest difference over its layer's largest |weight|."""

    def add(self, got: torch.Tensor, reference: torch.Tensor) -> None:
        """Count one layer (both float32, same shape)."""
        scale = float(reference.abs().max())
        apart = (got - reference).abs()
        self.flipped += int((apart > self.within * scale).sum())
        self.weights += apart.numel()
        self.largest = max(self.largest, float(apart.max()) / scale if scale > 0 else 0.0)
