"""Which ``model_type`` values hold a language model, known without importing torch.

``aqm validate`` must reject a checkpoint that ``aqm run`` would reject in its first seconds, yet
it may not import torch (its whole point is to answer at once). transformers' auto mappings are
the authority on which architectures have an image-text-to-text or a causal-LM class, but
importing them imports torch. Their names live as literal tables in
``transformers/models/auto/modeling_auto.py``, so they are read from that file's syntax tree:
facts of the installed transformers, with no import and no copy that could drift.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from auto_quantize_model.errors import InputError

IMAGE_TEXT_TO_TEXT = "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"
CAUSAL_LM = "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"


@functools.cache
def language_model_types() -> Mapping[str, frozenset[str]] | None:
    """``{table name: model types}`` of the installed transformers; None when unreadable.

    None means "cannot tell here": callers then leave the check to the real load, which asks the
    imported mappings. It never means "nothing is supported".
    """
    spec = importlib.util.find_spec("transformers")
    if spec is None or spec.origin is None:
        return None
    source = Path(spec.origin).parent / "models" / "auto" / "modeling_auto.py"
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    tables: dict[str, frozenset[str]] = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        target = node.targets[0]
        if not isinstance(target, ast.Name) or target.id not in (IMAGE_TEXT_TO_TEXT, CAUSAL_LM):
            continue
        call = node.value
        if not (isinstance(call, ast.Call) and call.args):
            return None
        try:
            pairs = ast.literal_eval(call.args[0])
        except ValueError:
            return None
        tables[target.id] = frozenset(str(pair[0]) for pair in pairs)
    return tables if len(tables) == 2 else None


def read_config_json(config_file: Path) -> dict[str, Any]:
    """``config.json`` as a dict, with every way it can be unusable named in one line."""
    try:
        raw = config_file.read_bytes()
    except OSError as err:
        raise InputError(f"cannot read {config_file}: {err.strerror or err}") from err
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{config_file} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise InputError(
            f"{config_file} holds a JSON {type(config).__name__}, not an object; "
            "a Hugging Face config.json is an object with a model_type key"
        )
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise InputError(
            f"{config_file} has no model_type string; a Hugging Face config.json names its architecture "
            'there (e.g. "model_type": "qwen3_vl")'
        )
    return config


def check_model_type(model_type: str, config_file: Path) -> None:
    """Refuse a ``model_type`` that has neither an image-text-to-text nor a causal-LM class."""
    tables = language_model_types()
    if tables is None or any(model_type in names for names in tables.values()):
        return
    raise InputError(
        f"{config_file}: model_type {model_type!r} has no language model in the installed transformers "
        "(neither an image-text-to-text nor a causal-LM architecture); aqm needs a (vision-)language model"
    )
