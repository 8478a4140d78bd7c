"""A checkout's ``config.json`` read without transformers' model code, so without torch.

``aqm validate`` and the pre-flight checks of ``aqm run`` use this to refuse, in a second, a
``config.json`` that LoadModel would refuse only after importing torch and transformers (10 s and
more): one that is not JSON, not an object, has no ``model_type``, or names an architecture with
no language model to quantize.

Which ``model_type`` values have a language model is transformers' knowledge, kept in the name
tables of ``transformers/models/auto/modeling_auto.py`` (the ones ``AutoModelForCausalLM`` and
``AutoModelForImageTextToText`` dispatch on). Importing that module imports torch, so the tables
are read from its source with :mod:`ast` instead: literal ``OrderedDict([("qwen3", "..."), ...])``
assignments. If the installed transformers spells them otherwise, or is absent, the check is
skipped (LoadModel still decides) rather than refusing every model.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from auto_quantize_model.errors import InputError

ModelKind = Literal["image-text-to-text", "causal-lm"]

IMAGE_TEXT_TO_TEXT_TABLE = "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"
CAUSAL_LM_TABLE = "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"
_TABLES = (IMAGE_TEXT_TO_TEXT_TABLE, CAUSAL_LM_TABLE)


def read_config_json(directory: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkout folder; every way it is unusable is named."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise InputError(f"{directory} has no config.json: not a Hugging Face checkout")
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise InputError(f"{config_file} is not UTF-8 text ({err.reason})") from err
    except json.JSONDecodeError as err:
        raise InputError(f"{config_file} is not valid JSON: {err.msg} at line {err.lineno}") from err
    except OSError as err:
        raise InputError(f"{config_file} cannot be read: {err.strerror or err}") from err
    if not isinstance(data, dict):
        raise InputError(f"{config_file} holds a JSON {type(data).__name__}, not an object of settings")
    return data


@functools.cache
def auto_model_types() -> dict[str, frozenset[str]] | None:
    """``model_type`` names per auto table of the installed transformers; None when unknown."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(next(iter(spec.submodule_search_locations))) / "models" / "auto" / "modeling_auto.py"
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    found: dict[str, frozenset[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in _TABLES:
                found[name] = frozenset(_literal_keys(node.value))
    if any(not found.get(name) for name in _TABLES):
        return None
    return found


def _literal_keys(node: ast.expr) -> list[str]:
    """First items of the ``(str, ...)`` pairs in ``OrderedDict([...])`` (or a plain list/dict)."""
    if isinstance(node, ast.Call) and node.args:
        node = node.args[0]
    if isinstance(node, ast.Dict):
        return [k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]
    if not isinstance(node, ast.List | ast.Tuple):
        return []
    keys = []
    for item in node.elts:
        if isinstance(item, ast.Tuple) and item.elts:
            first = item.elts[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                keys.append(first.value)
    return keys


def supported_model_type(config: Mapping[str, Any], config_file: str) -> ModelKind | None:
    """Which auto class loads this config: image-text-to-text (VLMs) first, then causal LM.

    Refuses, naming ``config_file``, a config without a ``model_type`` string or whose
    ``model_type`` has neither; returns None when the installed transformers' tables cannot be
    read (then LoadModel decides).
    """
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        got = "" if model_type is None else f", got {model_type!r}"
        raise InputError(
            f"{config_file} has no model_type string{got} (a Hugging Face config names its architecture)"
        )
    tables = auto_model_types()
    if tables is None:
        return None
    if model_type in tables[IMAGE_TEXT_TO_TEXT_TABLE]:
        return "image-text-to-text"
    if model_type in tables[CAUSAL_LM_TABLE]:
        return "causal-lm"
    raise InputError(
        f"{config_file}: model_type {model_type!r} has no language model "
        "(neither an image-text-to-text nor a causal-LM architecture)"
    )
