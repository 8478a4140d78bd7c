"""The ``BuildCalibLoader`` stage: captions file (or image + caption pairs) -> calibration batches.

The batching rules are pure (:mod:`auto_quantize_model.core.batching`, lists of ints); this module
reads the file, asks the tokenizer and turns the rows into the int64 tensors :class:`CalibData`
holds. torch is imported only when a batch is built.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import attrs

from auto_quantize_model.artifacts import CalibData, LoadedModel
from auto_quantize_model.core.batching import (
    MemoryBudget,
    calib_columns,
    check_calib_spec,
    check_padded_memory,
    pad_token_id,
    tokenize_captions,
)
from auto_quantize_model.core.captions import captions_label, captions_sha256, read_captions
from auto_quantize_model.core.image_pairs import check_pairs, pairs_sha256, read_pair_source, take_pairs
from auto_quantize_model.io.memory_limits import HostMemory, available_memory
from auto_quantize_model.specs import CalibSpec

if TYPE_CHECKING:
    from auto_quantize_model.pipeline import Artifacts

log = logging.getLogger("auto_quantize_model")

_ELEMENT_BYTES = {"float32": 4, "float64": 8}
"""Bytes per activation element by the loaded dtype's name; anything else (bf16, fp16) is 2."""


def make_calib_data(
    token_lists: Sequence[Sequence[int]],
    spec: CalibSpec,
    *,
    pad_id: int,
    captions_path: str,
    captions_sha256: str,
    captions: Sequence[str] = (),
) -> CalibData:
    """Truncate, batch in ``spec.layout``, count and build the tensors: the stage minus file and tokenizer."""
    from auto_quantize_model.backend.lm_forward import as_tensors

    built = calib_columns(
        token_lists, spec, pad_id=pad_id, captions_path=captions_path, captions_sha256=captions_sha256
    )
    return CalibData(
        batches=tuple(as_tensors(batch) for batch in built.batches),
        captions_per_batch=built.captions_per_batch,
        stats=built.stats,
        captions=tuple(captions),
    )


def memory_budget(
    loaded: LoadedModel, host_memory: Callable[[], HostMemory | None] = available_memory
) -> MemoryBudget:
    """The host memory this process may still take (its cgroup's limit included), the model
    device's memory, and the model's hidden size and depth."""
    free = host_memory()
    host = 2**62 if free is None else free.available  # unknown: never refuse on the host side
    device = host
    if loaded.device.startswith("cuda"):
        import torch

        device = int(torch.cuda.get_device_properties(torch.device(loaded.device)).total_memory)
    config: Any = getattr(loaded.model, "config", None)
    get_text_config = getattr(config, "get_text_config", None)
    text: Any = get_text_config() if callable(get_text_config) else config
    hidden = getattr(text, "hidden_size", None)
    layers = getattr(text, "num_hidden_layers", None)
    return MemoryBudget(
        host_bytes=host,
        device_bytes=device,
        host_limit=None if free is None else free.limited_by,
        hidden_size=hidden if isinstance(hidden, int) else None,
        layers=layers if isinstance(layers, int) else None,
        element_bytes=_ELEMENT_BYTES.get(loaded.dtype.removeprefix("torch."), 2),
    )


def image_calib(loaded: LoadedModel, spec: CalibSpec) -> CalibData:
    """``calib.images``: pairs checked, then encoded through the model's processor and vision tower
    (:mod:`auto_quantize_model.backend.vision_calib`)."""
    from auto_quantize_model.backend.vision_calib import image_calib_data

    assert spec.images is not None
    source = read_pair_source(spec.images)
    pairs = check_pairs(take_pairs(source, spec.max_samples))
    data = image_calib_data(
        loaded,
        pairs,
        spec,
        pad_id=pad_token_id(loaded.tokenizer, getattr(loaded.model, "config", None)),
        label=source.label,
        sha256=pairs_sha256(pairs),
    )
    stats, mix = data.stats, data.stats.images
    assert mix is not None
    log.info(
        "calibration: %d image + caption pairs, %d image and %d text tokens (%d scored) in %d "
        "(%.1f%% padding), %d %s batches",
        stats.samples,
        mix.image_tokens,
        mix.text_tokens,
        mix.caption_tokens,
        stats.total_tokens,
        100.0 * stats.padding_fraction,
        stats.batches,
        stats.layout,
    )
    return data


@attrs.frozen
class BuildCalibLoader:
    """Captions file -> :class:`CalibData`; only the loaded model's tokenizer and config are used."""

    requires: ClassVar[tuple[type, ...]] = (LoadedModel,)
    optional: ClassVar[tuple[type, ...]] = ()
    produces: ClassVar[type] = CalibData
    spec: CalibSpec = attrs.field(factory=CalibSpec)

    def run(self, inputs: Artifacts) -> CalibData:
        spec = self.spec
        check_calib_spec(spec)
        loaded = inputs.get(LoadedModel)
        if spec.images is not None:
            return image_calib(loaded, spec)
        tokenizer = loaded.tokenizer
        captions = read_captions(spec.captions, spec.max_samples)
        token_lists = tokenize_captions(tokenizer, captions)
        if spec.layout == "padded":
            longest = max(len(ids) for ids in token_lists)
            check_padded_memory(len(token_lists), longest, spec, memory_budget(loaded))
        data = make_calib_data(
            token_lists,
            spec,
            pad_id=pad_token_id(tokenizer, getattr(loaded.model, "config", None)),
            captions_path=captions_label(spec.captions),
            captions_sha256=captions_sha256(captions),
            captions=captions,
        )
        stats = data.stats
        log.info(
            "calibration: %d captions, %d real tokens in %d (%.1f%% padding), %d %s batches%s",
            stats.samples,
            stats.real_tokens,
            stats.total_tokens,
            100.0 * stats.padding_fraction,
            stats.batches,
            stats.layout,
            f", {stats.truncated_samples} captions cut to {stats.seq_len} tokens"
            if stats.truncated_samples
            else "",
        )
        return data
