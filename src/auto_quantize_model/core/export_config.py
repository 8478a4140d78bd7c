"""A chosen per-group format mix as a ModelOpt quantization config, and the checks that read it back.

Pure: no torch, no ModelOpt. The ModelOpt side is :mod:`auto_quantize_model.backend.modelopt.quant_config`
(preset configs, ModelOpt's recipe reader) and :mod:`auto_quantize_model.backend.modelopt.export`
(``mtq.quantize``, the Hugging Face exporter); they hand this module each format's ModelOpt config
as a plain dict.

The config has the shape ModelOpt 0.47's own ``get_auto_quantize_config`` gives a search result
(``modelopt/torch/quantization/algorithms.py:1976``): a deny-all entry ``{"quantizer_name": "*",
"enable": False}`` first, then one entry per quantizer of every chosen module, named
``<module>.<weight|input|output>_quantizer`` and carrying the attributes that format gives that
quantizer under ``auto_quantize`` (the format's patterns replayed on the quantizer's *local* name,
:func:`~auto_quantize_model.core.formats.local_quantizer`), so ``mtq.quantize`` recreates what the
search scored. Entries are applied in order, later ones winning (``set_quantizer_by_cfg`` in
``modelopt/torch/quantization/conversion.py:245``); module names are matched with ``fnmatch``
against full quantizer names, so the names are written with glob characters escaped and match
exactly one quantizer each. Unlike ``get_auto_quantize_config``, a preset's global entries
(attention/KV-cache quantizers such as ``*[kv]_bmm_quantizer``) are not carried over: the search
never applied them to a linear layer, and the export must compute what was scored.

ModelOpt 0.47 also reads fixed per-layer configs from YAML: a PTQ recipe (``modelopt/recipe/
config.py:115``, ``ModelOptPTQRecipe``: a ``metadata`` section with ``recipe_type: ptq`` and a
``quantize`` section holding ``quant_cfg`` and ``algorithm``), loaded by
``modelopt.recipe.load_recipe(path)`` (``modelopt/recipe/loader.py:83``). :func:`recipe_yaml`
writes that format. YAML keeps the integer keys of ``block_sizes`` (``-1: 128``) that ModelOpt
requires; JSON turns them into strings, which ``QuantizerAttributeConfig`` rejects, so
:func:`read_quant_config` restores them.

What the exporter records for each format, and which formats it cannot record faithfully, is
:mod:`auto_quantize_model.core.export_labels`; which format each group gets, and the fused-sibling
rule, is :mod:`auto_quantize_model.core.export_choice`.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import attrs
import yaml

from auto_quantize_model.core.export_choice import GroupChoice, check_fused_siblings
from auto_quantize_model.core.export_labels import ExportFormat, export_format
from auto_quantize_model.core.formats import local_quantizer
from auto_quantize_model.core.scores import NO_QUANT
from auto_quantize_model.errors import ConfigError, InputError

QUANTIZER_ATTRS = ("weight_quantizer", "input_quantizer", "output_quantizer")
"""The quantizers ModelOpt puts on a linear layer; the config names each of them per module."""

SUPPORTED_ALGORITHMS = ("max", "smoothquant", "awq_lite", "awq_clip", "awq_full")
"""Calibration methods an export may run (one per ``mtq.quantize`` call, over the whole model)."""

MIXED_PRECISION = "MIXED_PRECISION"
"""ModelOpt's ``quant_algo`` when layers carry more than one format (a per-layer map follows)."""

RECIPE_DESCRIPTION = "Per-layer mixed-precision PTQ chosen by auto-quantize-model from AutoQuant scores."


# --------------------------------------------------------------------------------------------------
# The config
# --------------------------------------------------------------------------------------------------


@attrs.frozen
class LayerExpectation:
    """What the export must show for one module: its group, format and the exporter's label."""

    module: str
    group: str
    format: str
    label: str | None
    """None for ``NONE`` (the module must not be quantized)."""
    group_size: int | None = None


