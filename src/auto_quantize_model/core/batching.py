"""Stage 3: captions become calibration batches, in one of two layouts.

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
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from auto_quantize_model.artifacts import CalibData, CalibStats
from auto_quantize_model.errors import ConfigError, InputError
from auto_quantize_model.specs import CalibSpec

if TYPE_CHECKING:
    import torch


log = logging.getLogger("auto_quantize_model")

BUILTIN_CAPTIONS = "builtin"
"""The ``captions`` value meaning the captions file shipped inside the package."""
_BUILTIN_RESOURCE = "data/captions.txt"
IGNORE_INDEX = -100
"""Label value that no loss is computed for (same as ``lm_forward.IGNORE_INDEX``; kept here so
this module does not import torch at import time)."""
LAYOUTS = ("packed", "padded")

Batch = dict[str, "torch.Tensor"]


# --------------------------------------------------------------------------- captions


def captions_label(captions: str | os.PathLike[str]) -> str:
    """What the stats and the manifest record as the captions' origin: ``builtin`` or an absolute path."""
    if str(captions) == BUILTIN_CAPTIONS:
        return BUILTIN_CAPTIONS
    return str(Path(captions).resolve())


def _read_bytes(captions: str | os.PathLike[str]) -> tuple[str, bytes]:
    if str(captions) == BUILTIN_CAPTIONS:
        resource = resources.files("auto_quantize_model").joinpath(_BUILTIN_RESOURCE)
        name = f"built-in captions file {resource}"
        try:
            return name, resource.read_bytes()
        except OSError as err:
            raise InputError(
                f"{name} cannot be read ({err.strerror or type(err).__name__}): the package install is "
                "incomplete; reinstall it or set calib.captions to a file"
            ) from err
    path = Path(captions)
    name = f"captions file {path}"
    if not path.exists():
        raise InputError(f"{name} does not exist")
    if path.is_dir():
        raise InputError(f"{name} is a directory, not a text file with one caption per line")
    try:
        return name, path.read_bytes()
    except OSError as err:
        raise InputError(f"{name} cannot be read: {err.strerror or type(err).__name__}") from err


def parse_captions(text: str) -> list[str]:
    """Non-blank lines, stripped, in order.

    Surrounding whitespace (including a Windows ``\\r``) is not part of a caption: it would only
    change the first or last token.
    """
    return [line.strip() for line in text.split("\n") if line.strip()]


def read_captions(captions: str | os.PathLike[str], max_samples: int) -> tuple[str, ...]:
    """The first ``max_samples`` captions of a UTF-8 file (or of the built-in one for ``builtin``).

    Asking for more captions than the file holds is an error rather than a silent shortfall:
    ``max_samples`` is what the report says was used.
    """
    if max_samples <= 0:
        raise ConfigError(f"calib.max_samples: must be > 0, got {max_samples}")
    name, data = _read_bytes(captions)
    if not data:
        raise InputError(f"{name} is empty: expected one caption per line")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(
            f"{name} is not UTF-8: byte 0x{data[err.start]:02x} at byte offset {err.start} ({err.reason})"
        ) from err
    found = parse_captions(text.removeprefix("\ufeff"))
    if not found:
        raise InputError(f"{name} holds only blank lines: expected one caption per line")
    if len(found) < max_samples:
        raise ConfigError(
            f"{name} holds {len(found)} captions but calib.max_samples asks for {max_samples}: "
            f"lower calib.max_samples to {len(found)} or fewer, or use a larger file"
        )
    return tuple(found[:max_samples])


