"""The architectures of the config sources match their published sizes (backend/model_configs.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from auto_quantize_model.backend.model_configs import ARCHITECTURES, Architecture

# ---------------------------------------------------------------- configs


def _on_meta(arch: Architecture) -> Any:
    from transformers import AutoModelForImageTextToText

    from auto_quantize_model.backend.models import config_source_config

    auto_class: Any = AutoModelForImageTextToText
    with torch.device("meta"):
        return auto_class.from_config(config_source_config(arch.source), dtype=torch.bfloat16)


def _billions(count: int) -> float:
    return count / 1e9


@pytest.mark.parametrize("arch", list(ARCHITECTURES.values()), ids=list(ARCHITECTURES))
def test_config_source_matches_its_published_size(arch: Architecture) -> None:
    """Built on the meta device, every ``config:`` source has its published parameter count.

    Tolerance: half a unit of the published figure's last digit (8.77 B -> +-0.005 B,
    33.4 B -> +-0.05 B), the most a rounded figure allows. The figures and their sources are in
    model_configs.py; a wrong width, layer count or embedding tie moves the count far beyond it.
    """
    model = _on_meta(arch)
    total = sum(p.numel() for p in model.parameters())
    assert abs(_billions(total) - arch.published_billions) <= arch.tolerance_billions, (
        f"{arch.source}: {total:,} parameters, published {arch.published_billions} B"
    )
    tied = model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert tied is arch.tie_word_embeddings
    text = model.config.text_config
    assert text.hidden_size == arch.text["hidden_size"]
    assert text.num_hidden_layers == arch.text["num_hidden_layers"]
    assert model.config.vision_config.out_hidden_size == text.hidden_size
    assert all(fact for fact in arch.provenance), f"{arch.source}: a provenance sentence is empty"


def test_moe_source_is_the_published_30b_a3b() -> None:
    """30B-A3B: 48 layers of 128 fused experts (MLP 768, top-8); 3.3 B of its text model per token.

    Active parameters: the text model (both embeddings) less each layer's unrouted experts (120 of
    128). That is 3.353 B; Qwen's card says 3.3 B, so its figure is truncated, not rounded: the
    check is 3.3 <= active < 3.4.
    """
    arch = ARCHITECTURES["config:qwen3-vl-30b-a3b"]
    model = _on_meta(arch)
    text = model.model.language_model
    experts = [layer.mlp.experts for layer in text.layers]
    assert len(experts) == 48
    assert all(type(e).__name__ == "Qwen3VLMoeTextExperts" for e in experts)
    first = experts[0]
    assert tuple(first.gate_up_proj.shape) == (128, 2 * 768, 2048)
    assert tuple(first.down_proj.shape) == (128, 2048, 768)
    assert text.layers[0].mlp.gate.top_k == 8
    routed = sum(e.gate_up_proj.numel() + e.down_proj.numel() for e in experts)
    text_total = sum(p.numel() for p in text.parameters()) + model.lm_head.weight.numel()
    active = text_total - routed * (1 - 8 / 128)
    assert arch.published_active_billions is not None
    assert arch.published_active_billions <= _billions(active) < arch.published_active_billions + 0.1
    assert abs(_billions(text_total) - 30.5) <= 0.05  # Qwen3-30B-A3B's 30.5 B total


def test_dense_sources_keep_attention_wider_than_hidden_where_published() -> None:
    """32B's 64 heads x 128 = 8192-wide attention over hidden 5120: head_dim is set, not derived."""
    model = _on_meta(ARCHITECTURES["config:qwen3-vl-32b"])
    attention = model.model.language_model.layers[0].self_attn
    assert tuple(attention.q_proj.weight.shape) == (8192, 5120)
    assert tuple(attention.k_proj.weight.shape) == (1024, 5120)
    assert tuple(attention.o_proj.weight.shape) == (5120, 8192)