@attrs.frozen(eq=False)
class ExportConfig:
    """A per-layer ModelOpt quantization config built from a choice, with what it must read back as."""

    choices: tuple[GroupChoice, ...]
    quant_config: dict[str, Any]
    """``{"quant_cfg": [...], "algorithm": ...}``: what ``mtq.quantize`` takes. Treat as read-only
    (copy it before handing it to ModelOpt, which may keep references)."""
    algorithm: str | None
    """The calibration method (``max``, ``smoothquant``, ``awq_lite``...); None: no calibration."""
    layers: tuple[LayerExpectation, ...]
    formats: tuple[ExportFormat, ...]
    """Every quantized format of the choice, in first-use order."""

    @property
    def needs_cuda(self) -> tuple[str, ...]:
        """The chosen formats ModelOpt can only quantize and export with CUDA kernels."""
        return tuple(f.name for f in self.formats if f.needs_cuda)

    @property
    def quantized(self) -> tuple[LayerExpectation, ...]:
        return tuple(layer for layer in self.layers if layer.label is not None)

    def format_of(self) -> dict[str, str]:
        """Module name -> chosen format (``NONE`` included)."""
        return {layer.module: layer.format for layer in self.layers}


def literal_pattern(name: str) -> str:
    """``name`` as an ``fnmatch`` pattern matching only itself (``*?[`` wrapped in brackets)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def algorithm_method(algorithm: Any) -> str | None:
    """The method name of a ModelOpt ``algorithm`` value: a string, ``{"method": ...}`` or None."""
    if algorithm is None or isinstance(algorithm, str):
        return algorithm
    if isinstance(algorithm, Mapping) and isinstance(algorithm.get("method"), str):
        return str(algorithm["method"])
    raise ConfigError(f"unsupported ModelOpt calibration algorithm {algorithm!r}: export supports one method")


def _calibration(
    formats: Sequence[str], format_configs: Mapping[str, Mapping[str, Any]]
) -> tuple[Any, str | None]:
    """The one calibration algorithm the mix needs, or a ConfigError naming the conflict."""
    methods: dict[str, list[str]] = {}
    value_of: dict[str, Any] = {}
    for name in formats:
        raw = format_configs[name].get("algorithm", "max")
        method = algorithm_method(raw)
        if method is None:
            continue  # dynamic formats (MX) need no calibration and are fine under any method
        if method not in SUPPORTED_ALGORITHMS:
            raise ConfigError(
                f"format {name} calibrates with {method!r}, which export does not support yet "
                f"(supported: {', '.join(SUPPORTED_ALGORITHMS)}); choose another format"
            )
        methods.setdefault(method, []).append(name)
        value_of.setdefault(method, raw)
    if len(methods) > 1:
        parts = "; ".join(f"{', '.join(names)} with {method}" for method, names in methods.items())
        raise ConfigError(
            f"the chosen formats calibrate differently ({parts}), and mtq.quantize runs one calibration "
            "algorithm over the whole model (SmoothQuant/AWQ would rescale the other formats' layers too): "
            "exporting such a mix is not supported yet; choose formats with one calibration method"
        )
    if not methods:
        return None, None
    method = next(iter(methods))
    return value_of[method], method


def _module_entries(module: str, fmt: Mapping[str, Any]) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    for attr in QUANTIZER_ATTRS:
        state = local_quantizer(fmt["quant_cfg"], attr)
        if not state.enabled:
            continue
        entry: dict[str, Any] = {"quantizer_name": f"{literal_pattern(module)}.{attr}"}
        if state.configured:
            entry["cfg"] = json_ready(state.cfg)
        else:
            entry["enable"] = True
        entries.append(entry)
    return entries


def build_export_config(
    choices: Sequence[GroupChoice],
    format_configs: Mapping[str, Mapping[str, Any]],
    *,
    vision_prefixes: Sequence[str] = (),
    known_modules: Collection[str] = (),
    exportable: Callable[[str], ExportFormat] = export_format,
) -> ExportConfig:
    """The ModelOpt config for ``choices``; every choice ModelOpt could not export faithfully refused.

    ``format_configs`` maps each chosen format to its ModelOpt quantize config (presets as
    ModelOpt defines them, custom formats from :meth:`CustomFormat.quant_cfg`). ``vision_prefixes``
    are the model's vision modules (quantizing them is refused: ModelOpt's exporter keeps vision
    layers unquantized); ``known_modules`` are all its linear layers (for the fused-sibling check).
    ``exportable`` says what the target checkpoint format records for a format, or why it cannot
    (ModelOpt's exporter by default; :func:`~auto_quantize_model.core.ct_config.ct_export_format`).
    """
    if not choices:
        raise ConfigError("nothing to export: the choice holds no recipe group")
    seen_groups: set[str] = set()
    seen_modules: dict[str, str] = {}
    for choice in choices:
        if choice.name in seen_groups:
            raise ConfigError(f"group {choice.name} is chosen twice")
        seen_groups.add(choice.name)
        if not choice.module_names:
            raise ConfigError(f"group {choice.name} lists no module")
        for module in choice.module_names:
            if module in seen_modules:
                raise ConfigError(f"module {module} is in groups {seen_modules[module]} and {choice.name}")
            seen_modules[module] = choice.name

    export_formats: dict[str, ExportFormat] = {}
    for choice in choices:
        if choice.format == NO_QUANT or choice.format in export_formats:
            continue
        found = exportable(choice.format)
        if found.refused is not None:
            raise ConfigError(
                f"group {choice.name}: format {choice.format} cannot be exported: {found.refused}"
            )
        if choice.format not in format_configs:
            raise ConfigError(f"group {choice.name}: no ModelOpt config was given for format {choice.format}")
        export_formats[choice.format] = found
    if not export_formats:
        raise ConfigError("nothing to export: every group of the choice is NONE (unquantized)")

    check_fused_siblings(choices, known_modules)
    for choice in choices:
        if choice.format == NO_QUANT:
            continue
        for module in choice.module_names:
            tower = next((p for p in vision_prefixes if module == p or module.startswith(p + ".")), None)
            if tower is not None:
                raise ConfigError(
                    f"group {choice.name}: module {module} is in the vision tower ({tower}); ModelOpt's HF "
                    f"exporter keeps vision layers unquantized (quantized ones break VL exports), so "
                    f"{choice.format} cannot be exported there; choose NONE for it"
                )
        inert = local_quantizer(format_configs[choice.format]["quant_cfg"], "weight_quantizer")
        if not inert.enabled or not inert.configured:
            raise ConfigError(
                f"group {choice.name}: format {choice.format} configures no weight quantizer "
                "of a linear layer"
            )

    algorithm, method = _calibration(list(export_formats), format_configs)
    entries: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
    layers: list[LayerExpectation] = []
    for choice in choices:
        chosen = export_formats.get(choice.format)
        for module in choice.module_names:
            if chosen is None:
                entries.append({"quantizer_name": f"{literal_pattern(module)}.*", "enable": False})
                layers.append(LayerExpectation(module, choice.name, NO_QUANT, None))
            else:
                entries.extend(_module_entries(module, format_configs[choice.format]))
                layers.append(
                    LayerExpectation(module, choice.name, choice.format, chosen.label, chosen.group_size)
                )
    return ExportConfig(
        choices=tuple(choices),
        quant_config={"quant_cfg": entries, "algorithm": json_ready(algorithm)},
        algorithm=method,
        layers=tuple(layers),
        formats=tuple(export_formats.values()),
    )


# --------------------------------------------------------------------------------------------------
# Files: JSON and ModelOpt's PTQ recipe YAML
# --------------------------------------------------------------------------------------------------


def json_ready(value: Any) -> Any:
    """A deep copy with tuples as lists (ModelOpt accepts both); dict keys keep their type."""
    if isinstance(value, Mapping):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(item) for item in value]
    return value


def quant_config_json(config: ExportConfig) -> str:
    """``quant_config.json``: the config for ``mtq.quantize`` (read it with :func:`read_quant_config`)."""
    return json.dumps(config.quant_config, indent=2) + "\n"


_INT_KEY = re.compile(r"^-?\d+$")
_INT_KEYED = ("block_sizes", "scale_block_sizes")


def _restore_int_keys(value: Any, int_keyed: bool = False) -> Any:
    if isinstance(value, dict):
        return {
            (
                int(key) if int_keyed and isinstance(key, str) and _INT_KEY.match(key) else key
            ): _restore_int_keys(item, key in _INT_KEYED)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_restore_int_keys(item) for item in value]
    return value


def read_quant_config(text: str, source: str = "quant_config.json") -> dict[str, Any]:
    """Parse ``quant_config.json`` into the dict ``mtq.quantize`` accepts.

    JSON object keys are strings, but ModelOpt wants ``block_sizes`` keyed by axis integers
    (``{-1: 128}``); those keys are turned back into integers.
    """
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{source}: not JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("quant_cfg"), list):
        raise InputError(f"{source}: expected an object with a 'quant_cfg' list (a ModelOpt quantize config)")
    restored = _restore_int_keys(raw)
    assert isinstance(restored, dict)
    return restored


def recipe_yaml(config: ExportConfig, description: str = RECIPE_DESCRIPTION) -> str:
    """``quant_recipe.yaml``: the config as a ModelOpt 0.47 PTQ recipe (``modelopt.recipe.load_recipe``).

    ``yaml.safe_dump`` quotes what YAML would otherwise misread (a ``*`` pattern as an alias, a
    ``-`` as a list) and keeps ``block_sizes``' integer keys, which is why the recipe is YAML at
    all; keys stay in ModelOpt's order rather than sorted, so the file reads like its presets.
    """
    recipe = json_ready(
        {
            "metadata": {"recipe_type": "ptq", "description": description},
            "quantize": {
                "algorithm": config.quant_config["algorithm"],
                "quant_cfg": config.quant_config["quant_cfg"],
            },
        }
    )
    header = [
        "# ModelOpt PTQ recipe written by auto-quantize-model: one entry per quantizer of each chosen layer.",
        "# Load: from modelopt.recipe import load_recipe; cfg = load_recipe(PATH).quantize.model_dump()",
    ]
    body = yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True, width=1_000_000)
    return "\n".join(header) + "\n" + str(body)


# --------------------------------------------------------------------------------------------------
# Reading back
# --------------------------------------------------------------------------------------------------


def _canonical(cfg: Any) -> str:
    """One spelling of a quantizer config: tuples as lists, keys as strings, keys sorted."""
    return json.dumps(json.loads(json.dumps(json_ready(cfg))), sort_keys=True)


def config_mismatches(
    quant_config: Mapping[str, Any],
    config: ExportConfig,
    format_configs: Mapping[str, Mapping[str, Any]],
    other_modules: Iterable[str] = (),
    canonical: Callable[[Any], str] | None = None,
) -> tuple[str, ...]:
    """Every quantizer of every chosen layer whose setting in ``quant_config`` differs from its format's.

    ``quant_config`` is what was read back from a file. Each quantizer's final state is found by
    replaying the entries in order on its full name (``mtq.quantize``'s rule) and compared with
    what the chosen format gives that quantizer under ``auto_quantize``; ``NONE`` layers and
    ``other_modules`` (e.g. every other linear layer of the model) must end disabled. Empty when
    the file lists exactly the chosen format of every layer.

    Attributes are compared as written (tuples as lists, keys as strings) unless ``canonical``
    spells them out first: ModelOpt's own writers leave out attributes at their default values
    (``get_auto_quantize_config`` drops ``axis: None``), which only ModelOpt's schema can fill in.
    """
    spell = canonical or _canonical
    entries = quant_config.get("quant_cfg", [])
    problems: list[str] = []
    if algorithm_method(quant_config.get("algorithm")) != config.algorithm:
        problems.append(f"algorithm is {quant_config.get('algorithm')!r}, expected {config.algorithm!r}")
    listed = {layer.module for layer in config.layers}
    checks = [(layer.module, layer.format) for layer in config.layers]
    checks += [(module, NO_QUANT) for module in other_modules if module not in listed]
    for module, fmt in checks:
        for attr in QUANTIZER_ATTRS:
            actual = local_quantizer(entries, f"{module}.{attr}")
            if fmt == NO_QUANT:
                if actual.enabled:
                    problems.append(f"{module}.{attr} is enabled, but {module} is NONE")
                continue
            expected = local_quantizer(format_configs[fmt]["quant_cfg"], attr)
            if actual.enabled != expected.enabled:
                state = "enabled" if actual.enabled else "disabled"
                problems.append(f"{module}.{attr} is {state}, but {fmt} has it the other way")
            elif actual.enabled and spell(actual.cfg) != spell(expected.cfg):
                problems.append(
                    f"{module}.{attr} is configured {_canonical(actual.cfg)}, "
                    f"{fmt} gives {_canonical(expected.cfg)}"
                )
    return tuple(problems)


def checkpoint_mismatches(hf_quant_config: Mapping[str, Any], config: ExportConfig) -> tuple[str, ...]:
    """Every layer whose record in ``hf_quant_config.json`` differs from the format chosen for it.

    With several formats ModelOpt writes ``quant_algo: MIXED_PRECISION`` and a ``quantized_layers``
    map (layer -> ``quant_algo``, ``group_size``...): every quantized layer must be there with
    its format's label, and nothing else. With one format it writes that label once and lists the
    unquantized layers in ``exclude_modules`` (wildcards): every ``NONE`` layer must be excluded
    and no chosen layer may be.
    """
    quantization = hf_quant_config.get("quantization")
    if not isinstance(quantization, Mapping):
        return ("hf_quant_config.json has no 'quantization' section",)
    algo = quantization.get("quant_algo")
    problems: list[str] = []
    if algo == MIXED_PRECISION:
        recorded = quantization.get("quantized_layers")
        if not isinstance(recorded, Mapping):
            return ("quant_algo is MIXED_PRECISION but there is no 'quantized_layers' map",)
        for layer in config.layers:
            entry = recorded.get(layer.module)
            if layer.label is None:
                if entry is not None:
                    problems.append(
                        f"{layer.module} is recorded as {entry.get('quant_algo')}, but it is NONE"
                    )
                continue
            if not isinstance(entry, Mapping):
                problems.append(f"{layer.module} ({layer.format}) is missing from quantized_layers")
                continue
            if entry.get("quant_algo") != layer.label:
                problems.append(
                    f"{layer.module} is recorded as {entry.get('quant_algo')}, "
                    f"{layer.format} is {layer.label}"
                )
            if layer.group_size is not None and entry.get("group_size") != layer.group_size:
                problems.append(
                    f"{layer.module} has group_size {entry.get('group_size')}, "
                    f"{layer.format} uses {layer.group_size}"
                )
        listed = {layer.module for layer in config.layers}
        problems.extend(
            f"{name} is recorded as quantized but was not chosen" for name in recorded if name not in listed
        )
        return tuple(problems)
    excluded = [str(p) for p in quantization.get("exclude_modules", []) or []]
    labels = {layer.label for layer in config.quantized}
    if algo is None or labels != {algo}:
        problems.append(f"quant_algo is {algo!r}, the chosen formats are {sorted(str(x) for x in labels)}")
    for layer in config.layers:
        is_excluded = any(fnmatch.fnmatchcase(layer.module, pattern) for pattern in excluded)
        if layer.label is None and not is_excluded:
            problems.append(f"{layer.module} is NONE but not in exclude_modules")
        elif layer.label is not None and is_excluded:
            problems.append(f"{layer.module} ({layer.format}) is in exclude_modules")
        elif layer.group_size is not None and quantization.get("group_size") != layer.group_size:
            problems.append(
                f"group_size is {quantization.get('group_size')}, {layer.format} uses {layer.group_size}"
            )
    return tuple(problems)


# --------------------------------------------------------------------------------------------------
# README of an export folder
# --------------------------------------------------------------------------------------------------


def readme_text(config: ExportConfig, *, checkpoint: bool, notes: Sequence[str] = ()) -> str:
    """``README.md`` of an export folder: what each file is, the chosen formats, how to load them."""
    counts: dict[str, int] = {}
    for choice in config.choices:
        counts[choice.format] = counts.get(choice.format, 0) + 1
    labels = {f.name: f.label for f in config.formats}
    lines = [
        "# Mixed-precision export (auto-quantize-model)",
        "",
        f"{len(config.choices)} recipe groups, {len(config.quantized)} quantized layers; calibration: "
        f"{config.algorithm or 'none'}.",
        "",
        "| format | groups | recorded in the checkpoint as |",
        "| :--- | ---: | :--- |",
    ]
    for name, count in counts.items():
        lines.append(f"| `{name}` | {count} | {labels.get(name) or 'not quantized'} |")
    lines += [
        "",
        "| file | what |",
        "| :--- | :--- |",
        "| `quant_config.json` | the per-layer ModelOpt quantize config (one entry per quantizer of "
        "every chosen layer) |",
        "| `quant_recipe.yaml` | the same config as a ModelOpt PTQ recipe |",
    ]
    if checkpoint:
        lines += [
            "| `config.json` | the model config; `quantization_config` holds the per-layer formats |",
            "| `hf_quant_config.json` | ModelOpt's record: `quant_algo` (`MIXED_PRECISION` with a "
            "`quantized_layers` map when formats differ) |",
            "| `*.safetensors` | weights: quantized layers hold packed integer/FP8 values with "
            "`weight_scale` (and `input_scale`, `pre_quant_scale`) |",
        ]
    lines += [
        "",
        "## Quantize the original model again (ModelOpt)",
        "",
        "```python",
        "import modelopt.torch.quantization as mtq",
        "from auto_quantize_model.core.export_config import read_quant_config",
        "",
        'config = read_quant_config(open("quant_config.json").read())  # block_sizes keys back to integers',
        "# or: from modelopt.recipe import load_recipe",
        '#     config = load_recipe("quant_recipe.yaml").quantize.model_dump()',
        "model = mtq.quantize(model, config, forward_loop)  # the unquantized model, your calibration loop",
        "```",
    ]
    if checkpoint:
        lines += [
            "",
            "## Load the checkpoint",
            "",
            "In PyTorch (what auto-quantize-model's read-back check does): every quantized layer's weights "
            "are dequantized from the stored values and scales, and its activations get a ModelOpt fake "
            "quantizer with the stored input scale.",
            "",
            "```python",
            "from auto_quantize_model.backend.modelopt.export import load_exported",
            "",
            'model = load_exported("THIS_FOLDER", device="cpu")',
            "```",
            "",
            "Transformers alone cannot: it has no loader for `quant_method: modelopt` and skips the "
            "quantization config. For deployment, TensorRT-LLM reads `hf_quant_config.json` "
            "(`MIXED_PRECISION` per-layer maps included) and vLLM reads `quantization_config` "
            "(`quant_method: modelopt`) for the formats it supports; neither was run by this tool.",
        ]
    if notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"
