"""Image + caption batches on the tiny Qwen3-VL: the chat turn, the vision tower run once per batch,
and packed pairs computing exactly what each pair computes alone in the full model."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch

from auto_quantize_model.artifacts import CalibData, LoadedModel
from auto_quantize_model.backend import vision_calib as vc
from auto_quantize_model.backend.lm_forward import (
    calibration_step_for,
    chunked_loss_backward,
    decoder_hidden,
    real_index,
    target_index,
)
from auto_quantize_model.core.image_pairs import BUILTIN, ImagePair, check_pairs, read_pair_source, take_pairs
from auto_quantize_model.errors import ConfigError, InputError
from auto_quantize_model.pipeline import Artifacts
from auto_quantize_model.specs import CalibSpec
from auto_quantize_model.stages.extract_lm import ExtractLM

pytestmark = pytest.mark.slow

PAD = 0


def _pairs(count: int) -> tuple[ImagePair, ...]:
    return check_pairs(take_pairs(read_pair_source(BUILTIN), count))


def _data(loaded: LoadedModel, count: int, encode: vc.VisionEncoder | None = None, **calib: Any) -> CalibData:
    spec = CalibSpec(images=BUILTIN, max_samples=count, **{"seq_len": 512, "batch_size": 2, **calib})
    return vc.image_calib_data(
        loaded, _pairs(count), spec, pad_id=PAD, label=BUILTIN, sha256="s", encode=encode
    )


def _token_logprobs(loaded: LoadedModel, batches: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Log-probability of every scored next token, batch by batch, row by row."""
    model: Any = loaded.model
    found = []
    with torch.no_grad():
        for batch in batches:
            hidden = decoder_hidden(model.model.language_model, batch)
            flat, targets = target_index(batch)
            logits = model.lm_head(hidden.reshape(-1, hidden.shape[-1])[flat]).log_softmax(-1)
            found.append(logits.gather(1, targets[:, None])[:, 0])
    return torch.cat(found)


def _full_model_logprobs(loaded: LoadedModel, pairs: Sequence[ImagePair]) -> torch.Tensor:
    """The reference: each pair alone through Qwen3VLForConditionalGeneration with its pixels."""
    model: Any = loaded.model
    processor = vc.image_processor(loaded)
    pieces = vc.chat_pieces(loaded.tokenizer, model.config.image_token_id)
    builder = vc.BatchBuilder(
        model.model, processor, vc.vision_encoder(model), model.get_input_embeddings(), PAD
    )
    found = []
    for pair in pairs:
        pixels, grid = builder.pixels([pair])
        caption = loaded.tokenizer(pair.text, add_special_tokens=False)["input_ids"]
        layout = vc.pair_layout(pair, caption, int(grid.prod()) // 4, pieces)
        ids = torch.tensor([layout.input_ids])
        types = (ids == model.config.image_token_id).long()
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=types)
        labels = torch.tensor(layout.labels)
        keep = labels[1:] != -100
        logprobs = out.logits[0, :-1].log_softmax(-1)[keep]
        found.append(logprobs.gather(1, labels[1:][keep][:, None])[:, 0])
    return torch.cat(found)


def test_a_pair_is_the_chat_turn_with_only_its_caption_scored(tiny_loaded: LoadedModel) -> None:
    tokenizer = tiny_loaded.tokenizer
    data = _data(tiny_loaded, 1)
    batch = data.batches[0]
    ids = batch["input_ids"][0].tolist()
    text = tokenizer.decode(ids)
    caption = "A red circle in the middle of a blue picture."
    # 64x64 is resized up to Qwen3-VL's 65,536-pixel minimum: 256x256, 16x16 patches of 16, 64 after 2x2 merge
    assert text == (
        "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 64 + "<|vision_end|>Describe this image."
        f"<|im_end|>\n<|im_start|>assistant\n{caption}<|im_end|>"
    )
    scored = [label for label in batch["labels"][0].tolist() if label != -100]
    assert scored == tokenizer(caption, add_special_tokens=False)["input_ids"]
    assert int(batch["visual_pos_masks"].sum()) == 64
    # calibration sees every token of the turn, image tokens included; scoring only the caption
    assert real_index(batch).numel() == len(ids)
    assert target_index(batch)[1].tolist() == scored


