"""How captions become batches: the packed and padded calibration layouts and held-out rows.

``padded`` is what the previous tool did: one caption per row, right-padded to ``seq_len``, an
``attention_mask`` hiding the padding. With ~12-token captions and ``seq_len`` 512 that is ~98%
padding, and every step costs about the same whatever it holds.

``packed`` (the default) keeps only real tokens: captions are laid end to end into rows of at most
``seq_len`` tokens (greedily, in file order, never splitting a caption), and rows are padded only to
the longest row of their batch. Each caption must still be seen exactly as if it were alone:

* ``position_ids`` restart at 0 for every caption, so rotary embeddings see the same positions;
* no attention crosses a caption boundary. No ``attention_mask`` is passed: with
  ``attention_mask=None`` and no KV cache, transformers (5.x ``masking_utils.create_causal_mask``
  via ``find_packed_sequence_indices``) starts a new sequence wherever ``position_ids`` do not
  step by +1 and builds a block-diagonal causal mask for ``sdpa`` and ``eager`` (and flex).
  ``tests/test_packing_isolation.py`` proves it on a tiny Qwen3-VL text model for ``sdpa`` and
  ``eager``: per-caption logits and losses match single-caption runs to 1e-5, and the test fails
  (its negative control shows by how much) if that detection ever goes away;
* no loss crosses a boundary: ``labels`` hold -100 at the first token of every caption (the last
  token of the previous caption must not be scored on predicting it) and at padding;
* row padding gets positions 0, 1, ... of its own, which never continue a caption's positions,
  so padding forms its own segment and real tokens never attend to it.

Flash attention takes another path: transformers' flash-attention mask is ``None`` (the
block-diagonal mask above is dropped) and it only derives varlen ``cu_seqlens`` from restarting
``position_ids`` when the batch has a single row. Packed batches with several rows would let
captions of a row attend to each other under ``flash_attention_2``; run it with ``batch_size=1``
(or flatten a batch's rows into one) if you choose that implementation.

Captions are tokenised without special tokens: a caption is plain text, not a chat turn or a
document. (Qwen tokenizers add nothing anyway; others would add a BOS to every caption.)

Everything here is pure: batches are plain lists of ints (:data:`Columns`), so the rules can be
tested without torch; the stage turns them into int64 tensors
(:func:`auto_quantize_model.backend.lm_forward.as_tensors`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from auto_quantize_model.artifacts import CalibStats, ImageMix
from auto_quantize_model.errors import ConfigError, InputError
from auto_quantize_model.specs import CalibSpec

IGNORE_INDEX = -100
"""Label value that no loss is computed for (Hugging Face's convention)."""
LAYOUTS = ("packed", "padded")
ROWS_PER_BATCH = 16
"""Held-out captions per forward pass; one caption per row, so the batch is short and cheap."""

Columns = dict[str, list[list[int]]]
"""One batch as plain data: column name (``input_ids``, ``labels``, ...) -> rows of ints."""

PADDED_COLUMNS = 4
"""``input_ids``, ``attention_mask``, ``position_ids`` and ``labels``: int64 each."""
INT64_BYTES = 8
LIST_BYTES_PER_POSITION = 60
"""What building a padded position costs in Python lists before it becomes a tensor: a pointer
per column (4 x 8 bytes) plus the int object of its position id (28 bytes above 256)."""


# --------------------------------------------------------------------------- tokens


def encode(tokenizer: Any, captions: Sequence[str]) -> list[list[int]]:
    """Token ids of each caption, without special tokens (see the module docstring)."""
    encoded = tokenizer(list(captions), add_special_tokens=False)["input_ids"]
    token_lists = [[int(t) for t in ids] for ids in encoded]
    if len(token_lists) != len(captions):
        raise ValueError(f"tokenizer returned {len(token_lists)} sequences for {len(captions)} captions")
    return token_lists


def tokenize_captions(tokenizer: Any, captions: Sequence[str]) -> list[list[int]]:
    """Calibration's token ids: every caption must give at least one token (it was asked for)."""
    token_lists = encode(tokenizer, captions)
    for index, ids in enumerate(token_lists):
        if not ids:
            raise InputError(f"caption #{index + 1} ({captions[index][:40]!r}) gives no tokens")
    return token_lists


def scorable(token_lists: Sequence[Sequence[int]], max_len: int) -> list[list[int]]:
    """Held-out token ids cut to ``max_len``; captions of fewer than 2 tokens predict nothing and
    are dropped (the caller reports how many)."""
    return [list(ids[:max_len]) for ids in token_lists if len(ids[:max_len]) >= 2]


def pad_token_id(tokenizer: Any, config: Any = None) -> int:
    """The one pad id of a model: the tokenizer's pad token, else the (text) config's, else EOS.

    Calibration rows, held-out rows and the scoring-only label limits all pad with it. Its value
    never reaches a loss or a real token's attention; in the padded layout it does feed
    activation-range calibration, as it did in the previous tool, so a model that defines
    neither a pad nor an EOS token is refused rather than padded with an arbitrary id.
    """
    candidates: list[Any] = [getattr(tokenizer, "pad_token_id", None)]
    if config is not None:
        get_text_config = getattr(config, "get_text_config", None)
        text_config = get_text_config() if callable(get_text_config) else None
        candidates += [getattr(text_config, "pad_token_id", None), getattr(config, "pad_token_id", None)]
    candidates.append(getattr(tokenizer, "eos_token_id", None))
    for value in candidates:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, list | tuple) and value and isinstance(value[0], int):
            return int(value[0])
    raise InputError(
        "neither the tokenizer nor the model config defines a pad or eos token; "
        "set pad_token in tokenizer_config.json"
    )


