"""The export's ModelOpt quantize config: a chosen format mix prepared, written and read back.

Step 1 of an export (:mod:`auto_quantize_model.backend.modelopt.export` does the checkpoint):
:func:`prepare_export` turns a per-group choice into an
:class:`~auto_quantize_model.core.export_config.ExportConfig` (the pure builder, fed with the
installed ModelOpt's preset configs) and refuses what cannot be exported on the model's device;
:func:`write_quant_config` writes it as ``quant_config.json`` and ``quant_recipe.yaml`` and reads
both back (the YAML through ModelOpt's own ``load_recipe``), so a config-only export is checked
by ModelOpt itself without a model. NVFP4 and MX formats need CUDA for ModelOpt's quantization
kernels, so they are refused for a CPU model.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from auto_quantize_model.backend.modelopt import import_modelopt
from auto_quantize_model.core import export_config as xc
from auto_quantize_model.core.export_choice import GroupChoice
from auto_quantize_model.core.export_labels import ExportFormat, export_format
from auto_quantize_model.core.formats import resolve_format
from auto_quantize_model.core.scores import NO_QUANT
from auto_quantize_model.errors import AqmError, ConfigError
from auto_quantize_model.io.atomic import atomic_write_text

if TYPE_CHECKING:
    from torch import nn

QUANT_CONFIG_FILE = "quant_config.json"
RECIPE_FILE = "quant_recipe.yaml"
README_FILE = "README.md"
HF_QUANT_CONFIG_FILE = "hf_quant_config.json"
"""The exporter's record of a checkpoint's formats; README.md describes a checkpoint once it exists."""


def format_configs(names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Each format's ModelOpt quantize config as a fresh dict: presets from the installed ModelOpt."""
    from auto_quantize_model.backend.modelopt.formats import format_config

    found: dict[str, dict[str, Any]] = {}
    for name in names:
        if name == NO_QUANT or name in found:
            continue
        found[name] = format_config(resolve_format(name))
    return found


def is_cuda(device: str) -> bool:
    """Whether ``device`` names a CUDA device, where ModelOpt has the kernels NVFP4/MX formats need."""
    return device.strip().lower().startswith("cuda")


def linear_modules(model: nn.Module) -> tuple[str, ...]:
    """Names of the model's linear layers (what ModelOpt puts weight quantizers on)."""
    from torch import nn

    return tuple(name for name, module in model.named_modules() if isinstance(module, nn.Linear))


def prepare_export(
    choices: Sequence[GroupChoice],
    *,
    device: str = "cpu",
    vision_prefixes: Sequence[str] = (),
    known_modules: Sequence[str] = (),
    exportable: Callable[[str], ExportFormat] = export_format,
) -> xc.ExportConfig:
    """The export config of ``choices``, refused with a one-line ConfigError when it cannot be exported.

    ``device`` is where the model will be quantized: NVFP4/MX formats need CUDA.
    ``vision_prefixes`` (``LanguageModel.vision_modules``) and ``known_modules``
    (:func:`linear_modules` of the model) sharpen the checks; both are optional. ``exportable``
    judges each format for the checkpoint format written (ModelOpt's by default).
    """
    configs = format_configs(choice.format for choice in choices)
    config = xc.build_export_config(
        choices, configs, vision_prefixes=vision_prefixes, known_modules=known_modules, exportable=exportable
    )
    if config.needs_cuda and not is_cuda(device):
        raise ConfigError(
            f"format {config.needs_cuda[0]} cannot be exported on {device}: ModelOpt quantizes (and so "
            "exports) it only with CUDA kernels; export on a CUDA device"
        )
    return config


@attrs.frozen
class ConfigFiles:
    """The config as written, and proof that both files read back as the choice."""

    json_path: str
    yaml_path: str
    readme_path: str
    layers: int
    """Layers whose setting was read back from both files (quantized and NONE)."""


def write_quant_config(
    config: xc.ExportConfig, output_dir: str | Path, description: str = xc.RECIPE_DESCRIPTION
) -> ConfigFiles:
    """Write ``quant_config.json`` and ``quant_recipe.yaml``, then read both back and compare.

    The JSON is parsed with :func:`~auto_quantize_model.core.export_config.read_quant_config`;
    the YAML with ModelOpt's ``modelopt.recipe.load_recipe`` (so ModelOpt itself accepts it).
    Each must give every chosen layer exactly its format's quantizer settings; AqmError if not.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = atomic_write_text(out / QUANT_CONFIG_FILE, xc.quant_config_json(config))
    yaml_path = atomic_write_text(out / RECIPE_FILE, xc.recipe_yaml(config, description))
    configs = format_configs(layer.format for layer in config.layers)
    from_json = xc.read_quant_config(json_path.read_text(encoding="utf-8"), str(json_path))
    raise_mismatches(
        str(json_path), xc.config_mismatches(from_json, config, configs, canonical=modelopt_canonical)
    )
    recipe_module = import_modelopt("modelopt.recipe")
    with contextlib.redirect_stdout(io.StringIO()):  # load_recipe prints the path it loads
        recipe = recipe_module.load_recipe(yaml_path)
    from_yaml = recipe.quantize.model_dump(exclude_unset=True)
    raise_mismatches(
        str(yaml_path), xc.config_mismatches(from_yaml, config, configs, canonical=modelopt_canonical)
    )
    readme = write_readme(out, config)
    return ConfigFiles(str(json_path), str(yaml_path), str(readme), len(config.layers))


def write_readme(output_dir: Path, config: xc.ExportConfig, notes: Sequence[str] = ()) -> Path:
    """``README.md`` for what the folder holds: the config files, and the checkpoint once written."""
    has_checkpoint = (output_dir / HF_QUANT_CONFIG_FILE).is_file()
    return atomic_write_text(
        output_dir / README_FILE, xc.readme_text(config, checkpoint=has_checkpoint, notes=notes)
    )


def modelopt_canonical(cfg: Any) -> str:
    """A quantizer's attributes with ModelOpt's defaults filled in, as sorted JSON.

    Two spellings of one setting (``{"num_bits": 8}`` and ``{"num_bits": 8, "axis": None}``)
    give the same text; sequential quantizers (lists) are spelled element by element.
    """
    attribute_config = import_modelopt("modelopt.torch.quantization.config").QuantizerAttributeConfig

    def full(one: Any) -> Any:
        if isinstance(one, list | tuple):
            return [full(item) for item in one]
        if one is None:
            return None
        dumped = attribute_config(**dict(one)).model_dump()
        dumped.pop("enable", None)  # enabling is compared on its own
        return dumped

    return json.dumps(json.loads(json.dumps(xc.json_ready(full(cfg)), default=str)), sort_keys=True)


def raise_mismatches(source: str, problems: Sequence[str]) -> None:
    """AqmError naming ``source`` (a file written) and its first problem, when it has any."""
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise AqmError(f"{source} does not read back as the chosen formats: {problems[0]}{more}")