def test_the_vision_tower_runs_once_per_batch_whatever_autoquant_does(tiny_loaded: LoadedModel) -> None:
    model: Any = tiny_loaded.model
    real = vc.vision_encoder(model)
    calls: list[int] = []
    tower_calls: list[int] = []

    def counting(pixels: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        calls.append(int(grid.shape[0]))
        return real(pixels, grid)

    hook = model.model.visual.register_forward_hook(lambda *_: tower_calls.append(1))
    data = _data(tiny_loaded, 12, encode=counting, batch_size=1)
    assert len(data.batches) >= 3
    assert calls == list(data.captions_per_batch)  # one call per batch, all its images at once
    lm = ExtractLM().run(Artifacts.of([tiny_loaded]))
    calibrate = calibration_step_for(lm, model)
    for _ in range(3):  # as calibration per format and scoring would
        for batch in data.batches:
            calibrate(model, batch)
            chunked_loss_backward(lm.module, lm.lm_head, batch, normalizer=1.0)
    hook.remove()
    assert len(calls) == len(data.batches)
    assert len(tower_calls) == len(data.batches)


def test_packed_pairs_score_each_token_as_alone_and_in_the_full_model(
    tiny_loaded: LoadedModel,
) -> None:
    pairs = 6
    packed = _data(tiny_loaded, pairs, layout="packed", batch_size=2)
    alone = _data(tiny_loaded, pairs, layout="padded", batch_size=1)
    assert [b["input_ids"].shape[0] for b in packed.batches] == [2]  # 6 pairs in 2 rows: 3 a row
    assert len(alone.batches) == pairs
    packed_lp = _token_logprobs(tiny_loaded, packed.batches)
    alone_lp = _token_logprobs(tiny_loaded, alone.batches)
    full_lp = _full_model_logprobs(tiny_loaded, _pairs(pairs))
    assert packed_lp.shape == alone_lp.shape == full_lp.shape
    assert packed_lp.shape[0] == packed.stats.images.caption_tokens  # type: ignore[union-attr]
    assert torch.allclose(packed_lp, alone_lp, atol=1e-5)
    assert torch.allclose(packed_lp, full_lp, atol=1e-5)
    # negative control: the image's 3-D rotary positions matter, so this comparison can fail
    flat = [dict(b, mrope_position_ids=b["position_ids"][None].expand(3, -1, -1)) for b in packed.batches]
    assert float((_token_logprobs(tiny_loaded, flat) - full_lp).abs().max()) > 1e-3


def test_packing_keeps_padding_under_ten_percent_and_counts_the_mix(tiny_loaded: LoadedModel) -> None:
    data = _data(tiny_loaded, 24, seq_len=512, batch_size=2)
    stats, mix = data.stats, data.stats.images
    assert mix is not None
    assert stats.padding_fraction < 0.10
    visual = sum(int(b["visual_pos_masks"].sum()) for b in data.batches)
    real = sum(int(b["real_mask"].sum()) for b in data.batches)
    scored = sum(int(target_index(b)[1].numel()) for b in data.batches)
    assert (mix.pairs, mix.image_tokens, mix.text_tokens, mix.caption_tokens) == (
        24,
        visual,
        real - visual,
        scored,
    )
    assert stats.real_tokens == real
    assert sum(count for _, _, count in mix.image_sizes) == 24
    # six sizes, four pairs each: equal counts are listed by size
    assert mix.image_sizes == ((48, 48, 4), (64, 64, 4), (64, 96, 4), (80, 80, 4), (96, 64, 4), (128, 64, 4))


def test_a_pair_longer_than_seq_len_names_its_line_and_the_length_needed(tiny_loaded: LoadedModel) -> None:
    with pytest.raises(ConfigError) as caught:
        _data(tiny_loaded, 1, seq_len=64)
    origin = _pairs(1)[0].origin
    assert str(caught.value) == (
        f"{origin}: the pair takes 107 tokens (64 for its 64x64 image) but calib.seq_len is 64; "
        "raise calib.seq_len to at least 107 or use a smaller image"
    )


def test_a_checkouts_own_processor_settings_are_used(tiny_loaded: LoadedModel, tmp_path: Path) -> None:
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"size": {"shortest_edge": 4096, "longest_edge": 16777216}, "patch_size": 16}),
        encoding="utf-8",
    )
    checkout = attrs.evolve(tiny_loaded, source=str(tmp_path))
    data = _data(checkout, 1)
    # 64x64 is already 4,096 pixels: 4x4 patches, 4 image tokens instead of 64
    assert data.stats.images is not None
    assert data.stats.images.image_tokens == 4


