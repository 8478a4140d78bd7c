"""Input statistics of chosen modules during a held-out pass: what the free proxies are made of.

Split from :mod:`auto_quantize_model.backend.measure` (which re-exports it) by job: that module
measures damage, this one only watches the baseline pass's inputs for
:mod:`auto_quantize_model.core.proxies`. No torch at module level.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from auto_quantize_model.core.proxies import ActivationStats


class ActivationRecorder:
    """Input statistics of chosen modules over the held-out captions' real tokens.

    Forward pre-hooks see each module's input; decoder inputs ``[rows, length, hidden]`` are
    cut to the real tokens with the batch's labels (padding carries ``IGNORE_INDEX``), the
    lm_head's inputs are already one row per position: the scored ones, then (a second call) each
    caption's last one, so it too sees every real token. Sums are float64 on the host.
    """

    def __init__(self, modules: Mapping[str, Sequence[nn.Module]]) -> None:
        self.modules = modules
        self.sums: dict[str, list[float]] = {}
        self.mask: torch.Tensor | None = None

    def batch(self, batch: dict[str, torch.Tensor]) -> None:
        from auto_quantize_model.core.batching import IGNORE_INDEX

        # image batches: image and prompt tokens are real without a label, and static scales see them
        self.mask = batch["real_mask"] != 0 if "real_mask" in batch else batch["labels"] != IGNORE_INDEX

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        handles = [
            module.register_forward_pre_hook(functools.partial(self._hook, name))
            for name, modules in self.modules.items()
            for module in modules
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, group: str, module: nn.Module, args: tuple[Any, ...]) -> None:
        import torch

        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.numel() == 0:
            return
        mask = self.mask
        if mask is not None and x.ndim == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            x = x[mask.to(x.device)]
        magnitude = x.detach().double().abs()
        sums = self.sums.setdefault(group, [0.0, 0.0, 0.0, 0.0])
        sums[0] = max(sums[0], float(magnitude.max()))
        sums[1] += float(magnitude.sum())
        sums[2] += float(magnitude.square().sum())
        sums[3] += magnitude.numel()

    def result(self) -> dict[str, ActivationStats]:
        from auto_quantize_model.core.proxies import ActivationStats

        return {
            name: ActivationStats(top, abs_sum, square_sum, int(count))
            for name, (top, abs_sum, square_sum, count) in self.sums.items()
        }
