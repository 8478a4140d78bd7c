"""The search plan's pure parts: steps, name maps, caption segments, the score-size mask, sizes."""

from __future__ import annotations

from auto_quantize_model.backend.modelopt.plan import (
    caption_segments,
    leading_steps,
    limit_scored_captions,
    lm_membership,
    plan_steps,
    textlm_name_map,
)
from auto_quantize_model.specs import AutoQuantSpec

# --------------------------------------------------------------------------------------------------
# Steps, fingerprint, messages
# --------------------------------------------------------------------------------------------------


def test_sizes_beyond_the_data_are_named_not_clamped_silently() -> None:
    steps = plan_steps((4, 4, 4), AutoQuantSpec(score_size=20, calib_size=8))
    assert (steps.calib_steps, steps.calib_samples, steps.score_steps, steps.score_samples) == (2, 8, 3, 12)
    assert steps.unmet == ("autoquant.score_size 20 exceeds the 12 calibration captions; all 12 were used",)
    assert plan_steps((4, 4), AutoQuantSpec(score_size=8)).unmet == ()


# --------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------


def test_leading_steps_counts_captions_not_batches() -> None:
    assert leading_steps((8, 8, 8, 8), 16) == (2, 16)
    assert leading_steps((8, 8, 8, 8), 17) == (3, 24)
    assert leading_steps((40, 3), 10) == (1, 40)  # packed rows hold many captions
    assert leading_steps((8, 8), 100) == (2, 16)  # more than there is: everything
    assert leading_steps((8, 8, 5), None) == (3, 21)


def test_name_maps() -> None:
    full = textlm_name_map("model.language_model", "lm_head")
    assert full("decoder.layers.3.mlp.up_proj") == "model.language_model.layers.3.mlp.up_proj"
    assert full("decoder") == "model.language_model"
    assert full("lm_head") == "lm_head"
    assert textlm_name_map("", "embed_out")("lm_head") == "embed_out"
    assert textlm_name_map("", "lm_head")("decoder.layers.0.self_attn.q_proj") == "layers.0.self_attn.q_proj"
    is_lm = lm_membership("model.language_model", "lm_head")
    assert is_lm("model.language_model.layers.0.mlp.up_proj")
    assert is_lm("lm_head")
    assert not is_lm("model.visual.blocks.0.attn.qkv")
    assert not is_lm("model.language_model_extra.x")


# --------------------------------------------------------------------------------------------------
# Caption segments and the score-size mask
# --------------------------------------------------------------------------------------------------


def test_caption_segments_skip_padding() -> None:
    # two captions (3 and 2 tokens) then a padding segment of pad id 0
    positions = [0, 1, 2, 0, 1, 0, 1]
    tokens = [5, 6, 7, 8, 9, 0, 0]
    assert caption_segments(positions, tokens, pad_id=0) == [(0, 3), (3, 5)]


def test_limit_scored_captions_masks_only_captions_past_score_size() -> None:
    import torch

    first = {
        "input_ids": torch.tensor([[5, 6, 7, 8]]),
        "position_ids": torch.tensor([[0, 1, 0, 1]]),
        "labels": torch.tensor([[-100, 6, -100, 8]]),
    }
    second = {
        "input_ids": torch.tensor([[1, 2, 3, 4, 9], [7, 7, 7, 0, 0]]),
        "position_ids": torch.tensor([[0, 1, 0, 1, 2], [0, 1, 2, 0, 1]]),
        "labels": torch.tensor([[-100, 2, -100, 4, 9], [-100, 7, 7, -100, -100]]),
    }
    batches, scored = limit_scored_captions([first, second], [2, 3], score_steps=2, score_size=3, pad_id=0)
    assert scored == 3
    assert batches[0] is first
    # caption 3 (first of batch two) stays; captions 4 and 5 lose their labels
    assert batches[1]["labels"].tolist() == [[-100, 2, -100, -100, -100], [-100, -100, -100, -100, -100]]
    assert second["labels"].tolist()[0] == [-100, 2, -100, 4, 9]  # the caller's batch is not mutated


def test_limit_scored_captions_leaves_whole_batches_alone() -> None:
    import torch

    batch = {
        "input_ids": torch.tensor([[5, 6]]),
        "position_ids": torch.tensor([[0, 1]]),
        "labels": torch.tensor([[-100, 6]]),
    }
    batches, scored = limit_scored_captions([batch, batch], [1, 1], score_steps=1, score_size=1, pad_id=0)
    assert scored == 1
    assert batches == [batch, batch]