def truncate(token_lists: Sequence[Sequence[int]], seq_len: int) -> tuple[list[list[int]], int]:
    """Captions cut to ``seq_len`` tokens, and how many had to be cut."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be > 0, got {seq_len}")
    cut = sum(1 for ids in token_lists if len(ids) > seq_len)
    return [list(ids[:seq_len]) for ids in token_lists], cut


def _check_lengths(token_lists: Sequence[Sequence[int]], seq_len: int) -> None:
    for index, ids in enumerate(token_lists):
        if not 0 < len(ids) <= seq_len:
            raise ValueError(f"caption {index} has {len(ids)} tokens; expected 1..{seq_len} (truncate first)")


# --------------------------------------------------------------------------- batching


def pack_rows(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Caption indices per row: greedy, in order, a caption never split, at most ``seq_len`` tokens a row.

    Greedy in order (not best-fit) keeps the data order, so the first N captions of a run are the
    first N of the file in every layout; with short captions the rows come out nearly full anyway.
    """
    rows: list[list[int]] = []
    used = seq_len
    for index, length in enumerate(lengths):
        if not 0 < length <= seq_len:
            raise ValueError(f"caption {index} has {length} tokens; expected 1..{seq_len} (truncate first)")
        if used + length > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(index)
        used += length
    return rows


def packed_columns(
    token_lists: Sequence[Sequence[int]], seq_len: int, batch_size: int, pad_id: int
) -> tuple[list[Columns], list[int]]:
    """Packed batches (``input_ids``, ``position_ids``, ``labels``) and the captions in each.

    See the module docstring for why there is no ``attention_mask``.
    """
    _check_lengths(token_lists, seq_len)
    rows = pack_rows([len(ids) for ids in token_lists], seq_len)
    batches: list[Columns] = []
    counts: list[int] = []
    for start in range(0, len(rows), batch_size):
        group = rows[start : start + batch_size]
        built: list[tuple[list[int], list[int], list[int]]] = []
        for row in group:
            ids: list[int] = []
            pos: list[int] = []
            labels: list[int] = []
            for index in row:
                caption = list(token_lists[index])
                ids += caption
                pos += range(len(caption))
                labels += [IGNORE_INDEX, *caption[1:]]
            built.append((ids, pos, labels))
        width = max(len(ids) for ids, _, _ in built)
        columns: Columns = {"input_ids": [], "position_ids": [], "labels": []}
        for ids, pos, labels in built:
            pad = width - len(ids)
            columns["input_ids"].append(ids + [pad_id] * pad)
            columns["position_ids"].append(pos + list(range(pad)))
            columns["labels"].append(labels + [IGNORE_INDEX] * pad)
        batches.append(columns)
        counts.append(sum(len(row) for row in group))
    return batches, counts


