"""ModelOpt's per-module FSDP lookup answered at once for a model that holds no FSDP module.

Before touching a module's weight (weight-only calibration, every recipe's weight quantization),
ModelOpt 0.47 asks ``_get_enclosing_fsdp_module(module, root)`` whether an FSDP2 shard owns it.
That first finds the module's name by scanning every ``(name, module)`` pair of the root
(``_get_module_name``, ``utils/core_utils.py``): linear in the model's size, once per module, so
quadratic in all. With ``extract.experts = "expert"`` a Qwen3-VL-MoE has one linear layer per
expert and projection: on a 12-layer, 128-expert model on CPU the scans took 10.6 s of a 125 s
profiled search, growing with the square of the layer count; on 30B-A3B's layout (48 layers) the
search took 359 s before and 211 s after this patch (BENCHMARKS.md, sixth wave).

The answer is knowable once: a model with no ``FSDPModule`` anywhere (aqm never shards with FSDP)
has no module inside an FSDP shard, so the lookup is ``None`` for every module of that root. While
:func:`fsdp_lookup_skipped` lasts, the lookup for that root answers so at once; any other root, or
a root that is itself FSDP, goes to ModelOpt's own lookup, as does every call once the context
ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import attrs

from auto_quantize_model.backend.modelopt.patches import swapped

if TYPE_CHECKING:
    from torch import nn


@attrs.define
class LookupCounts:
    """Lookups answered at once and passed to ModelOpt (mutable: filled while the patch lasts)."""

    skipped: int = 0
    passed: int = 0


@contextlib.contextmanager
def fsdp_lookup_skipped(root: nn.Module) -> Iterator[LookupCounts]:
    """ModelOpt's FSDP lookup answers ``None`` at once for ``root`` when it holds no FSDP module.

    Undo: ``_get_enclosing_fsdp_module`` of ModelOpt's ``core_utils`` is put back on exit, whatever
    happened. A root that holds an FSDP module is left to ModelOpt entirely (nothing is patched).
    """
    from modelopt.torch.quantization.utils import core_utils
    from torch.distributed.fsdp import FSDPModule

    counts = LookupCounts()
    if any(isinstance(module, FSDPModule) for module in root.modules()):
        yield counts
        return
    original: Callable[..., Any] = core_utils._get_enclosing_fsdp_module

    def enclosing_fsdp_module(module: nn.Module, root_model: nn.Module, name_to_module: Any = None) -> Any:
        if root_model is root and not isinstance(module, FSDPModule):
            counts.skipped += 1
            return None
        counts.passed += 1
        return original(module, root_model, name_to_module)

    with swapped(core_utils, "_get_enclosing_fsdp_module", enclosing_fsdp_module):
        yield counts
