"""Image + caption pairs -> calibration batches for the language model as it runs inside Qwen3-VL.

Each pair becomes the chat turn the model serves (:data:`PROMPT` is the user's question)::

    <|im_start|>user\\n<|vision_start|><|image_pad|> x N<|vision_end|>PROMPT<|im_end|>\\n
    <|im_start|>assistant\\nCAPTION<|im_end|>

``N`` is what the model's own image processor makes of the picture (resize to a multiple of
patch x merge, patches, ``image_grid_thw``; N = patches / merge²), exactly as
``Qwen3VLProcessor`` expands its placeholder. Only the caption's tokens carry labels: the prompt,
the image and the closing ``<|im_end|>`` are seen (and calibrated on) but never scored.

The vision tower runs here, once per batch, without gradients, and never again: every batch
stores the decoder's inputs ready made (``inputs_embeds`` with the image features in place of the
placeholders, the deepstack features, ``visual_pos_masks`` and Qwen3-VL's 3-D rotary positions
from the model's own ``get_rope_index``), so AutoQuant's passes (calibration per format, scoring)
cost the language model's tokens and nothing more. The vision tower is outside what AutoQuant
searches and holds no quantizer.

Batches are packed like captions (:func:`~auto_quantize_model.core.batching.pack_rows`: whole
samples laid end to end, greedily in order, rows padded to the batch's longest); ``padded`` puts
one pair in each row, padded to the batch's longest pair, never to ``seq_len``. A pair longer
than ``seq_len`` is refused, not cut: an image's tokens are all or nothing. A sample keeps
its own positions: ``position_ids`` (``[B, L]``) restart at 0 for every sample and are the text
positions the decoder's packed-sequence mask is built from, ``mrope_position_ids``
(``[3, B, L]``) are the rotary positions the sample would have alone. ``real_mask`` marks every
non-padding token, image tokens included, for calibration (:func:`~.lm_forward.real_index`).
"""

from __future__ import annotations

import collections
import copy
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from auto_quantize_model.artifacts import ActivationRange, CalibData, ImageMix, LoadedModel
from auto_quantize_model.core.batching import IGNORE_INDEX, calib_stats, pack_rows
from auto_quantize_model.core.image_pairs import ImagePair
from auto_quantize_model.errors import ConfigError, InputError
from auto_quantize_model.specs import CalibSpec

log = logging.getLogger("auto_quantize_model")

PROMPT = "Describe this image."
QWEN3_VL_IMAGE_SETTINGS: dict[str, Any] = {
    "size": {"shortest_edge": 65536, "longest_edge": 16777216},
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}
"""Qwen3-VL-*-Instruct's ``preprocessor_config.json`` apart from the patch geometry, which is
read from the model's own vision config: used for ``builtin:`` and ``config:`` sources."""
PROCESSOR_KEYS = (
    "size",
    "min_pixels",
    "max_pixels",
    "patch_size",
    "temporal_patch_size",
    "merge_size",
    "image_mean",
    "image_std",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "do_convert_rgb",
    "do_resize",
)

VisionEncoder = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, tuple[torch.Tensor, ...]]]
"""``(pixel_values, image_grid_thw) -> (image embeddings [N, H], deepstack features)``, N image
tokens of every image of a batch in order."""


# --------------------------------------------------------------------------- the model's pieces


def _vlm(model: nn.Module) -> Any:
    """The ``Qwen3VLModel`` inside a ``Qwen3VLForConditionalGeneration`` (or the model itself)."""
    inner: Any = getattr(model, "model", model)
    if not (hasattr(inner, "visual") and hasattr(inner, "get_rope_index")):
        raise ConfigError(
            f"calib.images needs a Qwen3-VL model with a vision tower; {type(model).__name__} has none "
            "(remove calib.images to calibrate on captions)"
        )
    return inner


