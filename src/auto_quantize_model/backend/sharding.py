"""Random-weight models spread over devices: ``config:``/``builtin:`` sources with a ``device_map``.

A 33-billion-parameter ``config:qwen3-vl-32b`` in bf16 does not fit one GPU once AutoQuant's
working memory is added, and building it on one device first to move it later would need that
device to hold it all. So the model is built on the meta device (no memory), placed the way
``from_pretrained`` places a checkpoint (accelerate's ``infer_auto_device_map`` with the model's
``_no_split_modules``, or the user's table), and each parameter and buffer is then created
directly on its device and initialised by the model's own ``_init_weights``.

Each module draws from a seed of its own: ``(spec.seed, module name)``. The weights therefore do
not depend on where the other modules went, nor in what order they were built: a layer on
``cuda:1`` gets the same bits as on ``cuda:0`` (CUDA devices run the same Philox stream for the
same seed), so a model split over two GPUs and the same model on one (``device_map={"": "cuda:0"}``)
are the same model, which is how the two-GPU check compares rankings. CPU draws differ from CUDA
draws, and all of them differ from the single stream of a build without ``device_map`` (that path
is untouched; tests pin its weights).

Forward across devices is accelerate's ``dispatch_model``: hooks move each placed module's inputs
to its device. ModelOpt 0.47 keeps those hooks when it converts a module to its quantized class
(``bind_forward_method`` re-applies them) and reads a hooked module's device from the hook
(``get_module_device``).

torch, transformers and accelerate are imported inside functions (this module is reached from
the CLI's import graph).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Collection, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from auto_quantize_model.backend.devices import resolve_device
from auto_quantize_model.errors import ConfigError
from auto_quantize_model.io.convert import did_you_mean
from auto_quantize_model.spec_values import DeviceMap, size_bytes
from auto_quantize_model.specs import LoadSpec

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)

Placement = dict[str, str]
"""Module (or tensor) name -> device (``cpu``, ``cuda:N``), the shape ``hf_device_map`` has."""

_LAYER_RE = re.compile(r"^(?P<stack>.*\.layers)\.(?P<index>\d+)$")


def module_seed(seed: int, name: str) -> int:
    """The seed of one module's weights: a hash of the run's seed and the module's name only."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


def uses_cuda(device_map: str | DeviceMap) -> bool:
    """Whether a placement puts anything on a GPU (strategies do whenever a GPU is visible)."""
    import torch

    if isinstance(device_map, str):
        return torch.cuda.is_available()
    return any(device.startswith("cuda") for _, device in device_map)


def owner_of(name: str, placement: Mapping[str, str]) -> str | None:
    """The placement key that covers ``name``: the longest that is ``name`` or a dotted prefix of it."""
    best: str | None = None
    for key in placement:
        if (key == "" or name == key or name.startswith(f"{key}.")) and (
            best is None or len(key) > len(best)
        ):
            best = key
    return best


