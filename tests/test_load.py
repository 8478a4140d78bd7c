"""LoadModel, the built-in sources and the package data they rely on."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from pytest_mock import MockerFixture

from auto_quantize_model.artifacts import LoadedModel
from auto_quantize_model.backend.devices import resolve_device, resolve_dtype
from auto_quantize_model.backend.model_configs import ARCHITECTURES, Architecture
from auto_quantize_model.backend.models import (
    auto_class_for,
    build_builtin,
    load_tokenizer,
    qwen3_vl_4b_config,
    read_checkpoint_config,
    tiny_qwen3_vl_config,
    tiny_qwen3_vl_moe_config,
)
from auto_quantize_model.data import DATA_DIR, builtin_captions_path, tiny_tokenizer_dir
from auto_quantize_model.errors import AqmError, ConfigError, InputError
from auto_quantize_model.pipeline import Artifacts, Pipeline
from auto_quantize_model.sources import BUILTIN_SOURCES, QWEN3_VL_4B, TINY_QWEN3_VL, TINY_QWEN3_VL_MOE
from auto_quantize_model.specs import LoadSpec
from auto_quantize_model.stages.load_model import LoadModel

TINY_SEED = 0  # the seed conftest.tiny_checkpoint was built with
QWEN_SPECIALS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# ---------------------------------------------------------------- package data


def test_captions_are_our_own_shape() -> None:
    lines = builtin_captions_path().read_text(encoding="utf-8").splitlines()
    assert 480 <= len(lines) <= 540
    assert len(set(lines)) == len(lines), "duplicate captions"
    for line in lines:
        assert line, "blank line"
        assert line == line.strip(), f"padded line: {line!r}"
        assert 6 <= len(line.split()) <= 20, line


def test_package_data_is_small() -> None:
    total = sum(p.stat().st_size for p in DATA_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert total < 200_000


def test_tiny_tokenizer_round_trips_every_caption() -> None:
    tokenizer = load_tokenizer(tiny_tokenizer_dir())
    lines = builtin_captions_path().read_text(encoding="utf-8").splitlines()
    encoded = tokenizer(lines, add_special_tokens=True)["input_ids"]
    assert tokenizer.batch_decode(encoded) == lines
    # Merges were learned from these captions: far fewer tokens than bytes.
    assert sum(map(len, encoded)) < 0.4 * sum(len(line) for line in lines)


def test_tiny_tokenizer_specials_and_bytes() -> None:
    tokenizer = load_tokenizer(tiny_tokenizer_dir())
    assert 1000 <= len(tokenizer) <= 2000
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.padding_side == "right"
    ids = [tokenizer.convert_tokens_to_ids(token) for token in ("<|endoftext|>", *QWEN_SPECIALS)]
    assert all(isinstance(i, int) and i < len(tokenizer) for i in ids)
    assert len(set(ids)) == 7
    # No BOS/EOS added: calibration rows hold caption tokens only, as with Qwen's tokenizer.
    plain = tokenizer("a dog", add_special_tokens=True)["input_ids"]
    assert not set(plain) & set(ids)
    # Byte-level: text never seen in training still round-trips, specials stay single tokens.
    odd = "Ünïcode café 🍕 <|image_pad|>"
    odd_ids = tokenizer(odd)["input_ids"]
    assert tokenizer.decode(odd_ids) == odd
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") in odd_ids


# ---------------------------------------------------------------- devices and dtypes


def test_resolve_device_auto_follows_cuda(mocker: MockerFixture) -> None:
    mocker.patch("torch.cuda.is_available", return_value=False)
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"
    mocker.patch("torch.cuda.is_available", return_value=True)
    mocker.patch("torch.cuda.device_count", return_value=2)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda:1") == "cuda:1"


@pytest.mark.parametrize(
    ("device", "cuda", "message"),
    [
        ("gpu", False, "'gpu' is not one of auto, cpu, cuda, cuda:N"),
        ("cuda", False, "'cuda' asked for, but CUDA is not available"),
        ("cuda:0", False, "'cuda:0' asked for, but CUDA is not available"),
        ("cuda:3", True, "'cuda:3' asked for, but only 2 GPU(s) exist"),
    ],
)
def test_resolve_device_errors(mocker: MockerFixture, device: str, cuda: bool, message: str) -> None:
    mocker.patch("torch.cuda.is_available", return_value=cuda)
    mocker.patch("torch.cuda.device_count", return_value=2)
    with pytest.raises(ConfigError, match=r"^device ") as err:
        resolve_device(device)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_resolve_dtype() -> None:
    assert resolve_dtype("auto", "cuda:0") is torch.bfloat16
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("float16", "cpu") is torch.float16
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16


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


def _write_tiny_config(directory: Path) -> None:
    tiny_qwen3_vl_config(load_tokenizer(tiny_tokenizer_dir())).save_pretrained(str(directory))


def _copy_tokenizer(directory: Path) -> None:
    for item in tiny_tokenizer_dir().iterdir():
        shutil.copy(item, directory / item.name)


def test_unknown_builtin_lists_known_ones() -> None:
    with pytest.raises(ConfigError) as err:
        build_builtin("builtin:tiny-llama", device="cpu")
    message = str(err.value)
    assert "'builtin:tiny-llama'" in message
    assert all(name in message for name in BUILTIN_SOURCES)


def test_load_errors_table(tmp_path: Path) -> None:
    """Each unusable input fails with a one-line InputError naming the culprit."""
    not_dir = tmp_path / "weights.safetensors"
    not_dir.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_json = tmp_path / "bad-json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    vision_only = tmp_path / "vision-only"
    vision_only.mkdir()
    (vision_only / "config.json").write_text(json.dumps({"model_type": "vit"}))
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    _write_tiny_config(no_tokenizer)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    _write_tiny_config(no_weights)
    _copy_tokenizer(no_weights)

    cases: list[tuple[LoadSpec, str]] = [
        (LoadSpec(str(tmp_path / "missing")), f"model path {tmp_path / 'missing'} does not exist"),
        (LoadSpec(str(not_dir)), f"model path {not_dir} is not a directory"),
        (LoadSpec(str(empty)), f"{empty} is not a Hugging Face checkout: it has no config.json"),
        (LoadSpec(str(bad_json)), f"{bad_json / 'config.json'} is not valid JSON"),
        (LoadSpec(str(vision_only)), "model_type 'vit' has no language model"),
        (LoadSpec(str(no_tokenizer), device="cpu"), f"no tokenizer in {no_tokenizer}"),
        (
            LoadSpec(str(no_tokenizer), tokenizer=str(tmp_path / "tok"), device="cpu"),
            f"tokenizer directory {tmp_path / 'tok'} does not exist",
        ),
        (LoadSpec(str(no_weights), device="cpu"), f"cannot load weights from {no_weights}"),
    ]
    for spec, expected in cases:
        with pytest.raises(InputError) as err:
            LoadModel(spec).run(Artifacts())
        message = str(err.value)
        assert expected in message, (spec.path, message)
        assert "\n" not in message


def test_checkpoint_faults_name_the_file(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Truncated or garbage weights and malformed config.json fail naming the file, in one line."""

    def broken(name: str, damage: Callable[[Path], None]) -> Path:
        folder = tmp_path / name
        shutil.copytree(tiny_checkpoint, folder)
        damage(folder)
        return folder

    def _garbage(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"\x07" * 4096)

    def truncate(folder: Path) -> None:
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    def edit_config(change: Callable[[dict[str, Any]], object]) -> Callable[[Path], None]:
        def apply(folder: Path) -> None:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            (folder / "config.json").write_text(json.dumps(change(config)), encoding="utf-8")

        return apply

    cases = [
        (broken("truncated", truncate), "model.safetensors: Error while deserializing header"),
        (
            broken("garbage", _garbage),
            "model.safetensors: Error while deserializing header",
        ),
        (broken("list", edit_config(lambda c: [c])), "config.json holds a JSON list, not an object"),
        (
            broken("no-type", edit_config(lambda c: {**c, "model_type": 3})),
            "config.json has no model_type string",
        ),
        (
            broken("unknown", edit_config(lambda c: {**c, "model_type": "qwen9_vl"})),
            "model_type 'qwen9_vl' has no language model",
        ),
        (broken("mismatch", edit_config(lambda c: {**c, "model_type": "bert"})), "cannot load weights from"),
    ]
    for folder, expected in cases:
        with pytest.raises(InputError) as err:
            LoadModel(LoadSpec(str(folder), device="cpu")).run(Artifacts())
        message = str(err.value)
        assert expected in message, (folder.name, message)
        assert str(folder) in message
        assert "\n" not in message


