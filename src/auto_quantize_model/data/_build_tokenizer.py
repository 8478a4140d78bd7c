"""Rebuild the tiny tokenizer shipped in ``tiny-tokenizer/`` from ``captions.txt``.

Not imported at runtime; run it by hand after editing the captions::

    python src/auto_quantize_model/data/_build_tokenizer.py

Byte-level BPE so that any UTF-8 text (not only our captions) tokenizes without unknown tokens,
and the Qwen-VL special tokens so the tiny Qwen3-VL config's image/video/vision ids name real
tokens. Like Qwen's tokenizer it adds no BOS/EOS when encoding, so calibration rows hold
caption tokens only. Training is deterministic for a fixed captions file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
PAD = "<|endoftext|>"
SPECIAL_TOKENS = (
    PAD,
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
VOCAB_SIZE = 1536


def build(captions: Path, out_dir: Path, vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    lines = [line.strip() for line in captions.read_text(encoding="utf-8").splitlines() if line.strip()]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(lines, trainer=trainer)
    wrapper: Any = PreTrainedTokenizerFast  # its __init__ is untyped
    tokenizer: PreTrainedTokenizerFast = wrapper(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token="<|im_end|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_max_length=262144,
        padding_side="right",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def main() -> int:
    tokenizer = build(HERE / "captions.txt", HERE / "tiny-tokenizer")
    print(f"wrote {HERE / 'tiny-tokenizer'} with {len(tokenizer)} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
