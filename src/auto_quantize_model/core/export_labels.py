"""What ModelOpt 0.47's Hugging Face exporter records for each format, or why a format is refused.

The exporter's per-layer label (``quant_algo`` in ``hf_quant_config.json``) is derived from the
quantizers alone (``get_quantization_format`` in ``modelopt/torch/export/quant_utils.py:488``) and
says less than the format: INT8 weights with dynamic per-token activations are recorded as
``W8A8_SQ_PER_CHANNEL`` (static per-tensor), FP8 weight-only as ``FP8`` (W8A8), FP8
per-input-channel as ``FP8`` (per tensor), INT4 with activations as ``W4A16_AWQ``, NVFP4 weights
with INT8 or dynamic FP8 activations as ``NVFP4`` (FP4 activations). A runtime reading those labels
would compute something else than what was scored, so such formats are refused by
:func:`export_format` with the label the exporter would write; so are INT4 weights without blocks,
which the exporter cannot pack (it asserts). A preset's label, group size and refusal are facts of
its row in ``data/presets.toml`` (:class:`~auto_quantize_model.core.presets.Preset`); a grammar
name's are derived here. ``tests/core/test_export_labels.py`` checks every listed format and every
grammar name against the exporter itself. Pure: no torch, no ModelOpt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs

from auto_quantize_model.core.format_grammar import CustomFormat, parse_custom
from auto_quantize_model.core.formats import resolve_format
from auto_quantize_model.core.presets import preset
from auto_quantize_model.core.scores import NO_QUANT
from auto_quantize_model.errors import ConfigError

if TYPE_CHECKING:
    from auto_quantize_model.core.export_choice import GroupChoice

_LABEL_MEANING = {
    "W8A8_SQ_PER_CHANNEL": "INT8 per-channel weights with static per-tensor INT8 activations",
    "W8A16": "INT8 per-channel weights with 16-bit activations",
    "FP8": "FP8 per-tensor weights with static per-tensor FP8 activations",
    "FP8_PER_CHANNEL_PER_TOKEN": "FP8 per-channel weights with dynamic per-token FP8 activations",
    "W4A16_AWQ": "INT4 block weights with 16-bit activations",
    "fp8_pb_wo": "a label no deployment runtime reads (FP8 block weight-only)",
    "NVFP4": "NVFP4 weights with NVFP4 (FP4, dynamic blocks of 16) activations",
}


@attrs.frozen
class ExportFormat:
    """What ModelOpt 0.47's HF exporter records for a format, or why it cannot record it faithfully."""

    name: str
    label: str | None
    """``quant_algo`` of each layer in ``hf_quant_config.json``; None when refused."""
    group_size: int | None = None
    """Block size the exporter writes beside the label (INT4/NVFP4/MX formats)."""
    needs_cuda: bool = False
    refused: str | None = None
    """Why this format cannot be exported; None when it can."""


_INT4_NEEDS_BLOCKS = (
    "ModelOpt 0.47's HF exporter packs INT4 weights only in blocks along the input dimension "
    "(get_quantization_format asserts block_sizes, so the export would stop with an AssertionError); "
    "use wint4-b128 (or -b64, -b32)"
)


def _custom_export(spec: CustomFormat) -> tuple[str | None, int | None, bool]:
    """The label the exporter writes for a custom format, its group size, and whether it is faithful.

    Mirrors ``get_quantization_format`` (``quant_utils.py:488``) and ``process_layer_quant_config``
    (``:683``): the weight's type, axis and blocks decide the label; activations only switch INT8
    between W8A8 and W8A16, and NVFP4 weights between NVFP4, W4A16_NVFP4 and W4A8_NVFP4_FP8. The
    label is None where the exporter raises instead of writing one (INT4 without blocks).
    """
    block = int(spec.weight_granularity[1:]) if spec.weight_granularity.startswith("b") else None
    if spec.weight == "int4":
        if block is None:
            return None, None, False
        return "W4A16_AWQ", block, spec.activation == "16"
    if spec.weight == "int8":
        if spec.activation == "16":
            return "W8A16", None, spec.weight_granularity == "pc"
        faithful = (
            spec.weight_granularity == "pc"
            and spec.activation == "int8"
            and spec.activation_granularity == "tensor"
        )
        return "W8A8_SQ_PER_CHANNEL", None, faithful
    if spec.weight == "fp4":
        # Only NVFP4 weights (dynamic blocks of 16, FP8 scales) get here: other FP4 weights are
        # refused for the search already. Any other input quantizer falls through to NVFP4.
        if spec.activation == "16":
            return "W4A16_NVFP4", block, True
        if spec.activation == "fp8" and spec.activation_granularity == "tensor":
            return "W4A8_NVFP4_FP8", block, True
        return "NVFP4", block, spec.activation == "fp4"
    if block is not None:
        return "fp8_pb_wo", None, False
    if spec.weight_granularity == "pc":
        faithful = spec.activation == "fp8" and spec.activation_granularity == "token"
        return "FP8_PER_CHANNEL_PER_TOKEN", None, faithful
    # Per tensor, and per input channel too: the exporter tests ``axis == 0`` alone.
    faithful = (
        spec.weight_granularity == "pt"
        and spec.activation == "fp8"
        and spec.activation_granularity == "tensor"
    )
    return "FP8", None, faithful