def image_processor(loaded: LoadedModel) -> Any:
    """The model's image processor (PIL backend: no torchvision needed), never downloaded.

    A checkout's own ``preprocessor_config.json`` gives its settings; ``builtin:``/``config:``
    sources get Qwen3-VL's published settings with the patch geometry of their vision config.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vision: Any = _vlm(loaded.model).config.vision_config
    settings: dict[str, Any] = {
        **copy.deepcopy(QWEN3_VL_IMAGE_SETTINGS),  # the processor edits the size dict it is given
        "patch_size": vision.patch_size,
        "temporal_patch_size": vision.temporal_patch_size,
        "merge_size": vision.spatial_merge_size,
    }
    config_file = Path(loaded.source) / "preprocessor_config.json"
    if not loaded.source.startswith(("builtin:", "config:")) and config_file.is_file():
        try:
            found = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise InputError(f"{config_file} cannot be read as JSON: {err}") from err
        settings |= {key: copy.deepcopy(found[key]) for key in PROCESSOR_KEYS if key in found}
    kwargs: Any = settings
    return Qwen2VLImageProcessorPil(**kwargs)


def vision_encoder(model: nn.Module) -> VisionEncoder:
    """The model's vision tower as a :data:`VisionEncoder` (no gradients, its own device)."""
    vlm = _vlm(model)

    def encode(pixels: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        device = next(vlm.visual.parameters()).device
        with torch.no_grad():
            out = vlm.get_image_features(pixels.to(device), grid.to(device), return_dict=True)
        embeds = torch.cat(tuple(out.pooler_output), dim=0)
        return embeds, tuple(out.deepstack_features or ())

    return encode


# --------------------------------------------------------------------------- samples


@attrs.frozen
class ChatPieces:
    """Token ids of the fixed parts of the chat turn, encoded once."""

    before_image: tuple[int, ...]
    after_image: tuple[int, ...]
    end: tuple[int, ...]
    image_token: int


def chat_pieces(tokenizer: Any, image_token: int) -> ChatPieces:
    def ids(text: str) -> tuple[int, ...]:
        return tuple(int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"])

    return ChatPieces(
        before_image=ids("<|im_start|>user\n<|vision_start|>"),
        after_image=ids(f"<|vision_end|>{PROMPT}<|im_end|>\n<|im_start|>assistant\n"),
        end=ids("<|im_end|>"),
        image_token=image_token,
    )


@attrs.frozen
class PairLayout:
    """One pair's tokens, before any pixel is processed (the image token count comes from its size)."""

    pair: ImagePair
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    image_tokens: int
    caption_tokens: int


def image_token_count(processor: Any, size: tuple[int, int]) -> int:
    width, height = size
    patches = int(processor.get_number_of_image_patches(height, width, {}))
    return patches // int(processor.merge_size) ** 2


def pair_layout(
    pair: ImagePair, caption_ids: Sequence[int], image_tokens: int, pieces: ChatPieces
) -> PairLayout:
    caption = tuple(int(t) for t in caption_ids)
    prompt = (*pieces.before_image, *([pieces.image_token] * image_tokens), *pieces.after_image)
    ids = (*prompt, *caption, *pieces.end)
    labels = (*([IGNORE_INDEX] * len(prompt)), *caption, *([IGNORE_INDEX] * len(pieces.end)))
    return PairLayout(pair, ids, labels, image_tokens, len(caption))


def pair_layouts(
    pairs: Sequence[ImagePair], tokenizer: Any, processor: Any, image_token: int, seq_len: int
) -> tuple[PairLayout, ...]:
    """Every pair's token layout; a pair longer than ``seq_len`` is refused (images are never cut)."""
    pieces = chat_pieces(tokenizer, image_token)
    captions = tokenizer([pair.text for pair in pairs], add_special_tokens=False)["input_ids"]
    layouts = []
    for pair, caption in zip(pairs, captions, strict=True):
        if not caption:
            raise InputError(f"{pair.origin}: the caption {pair.text[:40]!r} gives no tokens; give it words")
        if image_token in caption:
            raise InputError(f"{pair.origin}: the caption holds the image placeholder token; take it out")
        layout = pair_layout(pair, caption, image_token_count(processor, pair.size), pieces)
        if len(layout.input_ids) > seq_len:
            width, height = pair.size
            raise ConfigError(
                f"{pair.origin}: the pair takes {len(layout.input_ids)} tokens "
                f"({layout.image_tokens} for its {width}x{height} image) but calib.seq_len is {seq_len}; "
                f"raise calib.seq_len to at least {len(layout.input_ids)} or use a smaller image"
            )
        layouts.append(layout)
    return tuple(layouts)


# --------------------------------------------------------------------------- batches


def rope_positions(vlm: Any, layout: PairLayout, grid: torch.Tensor) -> torch.Tensor:
    """``[3, n]`` rotary positions of one pair alone, from the model's own ``get_rope_index``."""
    ids = torch.tensor([layout.input_ids], dtype=torch.int64)
    types = (ids == int(vlm.config.image_token_id)).to(torch.int64)
    positions: torch.Tensor = vlm.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=grid)[0]
    return positions[:, 0, :].to(torch.int64)


def _rows_of(layouts: Sequence[PairLayout], spec: CalibSpec) -> list[list[int]]:
    if spec.layout == "packed":
        return pack_rows([len(layout.input_ids) for layout in layouts], spec.seq_len)
    return [[index] for index in range(len(layouts))]


@attrs.frozen(eq=False)
class BatchBuilder:
    """Turns groups of pair layouts into decoder-ready batches, running the vision tower once each."""

    vlm: Any
    processor: Any
    encode: VisionEncoder
    embed: nn.Module
    pad_id: int

    def pixels(self, pairs: Sequence[ImagePair]) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        images = []
        for pair in pairs:
            with Image.open(pair.image) as image:
                images.append(image.convert("RGB"))
        out = self.processor(images=images, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"].to(torch.int64)

    def batch(self, layouts: Sequence[PairLayout], rows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        order = [index for row in rows for index in row]
        pixels, grid = self.pixels([layouts[i].pair for i in order])
        embeds, deepstack = self.encode(pixels, grid)
        grid_of = {index: grid[place : place + 1] for place, index in enumerate(order)}
        width = max(sum(len(layouts[i].input_ids) for i in row) for row in rows)
        columns: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
        for row in rows:
            parts: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
            for index in row:
                layout = layouts[index]
                length = len(layout.input_ids)
                parts["input_ids"].append(torch.tensor(layout.input_ids, dtype=torch.int64))
                parts["labels"].append(torch.tensor(layout.labels, dtype=torch.int64))
                parts["position_ids"].append(torch.arange(length, dtype=torch.int64))
                parts["mrope"].append(rope_positions(self.vlm, layout, grid_of[index]))
                parts["real_mask"].append(torch.ones(length, dtype=torch.int64))
            pad = width - sum(len(layouts[i].input_ids) for i in row)
            if pad:
                parts["input_ids"].append(torch.full((pad,), self.pad_id, dtype=torch.int64))
                parts["labels"].append(torch.full((pad,), IGNORE_INDEX, dtype=torch.int64))
                parts["position_ids"].append(torch.arange(pad, dtype=torch.int64))
                parts["mrope"].append(torch.arange(pad, dtype=torch.int64).expand(3, pad))
                parts["real_mask"].append(torch.zeros(pad, dtype=torch.int64))
            for key in ("input_ids", "labels", "position_ids", "real_mask"):
                columns[key].append(torch.cat(parts[key]))
            columns["mrope"].append(torch.cat(parts["mrope"], dim=1))
        batch = {
            key: torch.stack(columns[key]) for key in ("input_ids", "labels", "position_ids", "real_mask")
        }
        batch["mrope_position_ids"] = torch.stack(columns["mrope"], dim=1)
        visual = batch["input_ids"] == int(self.vlm.config.image_token_id)
        if int(visual.sum()) != embeds.shape[0]:
            raise RuntimeError(f"{int(visual.sum())} image placeholders for {embeds.shape[0]} image features")
        weight = next(self.embed.parameters())
        with torch.no_grad():
            text = self.embed(batch["input_ids"].to(weight.device))
            inputs = text.masked_scatter(
                visual.to(text.device)[..., None], embeds.to(text.device, text.dtype)
            )
        batch["inputs_embeds"] = inputs.cpu()
        batch["visual_pos_masks"] = visual
        batch["deepstack_visual_embeds"] = (
            torch.stack([level.to("cpu", text.dtype) for level in deepstack])
            if deepstack
            else torch.zeros((0, embeds.shape[0], embeds.shape[1]), dtype=text.dtype)
        )
        return batch


def _ranges(
    model: nn.Module, vlm: Any, batches: Sequence[dict[str, torch.Tensor]]
) -> tuple[ActivationRange, ...]:
    from auto_quantize_model.backend.vision_ranges import activation_ranges

    full: Any = model
    head = full.get_output_embeddings()
    head_name = next((name for name, module in model.named_modules() if module is head), "lm_head")
    return activation_ranges(model, vlm.language_model, head_name, batches)


def image_mix(
    layouts: Sequence[PairLayout], prompt: str = PROMPT, ranges: tuple[ActivationRange, ...] = ()
) -> ImageMix:
    sizes = collections.Counter(layout.pair.size for layout in layouts)
    image = sum(layout.image_tokens for layout in layouts)
    total = sum(len(layout.input_ids) for layout in layouts)
    return ImageMix(
        pairs=len(layouts),
        image_tokens=image,
        text_tokens=total - image,
        caption_tokens=sum(layout.caption_tokens for layout in layouts),
        image_sizes=tuple(
            (w, h, n) for (w, h), n in sorted(sizes.items(), key=lambda item: (-item[1], item[0]))
        ),
        prompt=prompt,
        ranges=ranges,
    )


def image_calib_data(
    loaded: LoadedModel,
    pairs: Sequence[ImagePair],
    spec: CalibSpec,
    *,
    pad_id: int,
    label: str,
    sha256: str,
    encode: VisionEncoder | None = None,
    ranges: bool = True,
) -> CalibData:
    """Checked pairs -> :class:`CalibData` whose batches carry the decoder's inputs ready made.

    ``encode`` replaces the model's vision tower (tests count its calls). ``ranges``: also record
    the per-layer input ranges on image vs text tokens (one more unquantized pass,
    :mod:`.vision_ranges`).
    """
    vlm = _vlm(loaded.model)
    processor = image_processor(loaded)
    layouts = pair_layouts(pairs, loaded.tokenizer, processor, int(vlm.config.image_token_id), spec.seq_len)
    rows = _rows_of(layouts, spec)
    builder = BatchBuilder(
        vlm=vlm,
        processor=processor,
        encode=vision_encoder(loaded.model) if encode is None else encode,
        embed=vlm.get_input_embeddings(),
        pad_id=pad_id,
    )
    batches = []
    counts = []
    for start in range(0, len(rows), spec.batch_size):
        group = rows[start : start + spec.batch_size]
        batches.append(builder.batch(layouts, group))
        counts.append(sum(len(row) for row in group))
    stats = calib_stats(
        spec,
        captions_path=label,
        captions_sha256=sha256,
        sample_tokens=[len(layout.input_ids) for layout in layouts],
        batch_positions=[int(batch["input_ids"].numel()) for batch in batches],
        images=image_mix(layouts, ranges=_ranges(loaded.model, vlm, batches) if ranges else ()),
    )
    return CalibData(
        batches=tuple(batches),
        captions_per_batch=tuple(counts),
        stats=stats,
        captions=tuple(pair.text for pair in pairs),
    )