def test_device_map_without_accelerate_is_refused(tmp_path: Path, mocker: MockerFixture) -> None:
    _write_tiny_config(tmp_path)
    _copy_tokenizer(tmp_path)
    mocker.patch("auto_quantize_model.backend.models._has_accelerate", return_value=False)
    with pytest.raises(ConfigError, match=r"^device_map='auto' needs the accelerate package"):
        LoadModel(LoadSpec(str(tmp_path), device_map="auto")).run(Artifacts())


def test_auto_class_prefers_image_text_to_text() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    assert auto_class_for(qwen3_vl_4b_config(), "x") is AutoModelForImageTextToText
    assert auto_class_for(AutoConfig.for_model("qwen3"), "x") is AutoModelForCausalLM
    with pytest.raises(InputError, match="'clip' has no language model"):
        auto_class_for(AutoConfig.for_model("clip"), "ckpt")


def test_read_checkpoint_config_of_saved_config(tmp_path: Path) -> None:
    _write_tiny_config(tmp_path)
    config = read_checkpoint_config(tmp_path)
    assert config.model_type == "qwen3_vl"


def test_pipeline_wraps_load_errors_naming_the_stage(tmp_path: Path) -> None:
    with pytest.raises(AqmError, match=r"^stage LoadModel failed: model path .* does not exist$"):
        Pipeline([LoadModel(LoadSpec(str(tmp_path / "nope")))]).run()


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


