"""Write a Qwen3-VL-MoE checkout with 30B-A3B's expert layout and narrow widths (not a test).

The MoE search's time on a GPU is mostly per-expert Python work (BENCHMARKS.md, fourth wave: two
thirds of 59 s on an H100), and that work scales with the number of layers and experts, not with
their width. A checkout with the published layout (48 layers, 128 experts, top-8) but widths of
128 makes the same Python work runnable on a CPU in minutes, so the batched fused-experts path and
the quantizer set-up can be compared when no GPU is lent. The folder is an ordinary
``save_pretrained`` checkout (random weights from ``--seed``, the tiny tokenizer), loaded by
``model.path`` like a user's.

    python benchmarks/moe_shape_checkout.py /tmp/moe-shape [--layers 48 --experts 128 --top-k 8]
    python benchmarks/gpu_scale.py --device cpu --kernels pytorch --out moe-shape.jsonl \\
        --fused-experts modelopt --fused-experts batched --case /tmp/moe-shape=INT8_DEFAULT_CFG

The output folder must not exist yet (nothing of the user's is overwritten).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="new folder for the checkout")
    parser.add_argument("--layers", type=int, default=48, help="decoder layers (30B-A3B: 48)")
    parser.add_argument("--experts", type=int, default=128, help="experts per layer (30B-A3B: 128)")
    parser.add_argument("--top-k", type=int, default=8, help="experts per token (30B-A3B: 8)")
    parser.add_argument("--width", type=int, default=128, help="hidden and expert MLP width")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.output.exists() or args.output.is_symlink():
        print(f"error: {args.output} exists; name a new folder", file=sys.stderr)
        return 2
    if min(args.layers, args.experts, args.top_k, args.width) < 1 or args.top_k > args.experts:
        print(
            "error: --layers, --experts, --top-k, --width must be >= 1 and top-k <= experts", file=sys.stderr
        )
        return 2

    import torch
    from transformers import AutoModelForImageTextToText, Qwen3VLMoeConfig

    from auto_quantize_model.backend.model_configs import TINY_VISION, tiny_moe_text
    from auto_quantize_model.backend.models import _special_token_ids, load_tokenizer
    from auto_quantize_model.data import tiny_tokenizer_dir

    auto_class: Any = AutoModelForImageTextToText  # from_config is untyped
    tokenizer = load_tokenizer(tiny_tokenizer_dir())
    text = tiny_moe_text(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    text.update(
        num_hidden_layers=args.layers,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        hidden_size=args.width,
        moe_intermediate_size=args.width,
        intermediate_size=2 * args.width,
    )
    vision = dict(TINY_VISION, out_hidden_size=args.width)
    config = Qwen3VLMoeConfig(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=False,
        **_special_token_ids(tokenizer, "moe-shape"),
    )
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        model = auto_class.from_config(config, dtype=torch.float32)
    model.eval()
    # written beside the target under a name of its own, then renamed: a failed save leaves no
    # half-written checkout under the asked-for name, and only the folder made here is removed
    args.output.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{args.output.name}.partial-", dir=args.output.parent))
    try:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        scratch.rename(args.output)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    parameters = sum(p.numel() for p in model.parameters())
    print(
        json.dumps(
            {
                "output": str(args.output),
                "layers": args.layers,
                "experts": args.experts,
                "top_k": args.top_k,
                "width": args.width,
                "parameters": parameters,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