def _named_tensors(model: nn.Module, *, every_name: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters then buffers; ``every_name`` lists a tied tensor under each of its names."""
    yield from model.named_parameters(remove_duplicate=not every_name)
    yield from model.named_buffers(remove_duplicate=not every_name)


def _canonical(device: str | int) -> str:
    if isinstance(device, int):
        return f"cuda:{device}"
    return "cuda:0" if device == "cuda" else device


def memory_caps(max_memory: Mapping[str, str]) -> dict[int | str, int]:
    """``{"0": "40GiB", "cpu": "1TB"}`` as accelerate takes it: GPU numbers and bytes."""
    caps: dict[int | str, int] = {}
    for key, size in max_memory.items():
        parsed = size_bytes(size)
        assert parsed is not None  # LoadSpec checked it
        caps[key if key == "cpu" else int(key)] = parsed
    return caps


def pretrained_device_map(device_map: str | DeviceMap) -> str | dict[str, int | str]:
    """``from_pretrained``'s ``device_map``: a strategy as is, a table with GPU numbers."""
    if isinstance(device_map, str):
        return device_map
    return _dispatch_map({name: _canonical(device) for name, device in device_map})


def explicit_placement(model: nn.Module, device_map: DeviceMap, source: str) -> Placement:
    """The user's table, checked against the model: every key names a module or tensor of it, and
    every parameter and buffer falls under some key."""
    modules = {name for name, _ in model.named_modules()}
    tensors = {name for name, _ in _named_tensors(model, every_name=True)}
    placement: Placement = {}
    for key, device in device_map:
        if key and key not in modules and key not in tensors:
            candidates = sorted(modules | tensors)
            raise ConfigError(
                f"model.device_map: {source} has no module {key!r}{did_you_mean(key, candidates)} "
                '(keys are module names such as model.language_model.layers.0, or "" for the rest)'
            )
        placement[key] = _canonical(resolve_device(_canonical(device)))
    for name in sorted(tensors):
        if owner_of(name, placement) is None:
            raise ConfigError(
                f'model.device_map: nothing places {name} of {source} (add its module, or "" for the rest)'
            )
    return placement


def strategy_placement(
    model: nn.Module, strategy: str, max_memory: Mapping[str, str] | None, source: str
) -> Placement:
    """What transformers' ``from_pretrained(device_map=strategy)`` computes, on a meta model.

    ``auto``, ``balanced`` and ``balanced_low_0`` spread the layers evenly over the GPUs (capped
    by ``max_memory``); ``sequential`` fills GPU 0 first. A placement that spills to disk is
    refused: the caps leave too little room for the model.
    """
    from accelerate.utils import (  # type: ignore[import-untyped]
        get_balanced_memory,
        get_max_memory,
        infer_auto_device_map,
    )

    limits = memory_caps(max_memory) if max_memory is not None else None
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    if strategy == "sequential":
        budget = get_max_memory(limits)
    else:
        budget = get_balanced_memory(
            model, max_memory=limits, no_split_module_classes=no_split, low_zero=strategy == "balanced_low_0"
        )
    found = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split)
    spilled = sorted(name for name, device in found.items() if device == "disk")
    if spilled:
        raise ConfigError(
            f"model.device_map={strategy!r}: {source} does not fit the memory allowed "
            f"(model.max_memory); {len(spilled)} module(s) would go to disk, first {spilled[0]}; "
            "raise model.max_memory or add GPUs"
        )
    return {name: _canonical(device) for name, device in found.items()}


def _tensor_devices(placement: Mapping[str, str], model: nn.Module) -> dict[str, str]:
    found = {name: owner_of(name, placement) for name, _ in _named_tensors(model)}
    return {name: placement[owner] for name, owner in found.items() if owner is not None}


def materialize(model: nn.Module, placement: Mapping[str, str], seed: int) -> None:
    """Create every meta parameter and buffer on its placed device, then initialise it.

    Tensors start as zeros, so one that ``_init_weights`` does not cover is deterministic rather
    than whatever memory held. Modules are initialised children before parents, as transformers
    does, each by the innermost ``PreTrainedModel`` holding it (a VLM's vision and text towers have
    their own configs and init ranges) and under :func:`module_seed`. A parameter shared by two
    modules (tied embeddings) is created once, where its first name puts it.
    """
    import torch

    devices = _tensor_devices(placement, model)
    made: dict[int, torch.Tensor] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for store in (module._parameters, module._buffers):
            for key, tensor in store.items():
                if tensor is None:
                    continue
                if id(tensor) in made:
                    store[key] = made[id(tensor)]
                    continue
                full = f"{module_name}.{key}" if module_name else key
                fresh = torch.zeros(tensor.shape, dtype=tensor.dtype, device=devices[full])
                made[id(tensor)] = (
                    torch.nn.Parameter(fresh, requires_grad=tensor.requires_grad)
                    if isinstance(tensor, torch.nn.Parameter)
                    else fresh
                )
                store[key] = made[id(tensor)]
    initialize(model, seed)


def initialize(model: nn.Module, seed: int, names: Collection[str] | None = None) -> None:
    """Run the model's ``_init_weights`` on each module (or those in ``names``) under its own seed.

    The global RNG state is restored afterwards, so a build does not shift what runs next.
    """
    import torch
    from transformers import PreTrainedModel
    from transformers import initialization as hf_init

    owners: dict[str, Any] = {}
    ordered = list(model.named_modules())
    for name, module in ordered:
        parent = owners[name.rpartition(".")[0]] if name else model
        owners[name] = module if isinstance(module, PreTrainedModel) else parent
    devices = {t.device for _, t in _named_tensors(model)}
    cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})
    with torch.random.fork_rng(devices=cuda), torch.no_grad(), hf_init.guard_torch_init_functions():
        for name, module in reversed(ordered):
            if names is None or name in names:
                torch.manual_seed(module_seed(seed, name))
                owners[name]._init_weights(module)