def test_held_out_pairs_are_the_ones_after_calibrations(tiny_loaded: LoadedModel) -> None:
    from auto_quantize_model.backend.vision_holdout import held_out_pairs

    calib = _data(tiny_loaded, 16)
    held, batches = held_out_pairs(calib, tiny_loaded, PAD, 20)
    assert held.texts == tuple(pair.text for pair in _pairs(24)[16:])
    assert (held.skipped, held.source) == (16, "builtin")
    assert held.notes == (
        "validate.holdout_samples = 20 asked, 8 used: builtin has 8 pair(s) calibration did not use",
    )
    assert [batch["input_ids"].shape[0] for batch in batches] == [8]  # one pair a row
    assert [len(ids) for ids in held.token_lists] == [
        int((row != -100).sum()) for row in batches[0]["labels"]
    ]


def test_no_pair_left_for_held_out_is_refused(tiny_loaded: LoadedModel) -> None:
    from auto_quantize_model.backend.vision_holdout import held_out_pairs

    with pytest.raises(ConfigError) as caught:
        held_out_pairs(_data(tiny_loaded, 24), tiny_loaded, PAD, 8, "frontier")
    assert str(caught.value) == (
        "frontier: calib.images builtin has 24 pairs and calibration uses all 24, so none is left to "
        "measure on; add pairs or lower calib.max_samples"
    )


def test_activation_ranges_split_image_and_text_tokens(tiny_loaded: LoadedModel) -> None:
    model: Any = tiny_loaded.model
    data = _data(tiny_loaded, 4)
    assert data.stats.images is not None
    ranges = {entry.name: entry for entry in data.stats.images.ranges}
    assert len(ranges) == 4 * 7 + 1  # q, k, v, o, gate, up, down per layer, and lm_head
    first = ranges["model.language_model.layers.0.self_attn.q_proj"]
    assert first == attrs.evolve(ranges["model.language_model.layers.0.self_attn.k_proj"], name=first.name)
    # layer 0's attention input is its input norm of the ready-made embeddings: computed apart here
    norm = model.model.language_model.layers[0].input_layernorm
    with torch.no_grad():
        peak = norm(data.batches[0]["inputs_embeds"]).abs().amax(-1)
    visual = data.batches[0]["visual_pos_masks"]
    real = data.batches[0]["real_mask"] != 0
    assert first.image_absmax == pytest.approx(float(peak[visual].max()), rel=1e-6)
    assert first.text_absmax == pytest.approx(float(peak[~visual & real].max()), rel=1e-6)
    assert first.image_absmax != pytest.approx(first.text_absmax)


def test_rows_laid_end_to_end_compute_the_same_as_rows(tiny_loaded: LoadedModel) -> None:
    """The flash-attention path flattens a batch's rows into one (:func:`one_row`); on sdpa both
    layouts are exact, so they must agree for image batches too (3-D positions, deepstack)."""
    from auto_quantize_model.backend.lm_forward import model_inputs, one_row

    decoder: Any = tiny_loaded.model.model.language_model  # type: ignore[union-attr]
    batch = _data(tiny_loaded, 6, batch_size=2).batches[0]
    rows, length = batch["input_ids"].shape
    assert rows == 2
    with torch.no_grad():
        apart = decoder(**model_inputs(batch)).last_hidden_state
        flat = decoder(**one_row(model_inputs(batch), rows * length)).last_hidden_state
    assert flat.shape == (1, rows * length, apart.shape[-1])
    assert torch.allclose(flat.reshape(apart.shape), apart, atol=1e-5)


def test_building_a_processor_leaves_the_published_settings_alone(
    tiny_loaded: LoadedModel, tmp_path: Path
) -> None:
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 1024}), encoding="utf-8")
    processor = vc.image_processor(attrs.evolve(tiny_loaded, source=str(tmp_path)))
    assert processor.size["shortest_edge"] == 1024
    assert vc.QWEN3_VL_IMAGE_SETTINGS["size"] == {"shortest_edge": 65536, "longest_edge": 16777216}


def test_a_caption_holding_the_image_placeholder_names_its_line(tiny_loaded: LoadedModel) -> None:
    model: Any = tiny_loaded.model
    pair = attrs.evolve(_pairs(1)[0], text="A <|image_pad|> here.")
    processor = vc.image_processor(tiny_loaded)
    with pytest.raises(InputError) as caught:
        vc.pair_layouts([pair], tiny_loaded.tokenizer, processor, model.config.image_token_id, 512)
    assert str(caught.value) == f"{pair.origin}: the caption holds the image placeholder token; take it out"


