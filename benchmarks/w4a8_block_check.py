"""Which NVFP4 weight block does ModelOpt apply to ``W4A8_NVFP4_FP8_CFG`` on this GPU: 16 or 32?

ModelOpt's config asks for blocks of 32, and its HF exporter writes ``group_size`` 32, but its
dynamic block path calls a triton kernel on compute capability 8.9+ that takes no block size. This
script fake-quantizes one random weight through ModelOpt and compares the result with our own
reference NVFP4 fake-quantization at both block sizes, so the preset table's ``scored_group_size``
rests on a measurement, not on reading the code. Needs CUDA; prints one JSON line.

    python benchmarks/w4a8_block_check.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E4M3_MAX = 448.0


def nvfp4_reference(weight: torch.Tensor, block: int) -> torch.Tensor:
    """NVFP4 fake-quantization as the format defines it: a per-tensor fp32 scale, per-block FP8
    E4M3 scales, E2M1 values rounded to the nearest grid point."""
    x = weight.float()
    rows, cols = x.shape
    blocks = x.reshape(rows, cols // block, block)
    global_scale = x.abs().amax() / (E2M1_MAX * E4M3_MAX)
    block_amax = blocks.abs().amax(dim=-1, keepdim=True)
    scale = (block_amax / E2M1_MAX / global_scale).to(torch.float8_e4m3fn).float() * global_scale
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    scaled = (blocks / scale).clamp(-E2M1_MAX, E2M1_MAX)
    grid = torch.tensor(E2M1_GRID, device=x.device)
    index = (scaled.abs().unsqueeze(-1) - grid).abs().argmin(dim=-1)
    return (grid[index] * scaled.sign() * scale).reshape(rows, cols)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import modelopt.torch.quantization as mtq

    torch.manual_seed(0)
    layer = torch.nn.Linear(512, 256, bias=False).cuda().to(torch.bfloat16)
    sample = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)

    def forward_loop(model: torch.nn.Module) -> None:
        model(sample)

    model = torch.nn.Sequential(layer)
    mtq.quantize(model, mtq.W4A8_NVFP4_FP8_CFG, forward_loop)
    linear: Any = model[0]  # ModelOpt swapped in its quantized Linear, with a weight_quantizer
    quantizer: Any = linear.weight_quantizer
    with torch.no_grad():
        fake = quantizer(linear.weight).float()
    weight = linear.weight.float()
    result: dict[str, object] = {
        "device": torch.cuda.get_device_name(0),
        "capability": list(torch.cuda.get_device_capability(0)),
        "configured_block_sizes": {str(k): str(v) for k, v in (quantizer.block_sizes or {}).items()},
    }
    for block in (16, 32):
        reference = nvfp4_reference(weight, block).to(torch.bfloat16).float()
        result[f"match_fraction_block{block}"] = float((reference == fake).float().mean())
        result[f"max_abs_diff_block{block}"] = float((reference - fake).abs().max())
        result[f"mean_abs_diff_block{block}"] = float((reference - fake).abs().mean())
    line = json.dumps(result)
    print(line)
    if args.out:
        args.out.write_text(line + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
