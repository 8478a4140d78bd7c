"""The compressed-tensors branch of :func:`~auto_quantize_model.backend.exporting.export_mix`.

``export_mix`` keeps the flow (budget, scratch folder, ``export.json``, placing); this module writes
the checkpoint into the scratch folder with :mod:`auto_quantize_model.backend.compressed_tensors`,
reads it back through transformers and returns the figures ``ExportedMix`` records.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from auto_quantize_model.core.ct_config import COMPRESSED_TENSORS, FLIP_SHARE, ct_readme_text, plan_ct
from auto_quantize_model.io.atomic import atomic_write_text

if TYPE_CHECKING:
    from auto_quantize_model.artifacts import CheckpointInputs, ExportedMix
    from auto_quantize_model.backend import ct_read_back as rb
    from auto_quantize_model.core.export_config import ExportConfig

log = logging.getLogger("auto_quantize_model")


def write_ct_checkpoint(
    config: ExportConfig, out: Path, inputs: CheckpointInputs
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Quantize the fresh model, write it as compressed-tensors into ``out``, read it back, write README."""
    from auto_quantize_model.backend import compressed_tensors as ct
    from auto_quantize_model.backend import ct_read_back as rb
    from auto_quantize_model.backend.export_check import export_check
    from auto_quantize_model.backend.modelopt.quant_config import linear_modules

    fresh = inputs.fresh
    plan = plan_ct(config, linear_modules(fresh.model))
    check = export_check(inputs)
    held_out, evaluate, head_path = check.held_out, check.evaluate, check.head_path
    written = ct.export_ct_checkpoint(
        fresh.model,
        fresh.tokenizer,
        config,
        plan,
        inputs.calib.batches,
        check.calibration_step,
        out,
        evaluate=evaluate,
    )
    started = time.perf_counter()
    back = rb.read_back_ct(written, evaluate, head_path, device=fresh.device)
    log.info(
        "export: quantized in %.1f s, written in %.1f s, read back through transformers in %.1f s",
        written.quantize_seconds,
        written.export_seconds,
        time.perf_counter() - started,
    )
    notes = (*written.notes, *held_out.notes)
    checked = (
        f"Read back with {back.loader}: held-out NLL {back.read_back_nll:.6f} nats/token against "
        f"{back.exported_nll:.6f} for the quantized model computing with the written weights, on "
        f"{check.data.describe()}; difference {back.difference:+.1e}, tolerance {back.tolerance:.0e}.",
        f"Decompressed weights against the written ones: worst layer {back.worst_layer}, max "
        f"|difference| {back.weight_max_diff:.2e} ({back.weight_relative:.1e} of its largest weight, "
        f"tolerance {back.weight_tolerance:.0e}).",
        *(flip_lines(back) if back.flip_weights else ()),
        rb.READ_BACK_NOTE,
        *((rb.NVFP4_DTYPE_NOTE,) if plan.holds_nvfp4 else ()),
    )
    model_class = back.loader.split(".", 1)[0]
    atomic_write_text(
        out / "README.md", ct_readme_text(plan, model_class=model_class, checked=checked, notes=notes)
    )
    figures = {
        "format": COMPRESSED_TENSORS,
        "quant_algo": plan.compression,
        **back.figures(),
        "loader": back.loader,
        "weight_worst_layer": back.worst_layer,
        "weight_max_diff": back.weight_max_diff,
        "weight_relative": back.weight_relative,
        "weight_tolerance": back.weight_tolerance,
        "weight_per_format": back.per_format,
        **check.data.figures(),
    }
    return figures, notes


def flip_lines(back: rb.CtReadBack) -> tuple[str, ...]:
    """What the NVFP4 layers' written codes (ModelOpt's exporter arithmetic) differ by from the model
    that was scored (its fake quantizer), said so that nobody mistakes it for a reading error."""
    share = back.flipped / back.flip_weights if back.flip_weights else 0.0
    return (
        f"NVFP4 layers hold ModelOpt's exporter codes, as its own HF export writes them: {back.flipped:,} "
        f"of {back.flip_weights:,} weights ({share:.2e}) round to the neighbouring FP4 value of the "
        f"fake-quantized model's (largest {back.flip_relative:.1e} of the layer's largest weight); the "
        f"fake-quantized model's NLL {back.fused_nll:.6f}, the written weights' {back.exported_nll:.6f} "
        f"({back.exported_nll - back.fused_nll:+.1e}).",
    )


def weights_record(mix: ExportedMix) -> dict[str, Any]:
    """``export.json``'s ``read_back.weights``: how far the decompressed weights are from the written
    ones, and (``flips``) how many differ from the fake-quantized model's by a rounding flip."""
    return {
        "against": "written weights (ModelOpt's fake-quantized ones; NVFP4: its exporter's codes)",
        "worst_layer": mix.weight_worst_layer,
        "max_abs_diff": mix.weight_max_diff,
        "relative": mix.weight_relative,
        "tolerance": mix.weight_tolerance,
        "ok": mix.weight_relative <= mix.weight_tolerance,
        "per_format": {
            fmt: {"worst_layer": layer, "max_abs_diff": diff, "relative": relative}
            for fmt, layer, diff, relative in mix.weight_per_format
        },
        "flips": {
            "weights": mix.flipped_weights,
            "of": mix.flip_weights,
            "largest_relative": mix.flip_relative,
            "fused_fake_quant_nll": None if math.isnan(mix.fused_nll) else mix.fused_nll,
            "largest_share": FLIP_SHARE,
            "ok": _flips_ok(mix),
        },
    }


def _flips_ok(mix: ExportedMix) -> bool:
    return mix.flipped_weights <= FLIP_SHARE * mix.flip_weights


def failure_line(mix: ExportedMix, target: Path) -> str:
    """The one-line error of a compressed-tensors read-back outside tolerance (files kept as evidence)."""
    if not _flips_ok(mix):
        return (
            f"{target}: {mix.flipped_weights:,} of {mix.flip_weights:,} NVFP4 weights are written otherwise "
            f"than the fake-quantized model computed them (at most {FLIP_SHARE:.0%} may be): the checkpoint "
            f"is not the model that was scored; the figures are in {target / 'export.json'}"
        )
    if not mix.weight_relative <= mix.weight_tolerance:
        return (
            f"{target}: transformers reads {mix.weight_worst_layer}'s weights back {mix.weight_relative:.1e} "
            f"(of its largest weight) off the written ones (tolerance {mix.weight_tolerance:.0e}); "
            f"the figures are in {target / 'export.json'}"
        )
    return (
        f"{target}: the compressed-tensors checkpoint reads back through transformers {mix.difference:+.2e} "
        f"nats/token off the written model (tolerance {mix.tolerance:.0e}); the figures are in "
        f"{target / 'export.json'}"
    )
