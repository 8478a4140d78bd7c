"""Counting which experts the calibration tokens are routed to: forward hooks on the MoE routers.

An expert's AutoQuant score grows with the tokens its router sent it while scoring, so an
expert that saw three tokens has a score at noise level: the report and the solver need to know
how many it saw. The count is taken from the router's own top-k choice, over real tokens only
(padding rows of a packed batch and the padded layout's padding never count), once per
calibration batch.

Two hooks cooperate. A forward pre-hook on the decoder recognises the calibration batch being
run (by the storage of its ``input_ids``; a flash-attention reshape keeps that storage) and
arms the real-token mask of that batch; a forward hook on each router takes its top-k experts
and counts the masked tokens. Each router counts each batch once, so the repeated passes of
ModelOpt's calibration (one per format), its scoring passes and gradient checkpointing's
recomputations add nothing: the first pass over the batches is the one counted, and ModelOpt's
calibration runs it with every quantizer collecting statistics, not quantizing, so the routing
is the unquantized model's.

torch is imported at the top: only stages that hold a model import this module.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from auto_quantize_model.artifacts import LanguageModel, LayerRouting, RoutingStats
from auto_quantize_model.backend.experts import expert_layers
from auto_quantize_model.backend.lm_forward import decoder_hidden, real_index

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")

BatchKey = tuple[int, int]
"""(data pointer, element count) of a batch's ``input_ids``: what identifies it inside the decoder."""


def _key(input_ids: torch.Tensor) -> BatchKey:
    return (int(input_ids.data_ptr()), int(input_ids.numel()))


def top_k_experts(output: Any, top_k: int) -> torch.Tensor:
    """The experts each token is sent to, ``[tokens, top_k]``, from what a router returned.

    transformers 5 routers return ``(logits, weights, indices)``; the experts' own choice is the
    indices (their first ``top_k`` columns, in case a caller widened the router for calibration).
    A plain linear router returns logits, whose top-k is the choice.
    """
    if isinstance(output, tuple) and len(output) >= 3 and not torch.is_floating_point(output[2]):
        indices: torch.Tensor = output[2]
        return indices.reshape(-1, indices.shape[-1])[:, :top_k]
    logits = output[0] if isinstance(output, tuple) else output
    logits = logits.reshape(-1, logits.shape[-1])
    chosen: torch.Tensor = torch.topk(logits.float(), top_k, dim=-1).indices
    return chosen


class _Layer:
    """One router's counts (mutable while counting)."""

    def __init__(self, layer: int, name: str, top_k: int, num_experts: int) -> None:
        self.layer = layer
        self.name = name
        self.top_k = top_k
        self.tokens = torch.zeros(num_experts, dtype=torch.long)
        self.counted: set[BatchKey] = set()


class RoutingCounter:
    """Counts routed tokens per expert while installed (:meth:`installed`), one batch at a time.

    Mutable on purpose: it lives for one stage call. ``batches`` are the calibration batches
    exactly as the decoder will be called with them (on the model's device).
    """

    def __init__(
        self,
        decoder: nn.Module,
        routers: Sequence[tuple[int, str, nn.Module, int, int]],
        batches: Sequence[dict[str, torch.Tensor]],
        pad_id: int | None,
    ) -> None:
        """``routers``: (layer, experts name, router module, top_k, number of experts) each."""
        self._decoder = decoder
        self._routers = [(module, _Layer(layer, name, top_k, n)) for layer, name, module, top_k, n in routers]
        self._masks: dict[BatchKey, torch.Tensor] = {}
        self._real = 0
        for batch in batches:
            flat = real_index(batch, pad_id)
            mask = torch.zeros(batch["input_ids"].numel(), dtype=torch.bool, device=flat.device)
            mask[flat] = True
            self._masks[_key(batch["input_ids"])] = mask
            self._real += int(flat.numel())
        self._current: tuple[BatchKey, torch.Tensor] | None = None
        self.mismatched = 0
        """Router calls whose token count did not match the armed batch (not counted)."""

    @classmethod
    def for_lm(cls, lm: LanguageModel, batches: Sequence[dict[str, torch.Tensor]]) -> RoutingCounter | None:
        """A counter for every MoE layer of ``lm`` with a router; None for a dense model."""
        if not lm.experts:
            return None
        routers = set(lm.routers)
        found = []
        for index, layer in enumerate(expert_layers(lm.full_model)):
            router = layer.name.rsplit(".", 1)[0] + ".gate"
            if layer.name not in lm.experts or router not in routers:
                continue
            module = lm.full_model.get_submodule(router)
            top_k = layer.top_k if layer.top_k is not None else getattr(module, "top_k", None)
            if not isinstance(top_k, int):
                continue
            match = _LAYER.search(layer.name + ".")
            number = int(match.group(1)) if match else index
            found.append((number, layer.name, module, top_k, layer.num_experts))
        if not found:
            return None
        return cls(lm.module, found, batches, lm.pad_token_id)

    def _arm(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._current = None
        if isinstance(input_ids, torch.Tensor):
            key = _key(input_ids)
            mask = self._masks.get(key)
            if mask is not None:
                self._current = (key, mask)

    def _count(self, layer: _Layer, output: Any) -> None:
        if self._current is None:
            return
        key, mask = self._current
        if key in layer.counted:
            return
        with torch.no_grad():
            chosen = top_k_experts(output, layer.top_k)
            if chosen.shape[0] != mask.shape[0]:
                self.mismatched += 1
                return
            real = chosen[mask.to(chosen.device)].reshape(-1)
            counts = torch.bincount(real, minlength=len(layer.tokens))
            layer.tokens += counts.cpu()
        layer.counted.add(key)

    def _hook_for(self, layer: _Layer) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self._count(layer, output)

        return hook

    @contextmanager
    def installed(self) -> Iterator[RoutingCounter]:
        """The hooks in place for the ``with`` block, removed afterwards whatever happens."""
        handles = [self._decoder.register_forward_pre_hook(self._arm, with_kwargs=True)]
        for module, layer in self._routers:
            handles.append(module.register_forward_hook(self._hook_for(layer)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._current = None

    def count_now(self, batches: Sequence[dict[str, torch.Tensor]]) -> None:
        """Run the decoder over ``batches`` (no gradients) with the hooks in place: a pass of its own,
        for when no calibration pass will run (a search restored from its saved state)."""
        with self.installed(), torch.no_grad():
            for batch in batches:
                decoder_hidden(self._decoder, batch)

    @property
    def complete(self) -> bool:
        """Every router counted every calibration batch."""
        return all(len(layer.counted) == len(self._masks) for _, layer in self._routers)

    def stats(self) -> RoutingStats | None:
        """The counts, or None unless every router counted every batch (a partial count would pass
        for a small one)."""
        if not self.complete:
            return None
        layers = sorted((layer for _, layer in self._routers), key=lambda layer: layer.layer)
        return RoutingStats(
            real_tokens=self._real,
            batches=len(self._masks),
            layers=tuple(
                LayerRouting(
                    layer.layer, layer.name, layer.top_k, tuple(int(v) for v in layer.tokens.tolist())
                )
                for layer in layers
            ),
        )
