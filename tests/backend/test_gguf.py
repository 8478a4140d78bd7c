"""GGUF loading on a tiny synthetic Llama written with the ``gguf`` package (no download).

The file is shaped like SmolLM2's: a byte-level BPE (``tokenizer.ggml.model = "gpt2"``,
``pre = "smollm"``) whose bos is ``<|im_start|>`` (1) and eos/pad ``<|im_end|>`` (2), Llama
weights with q/k rows in llama.cpp's rotary order, the token embedding in Q8_0 and one MLP weight
in Q4_1. Everything expected is computed here from what was written, never hard-coded.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np
import pytest

from auto_quantize_model.backend import gguf as gguf_backend
from auto_quantize_model.backend.gguf_cache import GGUF_DIR, content_sha256, folder_bytes, size_text
from auto_quantize_model.errors import ConfigError, InputError

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

HIDDEN, HEADS, KV_HEADS, LAYERS, FFN = 64, 4, 2, 2, 128
HEAD_DIM = HIDDEN // HEADS
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS, EOS, PAD, UNK = 1, 2, 2, 0
QUANTIZED = {"token_embd.weight": "Q8_0", "blk.1.ffn_up.weight": "Q4_1"}
"""GGUF tensors written quantized (the rest are F32); names are llama.cpp's."""

TEXTS = (
    "A man riding a wave on top of a surfboard.",
    "Two dogs play with 3 balls in 2024, don't they?",
    "A kitchen with white cabinets and a stainless steel refrigerator.",
    "résumé café naïve",
)
CORPUS = [
    *TEXTS,
    "A cat sitting on a laptop keyboard next to a mouse.",
    "A group of people standing around a table with food.",
    "The 12 buses are parked in a row at the station.",
    "A bowl of fruit with bananas, apples and oranges.",
    "A person flying a kite on a windy beach at sunset.",
]


@attrs.frozen(eq=False)
class TinyGguf:
    """A written file, the weights it should load as (HF names), and the BPE it was built from."""

    path: Path
    expected: dict[str, np.ndarray[Any, Any]]
    bpe: Tokenizer