@pytest.mark.slow
def test_load_model_builtin_honours_spec() -> None:
    spec = LoadSpec(
        TINY_QWEN3_VL, dtype="bfloat16", device="cpu", padding_side="left", attn_implementation="eager"
    )
    loaded = LoadModel(spec).run(Artifacts())
    assert loaded.dtype == "bfloat16"
    assert loaded.tokenizer.padding_side == "left"
    model: Any = loaded.model
    assert model.config.text_config._attn_implementation == "eager"


@pytest.mark.slow
def test_reload_through_from_pretrained_gives_the_same_logits(tiny_checkpoint: Path) -> None:
    spec = LoadSpec(str(tiny_checkpoint), device="cpu", padding_side="left")
    loaded = LoadModel(spec).run(Artifacts())
    assert loaded.architecture == "Qwen3VLForConditionalGeneration"
    assert (loaded.dtype, loaded.device, loaded.source) == ("float32", "cpu", str(tiny_checkpoint))
    assert loaded.tokenizer.padding_side == "left"
    assert not loaded.model.training
    model: Any = loaded.model
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight

    original = build_builtin(TINY_QWEN3_VL, seed=TINY_SEED, device="cpu")
    batch = original.tokenizer(["A red bicycle leans against a brick wall."], return_tensors="pt")
    with torch.no_grad():
        expected = original.model(**batch).logits
        got = loaded.model(**batch).logits
    assert torch.equal(got, expected)


@pytest.mark.slow
def test_tokenizer_from_another_directory(tiny_checkpoint: Path, tmp_path: Path) -> None:
    weights_only = tmp_path / "weights"
    weights_only.mkdir()
    for item in tiny_checkpoint.iterdir():
        if item.name in {"config.json", "model.safetensors", "generation_config.json"}:
            shutil.copy(item, weights_only / item.name)
    with pytest.raises(InputError, match="no tokenizer in"):
        LoadModel(LoadSpec(str(weights_only), device="cpu")).run(Artifacts())
    spec = LoadSpec(str(weights_only), tokenizer=str(tiny_tokenizer_dir()), device="cpu", dtype="bfloat16")
    loaded = LoadModel(spec).run(Artifacts())
    assert loaded.dtype == "bfloat16"
    assert loaded.tokenizer.pad_token == "<|endoftext|>"


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
