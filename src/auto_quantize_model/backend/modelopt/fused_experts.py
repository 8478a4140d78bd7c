"""What the two fused-experts patches read alike: ModelOpt's per-expert quantizer lists and reason tallies.

ModelOpt 0.47 hangs one ``TensorQuantizer`` per expert and projection on a fused experts module
(``_QuantFusedExperts``) in an ``nn.ModuleList`` per projection. :mod:`.batched_experts` checks
those lists before running its grouped forward and :mod:`.quantizer_setup` shortens and refills
them; both walk them here, so a layout ModelOpt adds (another list name) is taught to both at
once. Both also tally why they left work to ModelOpt, and report the tally in one wording.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

GATED_LISTS = ("gate_up_proj_weight_quantizers", "down_proj_weight_quantizers")
"""The lists of gated experts (``gate_up_proj`` then ``down_proj``), the only layout batched."""
QUANTIZER_LISTS = (GATED_LISTS[0], "up_proj_weight_quantizers", GATED_LISTS[1])
"""Every per-expert quantizer list ModelOpt gives fused experts, gated and non-gated layouts."""


def quantizer_lists(module: Any, names: Sequence[str] = QUANTIZER_LISTS) -> Iterator[tuple[str, Any]]:
    """``(name, list)`` for each of ``names`` that ``module`` holds, in the order of ``names``.

    A layout without some list (non-gated experts have no ``gate_up_proj``) simply yields fewer;
    callers that need every one of ``names`` compare how many came back.
    """
    for name in names:
        members = getattr(module, name, None)
        if members is not None:
            yield name, members


def by_reason(tally: Mapping[str, int], template: str = "{}") -> str:
    """``reason: count, ...`` in reason order (stable, so logs compare) put in ``template``.

    An empty tally gives ``""``, not an empty template: a summary only explains what happened.
    """
    if not tally:
        return ""
    return template.format(", ".join(f"{reason}: {count}" for reason, count in sorted(tally.items())))
