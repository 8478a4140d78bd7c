"""The package data: bundled captions and the tiny tokenizer."""

from __future__ import annotations

from auto_quantize_model.backend.models import load_tokenizer
from auto_quantize_model.data import DATA_DIR, builtin_captions_path, tiny_tokenizer_dir

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