def padded_columns(
    token_lists: Sequence[Sequence[int]], seq_len: int, batch_size: int, pad_id: int
) -> tuple[list[Columns], list[int]]:
    """One caption per row, right-padded to ``seq_len`` (the previous tool's layout).

    ``position_ids`` are ``0..seq_len-1`` for the whole row: real tokens get ``0..n-1`` and padding
    simply continues, which is what the model computes itself when given no ``position_ids`` (the
    previous tool's behaviour). Padding is hidden from real tokens by the ``attention_mask`` and,
    with right padding, no query row is ever fully masked.
    """
    _check_lengths(token_lists, seq_len)
    batches: list[Columns] = []
    counts: list[int] = []
    for start in range(0, len(token_lists), batch_size):
        group = token_lists[start : start + batch_size]
        columns: Columns = {"input_ids": [], "attention_mask": [], "position_ids": [], "labels": []}
        for caption in group:
            real = list(caption)
            pad = seq_len - len(real)
            columns["input_ids"].append(real + [pad_id] * pad)
            columns["attention_mask"].append([1] * len(real) + [0] * pad)
            columns["position_ids"].append(list(range(seq_len)))
            columns["labels"].append(real + [IGNORE_INDEX] * pad)
        batches.append(columns)
        counts.append(len(group))
    return batches, counts


def holdout_columns(
    token_lists: Sequence[Sequence[int]], pad_id: int, rows: int = ROWS_PER_BATCH
) -> list[Columns]:
    """Held-out batches: one caption per row, right-padded, every token of it scored.

    Padding sits after the caption, so causal attention keeps it out of every real position
    (no attention mask needed) and its ``IGNORE_INDEX`` labels keep it out of the loss. Captions
    are grouped by length to keep padding small; the mean loss does not depend on the order.
    """
    order = sorted(range(len(token_lists)), key=lambda i: (len(token_lists[i]), i))
    batches: list[Columns] = []
    for start in range(0, len(order), rows):
        chunk = [list(token_lists[i]) for i in order[start : start + rows]]
        length = max(len(ids) for ids in chunk)
        batches.append(
            {
                "input_ids": [ids + [pad_id] * (length - len(ids)) for ids in chunk],
                "position_ids": [list(range(length)) for _ in chunk],
                "labels": [ids + [IGNORE_INDEX] * (length - len(ids)) for ids in chunk],
            }
        )
    return batches


# --------------------------------------------------------------------------- checks


def check_calib_spec(spec: CalibSpec) -> None:
    """A known layout, before any file is read (the numbers are checked by :class:`CalibSpec`
    itself; a ``Literal`` is only checked where a pipeline file is read)."""
    if spec.layout not in LAYOUTS:
        raise ConfigError(f"calib.layout: unknown layout {spec.layout!r} (known: {', '.join(LAYOUTS)})")


@attrs.frozen
class MemoryBudget:
    """What the padded layout may use, and what its activations scale with (read off the model)."""

    host_bytes: int
    """Host memory this process may still take: the batches are built and kept here."""
    device_bytes: int
    """Memory of the device the model runs on (``host_bytes`` on CPU)."""
    host_limit: str | None = None
    """What sets ``host_bytes`` (``MemAvailable``, a cgroup's ``memory.max``), named in the
    message; None: the machine's memory as such."""
    hidden_size: int | None = None
    layers: int | None = None
    element_bytes: int = 2
    """Bytes per activation element (2 for bfloat16/float16, 4 for float32)."""


@attrs.frozen
class PaddedMemory:
    """Rough memory of padded calibration: a lower bound, so refusing on it never refuses a run
    that could fit."""

    batches: int
    """The int64 batches: samples x seq_len positions x 4 columns x 8 bytes."""
    building: int
    """Python lists alive while those batches are built, on top of them."""
    activations: int
    """One batch through the model: the hidden states every layer keeps for the backward pass,
    plus the boolean ``[batch, seq_len, seq_len]`` mask the padding mask is expanded to."""
    mask: int


def padded_memory(samples: int, spec: CalibSpec, budget: MemoryBudget) -> PaddedMemory:
    positions = samples * spec.seq_len
    rows = min(spec.batch_size, samples)
    mask = rows * spec.seq_len * spec.seq_len
    hidden = rows * spec.seq_len * (budget.hidden_size or 0) * (budget.layers or 0) * budget.element_bytes
    return PaddedMemory(
        batches=positions * PADDED_COLUMNS * INT64_BYTES,
        building=positions * LIST_BYTES_PER_POSITION,
        activations=hidden + mask,
        mask=mask,
    )


