"""The published Qwen3-VL architectures behind the ``config:`` sources, with where each number came from.

A ``config:`` source builds the real architecture with random weights, so timings, peak memory
and the report's shape are those of the real model without fetching its weights (and without the
Hugging Face hub, which this project never reaches). Each :class:`Architecture` keeps the numbers
together with the sources they were read from and the parameter count the model is published
with; a test builds every architecture on the meta device and checks that count, which is what
catches a wrong or missing number (tied vs untied embeddings alone moves 8B by 0.62 B).

Where the numbers come from (no checkpoint could be downloaded here, so each was cross-checked):

* transformers 5.17, ``models/qwen3_vl/configuration_qwen3_vl.py`` and
  ``models/qwen3_vl_moe/configuration_qwen3_vl_moe.py``: the class defaults give the 27-block
  vision tower of the 8B, 32B and 30B-A3B checkpoints (depth 27, hidden 1152, MLP 4304, 16 heads,
  ``gelu_pytorch_tanh``, patch 16, 2x2 merge, temporal patch 2, 2304 position embeddings,
  deepstack after blocks 8, 16 and 24), the image/video/vision-start/vision-end token ids
  (151655, 151656, 151652, 151653), the 151,936-token vocabulary, head_dim 128, RMSNorm eps 1e-6
  and bias-free attention. Their *text* defaults (hidden 4096, MLP 22016, 32 layers; MoE: hidden
  2048, 24 layers, 60 experts, top-4) belong to no published Qwen3-VL and are not used.
* The checkpoints' own ``config.json`` files, as transcribed in public code and documentation
  (found with a code search; quoted per architecture below). Where two transcriptions disagreed
  the published parameter count decided.
* The published parameter counts: the Hugging Face model pages' safetensors size (8.77 B, 33.4 B,
  31.07 B; 4.44 B for 4B), repeated by model catalogues (LM Studio's Qwen3-VL-8B card: "8.77B
  parameters"; free2aitools' Qwen3-VL-30B-A3B page: "Parameters 31.07"). For 30B-A3B the text
  model alone matches Qwen3-30B-A3B's card: 30.5 B total, 3.3 B activated, 48 layers, 32 query /
  4 KV heads, 128 experts, 8 activated.

This module is pure data (no torch, no transformers at import); :func:`transformers_config`
turns an architecture into a transformers config when a model is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import attrs

from auto_quantize_model.sources import QWEN3_VL_4B, QWEN3_VL_8B, QWEN3_VL_30B_A3B, QWEN3_VL_32B

if TYPE_CHECKING:
    from transformers import PretrainedConfig

Family = Literal["qwen3_vl", "qwen3_vl_moe"]

# Shared by every Qwen3-VL size: transformers' Qwen3VLConfig / Qwen3VLMoeConfig defaults, and
# the same ids in every published config.json.
_TOKEN_IDS: dict[str, Any] = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}
# Qwen's tokenizer: <|endoftext|> and <|im_end|> (text_config of the published 4B and 8B configs).
_TEXT_TOKENS: dict[str, int] = {"bos_token_id": 151643, "eos_token_id": 151645}
# Every published Qwen3-VL text_config: rope_theta 5,000,000, interleaved mrope [24, 20, 20]
# (half of head_dim 128), 256k context. transformers 5 reads them as ``rope_parameters``.
_ROPE: dict[str, Any] = {
    "rope_type": "default",
    "rope_theta": 5_000_000.0,
    "mrope_section": [24, 20, 20],
    "mrope_interleaved": True,
}
_TEXT_COMMON: dict[str, Any] = {
    "vocab_size": 151936,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-6,
    "attention_bias": False,
    **_TEXT_TOKENS,
}


def _tower_27(out_hidden_size: int) -> dict[str, Any]:
    """The 27-block SigLIP-2 tower of 8B, 32B and 30B-A3B; only its output width follows the LM."""
    return {
        "depth": 27,
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_heads": 16,
        "hidden_act": "gelu_pytorch_tanh",
        "in_channels": 3,
        "out_hidden_size": out_hidden_size,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [8, 16, 24],
    }


@attrs.frozen
class Architecture:
    """One published architecture: its numbers, its published size, and where both came from."""

    source: str
    """The ``config:`` name LoadModel accepts."""
    checkpoint: str
    """The Hugging Face checkpoint it reproduces (never downloaded)."""
    family: Family
    text: Mapping[str, Any]
    vision: Mapping[str, Any]
    tie_word_embeddings: bool
    published_billions: float
    """Total parameters (vision included) as published, in billions."""
    published_decimals: int
    """Decimals the published figure is given with: a count within half its last digit matches."""
    provenance: tuple[str, ...]
    """Where the numbers came from, one sentence each."""
    published_active_billions: float | None = None
    """Parameters used per token of the text model (MoE only), as published."""

    @property
    def is_moe(self) -> bool:
        return self.family == "qwen3_vl_moe"

    @property
    def tolerance_billions(self) -> float:
        """Half a unit of the published figure's last digit: 0.005 B for "8.77 B"."""
        return 0.5 * 10.0 ** (-self.published_decimals)


