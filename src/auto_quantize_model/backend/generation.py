"""Greedy continuations of held-out captions: the generation check of validation and the frontier.

What the agreement between two models' continuations means is
:mod:`auto_quantize_model.core.last_position`; this module only generates. No KV cache: every
step runs the decoder over the whole prompt and what was generated so far, through the same
forward as the held-out passes (:func:`~auto_quantize_model.backend.lm_forward.decoder_hidden`),
so a quantized model computes each step exactly as it computes a held-out position. Captions
are short (tens of tokens) and the continuations a few tokens, so recomputing costs little, and
nothing of a cache's own numerics (or ModelOpt's handling of it) enters the comparison.

Rows are right-padded, one prompt per row, positions counting from 0 as in the held-out batches:
causal attention keeps the padding after a row's last token out of every real position, so no
attention mask is needed and each row is generated as if it were alone. No torch at module level.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs

from auto_quantize_model.core.batching import ROWS_PER_BATCH

if TYPE_CHECKING:
    import torch
    from torch import nn

    from auto_quantize_model.core.last_position import Continuations


@attrs.frozen
class Greedy:
    """Continue each prompt by ``steps`` tokens, each the model's most likely next token."""

    prompts: tuple[tuple[int, ...], ...]
    steps: int
    pad_id: int
    rows: int = ROWS_PER_BATCH
    """Prompts per forward call."""

    def __attrs_post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if any(not prompt for prompt in self.prompts):
            raise ValueError("every prompt needs at least one token")

    def run(self, decoder: nn.Module, lm_head: nn.Module, device: torch.device) -> Continuations:
        """The continuation of every prompt, in prompt order; the model is only read."""
        import torch

        found: dict[int, tuple[int, ...]] = {}
        order = sorted(range(len(self.prompts)), key=lambda i: (len(self.prompts[i]), i))
        with torch.inference_mode():
            for start in range(0, len(order), self.rows):
                chunk = order[start : start + self.rows]
                tokens = self._continue([self.prompts[i] for i in chunk], decoder, lm_head, device)
                found.update(zip(chunk, tokens, strict=True))
        return tuple(found[i] for i in range(len(self.prompts)))

    def _continue(
        self, prompts: Sequence[tuple[int, ...]], decoder: nn.Module, lm_head: nn.Module, device: torch.device
    ) -> list[tuple[int, ...]]:
        import torch

        from auto_quantize_model.backend.lm_forward import decoder_hidden, to_head

        rows = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
        # the last generated token is never fed back, hence one column fewer than steps
        width = int(lengths.max()) + self.steps - 1
        ids = torch.full((rows, width), self.pad_id, dtype=torch.int64)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.int64)
        ids, lengths = ids.to(device), lengths.to(device)
        every_row = torch.arange(rows, device=device)
        generated: list[torch.Tensor] = []
        for step in range(self.steps):
            span = int(lengths.max())
            batch = {
                "input_ids": ids[:, :span],
                "position_ids": torch.arange(span, device=device).repeat(rows, 1),
            }
            hidden = decoder_hidden(decoder, batch)
            last = hidden[every_row.to(hidden.device), (lengths - 1).to(hidden.device)]
            logits = lm_head(to_head(last, lm_head))
            token = logits.argmax(-1).to(device)
            generated.append(token.cpu())
            if step < self.steps - 1:
                ids[every_row, lengths] = token
                lengths = lengths + 1
        table = torch.stack(generated, dim=1).tolist()
        return [tuple(int(t) for t in row) for row in table]