def byte_text(count: float) -> str:
    """``1.5 GiB``: binary units, three significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if count < 1024 or unit == "PiB":
            return f"{count:.3g} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _host_text(budget: MemoryBudget) -> str:
    if budget.host_limit is None:
        return f"this machine's {byte_text(budget.host_bytes)} of memory"
    return f"the {byte_text(budget.host_bytes)} of memory this process may still take ({budget.host_limit})"


def check_padded_memory(samples: int, longest: int, spec: CalibSpec, budget: MemoryBudget) -> None:
    """Refuse a padded calibration that cannot fit before a single row is built.

    Every padded caption costs ``seq_len`` positions whatever its length, so a typo'd
    ``seq_len`` (10**7) would otherwise fill the machine's memory in Python lists and die there,
    or reach the GPU and fail on the attention mask. ``longest`` (tokens of the longest caption)
    is the ``seq_len`` the message suggests.
    """
    if spec.layout != "padded":
        return
    need = padded_memory(samples, spec, budget)
    host_over = need.batches + need.building > budget.host_bytes
    device_over = need.activations > budget.device_bytes
    if not (host_over or device_over):
        return
    rows = min(spec.batch_size, samples)
    dims = (
        f"hidden states of {budget.layers} layers x {budget.hidden_size} in {budget.element_bytes}-byte "
        "elements plus "
        if budget.hidden_size and budget.layers
        else ""
    )
    over = [
        *([_host_text(budget)] if host_over else []),
        *([f"the model device's {byte_text(budget.device_bytes)}"] if device_over else []),
    ]
    fit = max(1, min(longest, spec.seq_len))
    raise ConfigError(
        f'calib.seq_len: {spec.seq_len} with calib.layout = "padded" needs about '
        f"{byte_text(need.batches)} of int64 batches ({samples} captions x {spec.seq_len} positions x "
        f"{PADDED_COLUMNS} columns x {INT64_BYTES} bytes, and {byte_text(need.building)} more while they "
        f"are built) and roughly {byte_text(need.activations)} of activations per batch of {rows} "
        f"({dims}a {byte_text(need.mask)} attention mask): more than {' and '.join(over)}; the longest "
        f'caption has {longest} tokens, so set calib.seq_len = {fit}, or use calib.layout = "packed" '
        "(rows only as long as their captions)"
    )


# --------------------------------------------------------------------------- calibration data


@attrs.frozen
class CalibColumns:
    """Calibration batches as plain data, with what :class:`CalibData` records about them."""

    batches: tuple[Columns, ...]
    captions_per_batch: tuple[int, ...]
    stats: CalibStats


def _positions(columns: Columns) -> int:
    return sum(len(row) for row in columns["input_ids"])


def calib_columns(
    token_lists: Sequence[Sequence[int]],
    spec: CalibSpec,
    *,
    pad_id: int,
    captions_path: str,
    captions_sha256: str,
) -> CalibColumns:
    """Truncate, batch in ``spec.layout`` and count: the whole stage minus files, tokenizer and torch."""
    check_calib_spec(spec)
    cut_lists, truncated = truncate(token_lists, spec.seq_len)
    if cut_lists and all(len(ids) < 2 for ids in cut_lists):
        raise ConfigError(
            f"calib.captions: all {len(cut_lists)} calibration captions ({captions_path}) are 1 token long, "
            "so no token has a next one to predict and every score would be 0; use longer captions"
        )
    build = packed_columns if spec.layout == "packed" else padded_columns
    batches, counts = build(cut_lists, spec.seq_len, spec.batch_size, pad_id)
    stats = calib_stats(
        spec,
        captions_path=captions_path,
        captions_sha256=captions_sha256,
        sample_tokens=[len(ids) for ids in cut_lists],
        batch_positions=[_positions(batch) for batch in batches],
        truncated_samples=truncated,
    )
    return CalibColumns(batches=tuple(batches), captions_per_batch=tuple(counts), stats=stats)


def calib_stats(
    spec: CalibSpec,
    *,
    captions_path: str,
    captions_sha256: str,
    sample_tokens: Sequence[int],
    batch_positions: Sequence[int],
    truncated_samples: int = 0,
    images: ImageMix | None = None,
) -> CalibStats:
    """What a calibration saw, counted the same way for captions alone and image + caption pairs.

    ``sample_tokens``: the real tokens of each sample as calibrated (after any cut);
    ``batch_positions``: the positions of each batch, padding included. Both loaders report
    through here so that ``padding_fraction`` and the token totals mean one thing in every manifest.
    """
    return CalibStats(
        captions_path=captions_path,
        captions_sha256=captions_sha256,
        layout=spec.layout,
        seq_len=spec.seq_len,
        batch_size=spec.batch_size,
        max_samples=spec.max_samples,
        samples=len(sample_tokens),
        real_tokens=sum(sample_tokens),
        total_tokens=sum(batch_positions),
        batches=len(batch_positions),
        truncated_samples=truncated_samples,
        images=images,
    )
