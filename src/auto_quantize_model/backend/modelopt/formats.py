"""What one of our format names becomes when handed to ModelOpt."""

from __future__ import annotations

from typing import Any

from auto_quantize_model.backend.modelopt import import_modelopt
from auto_quantize_model.core.formats import parse_custom, resolve_format
from auto_quantize_model.errors import ConfigError


def modelopt_config(name: str) -> dict[str, Any] | str:
    """What to pass to ``mtq.auto_quantize(quantization_formats=[...])`` for this format.

    Presets are passed by name, so ModelOpt labels its results with that name; custom formats
    are a fresh config dict (ModelOpt labels them ``CUSTOM_<index>`` unless
    :func:`~auto_quantize_model.backend.modelopt.patches.named_custom_formats` names them).
    Imports ModelOpt only to confirm that a preset exists in the installed version.
    """
    info = resolve_format(name)
    if info.kind == "preset":
        mtq_config = import_modelopt("modelopt.torch.quantization.config")
        if info.modelopt_name is None or not hasattr(mtq_config, info.modelopt_name):
            raise ConfigError(f"format {name} is not defined by the installed ModelOpt version")
        return info.modelopt_name
    spec = parse_custom(name)
    if spec is None:
        raise ConfigError(f"format {name} is neither a ModelOpt preset nor a custom format")
    if spec.refused is not None:
        raise ConfigError(f"format {name} cannot be used for AutoQuant: {spec.refused}")
    return spec.quant_cfg()