def captions_sha256(captions: Sequence[str]) -> str:
    """Hash of the captions actually used, one per line with a trailing newline.

    For a clean file (no blank lines, no surrounding spaces) read in full, this equals the file's
    own ``sha256sum``; in every case two runs with equal hashes calibrated on the same text.
    """
    digest = hashlib.sha256()
    for caption in captions:
        digest.update(caption.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


# --------------------------------------------------------------------------- tokens


def tokenize_captions(tokenizer: Any, captions: Sequence[str]) -> list[list[int]]:
    """Token ids of each caption, without special tokens; every caption must give at least one."""
    encoded = tokenizer(list(captions), add_special_tokens=False)["input_ids"]
    token_lists = [[int(t) for t in ids] for ids in encoded]
    if len(token_lists) != len(captions):
        raise ValueError(f"tokenizer returned {len(token_lists)} sequences for {len(captions)} captions")
    for index, ids in enumerate(token_lists):
        if not ids:
            raise InputError(f"caption #{index + 1} ({captions[index][:40]!r}) gives no tokens")
    return token_lists


def pad_token_id(tokenizer: Any) -> int:
    """The id padding uses: the tokenizer's pad token, else its EOS, else 0.

    Its value never reaches a loss or a real token's attention; in the padded layout it does feed
    activation-range calibration, as it did in the previous tool.
    """
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


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


# --------------------------------------------------------------------------- batching (pure)


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


def _as_batch(columns: dict[str, list[list[int]]]) -> Batch:
    import torch

    return {key: torch.tensor(rows, dtype=torch.int64) for key, rows in columns.items()}


def packed_batches(
    token_lists: Sequence[Sequence[int]], seq_len: int, batch_size: int, pad_id: int
) -> tuple[list[Batch], list[int]]:
    """Packed batches (``input_ids``, ``position_ids``, ``labels``) and the captions in each.

    See the module docstring for why there is no ``attention_mask``.
    """
    _check_lengths(token_lists, seq_len)
    rows = pack_rows([len(ids) for ids in token_lists], seq_len)
    batches: list[Batch] = []
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
        columns: dict[str, list[list[int]]] = {"input_ids": [], "position_ids": [], "labels": []}
        for ids, pos, labels in built:
            pad = width - len(ids)
            columns["input_ids"].append(ids + [pad_id] * pad)
            columns["position_ids"].append(pos + list(range(pad)))
            columns["labels"].append(labels + [IGNORE_INDEX] * pad)
        batches.append(_as_batch(columns))
        counts.append(sum(len(row) for row in group))
    return batches, counts


def padded_batches(
    token_lists: Sequence[Sequence[int]], seq_len: int, batch_size: int, pad_id: int
) -> tuple[list[Batch], list[int]]:
    """One caption per row, right-padded to ``seq_len`` (the previous tool's layout).

    ``position_ids`` are ``0..seq_len-1`` for the whole row: real tokens get ``0..n-1`` and padding
    simply continues, which is what the model computes itself when given no ``position_ids`` (the
    previous tool's behaviour). Padding is hidden from real tokens by the ``attention_mask`` and,
    with right padding, no query row is ever fully masked.
    """
    _check_lengths(token_lists, seq_len)
    batches: list[Batch] = []
    counts: list[int] = []
    for start in range(0, len(token_lists), batch_size):
        group = token_lists[start : start + batch_size]
        columns: dict[str, list[list[int]]] = {
            "input_ids": [],
            "attention_mask": [],
            "position_ids": [],
            "labels": [],
        }
        for caption in group:
            real = list(caption)
            pad = seq_len - len(real)
            columns["input_ids"].append(real + [pad_id] * pad)
            columns["attention_mask"].append([1] * len(real) + [0] * pad)
            columns["position_ids"].append(list(range(seq_len)))
            columns["labels"].append(real + [IGNORE_INDEX] * pad)
        batches.append(_as_batch(columns))
        counts.append(len(group))
    return batches, counts


def check_calib_spec(spec: CalibSpec) -> None:
    """Numbers in range and a known layout, before any file is read."""
    for key in ("max_samples", "seq_len", "batch_size"):
        value = getattr(spec, key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"calib.{key}: must be an integer > 0, got {value!r}")
    if spec.layout not in LAYOUTS:
        raise ConfigError(f"calib.layout: unknown layout {spec.layout!r} (known: {', '.join(LAYOUTS)})")


def make_calib_data(
    token_lists: Sequence[Sequence[int]],
    spec: CalibSpec,
    *,
    pad_id: int,
    captions_path: str,
    captions_sha256: str,
) -> CalibData:
    """Truncate, batch in ``spec.layout`` and count: the whole stage minus file and tokenizer."""
    check_calib_spec(spec)
    cut_lists, truncated = truncate(token_lists, spec.seq_len)
    build = packed_batches if spec.layout == "packed" else padded_batches
    batches, counts = build(cut_lists, spec.seq_len, spec.batch_size, pad_id)
    stats = CalibStats(
        captions_path=captions_path,
        captions_sha256=captions_sha256,
        layout=spec.layout,
        seq_len=spec.seq_len,
        batch_size=spec.batch_size,
        max_samples=spec.max_samples,
        samples=len(cut_lists),
        real_tokens=sum(len(ids) for ids in cut_lists),
        total_tokens=sum(int(batch["input_ids"].numel()) for batch in batches),
        batches=len(batches),
        truncated_samples=truncated,
    )
    return CalibData(batches=tuple(batches), captions_per_batch=tuple(counts), stats=stats)


# --------------------------------------------------------------------------- stage
