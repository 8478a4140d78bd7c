"""Replaying the baseline pass's decoder-layer outputs, so a held-out pass runs only what changed.

Split from :mod:`auto_quantize_model.backend.measure` by job: that module measures, this one
only makes later passes cheaper (bit for bit the same results), and it is the one place that
decides how much memory such a record may take (:data:`LAYER_CACHE_SHARE`, which the KL
reference of :class:`~auto_quantize_model.backend.measure.Reference` obeys too). No torch at
module level.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger("auto_quantize_model")


LAYER_CACHE_SHARE = 0.25
"""Share of a device's free memory (host: ``MemAvailable``) the layer cache may take there."""


def free_bytes(device: torch.device) -> int:
    """Memory free for new tensors on ``device`` now; 0 where it cannot be told (no cache there)."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return 0
    meminfo = Path("/proc/meminfo")
    with contextlib.suppress(OSError, ValueError, IndexError), meminfo.open(encoding="ascii") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(AttributeError, ValueError, OSError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return 0


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _tensors(item)


def _cloned(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple | list):
        return type(value)(_cloned(item) for item in value)
    return value


class LayerCache:
    """Every decoder layer's output on every held-out batch of the baseline pass, for replay.

    With one group quantized, the decoder layers before the group's layer compute exactly what
    they computed in the baseline pass (same weights, same inputs, every other group on NONE), so
    a pass can take the baseline's output of the layer just before and run only from the group's
    layer on. Replayed layers get their ``forward`` swapped for one returning the recorded output,
    so the decoder's own forward still builds masks, positions and rotary embeddings and calls
    each layer as it always does: nothing about a layer's arguments is re-derived here. Each
    replayed output is a fresh copy, so a layer that works in place on its input cannot spoil
    the record.

    Costs layers x held-out positions (padding included) x hidden x element bytes, about 60 MB
    for SmolLM2-135M on 64 captions; recording stops and the cache stays empty once it would take
    more than :data:`LAYER_CACHE_SHARE` of the free memory of a device it lives on, and every pass
    then runs the whole decoder. Not a frozen value: it is filled by one pass and read by later
    ones, and only while :func:`~auto_quantize_model.backend.measure.measure_mixes` runs.
    """

    def __init__(self, decoder: nn.Module, lm_head: nn.Module) -> None:
        from torch import nn

        layers = getattr(decoder, "layers", None)
        self.layers: tuple[nn.Module, ...] = tuple(layers) if isinstance(layers, nn.ModuleList) else ()
        self.layer_of = {id(m): index for index, layer in enumerate(self.layers) for m in layer.modules()}
        """Module ``id`` -> index of the decoder layer holding it."""
        self.head = {id(m) for m in lm_head.modules()}
        self.outputs: list[list[Any]] = []
        """``[batch][layer]``: what each layer returned in the recorded pass."""
        self.off = "" if self.layers else "the decoder has no ``layers`` list"
        """Why the cache is not used (empty while it is)."""

    @property
    def ready(self) -> bool:
        return not self.off and bool(self.outputs) and all(len(o) == len(self.layers) for o in self.outputs)

    def clear(self) -> None:
        self.outputs = []

    def start(self, modules: Sequence[nn.Module]) -> int:
        """The first layer a pass must run when ``modules`` differ from the recorded pass.

        A module inside decoder layer ``i`` gives ``i``; the lm_head alone gives the number of
        layers (every layer replayed); anything else (embeddings, final norm, a module outside
        decoder and head) gives 0, the whole decoder.
        """
        first = len(self.layers)
        for module in modules:
            key = id(module)
            if key in self.layer_of:
                first = min(first, self.layer_of[key])
            elif key not in self.head:
                return 0
        return first

    @contextlib.contextmanager
    def recording(self, batches: int) -> Iterator[Callable[[int], None]]:
        """Record every layer's output during one pass; yields the callback that names the batch."""
        self.clear()
        if self.off:
            yield lambda index: None
            return
        outputs: list[list[Any]] = [[] for _ in range(batches)]
        current = [0]
        used: dict[torch.device, int] = {}
        allowed: dict[torch.device, int] = {}

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if self.off:
                return
            for tensor in _tensors(output):
                device = tensor.device
                if device not in allowed:
                    allowed[device] = int(free_bytes(device) * LAYER_CACHE_SHARE)
                used[device] = used.get(device, 0) + tensor.numel() * tensor.element_size()
                if used[device] > allowed[device]:
                    self.off = (
                        f"the layer outputs would take more than {allowed[device] / 2**20:.0f} MiB on "
                        f"{device} ({LAYER_CACHE_SHARE:.0%} of its free memory)"
                    )
                    outputs.clear()
                    log.info("held-out layer cache off: %s; every pass runs the whole decoder", self.off)
                    return
            outputs[current[0]].append(_cloned(output))

        def batch(index: int) -> None:
            current[0] = index

        handles = [layer.register_forward_hook(hook) for layer in self.layers]
        try:
            yield batch
        finally:
            for handle in handles:
                handle.remove()
        if not self.off:
            self.outputs = outputs
            if not self.ready:
                self.off = "a decoder layer did not run exactly once per held-out batch"
                self.clear()

    @contextlib.contextmanager
    def replaying(self, start: int) -> Iterator[Callable[[int], None]]:
        """Layers before ``start`` return their recorded output; yields the callback naming the batch."""
        current = [0]
        replayed = self.layers[:start] if self.ready else ()
        saved = [layer.__dict__.get("forward") for layer in replayed]

        def replay(index: int) -> Callable[..., Any]:
            return lambda *args, **kwargs: _cloned(self.outputs[current[0]][index])

        def batch(index: int) -> None:
            current[0] = index

        try:
            for index, layer in enumerate(replayed):
                layer.forward = replay(index)
            yield batch
        finally:
            for layer, forward in zip(replayed, saved, strict=True):
                if forward is None:
                    layer.__dict__.pop("forward", None)
                else:
                    layer.forward = forward