def test_fused_experts_gate_up_input_range_splits_image_and_text_tokens() -> None:
    """On the MoE the fused experts module is a row of its own: its input (every token's hidden
    state after the post-attention norm, flattened to ``[B * L, H]``) split by token kind."""
    from auto_quantize_model.backend.models import build_builtin
    from auto_quantize_model.sources import TINY_QWEN3_VL_MOE

    loaded = build_builtin(TINY_QWEN3_VL_MOE, seed=0, dtype="float32", device="cpu")
    data = _data(loaded, 4)
    assert data.stats.images is not None
    ranges = {entry.name: entry for entry in data.stats.images.ranges}
    experts = "model.language_model.layers.0.mlp.experts"
    assert experts in ranges
    assert len([name for name in ranges if name.endswith(".mlp.experts")]) == 2
    # the block's input, computed apart: the decoder's layer 0 run by hand up to its MLP norm
    model: Any = loaded.model
    captured: list[torch.Tensor] = []
    block = model.model.language_model.layers[0].mlp
    handle = block.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            decoder_hidden(model.model.language_model, data.batches[0])
    finally:
        handle.remove()
    peak = captured[0].abs().amax(-1)
    visual = data.batches[0]["visual_pos_masks"]
    real = data.batches[0]["real_mask"] != 0
    want_image = float(peak[visual & real].max())
    want_text = float(peak[~visual & real].max())
    for batch in data.batches[1:]:  # the recorded range is over every batch
        captured.clear()
        handle = block.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
        try:
            with torch.no_grad():
                decoder_hidden(model.model.language_model, batch)
        finally:
            handle.remove()
        peak = captured[0].abs().amax(-1)
        visual, real = batch["visual_pos_masks"], batch["real_mask"] != 0
        if bool((visual & real).any()):
            want_image = max(want_image, float(peak[visual & real].max()))
        want_text = max(want_text, float(peak[~visual & real].max()))
    assert ranges[experts].image_absmax == pytest.approx(want_image, rel=1e-6)
    assert ranges[experts].text_absmax == pytest.approx(want_text, rel=1e-6)
    assert ranges[experts].image_absmax != pytest.approx(ranges[experts].text_absmax)


def test_fused_experts_down_input_range_is_each_tokens_largest_over_its_routed_experts() -> None:
    """The second row of a fused experts module: ``act(gate) * up`` of every routed expert, computed
    here token by token (the recorder goes expert by expert), split by token kind."""
    from auto_quantize_model.backend.models import build_builtin
    from auto_quantize_model.sources import TINY_QWEN3_VL_MOE

    loaded = build_builtin(TINY_QWEN3_VL_MOE, seed=0, dtype="float32", device="cpu")
    data = _data(loaded, 4)
    assert data.stats.images is not None
    ranges = {entry.name: entry for entry in data.stats.images.ranges}
    name = "model.language_model.layers.1.mlp.experts"
    assert [row for row in ranges if row.startswith(name)] == [name, f"{name}.down_proj"]
    model: Any = loaded.model
    experts = model.model.language_model.layers[1].mlp.experts
    want = {"image": 0.0, "text": 0.0}
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = experts.register_forward_pre_hook(lambda module, args: seen.append((args[0], args[1])))
    try:
        with torch.no_grad():
            for batch in data.batches:
                decoder_hidden(model.model.language_model, batch)
    finally:
        handle.remove()
    for batch, (x, routed) in zip(data.batches, seen, strict=True):
        visual = batch["visual_pos_masks"].reshape(-1)
        real = (batch["real_mask"] != 0).reshape(-1)
        for token in (index for index in range(x.shape[0]) if bool(real[index])):
            peak = 0.0
            for expert in routed[token].tolist():
                gate, up = (experts.gate_up_proj[expert].detach() @ x[token]).chunk(2)
                peak = max(peak, float((torch.nn.functional.silu(gate) * up).abs().max()))
            kind = "image" if bool(visual[token]) else "text"
            want[kind] = max(want[kind], peak)
    down = ranges[f"{name}.down_proj"]
    assert down.image_absmax == pytest.approx(want["image"], rel=1e-5)
    assert down.text_absmax == pytest.approx(want["text"], rel=1e-5)
    assert down.image_absmax != pytest.approx(ranges[name].image_absmax)
