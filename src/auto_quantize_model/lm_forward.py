"""Forward passes and losses over calibration batches, shared by AutoQuant and validation.

The loss only ever materialises logits at positions whose next token is a real caption token:
full-vocabulary fp32 logits for every padded position are what dominated peak memory in the
previous tool (batch x seq x 151,936 floats).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from auto_quantize_model.artifacts import LanguageModel

IGNORE_INDEX = -100


class TextLM(nn.Module):
    """The decoder and lm_head under one root, so ModelOpt sees the LM and nothing else.

    Module names inside it are ``decoder.*`` and ``lm_head``; :func:`full_name` maps them back
    to the names they have in the full model.
    """

    def __init__(self, decoder: nn.Module, lm_head: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder
        self.lm_head = lm_head

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return selected_logits(self.decoder, self.lm_head, batch)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Keyword arguments for the decoder; labels never go in (Qwen3VLTextModel ignores them)."""
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
    if "attention_mask" in batch:
        kwargs["attention_mask"] = batch["attention_mask"]
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
    return kwargs


def target_index(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of positions that predict a real token, and those tokens.

    Position ``t`` predicts ``labels[t + 1]``; the last position of a row predicts nothing.
    """
    labels = batch["labels"]
    rows, length = labels.shape
    nxt = labels[:, 1:]
    keep = nxt != IGNORE_INDEX
    positions = torch.arange(length - 1, device=labels.device).expand(rows, -1)
    flat = (torch.arange(rows, device=labels.device)[:, None] * length + positions)[keep]
    return flat, nxt[keep]


def decoder_hidden(decoder: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = decoder(**model_inputs(batch))
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    assert isinstance(hidden, torch.Tensor)
    return hidden


def selected_logits(decoder: nn.Module, lm_head: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits ``[N, vocab]`` at the N positions with a real next-token target, in row order."""
    hidden = decoder_hidden(decoder, batch)
    flat, _ = target_index(batch)
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat.to(hidden.device))
    logits = lm_head(picked)
    assert isinstance(logits, torch.Tensor)
    return logits


def next_token_loss(
    logits: torch.Tensor, batch: dict[str, torch.Tensor], normalizer: float | None = None
) -> torch.Tensor:
    """Cross-entropy (fp32) of :func:`selected_logits` against the real next tokens.

    Without ``normalizer`` it is the batch mean. With one it is the batch's sum divided by that
    constant: AutoQuant's gradient score squares per-token gradients, so a per-batch mean would
    weigh a token by 1/(tokens in its batch)^2 and make scores depend on how captions were
    batched; a run-wide constant keeps every token's weight equal in every layout.
    """
    _, targets = target_index(batch)
    if normalizer is None:
        return nn.functional.cross_entropy(logits.float(), targets.to(logits.device), reduction="mean")
    total = nn.functional.cross_entropy(logits.float(), targets.to(logits.device), reduction="sum")
    return total / normalizer


def forward_step_for(lm: LanguageModel, root: nn.Module) -> Any:
    """A ModelOpt ``forward_step`` that finds decoder and head inside whatever root it is given."""
    if isinstance(root, TextLM):
        decoder_path, head_path = "decoder", "lm_head"
    else:
        decoder_path, head_path = lm.prefix, lm.head_name

    def forward_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        decoder = model.get_submodule(decoder_path) if decoder_path else model
        return selected_logits(decoder, model.get_submodule(head_path), batch)

    return forward_step