QWEN3_VL_4B_ARCH = Architecture(
    source=QWEN3_VL_4B,
    checkpoint="Qwen/Qwen3-VL-4B-Instruct",
    family="qwen3_vl",
    text={
        **_TEXT_COMMON,
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": True,
        "rope_parameters": _ROPE,
    },
    vision={
        "depth": 24,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_heads": 16,
        "hidden_act": "gelu_pytorch_tanh",
        "in_channels": 3,
        "out_hidden_size": 2560,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [5, 11, 17],
    },
    tie_word_embeddings=True,
    published_billions=4.44,
    published_decimals=2,
    provenance=(
        "config.json of Qwen/Qwen3-VL-4B-Instruct (transformers 4.57.0.dev0 export), as the project "
        "shipped it before this module and as transcribed in public code: text 2560/9728/36 layers, "
        "32/8 heads, tied embeddings; vision 24 blocks of 1024/4096, deepstack [5, 11, 17].",
        "Published size 4.44 B (Hugging Face model page).",
    ),
)

QWEN3_VL_8B_ARCH = Architecture(
    source=QWEN3_VL_8B,
    checkpoint="Qwen/Qwen3-VL-8B-Instruct",
    family="qwen3_vl",
    text={
        **_TEXT_COMMON,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
        "rope_parameters": _ROPE,
    },
    vision=_tower_27(out_hidden_size=4096),
    tie_word_embeddings=False,
    published_billions=8.77,
    published_decimals=2,
    provenance=(
        "Text 4096 hidden / 12288 MLP / 36 layers / 32 query and 8 KV heads / head_dim 128 / "
        "rope_theta 5e6 / mrope [24, 20, 20] interleaved / 262144 positions: the 8B config.json as "
        "quoted by a Qwen3-VL architecture write-up and by an MLX-VLM compatibility test of the "
        "official 8B shape (one other test claims MLP 22016, transformers' placeholder default; "
        "that gives 13.07 B, not the published 8.77 B).",
        "Untied lm_head: only untied embeddings reach 8.77 B (tied gives 8.15 B), as in Qwen3-8B.",
        "Vision: transformers' Qwen3VLVisionConfig defaults with out_hidden_size 4096 (the 8B "
        "config.json's vision_config, same write-up).",
        "Published size 8.77 B (Hugging Face safetensors size; LM Studio's Qwen3-VL-8B card).",
    ),
)

QWEN3_VL_32B_ARCH = Architecture(
    source=QWEN3_VL_32B,
    checkpoint="Qwen/Qwen3-VL-32B-Instruct",
    family="qwen3_vl",
    text={
        **_TEXT_COMMON,
        "hidden_size": 5120,
        "intermediate_size": 25600,
        "num_hidden_layers": 64,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
        "rope_parameters": _ROPE,
    },
    vision=_tower_27(out_hidden_size=5120),
    tie_word_embeddings=False,
    published_billions=33.4,
    published_decimals=1,
    provenance=(
        "Text 5120 hidden / 25600 MLP / 64 layers / 64 query and 8 KV heads / head_dim 128 (so "
        "attention is 8192 wide, not hidden / heads = 80): the 32B config.json as committed in two "
        "public projects that load it (one checks every field of the shipped file); same rope, "
        "vocabulary and positions as every Qwen3-VL.",
        "Vision: the 27-block tower with out_hidden_size 5120 (same config.json).",
        "Untied lm_head: the config.json sets no tie (transformers' Qwen3VLConfig defaults to "
        "untied) and only untied embeddings reach 33.4 B (tied gives 32.58 B).",
        "Published size 33.4 B (Hugging Face safetensors size).",
    ),
)

