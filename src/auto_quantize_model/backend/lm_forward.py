"""Forward passes and losses over calibration batches, shared by AutoQuant and validation.

The loss only ever materialises logits at positions whose next token is a real caption token:
full-vocabulary fp32 logits for every padded position are what dominated peak memory in the
previous tool (batch x seq x 151,936 floats).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from auto_quantize_model.core.batching import IGNORE_INDEX

if TYPE_CHECKING:
    from auto_quantize_model.artifacts import LanguageModel
    from auto_quantize_model.core.batching import Columns


def as_tensors(columns: Columns) -> dict[str, torch.Tensor]:
    """A batch of plain rows (:mod:`~auto_quantize_model.core.batching`) as int64 CPU tensors."""
    return {key: torch.tensor(rows, dtype=torch.int64) for key, rows in columns.items()}


def input_device(decoder: nn.Module) -> torch.device:
    """Where a batch must go: the input embeddings' device (with ``device_map`` the model spans
    several), else the first parameter's, else the CPU."""
    embeddings = getattr(decoder, "get_input_embeddings", None)
    if callable(embeddings):
        with contextlib.suppress(Exception):
            weight = getattr(embeddings(), "weight", None)
            if isinstance(weight, torch.Tensor):
                return weight.device
    for param in decoder.parameters():
        return param.device
    return torch.device("cpu")


def module_device(module: nn.Module) -> torch.device | None:
    """Where ``module`` computes: its accelerate hook's execution device when it has one (a
    spread model), else its first parameter's; None for a module without parameters (a fake).

    lm_head chunks are moved here before the call, so a head on another GPU than the decoder's
    last layer works with or without accelerate's hooks.
    """
    hook = getattr(module, "_hf_hook", None)
    for candidate in (hook, *getattr(hook, "hooks", ())):
        device = getattr(candidate, "execution_device", None)
        if device is not None:
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    for param in module.parameters():
        return param.device
    return None


