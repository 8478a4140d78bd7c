"""The preset table as package data: every public answer about a format is what it was before.

``tests/data/preset_facts.json`` was written by :func:`facts` from main at f775419, before the
three preset tables became ``data/presets.toml``; the test compares today's answers with it,
except for the export fixes listed in :data:`FIXED` (each checked for its new value).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs

from auto_quantize_model.core.export_config import ExportConfig, GroupChoice, build_export_config, export_format
from auto_quantize_model.core.formats import (
    all_formats,
    check_formats,
    min_effective_bits,
    parse_custom,
    resolve_format,
)
from auto_quantize_model.core.ranking import format_scheme_part, scheme_name
from auto_quantize_model.errors import AqmError

SNAPSHOT = Path(__file__).parent / "data" / "preset_facts.json"
PREVIOUS_YAML = Path(__file__).parent / "data" / "recipe_previous.yaml"
"""What the hand-written YAML emitter wrote for :func:`sample_config` (main at f775419)."""
AWQ_LITE = ("INT4_AWQ_CFG", "W4A8_AWQ_BETA_CFG", "NVFP4_AWQ_LITE_CFG")


def _outcome(call: Any, *args: Any) -> Any:
    """What a public function answers: its value, or its error's class and message."""
    try:
        return call(*args)
    except AqmError as err:
        return {"error": type(err).__name__, "message": str(err)}


def _checked(name: str, device: str) -> Any:
    return _outcome(lambda: check_formats([name], device) or "ok")


def facts() -> dict[str, Any]:
    """Every preset, listed custom name and AWQ-lite option, through every public function."""
    names = [info.name for info in all_formats()]
    names += [f"{name}:alpha_step=0.25" for name in AWQ_LITE]
    table: dict[str, Any] = {}
    for name in names:
        info = resolve_format(name)
        table[name] = {
            "format": {**attrs.asdict(info), "usable": info.usable, "base_name": info.base_name},
            "check_cpu": _checked(name, "cpu"),
            "check_cuda": _checked(name, "cuda"),
            "min_effective_bits": min_effective_bits([name]),
            "export": attrs.asdict(export_format(name)),
            "scheme_part": format_scheme_part(name),
            "scheme_name": _outcome(scheme_name, [name]),
        }
    return {"order": names, "formats": table}


def sample_config() -> ExportConfig:
    """A mix with every value shape a recipe holds: integer and string block keys, tuples, None,
    booleans, floats, glob characters in module names and quotes in the description's neighbours."""
    names = ("wint4-b128_a16", "wfp8-pc_afp8-token", "wfp4_afp8", "wint8_aint8")
    configs: dict[str, Any] = {}
    for name in names:
        spec = parse_custom(name)
        assert spec is not None
        configs[name] = spec.quant_cfg()
    choices = [
        GroupChoice("head", ("lm_head",), names[0]),
        GroupChoice("down", ("m.layers.0.mlp.down_proj",), names[1]),
        GroupChoice("experts", ("m.layers.1.mlp.experts[0]", "m.layers.1.mlp.experts*?"), names[2]),
        GroupChoice("o", ("m.layers.0.self_attn.o_proj",), "NONE"),
        GroupChoice("q", ("m.layers.0.self_attn.q_proj",), names[3]),
    ]
    return build_export_config(choices, configs)


SAMPLE_DESCRIPTION = "it's a 'test': # not a comment, * not an alias, - not a list, {not: a map}"


if __name__ == "__main__":  # regenerate (only ever from the commit named in the docstring)
    SNAPSHOT.parent.mkdir(exist_ok=True)
    SNAPSHOT.write_text(json.dumps(facts(), indent=1, sort_keys=True) + "\n")
    from auto_quantize_model.core.export_config import recipe_yaml

    PREVIOUS_YAML.write_text(recipe_yaml(sample_config(), SAMPLE_DESCRIPTION))
