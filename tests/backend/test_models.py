"""The built-in sources: their configs, and the tiny models built from them."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pytest_mock import MockerFixture

from auto_quantize_model.artifacts import LoadedModel
from auto_quantize_model.backend.models import (
    auto_class_for,
    build_builtin,
    load_tokenizer,
    qwen3_vl_4b_config,
    tiny_qwen3_vl_config,
    tiny_qwen3_vl_moe_config,
)
from auto_quantize_model.data import tiny_tokenizer_dir
from auto_quantize_model.errors import ConfigError, InputError
from auto_quantize_model.sources import BUILTIN_SOURCES, QWEN3_VL_4B, TINY_QWEN3_VL, TINY_QWEN3_VL_MOE
from auto_quantize_model.specs import LoadSpec

TINY_SEED = 0  # the seed conftest.tiny_checkpoint was built with


# ---------------------------------------------------------------- configs


def test_qwen3_vl_4b_config_matches_the_published_architecture() -> None:
    config = qwen3_vl_4b_config()
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (2560, 36, 32)
    assert (text.num_key_value_heads, text.head_dim, text.intermediate_size) == (8, 128, 9728)
    assert (text.vocab_size, text.max_position_embeddings) == (151936, 262144)
    assert text.rope_parameters["rope_theta"] == 5_000_000.0
    assert text.rope_parameters["mrope_section"] == [24, 20, 20]
    assert text.rope_parameters["mrope_interleaved"] is True
    assert config.tie_word_embeddings is True
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.intermediate_size) == (
        24,
        1024,
        16,
        4096,
    )
    assert (vision.out_hidden_size, vision.patch_size, vision.spatial_merge_size) == (2560, 16, 2)
    assert (vision.temporal_patch_size, vision.num_position_embeddings) == (2, 2304)
    assert list(vision.deepstack_visual_indexes) == [5, 11, 17]
    ids = (
        config.image_token_id,
        config.video_token_id,
        config.vision_start_token_id,
        config.vision_end_token_id,
    )
    assert ids == (151655, 151656, 151652, 151653)


def test_qwen3_vl_4b_parameter_count_on_meta() -> None:
    """The whole architecture, sized without allocating: 4.44 B parameters, lm_head tied."""
    from transformers import AutoModelForImageTextToText

    auto_class: Any = AutoModelForImageTextToText
    with torch.device("meta"):
        model = auto_class.from_config(qwen3_vl_4b_config(), dtype=torch.bfloat16)
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for p in model.model.visual.parameters())
    assert total == 4_437_815_808
    assert vision == 415_347_712
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight


def test_tiny_moe_config_is_small_and_shaped_like_30b_a3b() -> None:
    tokenizer = load_tokenizer(tiny_tokenizer_dir())
    config = tiny_qwen3_vl_moe_config(tokenizer)
    text = config.text_config
    assert config.model_type == "qwen3_vl_moe"
    assert (text.num_experts, text.num_experts_per_tok, text.num_hidden_layers) == (4, 2, 2)
    assert text.hidden_size % 128 == 0
    assert text.moe_intermediate_size % 128 == 0
    assert sum(text.rope_parameters["mrope_section"]) == text.head_dim // 2
    assert tokenizer.convert_ids_to_tokens(config.image_token_id) == "<|image_pad|>"
    assert config.tie_word_embeddings is False


def test_tiny_config_points_vision_ids_at_real_tokens() -> None:
    tokenizer = load_tokenizer(tiny_tokenizer_dir())
    config = tiny_qwen3_vl_config(tokenizer)
    text = config.text_config
    assert text.vocab_size == len(tokenizer)
    assert sum(text.rope_parameters["mrope_section"]) == text.head_dim // 2
    assert text.num_attention_heads > text.num_key_value_heads  # GQA
    assert tokenizer.convert_ids_to_tokens(config.image_token_id) == "<|image_pad|>"
    assert tokenizer.convert_ids_to_tokens(config.video_token_id) == "<|video_pad|>"
    assert tokenizer.convert_ids_to_tokens(config.vision_start_token_id) == "<|vision_start|>"
    assert tokenizer.convert_ids_to_tokens(config.vision_end_token_id) == "<|vision_end|>"
    assert all(i < config.vision_config.depth for i in config.vision_config.deepstack_visual_indexes)


# ---------------------------------------------------------------- errors


def test_unknown_builtin_lists_known_ones() -> None:
    with pytest.raises(ConfigError) as err:
        build_builtin("builtin:tiny-llama", device="cpu")
    message = str(err.value)
    assert "'builtin:tiny-llama'" in message
    assert all(name in message for name in BUILTIN_SOURCES)


def test_auto_class_prefers_image_text_to_text() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    assert auto_class_for(qwen3_vl_4b_config(), "x") is AutoModelForImageTextToText
    assert auto_class_for(AutoConfig.for_model("qwen3"), "x") is AutoModelForCausalLM
    with pytest.raises(InputError, match="'clip' has no language model"):
        auto_class_for(AutoConfig.for_model("clip"), "ckpt")


# ---------------------------------------------------------------- real models on CPU


@pytest.mark.slow
def test_builtin_tiny_is_small_fast_and_seeded() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    loaded = build_builtin(TINY_QWEN3_VL, seed=TINY_SEED, device="cpu")
    assert torch.equal(torch.rand(1), expected_next), "building must not consume the global RNG"

    assert isinstance(loaded, LoadedModel)
    assert loaded.architecture == "Qwen3VLForConditionalGeneration"
    assert (loaded.dtype, loaded.device, loaded.source) == ("float32", "cpu", TINY_QWEN3_VL)
    model: Any = loaded.model
    assert not model.training
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) < 3_000_000

    batch = loaded.tokenizer(
        ["A dog runs along the beach.", "Two cats sleep."], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(loaded.tokenizer))
    assert torch.isfinite(logits).all()

    same = build_builtin(TINY_QWEN3_VL, seed=TINY_SEED, device="cpu").model
    other = build_builtin(TINY_QWEN3_VL, seed=TINY_SEED + 1, device="cpu").model
    weight = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.get_parameter(weight), same.get_parameter(weight))
    assert not torch.equal(model.get_parameter(weight), other.get_parameter(weight))


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.slow
def test_qwen3_vl_4b_builds_on_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    loaded = build_builtin(QWEN3_VL_4B, seed=0, device="cuda")
    model = loaded.model
    assert (loaded.dtype, loaded.device) == ("bfloat16", "cuda:0")
    assert sum(p.numel() for p in model.parameters()) == 4_437_815_808
    assert all(p.device.type == "cuda" for p in model.parameters())
    weight = model.get_parameter("model.language_model.layers.0.mlp.down_proj.weight")
    assert 0.01 < weight.float().std().item() < 0.03  # initialised (std 0.02), not left empty
    batch = loaded.tokenizer(["A woman walks her dog along a wet sidewalk at dusk."], return_tensors="pt").to(
        "cuda"
    )
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] == 151936
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_tiny_moe_builds_on_cpu_seeded() -> None:
    """The tiny MoE source: fused experts, the global RNG untouched, same seed -> same experts."""
    torch.manual_seed(7)
    expected_next = torch.rand(1)
    torch.manual_seed(7)
    loaded = build_builtin(TINY_QWEN3_VL_MOE, seed=TINY_SEED, device="cpu")
    assert torch.equal(torch.rand(1), expected_next)
    assert loaded.architecture == "Qwen3VLMoeForConditionalGeneration"
    model: Any = loaded.model
    again: Any = build_builtin(TINY_QWEN3_VL_MOE, seed=TINY_SEED, device="cpu").model
    name = "model.language_model.layers.1.mlp.experts.gate_up_proj"
    assert torch.equal(model.get_parameter(name), again.get_parameter(name))
    batch = loaded.tokenizer(["A dog runs along the beach."], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all()


def test_a_placed_builtin_without_accelerate_names_the_package(mocker: MockerFixture) -> None:
    from auto_quantize_model.backend.models import load

    mocker.patch("auto_quantize_model.backend.models._has_accelerate", return_value=False)
    spec = LoadSpec(path="builtin:tiny-qwen3-vl", device_map="auto")
    with pytest.raises(ConfigError, match=r"^model.device_map = 'auto' needs the accelerate package"):
        load(spec)