def _train_bpe() -> Tokenizer:
    """A byte-level BPE with SmolLM's pre-tokenizer (each digit alone, then GPT-2's split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer=trainer)
    return bpe


def _rotary_interleave(weight: np.ndarray[Any, Any], heads: int) -> np.ndarray[Any, Any]:
    """HF q/k rows (per head: first rotary half, then second) in llama.cpp's order (pairs interleaved)."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def _write_tiny_gguf(path: Path) -> TinyGguf:
    import gguf

    bpe = _train_bpe()
    state = json.loads(bpe.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    assert tokens[: len(SPECIALS)] == list(SPECIALS)
    n_vocab = len(tokens)

    rng = np.random.default_rng(0)

    def randn(*shape: int) -> np.ndarray[Any, Any]:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    hf: dict[str, np.ndarray[Any, Any]] = {
        "model.embed_tokens.weight": randn(n_vocab, HIDDEN),
        "model.norm.weight": 1.0 + randn(HIDDEN),
        "lm_head.weight": randn(n_vocab, HIDDEN),
    }
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    names["lm_head.weight"] = "output.weight"
    per_layer = {
        "input_layernorm": ("attn_norm", (HIDDEN,)),
        "self_attn.q_proj": ("attn_q", (HEADS * HEAD_DIM, HIDDEN)),
        "self_attn.k_proj": ("attn_k", (KV_HEADS * HEAD_DIM, HIDDEN)),
        "self_attn.v_proj": ("attn_v", (KV_HEADS * HEAD_DIM, HIDDEN)),
        "self_attn.o_proj": ("attn_output", (HIDDEN, HEADS * HEAD_DIM)),
        "post_attention_layernorm": ("ffn_norm", (HIDDEN,)),
        "mlp.gate_proj": ("ffn_gate", (FFN, HIDDEN)),
        "mlp.up_proj": ("ffn_up", (FFN, HIDDEN)),
        "mlp.down_proj": ("ffn_down", (HIDDEN, FFN)),
    }
    for layer in range(LAYERS):
        for hf_name, (gguf_name, shape) in per_layer.items():
            key = f"model.layers.{layer}.{hf_name}.weight"
            hf[key] = 1.0 + randn(*shape) if len(shape) == 1 else randn(*shape)
            names[key] = f"blk.{layer}.{gguf_name}.weight"

    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("tiny-test-llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_pad_token_id(PAD)
    writer.add_unk_token_id(UNK)
    writer.add_add_bos_token(False)

    expected: dict[str, np.ndarray[Any, Any]] = {}
    for key, value in hf.items():
        stored = value
        if key.endswith("q_proj.weight"):
            stored = _rotary_interleave(value, HEADS)
        elif key.endswith("k_proj.weight"):
            stored = _rotary_interleave(value, KV_HEADS)
        qtype_name = QUANTIZED.get(names[key])
        if qtype_name is None:
            writer.add_tensor(names[key], stored)
            expected[key] = value
            continue
        qtype = gguf.GGMLQuantizationType[qtype_name]
        packed = gguf.quants.quantize(stored, qtype)
        writer.add_tensor(names[key], packed, raw_dtype=qtype)
        expected[key] = gguf.quants.dequantize(packed, qtype).reshape(value.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return TinyGguf(path=path, expected=expected, bpe=bpe)


def _needs_gguf() -> None:
    pytest.importorskip("gguf", reason="gguf not installed (pip install '.[gguf]')")


def _needs_accelerate() -> None:
    """Skips without importing it (accelerate imports torch: seconds a fast test should not pay)."""
    if importlib.util.find_spec("accelerate") is None:
        pytest.skip("accelerate not installed; transformers needs it to load a GGUF (pip install '.[gguf]')")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyGguf:
    _needs_gguf()
    folder = tmp_path_factory.mktemp("tiny-gguf")
    return _write_tiny_gguf(folder / "tiny-llama.Q8_0.gguf")


@pytest.fixture(scope="module")
def loaded(tiny: TinyGguf) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Loaded once for the read-only tests (through the folder, the usual way)."""
    _needs_accelerate()
    return gguf_backend.load_gguf(tiny.path.parent, dtype="float32", device="cpu")


# --------------------------------------------------------------------------------------------
# Paths and prerequisites (no gguf needed)


def test_a_gguf_file_and_its_folder_resolve_to_the_file(tmp_path: Path) -> None:
    file = tmp_path / "Model.Q4_1.GGUF"
    file.write_bytes(b"GGUF")
    (tmp_path / "README.md").write_text("not a model", encoding="utf-8")
    assert gguf_backend.resolve_gguf_path(file) == file
    assert gguf_backend.resolve_gguf_path(tmp_path) == file


@pytest.mark.parametrize("names", [(), ("a.gguf", "b.gguf")])
def test_a_folder_without_exactly_one_gguf_is_refused_naming_what_it_holds(
    tmp_path: Path, names: tuple[str, ...]
) -> None:
    for name in names:
        (tmp_path / name).write_bytes(b"GGUF")
    listed = ", ".join(names) if names else "none"
    with pytest.raises(InputError, match=rf"folder {tmp_path} must hold exactly one .gguf.*\({listed}\)"):
        gguf_backend.resolve_gguf_path(tmp_path)


def test_missing_and_non_gguf_paths_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        gguf_backend.resolve_gguf_path(tmp_path / "absent.gguf")
    other = tmp_path / "model.safetensors"
    other.write_bytes(b"")
    with pytest.raises(InputError, match=r"model.safetensors is not a \.gguf file"):
        gguf_backend.resolve_gguf_path(other)


def test_missing_packages_are_all_named_with_the_extra_to_install() -> None:
    with pytest.raises(ConfigError, match=r"gguf, accelerate.*pip install 'auto-quantize-model\[gguf\]'"):
        gguf_backend.require_gguf_packages(find_spec=lambda name: None)
    with pytest.raises(ConfigError, match=r"package\(s\) accelerate, not installed"):
        gguf_backend.require_gguf_packages(find_spec=lambda name: None if name == "accelerate" else name)
    gguf_backend.require_gguf_packages(find_spec=lambda name: name)


def test_an_unknown_dtype_is_refused_before_loading(tmp_path: Path) -> None:
    file = tmp_path / "m.gguf"
    file.write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match="dtype 'fp8' is not one of auto, bfloat16, float16, float32"):
        gguf_backend.load_gguf(file, dtype="fp8", device="cpu")


# --------------------------------------------------------------------------------------------
# Metadata


def test_token_info_is_read_from_the_metadata(tiny: TinyGguf) -> None:
    info = gguf_backend.read_token_info(tiny.path)
    assert (info.architecture, info.tokenizer_model, info.pre) == ("llama", "gpt2", "smollm")
    assert info.special_ids == {"bos": BOS, "eos": EOS, "pad": PAD, "unk": UNK}
    assert info.special_tokens == {
        "bos": SPECIALS[BOS],
        "eos": SPECIALS[EOS],
        "pad": SPECIALS[PAD],
        "unk": SPECIALS[UNK],
    }


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    _needs_gguf()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(InputError, match=r"bad\.gguf is not a readable GGUF file"):
        gguf_backend.read_token_info(bad)


# --------------------------------------------------------------------------------------------
# Loading (transformers' GGUF path, then our fixes)


@pytest.mark.slow
def test_weights_are_the_written_tensors_as_plain_floats(
    tiny: TinyGguf, loaded: tuple[torch.nn.Module, PreTrainedTokenizerBase]
) -> None:
    import torch

    model, _ = loaded
    state = model.state_dict()
    assert set(state) == set(tiny.expected)
    for name, value in tiny.expected.items():
        assert state[name].dtype == torch.float32, name
        torch.testing.assert_close(state[name], torch.from_numpy(value), rtol=0, atol=0, msg=name)
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    plain: Any = model
    assert not getattr(plain, "is_quantized", False)
    assert not hasattr(plain, "hf_quantizer")
    assert "quantization_config" not in plain.config.to_dict()


@pytest.mark.slow
def test_special_tokens_follow_the_metadata_not_transformers_guess(
    tiny: TinyGguf, loaded: tuple[torch.nn.Module, PreTrainedTokenizerBase]
) -> None:
    model, tokenizer = loaded
    ids = gguf_backend.read_token_info(tiny.path).special_ids
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (ids["bos"], ids["eos"])
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id) == (ids["pad"], ids["unk"])
    assert tokenizer.eos_token == SPECIALS[EOS]  # transformers alone would say SPECIALS[BOS]
    plain: Any = model
    for holder in (plain.config, plain.generation_config):
        assert (holder.bos_token_id, holder.eos_token_id, holder.pad_token_id) == (BOS, EOS, PAD)


@pytest.mark.slow
def test_tokenizer_encodes_like_the_bpe_it_was_written_from(
    tiny: TinyGguf, loaded: tuple[torch.nn.Module, PreTrainedTokenizerBase]
) -> None:
    _, tokenizer = loaded
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == tiny.bpe.encode(text).ids, text
        assert tokenizer.decode(ids) == text
    digits = tokenizer.encode(" 2024", add_special_tokens=False)
    assert len(digits) >= 4  # smollm: one pre-token per digit, so no multi-digit merge can apply


@pytest.mark.slow
def test_save_pretrained_then_plain_from_pretrained_gives_identical_logits(
    tmp_path: Path, loaded: tuple[torch.nn.Module, PreTrainedTokenizerBase]
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = loaded
    saver: Any = model
    saver.save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    written = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    assert "quantization_config" not in written
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32, local_files_only=True)
    tokenizer_again = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    batch = tokenizer(list(TEXTS), return_tensors="pt", padding=True)
    assert torch.equal(
        tokenizer_again(list(TEXTS), return_tensors="pt", padding=True).input_ids, batch.input_ids
    )
    assert tokenizer_again.eos_token_id == EOS
    with torch.no_grad():
        expected = model(**batch).logits
        got = again(**batch).logits
    assert torch.equal(got, expected)


def _copy_of(tiny: TinyGguf, folder: Path) -> Path:
    _needs_accelerate()
    folder.mkdir()
    copy = folder / tiny.path.name
    copy.write_bytes(tiny.path.read_bytes())
    return copy


def test_a_kept_converted_copy_is_loaded_instead_of_the_gguf_and_is_the_same_model(
    tmp_path: Path, tiny: TinyGguf, loaded: tuple[torch.nn.Module, PreTrainedTokenizerBase], mocker: Any
) -> None:
    import torch

    file = _copy_of(tiny, tmp_path / "cache")
    first, _ = gguf_backend.load_gguf(file, dtype="float32", device="cpu", keep_converted=True)
    folder = gguf_backend.converted_folder(file, torch.float32)
    assert (folder / gguf_backend.CONVERTED_MARKER).is_file()
    assert [p.name for p in file.parent.iterdir() if ".tmp-" in p.name] == []
    parse = mocker.spy(gguf_backend, "read_token_info")
    again, tokenizer_again = gguf_backend.load_gguf(file, dtype="float32", device="cpu", keep_converted=True)
    assert parse.call_count == 0  # the GGUF file was not read again
    model, tokenizer = loaded
    batch = tokenizer(list(TEXTS), return_tensors="pt", padding=True)
    assert torch.equal(
        tokenizer_again(list(TEXTS), return_tensors="pt", padding=True).input_ids, batch.input_ids
    )
    assert (tokenizer_again.eos_token_id, tokenizer_again.pad_token_id) == (
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert tokenizer_again.padding_side == "right"
    expected = dict(model.state_dict())
    assert {
        name: torch.equal(value, expected[name]) for name, value in again.state_dict().items()
    } == dict.fromkeys(expected, True)
    assert not again.training
    del first


def test_a_converted_copy_of_another_file_is_replaced(tmp_path: Path, tiny: TinyGguf, mocker: Any) -> None:
    import torch

    file = _copy_of(tiny, tmp_path / "cache")
    gguf_backend.load_gguf(file, dtype="float32", device="cpu", keep_converted=True)
    folder = gguf_backend.converted_folder(file, torch.float32)
    record = json.loads((folder / gguf_backend.CONVERTED_MARKER).read_text(encoding="utf-8"))
    (folder / gguf_backend.CONVERTED_MARKER).write_text(
        json.dumps({**record, "size": record["size"] + 1}), encoding="utf-8"
    )
    parse = mocker.spy(gguf_backend, "read_token_info")
    gguf_backend.load_gguf(file, dtype="float32", device="cpu", keep_converted=True)
    assert parse.call_count == 1  # converted again from the file
    assert json.loads((folder / gguf_backend.CONVERTED_MARKER).read_text(encoding="utf-8")) == record


def test_a_copy_that_cannot_be_written_costs_only_a_log_line(
    tmp_path: Path, tiny: TinyGguf, mocker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    import torch

    file = _copy_of(tiny, tmp_path / "cache")
    mocker.patch(
        "transformers.PreTrainedModel.save_pretrained", side_effect=OSError(28, "No space left on device")
    )
    with caplog.at_level(logging.INFO, logger=gguf_backend.log.name):
        model, _ = gguf_backend.load_gguf(file, dtype="float32", device="cpu", keep_converted=True)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert not gguf_backend.converted_folder(file, torch.float32).exists()
    assert sorted(p.name for p in file.parent.iterdir()) == [file.name]  # no scratch folder left
    assert any("could not keep the converted copy" in m and "No space left" in m for m in caplog.messages)


def test_a_users_own_gguf_gets_nothing_written_beside_it(tmp_path: Path, tiny: TinyGguf) -> None:
    file = _copy_of(tiny, tmp_path / "mine")
    gguf_backend.load_gguf(file, dtype="float32", device="cpu")
    assert sorted(p.name for p in file.parent.iterdir()) == [file.name]


@pytest.mark.slow
def test_modelopt_quantizes_the_loaded_model(tiny: TinyGguf) -> None:
    _needs_accelerate()
    import modelopt.torch.quantization as mtq
    import torch

    model, tokenizer = gguf_backend.load_gguf(tiny.path, dtype="float32", device="cpu")
    batch = tokenizer(list(TEXTS), return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**batch).logits

    def calibrate(module: Any) -> None:
        module(**batch)

    mtq.quantize(model, mtq.INT8_DEFAULT_CFG, forward_loop=calibrate)
    quantized = [name for name, m in model.named_modules() if name.endswith("q_proj.weight_quantizer")]
    assert len(quantized) == LAYERS
    with torch.no_grad():
        after = model(**batch).logits
    assert torch.isfinite(after).all()
    assert not torch.equal(after, before)  # INT8 fake quantization changes the logits a little


# --------------------------------------------------------------------------------------------
# A user's GGUF file: its converted copy in the model cache, keyed by content (issue 26)


def load_cached(file: Path, cache: Path) -> Any:
    model, _ = gguf_backend.load_gguf(file, dtype="float32", device="cpu", cache_dir=cache)
    return model


def kept_copies(cache: Path) -> list[Path]:
    return sorted((cache / GGUF_DIR).iterdir()) if (cache / GGUF_DIR).is_dir() else []


def test_a_users_gguf_is_converted_once_and_kept_in_the_cache_by_content(
    tmp_path: Path,
    tiny: TinyGguf,
    mocker: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import torch

    file = _copy_of(tiny, tmp_path / "mine")
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger=gguf_backend.__name__)
    first = load_cached(file, cache)
    (folder,) = kept_copies(cache)
    assert folder.name.startswith(content_sha256(file) + ".converted-float32-transformers-")
    assert sorted(p.name for p in file.parent.iterdir()) == [file.name]  # nothing beside the user's file
    on_disk = size_text(folder_bytes(folder))
    assert f"kept the converted copy of {file} in {folder} ({on_disk} on disk;" in caplog.text

    parse = mocker.spy(gguf_backend, "read_token_info")
    elsewhere = _copy_of(tiny, tmp_path / "copy")  # the same bytes under another path
    again = load_cached(elsewhere, cache)
    assert parse.call_count == 0  # not converted again: the content is the key
    assert f"loaded {elsewhere} from its converted copy {folder} ({on_disk} on disk)" in caplog.text
    assert kept_copies(cache) == [folder]
    expected = first.state_dict()
    assert {
        name: torch.equal(value, expected[name]) for name, value in again.state_dict().items()
    } == dict.fromkeys(expected, True)


def test_a_file_changed_in_place_is_converted_again(
    tmp_path: Path,
    tiny: TinyGguf,
    mocker: Any,
) -> None:
    file = _copy_of(tiny, tmp_path / "mine")
    cache = tmp_path / "cache"
    load_cached(file, cache)
    with file.open("ab") as grown:  # GGUF readers ignore trailing bytes; the content differs
        grown.write(b"\0" * 32)
    parse = mocker.spy(gguf_backend, "read_token_info")
    load_cached(file, cache)
    assert parse.call_count == 1
    assert len(kept_copies(cache)) == 2


def test_a_copy_with_another_record_is_converted_again(
    tmp_path: Path,
    tiny: TinyGguf,
    mocker: Any,
) -> None:
    file = _copy_of(tiny, tmp_path / "mine")
    cache = tmp_path / "cache"
    load_cached(file, cache)
    (folder,) = kept_copies(cache)
    marker = folder / gguf_backend.CONVERTED_MARKER
    record = json.loads(marker.read_text(encoding="utf-8"))
    marker.write_text(json.dumps({**record, "size": 1}), encoding="utf-8")
    parse = mocker.spy(gguf_backend, "read_token_info")
    load_cached(file, cache)
    assert parse.call_count == 1
    assert json.loads(marker.read_text(encoding="utf-8")) == record


def test_an_unwritable_cache_costs_a_conversion_not_the_run(
    tmp_path: Path,
    tiny: TinyGguf,
    caplog: pytest.LogCaptureFixture,
) -> None:
    file = _copy_of(tiny, tmp_path / "mine")
    cache = tmp_path / "cache"
    cache.write_text("a file where the cache folder should be")
    caplog.set_level(logging.INFO, logger=gguf_backend.__name__)
    assert load_cached(file, cache) is not None
    assert "the next run converts again" in caplog.text


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 bytes"), (999, "999 bytes"), (517_000_000, "517.0 MB"), (16_200_000_000, "16.2 GB")],
)
def test_size_text(count: int, text: str) -> None:
    assert size_text(count) == text


def test_a_folder_under_the_copys_name_that_aqm_did_not_make_is_left_alone(tmp_path: Path) -> None:
    """Only a stale copy of ours (it holds the marker) is replaced: someone else's folder stays."""

    class NeverSaved:
        def save_pretrained(self, path: str) -> None:
            raise AssertionError("nothing may be written over a folder aqm did not make")

    folder = tmp_path / "model.converted-float32-transformers-x"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep", encoding="utf-8")
    gguf_backend._save_converted(NeverSaved(), NeverSaved(), folder, tmp_path / "model.gguf", {})  # type: ignore[arg-type]
    assert [p.name for p in folder.iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]