def export_format(name: str) -> ExportFormat:
    """The exporter's label for a format, or the reason it cannot be exported (unknown names raise)."""
    if name == NO_QUANT:
        return ExportFormat(name=name, label=None)
    info = resolve_format(name)
    if info.refused is not None:
        return ExportFormat(name=name, label=None, needs_cuda=info.needs_cuda, refused=info.refused)
    row = preset(info.base_name)  # an AWQ alpha step changes the scales it finds, not the export
    if row is not None:
        if row.export_refused is not None:
            return ExportFormat(name=name, label=None, needs_cuda=info.needs_cuda, refused=row.export_refused)
        return ExportFormat(
            name=name, label=row.export_label, group_size=row.export_group_size, needs_cuda=info.needs_cuda
        )
    spec = parse_custom(info.base_name)
    assert spec is not None, f"{name} resolved as neither a preset nor a grammar name"
    recorded, block, faithful = _custom_export(spec)
    if recorded is None:
        return ExportFormat(name=name, label=None, needs_cuda=info.needs_cuda, refused=_INT4_NEEDS_BLOCKS)
    if not faithful:
        meaning = _LABEL_MEANING.get(recorded, recorded)
        return ExportFormat(
            name=name,
            label=None,
            needs_cuda=info.needs_cuda,
            refused=(
                f"it quantizes {spec.describe_weights()} with {spec.describe_activations()} activations, "
                f"but ModelOpt 0.47's HF exporter records it as {recorded} ({meaning}), so a runtime "
                "reading the checkpoint would not compute what was scored"
            ),
        )
    return ExportFormat(name=name, label=recorded, group_size=block, needs_cuda=info.needs_cuda)


READABLE_LABELS = (
    "W8A8_SQ_PER_CHANNEL",
    "W8A16",
    "FP8",
    "FP8_PER_CHANNEL_PER_TOKEN",
    "W4A16_AWQ",
    "NVFP4",
    "W4A16_NVFP4",
    "W4A8_NVFP4_FP8",
)
"""Labels whose layers ``aqm export --checkpoint`` can decode to read the checkpoint back
(:func:`~auto_quantize_model.backend.modelopt.export.load_exported`). Others (``W4A8_AWQ``,
``NVFP4_AWQ``, ``MXFP8``, ``W4A8_MXFP4_FP8``) are written by ModelOpt's exporter but would stop the
read-back after the quantization, the export and the writing had been paid for, so
:func:`check_checkpoint_choices` refuses them first."""


def check_checkpoint_choices(choices: Sequence[GroupChoice]) -> None:
    """Refuse, in one line naming the group and format, a ModelOpt-format checkpoint we could not read back.

    Run before any model is loaded. Formats ModelOpt cannot export at all are refused later, by
    the export's own check, with their reason.
    """
    seen: set[str] = set()
    for choice in choices:
        if choice.format == NO_QUANT or choice.format in seen:
            continue
        seen.add(choice.format)
        label = export_format(choice.format).label
        if label is not None and label not in READABLE_LABELS:
            raise ConfigError(
                f"group {choice.name}: format {choice.format} is written as {label}, which aqm's read-back "
                f"cannot decode (it reads {', '.join(READABLE_LABELS)}), so its checkpoint would go "
                "unchecked: export it without --checkpoint (quant_config.json and quant_recipe.yaml, for "
                "ModelOpt's own PTQ), or search with other formats"
            )
