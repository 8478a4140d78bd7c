"""Files shipped with the package: our own captions and a tiny tokenizer trained on them.

Both exist so that tests, examples and ``builtin:`` sources work offline with nothing downloaded.
``captions.txt`` was written for this project (everyday scene descriptions, one per line); it is
not taken from any dataset. ``tiny-tokenizer/`` is rebuilt from it by ``_build_tokenizer.py``.
"""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent


def builtin_captions_path() -> Path:
    """The bundled captions file (512 lines, UTF-8, no blank lines)."""
    return DATA_DIR / "captions.txt"


def builtin_holdout_path() -> Path:
    """128 more captions of ours, disjoint from ``captions.txt``, for held-out validation.

    Calibrating on all 512 bundled captions (the 4B pipelines do) leaves none of ``captions.txt``
    to validate on; this file is never used for calibration by default.
    """
    return DATA_DIR / "holdout-captions.txt"


def tiny_tokenizer_dir() -> Path:
    """A ``save_pretrained`` directory loadable with ``AutoTokenizer.from_pretrained``.

    Byte-level BPE (any UTF-8 text encodes), pad ``<|endoftext|>``, eos ``<|im_end|>`` and the
    Qwen-VL vision/chat special tokens; it adds no BOS/EOS when encoding, like Qwen's tokenizer.
    """
    return DATA_DIR / "tiny-tokenizer"


def builtin_images_dir() -> Path:
    """24 small generated pictures with a caption each (``pairs.jsonl``), rebuilt by
    ``_build_images.py``: the ``builtin`` source of ``[calib] images``."""
    return DATA_DIR / "images"