QWEN3_VL_30B_A3B_ARCH = Architecture(
    source=QWEN3_VL_30B_A3B,
    checkpoint="Qwen/Qwen3-VL-30B-A3B-Instruct",
    family="qwen3_vl_moe",
    text={
        **_TEXT_COMMON,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "tie_word_embeddings": False,
        "rope_parameters": _ROPE,
    },
    vision=_tower_27(out_hidden_size=2048),
    tie_word_embeddings=False,
    published_billions=31.07,
    published_decimals=2,
    published_active_billions=3.3,
    provenance=(
        "Text 2048 hidden / 48 layers / 32 query and 4 KV heads / head_dim 128 / 128 experts of "
        "MLP 768, 8 per token / decoder_sparse_step 1, no dense layers / untied lm_head: "
        "Qwen/Qwen3-VL-30B-A3B-Instruct config.json (commit 1fc78ad) as transcribed field by field "
        "in a public parser test, agreeing with NVIDIA's Megatron arguments for the same model "
        "(--num-experts 128 --moe-router-topk 8 --moe-ffn-hidden-size 768 "
        "--untie-embeddings-and-output-weights).",
        "intermediate_size 6144 is only used by dense MLP layers, which this model has none of "
        "(mlp_only_layers empty); norm_topk_prob true in config.json is what transformers' router "
        "always does (it renormalises the top-k weights), so it is not a setting here.",
        "Vision: the 27-block tower with out_hidden_size 2048 (same config.json).",
        "Published size 31.07 B (Hugging Face safetensors size); the text model alone is "
        "Qwen3-30B-A3B's 30.5 B total / 3.3 B activated.",
    ),
)

ARCHITECTURES: Mapping[str, Architecture] = {
    arch.source: arch
    for arch in (QWEN3_VL_4B_ARCH, QWEN3_VL_8B_ARCH, QWEN3_VL_32B_ARCH, QWEN3_VL_30B_A3B_ARCH)
}
"""Every ``config:`` source, by name."""


def transformers_config(arch: Architecture) -> PretrainedConfig:
    """The transformers config for ``arch`` (``Qwen3VLConfig`` or ``Qwen3VLMoeConfig``)."""
    if arch.is_moe:
        from transformers import Qwen3VLMoeConfig

        return Qwen3VLMoeConfig(
            text_config=dict(arch.text),
            vision_config=dict(arch.vision),
            tie_word_embeddings=arch.tie_word_embeddings,
            **_TOKEN_IDS,
        )
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(arch.text),
        vision_config=dict(arch.vision),
        tie_word_embeddings=arch.tie_word_embeddings,
        **_TOKEN_IDS,
    )


def tiny_moe_text(vocab_size: int, pad_token_id: int | None, eos_token_id: int | None) -> dict[str, Any]:
    """Text settings of the tiny Qwen3-VL-MoE: 2 layers, 4 experts of MLP 128, top-2.

    Shaped like 30B-A3B where it matters to ModelOpt (fused 3-D ``gate_up_proj``/``down_proj``
    experts, a top-k router, GQA, interleaved mrope) and small enough for CPU tests. Hidden and
    expert widths are 128 so block formats with blocks of 64 or 128 apply to every weight.
    """
    return {
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 256,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "pad_token_id": pad_token_id,
        "eos_token_id": eos_token_id,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": [6, 5, 5],
            "mrope_interleaved": True,
        },
    }


TINY_VISION: Mapping[str, Any] = {
    "depth": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_heads": 4,
    "out_hidden_size": 128,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "num_position_embeddings": 64,
    "deepstack_visual_indexes": [1],
}
"""The tiny built-ins' vision tower: 2 blocks with a deepstack merger after block 1."""