def to_head(hidden: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
    """``hidden`` on lm_head's device (no copy when it is there already)."""
    device = module_device(lm_head)
    return hidden if device is None else hidden.to(device)


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


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
    """Keyword arguments for the decoder; labels never go in (Qwen3VLTextModel ignores them).

    An image batch (:mod:`.vision_calib`) carries the decoder's inputs ready made: embeddings
    with the image features in place, and positions as Qwen3VLTextModel takes them with packing,
    ``[4, B, L]``: the text positions (restarting per sample, from which the packed-sequence
    mask is built) stacked on the three rotary ones. With gradients on, the embeddings enter as a
    leaf that requires a gradient: gradient scoring needs every layer's output gradient, and in
    text batches that path starts at the embedding weight, which the ready-made embeddings skip.
    """
    if "inputs_embeds" in batch:
        embeds = batch["inputs_embeds"]
        if torch.is_grad_enabled():
            embeds = embeds.detach().requires_grad_(True)
        return {
            "inputs_embeds": embeds,
            "position_ids": torch.cat((batch["position_ids"][None], batch["mrope_position_ids"]), dim=0),
            "visual_pos_masks": batch["visual_pos_masks"],
            "deepstack_visual_embeds": list(batch["deepstack_visual_embeds"].unbind(0)),
            "use_cache": False,
        }
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


def real_index(batch: dict[str, torch.Tensor], pad_id: int | None = None) -> torch.Tensor:
    """Flat indices of every real token of a batch, in row order, padding left out.

    Calibration must see these all, not only the positions with a next-token target: the last
    token of a caption predicts nothing in the batch, yet a deployed model computes every
    generated token from exactly that position, so an activation range fitted without it clips
    in service. An ``attention_mask`` (padded layout) says it directly. Packed rows carry none: a
    position is real when its label is (a caption's second token on), when the next position's
    label is (a caption's first token), or when it and the next both start a caption (a
    one-token caption); padding has ``IGNORE_INDEX`` labels and positions counting up from 0, so
    it never qualifies. A one-token caption in a row's last column looks like one token of
    padding; there its token decides (real unless it is ``pad_id``; without ``pad_id``, padding).
    """
    labels = batch["labels"]
    rows, length = labels.shape
    if "real_mask" in batch:  # image batches: image and prompt tokens have no label yet are real
        real = batch["real_mask"].to(labels.device) != 0
    elif "attention_mask" in batch:
        real = batch["attention_mask"].to(labels.device) != 0
    else:
        real = labels != IGNORE_INDEX
        if length > 1:
            real[:, :-1] |= labels[:, 1:] != IGNORE_INDEX
        if "position_ids" in batch:
            starts = batch["position_ids"].to(labels.device) == 0
            if length > 1:
                real[:, :-1] |= starts[:, :-1] & starts[:, 1:]
            if pad_id is not None:
                real[:, -1] |= starts[:, -1] & (batch["input_ids"][:, -1].to(labels.device) != pad_id)
    return torch.arange(rows * length, device=labels.device)[real.reshape(-1)]


def uses_flash_attention(decoder: nn.Module) -> bool:
    implementation = getattr(getattr(decoder, "config", None), "_attn_implementation", None)
    return isinstance(implementation, str) and "flash" in implementation


def decoder_hidden(decoder: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``last_hidden_state`` ``[B, L, H]`` of the decoder for a calibration batch.

    Packed rows rely on positions restarting at each caption to keep captions apart. sdpa and
    eager turn that into a block-diagonal mask for any number of rows, but flash attention (in
    transformers 5.x) only splits sequences by position when the batch is a single row, so with
    flash attention the rows are laid end to end as one row and the result is reshaped back.
    """
    inputs = model_inputs(batch)
    rows, length = batch["input_ids"].shape
    if rows > 1 and "attention_mask" not in batch and uses_flash_attention(decoder):
        inputs = one_row(inputs, rows * length)
    out = decoder(**inputs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    assert isinstance(hidden, torch.Tensor)
    return hidden.reshape(rows, length, hidden.shape[-1])


def one_row(inputs: dict[str, Any], positions: int) -> dict[str, Any]:
    """``inputs`` with a batch's rows laid end to end as one row (the flash-attention path).

    Samples in a row and rows alike are told apart by the text positions restarting at 0, so the
    result is the same; image features stay in order (row-major both ways).
    """
    flat = dict(inputs)
    for key in ("input_ids", "visual_pos_masks"):
        if key in flat:
            flat[key] = flat[key].reshape(1, positions)
    if "inputs_embeds" in flat:
        flat["inputs_embeds"] = flat["inputs_embeds"].reshape(1, positions, -1)
    if "position_ids" in flat:
        position_ids = flat["position_ids"]
        lead = position_ids.shape[:-2]
        flat["position_ids"] = position_ids.reshape(*lead, 1, positions)
    return flat


def selected_logits(decoder: nn.Module, lm_head: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits ``[N, vocab]`` at the N positions with a real next-token target, in row order."""
    hidden = decoder_hidden(decoder, batch)
    flat, _ = target_index(batch)
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat.to(hidden.device))
    logits = lm_head(to_head(picked, lm_head))
    assert isinstance(logits, torch.Tensor)
    return logits


def next_token_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy (fp32) of :func:`selected_logits` against the real next tokens."""
    _, targets = target_index(batch)
    return nn.functional.cross_entropy(logits.float(), targets.to(logits.device), reduction="mean")


HEAD_CHUNK_TOKENS = 256
"""Positions per lm_head chunk in calibration and gradient scoring.

Each lm_head call also materialises a fake-quantized copy of its weight (151,936 x 2,560 in
bf16, ~0.8 GB on Qwen3-VL-4B), so chunks trade a little time for peak memory: 256 positions keep
the logits, their fp32 copy and gradients under ~0.5 GB.
"""


def chunked_loss_backward(
    decoder: nn.Module,
    lm_head: nn.Module,
    batch: dict[str, torch.Tensor],
    normalizer: float,
    chunk_tokens: int | None = None,
) -> float:
    """Backward of ``sum(CE) / normalizer`` with lm_head run on a few positions at a time.

    The decoder runs forward and backward once; lm_head (and the loss) run per chunk of target
    positions against a detached copy of the hidden states, whose gradient is then sent through
    the decoder in one go. Rows of lm_head's output are independent, so per-chunk backward passes
    give exactly the gradients of the whole, while full-vocabulary logits exist for one chunk at a
    time. Returns the loss value.
    """
    hidden = decoder_hidden(decoder, batch)
    flat, targets = target_index(batch)
    picked = to_head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat.to(hidden.device)), lm_head)
    targets = targets.to(picked.device)
    detached = picked.detach().requires_grad_(True)
    step = chunk_tokens or HEAD_CHUNK_TOKENS
    total = 0.0
    for start in range(0, detached.shape[0], step):
        logits = lm_head(detached[start : start + step])
        assert isinstance(logits, torch.Tensor)
        chunk_targets = targets[start : start + step].to(logits.device)
        loss = nn.functional.cross_entropy(logits.float(), chunk_targets, reduction="sum") / normalizer
        torch.autograd.backward(loss)
        total += float(loss.detach())
    if detached.grad is not None and picked.requires_grad:
        torch.autograd.backward(picked, detached.grad)
    return total


def calibration_step_for(lm: LanguageModel, root: nn.Module) -> Any:
    """A forward for ModelOpt's calibration: every quantizer sees every real token, no logits are kept.

    Calibration only collects activation statistics, so lm_head runs chunk by chunk on every real
    position (:func:`real_index`: the last token of each caption too, which scoring skips for want
    of a target) and its outputs are dropped at once.
    """
    decoder_path, head_path = decoder_and_head(lm, root)
    pad_id = lm.pad_token_id

    def calibration_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
        decoder = model.get_submodule(decoder_path) if decoder_path else model
        head = model.get_submodule(head_path)
        hidden = decoder_hidden(decoder, batch)
        flat = real_index(batch, pad_id)
        picked = to_head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat.to(hidden.device)), head)
        for start in range(0, picked.shape[0], HEAD_CHUNK_TOKENS):
            head(picked[start : start + HEAD_CHUNK_TOKENS])

    return calibration_step


def decoder_and_head(lm: LanguageModel, root: nn.Module) -> tuple[str, str]:
    """Paths of decoder and lm_head inside ``root`` (a :class:`TextLM` or the full model)."""
    if isinstance(root, TextLM):
        return "decoder", "lm_head"
    return lm.prefix, lm.head_name


def forward_step_for(lm: LanguageModel, root: nn.Module) -> Any:
    """A ModelOpt ``forward_step`` that finds decoder and head inside whatever root it is given."""
    decoder_path, head_path = decoder_and_head(lm, root)

    def forward_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        decoder = model.get_submodule(decoder_path) if decoder_path else model
        return selected_logits(decoder, model.get_submodule(head_path), batch)

    return forward_step
