"""ModelOpt quantizers built by its own ``TensorQuantizer.__init__`` or copied from a template (not a test).

``fast_fused_experts_setup`` builds every quantizer that quantized modules' ``_setup`` asks for from
one template per descriptor: three per linear layer, 55,878 for the split experts of
Qwen3-VL-30B-A3B. The end-to-end effect on the CPU stand-ins is smaller than their run-to-run
spread, so this times the construction alone, alternating both ways in one process.

    python benchmarks/quantizer_init.py --count 14000 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=14_000, help="quantizers per timing (12-layer stand-in)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    from modelopt.torch.quantization.nn import TensorQuantizer
    from modelopt.torch.quantization.nn.modules.quant_module import QUANT_DESC_8BIT_PER_TENSOR

    from auto_quantize_model.backend.modelopt.quantizer_setup import fast_fused_experts_setup

    own: list[float] = []
    templated: list[float] = []
    for _ in range(args.rounds):
        started = time.perf_counter()
        made = [TensorQuantizer(QUANT_DESC_8BIT_PER_TENSOR) for _ in range(args.count)]
        own.append(time.perf_counter() - started)
        with fast_fused_experts_setup() as counts:
            started = time.perf_counter()
            copies = [TensorQuantizer(QUANT_DESC_8BIT_PER_TENSOR) for _ in range(args.count)]
            templated.append(time.perf_counter() - started)
        assert counts.initialised == args.count
        assert [q.get_modelopt_state() for q in copies[:3]] == [q.get_modelopt_state() for q in made[:3]]
        del made, copies
    print(
        f"{args.count:,} quantizers, {args.rounds} rounds: ModelOpt's __init__ median "
        f"{statistics.median(own):.2f} s ({', '.join(f'{s:.2f}' for s in own)}), from a template "
        f"{statistics.median(templated):.2f} s ({', '.join(f'{s:.2f}' for s in templated)})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
