"""Calibration sees every real token; scoring keeps to the positions with a next-token target.

lm_head's input range used to be calibrated on the scored positions only, so the last token of
every caption (no target inside the batch) was never seen; a deployed model computes each
generated token from exactly that position. The fake decoder here puts the batch's largest
activation on a caption's last token: the amax lm_head records must include it.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from auto_quantize_model.artifacts import LanguageModel
from auto_quantize_model.backend.lm_forward import (
    TextLM,
    as_tensors,
    calibration_step_for,
    real_index,
    selected_logits,
    target_index,
)
from auto_quantize_model.core.batching import packed_columns, padded_columns

LOUD = 7
"""The token whose hidden state is large: the last token of the first caption below."""
CAPTIONS = [[3, 4, LOUD], [8], [5, 6], [9, 10, 11], [12]]
"""Packed into 8-token rows two to a batch: [3 4 7 8 5 6] [9 10 11 12]; one-token captions inside a
row and at the end of one."""
PAD = 0


class LoudLastToken(nn.Module):
    """A decoder whose hidden state is ``token / 100`` everywhere, except 50.0 for :data:`LOUD`."""

    def forward(
        self, input_ids: torch.Tensor, position_ids: Any = None, attention_mask: Any = None, **_: Any
    ) -> tuple[torch.Tensor]:
        hidden = (input_ids.float() / 100.0)[..., None].expand(*input_ids.shape, 4).clone()
        hidden[input_ids == LOUD] = 50.0
        return (hidden,)


class AmaxHead(nn.Linear):
    """lm_head that records the largest |input| it was given, as a max calibrator does."""

    def __init__(self) -> None:
        super().__init__(4, 12)
        self.amax = 0.0
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.amax = max(self.amax, float(x.abs().max()))
        self.seen += x.shape[0]
        return super().forward(x)


def language_model(root: TextLM) -> LanguageModel:
    return LanguageModel(
        module=root.decoder,
        lm_head=root.lm_head,
        prefix="",
        head_name="lm_head",
        full_model=root,
        vision_modules=(),
        scope="language_model",
        pad_token_id=PAD,
    )


def batches(layout: str) -> list[dict[str, torch.Tensor]]:
    build = packed_columns if layout == "packed" else padded_columns
    columns, _ = build(CAPTIONS, 8, 2, PAD)
    return [as_tensors(c) for c in columns]


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_real_index_is_every_caption_token_and_no_padding(layout: str) -> None:
    found = []
    for batch in batches(layout):
        flat = real_index(batch, PAD)
        found += batch["input_ids"].reshape(-1)[flat].tolist()
    assert sorted(found) == sorted(t for caption in CAPTIONS for t in caption)  # the one-token caption too
    assert PAD not in found


def test_packed_one_token_captions_are_real_wherever_they_sit() -> None:
    columns, _ = packed_columns([[1, 2], [3], [4, 5, 6], [7]], 4, 2, PAD)
    assert columns[0]["input_ids"] == [[1, 2, 3, PAD], [4, 5, 6, 7]]  # [3] before padding, [7] ends a row
    batch = as_tensors(columns[0])
    assert real_index(batch, PAD).tolist() == [0, 1, 2, 4, 5, 6, 7]
    # without the pad id, a last column at position 0 with no label cannot be told from padding
    assert real_index(batch).tolist() == [0, 1, 2, 4, 5, 6]
    padding_of_one = as_tensors(packed_columns([[1, 2, 3], [4, 5, 6, 7]], 4, 2, PAD)[0][0])
    assert real_index(padding_of_one, PAD).tolist() == [0, 1, 2, 4, 5, 6, 7]


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_lm_head_calibration_sees_each_captions_last_token(layout: str) -> None:
    root = TextLM(LoudLastToken(), AmaxHead())
    step = calibration_step_for(language_model(root), root)
    for batch in batches(layout):
        step(root, batch)
    head = root.lm_head
    assert isinstance(head, AmaxHead)
    assert head.amax == 50.0
    assert head.seen == sum(len(c) for c in CAPTIONS)
    # the scored positions alone never hold it: that was the calibration before
    scored = torch.cat(
        [LoudLastToken()(b["input_ids"])[0].reshape(-1, 4)[target_index(b)[0]] for b in batches(layout)]
    )
    assert float(scored.abs().max()) == pytest.approx(0.10)  # token 10: the loudest one with a target


def test_scoring_still_uses_the_positions_with_a_target_only() -> None:
    root = TextLM(LoudLastToken(), AmaxHead())
    logits = [selected_logits(root.decoder, root.lm_head, b) for b in batches("packed")]
    assert sum(x.shape[0] for x in logits) == sum(len(c) - 1 for c in CAPTIONS)


def test_modelopt_records_the_last_tokens_amax() -> None:
    """The real calibrator: ModelOpt's INT8 input quantizer on lm_head, calibrated with our step."""
    import modelopt.torch.quantization as mtq

    root = TextLM(LoudLastToken(), nn.Linear(4, 12))
    step = calibration_step_for(language_model(root), root)
    data = batches("packed")
    head_on = [  # INT8_DEFAULT_CFG leaves lm_head out; AutoQuant offers it the format as a recipe group
        {"quantizer_name": "*lm_head.weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}},
        {"quantizer_name": "*lm_head.input_quantizer", "cfg": {"num_bits": 8, "axis": None}},
    ]
    config = {**mtq.INT8_DEFAULT_CFG, "quant_cfg": [*mtq.INT8_DEFAULT_CFG["quant_cfg"], *head_on]}

    def calibrate(model: nn.Module) -> None:
        for batch in data:
            step(model, batch)

    mtq.quantize(root, config, forward_loop=calibrate)
    quantizer: Any = root.lm_head.input_quantizer
    assert float(quantizer.amax.max()) == pytest.approx(50.0)
