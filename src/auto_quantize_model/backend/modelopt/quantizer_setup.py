"""Fused experts' per-expert quantizers configured once per list and copied, not built one by one.

ModelOpt 0.47 gives a fused experts module (``_QuantFusedExperts``) one ``TensorQuantizer`` per
expert and projection, and builds every one of them through its pydantic attribute config: at
conversion (``_setup``), then again for every recipe of the search (``QuantRecipeHparam``:
``_make_fresh_quantizer_for_attr`` and ``set_quantizer_by_cfg`` per module). On Qwen3-VL-30B-A3B
that was 38,892 ``TensorQuantizer.__init__`` and 103,906 ``set_from_attribute_config`` calls,
about 31 s of a 59 s AutoQuant (BENCHMARKS.md, fourth wave). Every quantizer of such a list
starts the same and receives the same configuration (the config's names are matched with the
expert index stripped), so while :func:`fast_fused_experts_setup` lasts:

* ``_setup`` builds each list's first quantizer as ModelOpt does and copies it for the others;
* ``_make_fresh_quantizer_for_attr`` does the same for a fresh list;
* ``set_quantizer_by_cfg`` (as called by ``auto_quantize`` on the model and by each recipe on its
  module) shortens every list of identical, unused quantizers to its first member, lets ModelOpt
  configure that one, and fills the list again with copies of it;
* ``TensorQuantizer(descriptor)``, as every quantized module's ``_setup`` calls it at conversion
  (three per linear layer: 55,878 quantizers for the split experts of Qwen3-VL-30B-A3B), builds
  one quantizer per descriptor through ModelOpt's pydantic config and copies it for the others.

A copy (:func:`copies_of`) is a new object with the same attribute values; torch's own
containers (buffers, hooks, ...) and the calibrator are its own, as a freshly built quantizer's
are, while values ModelOpt's path shares between the quantizers it configures from one config
(a ``block_sizes`` dict) stay shared. Lists whose members differ, hold ranges or hooks, or are
not plain ``TensorQuantizer``\\ s, and configs that could tell experts apart (a name pattern with a
digit, ``?`` or ``[`` that matches some indices and not others, or a filter function), are left to
ModelOpt unchanged (counted in :class:`SetupCounts`).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import fnmatch
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from auto_quantize_model.backend.modelopt.fused_experts import QUANTIZER_LISTS, by_reason, quantizer_lists
from auto_quantize_model.backend.modelopt.patches import swapped


@attrs.define
class SetupCounts:
    """What the fast set-up did during one search (mutable: filled while the patch is in place)."""

    copied: int = 0
    """Quantizers made by copying a configured one instead of building and configuring them."""
    declined: collections.Counter[str] = attrs.field(factory=collections.Counter)
    """Lists left to ModelOpt, by reason."""
    initialised: int = 0
    """Quantizers whose ``__init__`` copied a template built once for their descriptor."""

    def summary(self) -> str:
        built = f", {self.initialised} built from a template" if self.initialised else ""
        return f"{self.copied} quantizers copied{built}" + by_reason(
            self.declined, "; lists left to ModelOpt: {}"
        )


@contextlib.contextmanager
def fast_fused_experts_setup() -> Iterator[SetupCounts]:
    """ModelOpt builds fused experts' quantizer lists by configuring one and copying it; undone after.

    Undo: ``_QuantFusedExperts._setup``, ``TensorQuantizer.__init__`` and the
    ``_make_fresh_quantizer_for_attr`` and ``set_quantizer_by_cfg`` names of ModelOpt's
    ``algorithms`` and ``model_quant`` modules are put back; quantizers made meanwhile are ordinary
    ``TensorQuantizer`` objects.
    """
    from modelopt.torch.quantization import algorithms, model_quant
    from modelopt.torch.quantization.nn import TensorQuantizer
    from modelopt.torch.quantization.plugins.huggingface import _QuantFusedExperts
    from torch import nn

    counts = SetupCounts()
    original_setup = vars(_QuantFusedExperts)["_setup"]
    original_fresh = algorithms._make_fresh_quantizer_for_attr
    original_configure = algorithms.set_quantizer_by_cfg

    def setup(self: Any) -> None:
        experts = self.__dict__.get("num_experts")
        if not isinstance(experts, int) or experts < 2:
            original_setup(self)
            return
        self.num_experts = 1  # ModelOpt builds one quantizer per list ...
        try:
            original_setup(self)
        finally:
            self.num_experts = experts
        for _, members in quantizer_lists(self):  # ... and the others are copies of it
            if len(members) == 1:
                members.extend(copies_of(members[0], experts - 1))
                counts.copied += experts - 1

    default = TensorQuantizer()  # what ModelOpt builds for every fresh quantizer
    templates: dict[tuple[Any, ...], dict[str, Any]] = {}

    def fresh(module: Any, attr_name: str) -> Any:
        current = getattr(module, attr_name, None)
        if isinstance(current, nn.ModuleList):
            if attr_name not in QUANTIZER_LISTS or len(current) < 2:
                return original_fresh(module, attr_name)
            counts.copied += len(current)
            return nn.ModuleList(copies_of(default, len(current)))
        counts.copied += 1
        return copies_of(default, 1)[0]

    def configure(quant_model: Any, quant_cfg: Any) -> Any:
        key = _module_key(quant_model, quant_cfg, default)
        template = templates.get(key) if key is not None else None
        if template is not None:
            for name, configured in template.items():
                setattr(quant_model, name, copies_of(configured, 1)[0])
            counts.copied += len(template)
            return None
        with _lists_shortened(quant_model, quant_cfg, counts) as refill:
            result = original_configure(quant_model, quant_cfg)
            refill()
        if key is not None:
            templates[key] = {name: copies_of(child, 1)[0] for name, child in quant_model.named_children()}
        return result

    original_init = vars(TensorQuantizer)["__init__"]
    made: dict[int, tuple[Any, Any]] = {}  # id(descriptor) -> (the descriptor, kept alive; template)

    def init(
        self: Any,
        quant_attribute_cfg: Any = None,
        if_quant: bool = True,
        if_calib: bool = False,
        amax: Any = None,
    ) -> None:
        plain_call = amax is None and if_quant is True and if_calib is False
        if type(self) is not TensorQuantizer or not plain_call or not _shared_descriptor(quant_attribute_cfg):
            original_init(self, quant_attribute_cfg, if_quant, if_calib, amax)
            return
        entry = made.get(id(quant_attribute_cfg))
        if entry is None:
            template = object.__new__(TensorQuantizer)
            original_init(template, quant_attribute_cfg)
            entry = made[id(quant_attribute_cfg)] = (quant_attribute_cfg, template)
        vars(self).update(vars(copies_of(entry[1], 1)[0]))
        counts.initialised += 1

    with (
        swapped(TensorQuantizer, "__init__", init),
        swapped(_QuantFusedExperts, "_setup", setup),
        swapped(algorithms, "_make_fresh_quantizer_for_attr", fresh),
        swapped(algorithms, "set_quantizer_by_cfg", configure),
        swapped(model_quant, "set_quantizer_by_cfg", configure),
    ):
        yield counts


def _shared_descriptor(descriptor: Any) -> bool:
    """None (ModelOpt's default) or a ``QuantizerAttributeConfig``: what quantized modules' ``_setup``
    passes (their class's ``default_quant_desc_*``, module constants nobody edits), so a template
    built from the first call stands for every later one. A plain dict is built each time."""
    from modelopt.torch.quantization.config import QuantizerAttributeConfig

    return descriptor is None or type(descriptor) is QuantizerAttributeConfig


@contextlib.contextmanager
def _lists_shortened(root: Any, quant_cfg: Any, counts: SetupCounts) -> Iterator[Callable[[], None]]:
    """Every uniform per-expert list under ``root`` cut to its first member; the yielded call refills them.

    Refilling copies the (now configured) first member into the list's other places. If the block
    fails, the lists get their original members back.
    """
    from modelopt.torch.quantization.conversion import normalize_quant_cfg_list
    from modelopt.torch.quantization.plugins.huggingface import _QuantFusedExperts

    entries = normalize_quant_cfg_list(quant_cfg)
    cut: list[tuple[Any, list[Any]]] = []
    for name, module in root.named_modules():
        if not isinstance(module, _QuantFusedExperts):
            continue
        for attr, members in quantizer_lists(module):
            if len(members) < 2:
                continue
            prefix = f"{name}.{attr}" if name else attr
            reason = _why_not_uniform(list(members)) or _why_index_matters(entries, prefix, len(members))
            if reason is not None:
                counts.declined[reason] += 1
                continue
            cut.append((members, list(members)))
            del members[1:]
    done = False

    def refill() -> None:
        nonlocal done
        for members, original in cut:
            members.extend(copies_of(members[0], len(original) - 1))
            counts.copied += len(original) - 1
        done = True

    try:
        yield refill
    finally:
        if not done:
            for members, original in cut:
                del members[:]
                members.extend(original)


def _module_key(module: Any, quant_cfg: Any, default: Any) -> tuple[Any, ...] | None:
    """What ModelOpt's configuration of ``module`` depends on, when it depends on nothing else.

    ``set_quantizer_by_cfg`` called on one quantized module (as each recipe does) matches names
    relative to it (``weight_quantizer``) and parent classes (the module's type), so for a module
    whose children are all freshly built quantizers the result is fixed by its type, their names
    and the config: modules alike (every expert projection of a split MoE, every ``q_proj``) get
    copies of the first one's result. None for anything else (fused experts, a model, quantizers
    already configured or calibrated).
    """
    from modelopt.torch.quantization.conversion import normalize_quant_cfg_list
    from modelopt.torch.quantization.nn import QuantModule
    from modelopt.torch.quantization.plugins.huggingface import _QuantFusedExperts

    if not isinstance(module, QuantModule) or isinstance(module, _QuantFusedExperts):
        return None
    names = []
    for name, child in module.named_children():
        if not _plain(child) or not _same_settings(default, child):
            return None
        names.append(name)
    if not names:
        return None
    return (type(module), tuple(names), repr(normalize_quant_cfg_list(quant_cfg)))


def _why_index_matters(entries: list[Any], prefix: str, size: int) -> str | None:
    """Why the config might treat experts of the list ``prefix`` differently, or None when it cannot.

    A wildcard of ``*`` and literals without digits matches ``prefix.0`` exactly when it matches
    ``prefix.17`` (the trailing index can only be eaten by a ``*``); other wildcards are tried on
    every index.
    """
    for entry in entries:
        pattern = entry["quantizer_name"]
        if not isinstance(pattern, str):
            return "filter function in the config"
        if not any(ch.isdigit() or ch in "?[" for ch in pattern):
            continue
        if len({fnmatch.fnmatch(f"{prefix}.{index}", pattern) for index in range(size)}) > 1:
            return "config pattern names expert indices"
    return None


def _why_not_uniform(members: list[Any]) -> str | None:
    """Why the list's quantizers are not interchangeable unused copies of its first, or None."""
    first = members[0]
    if not _plain(first):
        return "quantizer in use or not a plain TensorQuantizer"
    for member in members[1:]:
        if not _plain(member):
            return "quantizer in use or not a plain TensorQuantizer"
        if not _same_settings(first, member):
            return "quantizers configured differently"
    return None


_MODULE_CONTAINERS: frozenset[str] | None = None


def _module_containers() -> frozenset[str]:
    """The attributes ``nn.Module.__init__`` creates (containers every module owns alone)."""
    global _MODULE_CONTAINERS
    if _MODULE_CONTAINERS is None:
        from torch import nn

        _MODULE_CONTAINERS = frozenset(nn.Module().__dict__)
    return _MODULE_CONTAINERS


def _plain(quantizer: Any) -> bool:
    """Whether copying ``quantizer`` attribute by attribute gives what building it afresh would.

    Plain means: exactly ``TensorQuantizer``; no parameters, buffers (ranges), children or hooks;
    no tensor or module held directly; no calibrator state (a max calibrator that has seen nothing,
    or none) and no bias calibrator or backend cache.
    """
    import torch
    from modelopt.torch.quantization.calib import MaxCalibrator
    from modelopt.torch.quantization.nn import TensorQuantizer

    if type(quantizer) is not TensorQuantizer:
        return False
    state = quantizer.__dict__
    containers = _module_containers()
    for key, value in state.items():
        if key in containers and isinstance(value, dict | set):
            if value:
                return False
        elif isinstance(value, torch.Tensor | torch.nn.Module):
            return False
    calibrator = state.get("_calibrator")
    if calibrator is not None and (
        type(calibrator) is not MaxCalibrator or calibrator._calib_amax is not None or calibrator._track_amax
    ):
        return False
    return state.get("_bias_calibrator") is None and state.get("_quantizer_cache") is None


def _same_settings(first: Any, other: Any) -> bool:
    """Whether two plain quantizers hold equal settings (their calibrators' included)."""
    mine, theirs = first.__dict__, other.__dict__
    if mine.keys() != theirs.keys():
        return False
    containers = _module_containers()
    for key, value in mine.items():
        counterpart = theirs[key]
        if key == "_calibrator":
            if type(value) is not type(counterpart) or (
                value is not None and vars(value) != vars(counterpart)
            ):
                return False
        elif key in containers and isinstance(value, dict | set):
            continue  # empty in both (plain)
        elif value is not counterpart and value != counterpart:
            return False
    return True


def copies_of(quantizer: Any, count: int) -> list[Any]:
    """``count`` quantizers equal to ``quantizer`` as freshly built, identically configured ones would be.

    Plain quantizers (:func:`_plain`) are copied attribute by attribute: torch's (empty) containers
    and the calibrator are each copy's own, other values are shared as ModelOpt shares them
    between quantizers configured from one config. Anything else is deep-copied.
    """
    if not _plain(quantizer):
        return [copy.deepcopy(quantizer) for _ in range(count)]
    state = quantizer.__dict__
    containers = _module_containers()
    own = [
        (key, type(value))
        for key, value in state.items()
        if key in containers and isinstance(value, dict | set)
    ]
    calibrator = state.get("_calibrator")
    made = []
    for _ in range(count):
        new = object.__new__(type(quantizer))
        fields = dict(state)
        for key, kind in own:
            fields[key] = kind()
        if calibrator is not None:
            twin = object.__new__(type(calibrator))
            twin.__dict__.update(calibrator.__dict__)
            fields["_calibrator"] = twin
        new.__dict__.update(fields)
        made.append(new)
    return made
