"""What one of our format names becomes when handed to ModelOpt."""

from __future__ import annotations

import copy
from typing import Any

from auto_quantize_model.backend.modelopt import import_modelopt
from auto_quantize_model.core.format_grammar import parse_custom
from auto_quantize_model.core.formats import FormatInfo, resolve_format
from auto_quantize_model.errors import ConfigError


def modelopt_config(name: str) -> dict[str, Any] | str:
    """What to pass to ``mtq.auto_quantize(quantization_formats=[...])`` for this format.

    Presets are passed by name, so ModelOpt labels its results with that name; custom formats
    and presets with an option (``W4A8_AWQ_BETA_CFG:alpha_step=0.25``) are a fresh config dict
    (ModelOpt labels them ``CUSTOM_<index>`` unless
    :func:`~auto_quantize_model.backend.modelopt.patches.named_custom_formats` names them).
    Imports ModelOpt only to confirm that a preset exists in the installed version.
    """
    info = resolve_format(name)
    if info.kind == "preset":
        if info.alpha_step is not None:
            return format_config(info)
        _preset_config(info)  # exists in this ModelOpt
        return info.base_name
    return format_config(info)


def format_config(info: FormatInfo) -> dict[str, Any]:
    """The format's ModelOpt quantize config as a fresh dict, its options applied.

    An AWQ-lite ``alpha_step`` replaces the config's ``algorithm`` by ModelOpt's own spelling of
    the same method with that step, so everything else about the preset stays ModelOpt's.
    """
    if info.kind == "preset":
        config = copy.deepcopy(_preset_config(info))
    else:
        spec = parse_custom(info.base_name)
        if spec is None:
            raise ConfigError(f"format {info.name} is neither a ModelOpt preset nor a custom format")
        if spec.refused is not None:
            raise ConfigError(f"format {info.name} cannot be used for AutoQuant: {spec.refused}")
        config = spec.quant_cfg()
    if info.alpha_step is not None:
        config["algorithm"] = {"method": "awq_lite", "alpha_step": info.alpha_step}
    return config


def _preset_config(info: FormatInfo) -> dict[str, Any]:
    mtq_config = import_modelopt("modelopt.torch.quantization.config")
    if info.modelopt_name is None or not hasattr(mtq_config, info.modelopt_name):
        raise ConfigError(f"format {info.name} is not defined by the installed ModelOpt version")
    config: dict[str, Any] = getattr(mtq_config, info.modelopt_name)
    return config