def _dispatch_map(placement: Mapping[str, str]) -> dict[str, int | str]:
    """accelerate's spelling: GPU numbers, ``cpu``."""
    return {
        name: (int(device.partition(":")[2] or 0) if device.startswith("cuda") else device)
        for name, device in placement.items()
    }


def settled_placement(model: nn.Module, placement: Mapping[str, str]) -> Placement:
    """``placement`` with each key moved to where its tensors actually are.

    A tied weight lives where its first name put it (the embeddings); the module holding its
    second name (an untied-looking ``lm_head``) must run there too, or its hook would move the
    inputs to a device its weight is not on.
    """
    settled = dict(placement)
    for key in placement:
        prefix = f"{key}." if key else ""
        found = {str(t.device) for name, t in _named_tensors(model) if name == key or name.startswith(prefix)}
        if len(found) == 1:
            settled[key] = found.pop()
    return settled


def build_placed(
    spec: LoadSpec, config: PretrainedConfig, dtype: torch.dtype, *, attn_implementation: str | None = None
) -> nn.Module:
    """The model of ``config`` with its weights on the devices ``spec.device_map`` asks for.

    ``model.hf_device_map`` holds the final placement (what ``from_pretrained`` would set).
    """
    import torch
    from accelerate import dispatch_model  # type: ignore[import-untyped]
    from transformers import AutoModelForImageTextToText

    assert spec.device_map is not None
    auto_class: Any = AutoModelForImageTextToText  # from_config is untyped
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with torch.device("meta"):
        model: nn.Module = auto_class.from_config(config, **kwargs)
    if isinstance(spec.device_map, str):
        limits = dict(spec.max_memory) if spec.max_memory is not None else None
        placement = strategy_placement(model, spec.device_map, limits, spec.path)
    else:
        placement = explicit_placement(model, spec.device_map, spec.path)
    materialize(model, placement, spec.seed)
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    final = settled_placement(model, placement)
    dispatch_model(model, device_map=_dispatch_map(final))
    object.__setattr__(model, "hf_device_map", final)  # what from_pretrained sets, with our spelling
    model.eval()
    return model


def model_placement(model: nn.Module) -> Placement:
    """Where a model's modules are: its ``hf_device_map`` when it has one, else ``{"": device}``
    of its first tensor (empty for a model without tensors)."""
    mapping = getattr(model, "hf_device_map", None)
    if isinstance(mapping, Mapping) and mapping:
        return {str(name): _canonical(device) for name, device in mapping.items()}
    for _, tensor in _named_tensors(model):
        return {"": str(tensor.device)}
    return {}


def layers_per_device(placement: Mapping[str, str]) -> dict[str, int]:
    """Decoder (and vision) layers placed on each device, counting ``*.layers.N`` entries."""
    counts: dict[str, int] = {}
    for name, device in placement.items():
        if _LAYER_RE.match(name):
            counts[device] = counts.get(device, 0) + 1
    return counts


def placement_summary(placement: Mapping[str, str]) -> str:
    """One line for manifests and logs: each device with its modules, layer runs collapsed
    (``cuda:0: model.language_model.layers.0-31, model.visual; cuda:1: ...``)."""
    by_device: dict[str, list[str]] = {}
    for name, device in placement.items():
        by_device.setdefault(device, []).append(name or "(all)")
    parts = []
    for device, names in by_device.items():
        parts.append(f"{device}: {', '.join(_collapse_layers(names))}")
    return "; ".join(parts)


def _collapse_layers(names: list[str]) -> list[str]:
    runs: dict[str, list[int]] = {}
    out: list[str] = []
    for name in names:
        match = _LAYER_RE.match(name)
        if match is None:
            out.append(name)
            continue
        stack = match.group("stack")
        if stack not in runs:
            runs[stack] = []
            out.append(stack)
        runs[stack].append(int(match.group("index")))
    result: list[str] = []
    for item in out:
        if item in runs:
            result.extend(f"{item}.{span}" for span in _spans(sorted(runs[item])))
        else:
            result.append(item)
    return result


def _spans(indices: list[int]) -> Iterator[str]:
    start = previous = indices[0]
    for index in indices[1:]:
        if index != previous + 1:
            yield str(start) if start == previous else f"{start}-{previous}"
            start = index
        previous = index
    yield str(start) if start == previous else f"{start}-{previous}"
