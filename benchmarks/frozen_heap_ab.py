"""Same-process A/B of RunAutoQuant with and without :func:`frozen_heap` (not a test).

Why a separate script: the effect is a fixed cost of a few hundredths of a second to a second,
smaller than the spread between lent machines, so it can only be measured by alternating both
variants in one process on one model. Runs alternate (the first is a discarded warm-up) and the
scores of both variants are compared, since freezing must not change them.

    python benchmarks/frozen_heap_ab.py --model config:qwen3-vl-4b --device cuda \\
        --captions coco2017_captions_large.txt --runs 3
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
from collections.abc import Callable, Iterator, Sequence

import auto_quantize_model.backend.modelopt.patches as aq
from auto_quantize_model.artifacts import SensitivityScores
from auto_quantize_model.pipeline import Pipeline
from auto_quantize_model.specs import AutoQuantSpec, CalibSpec, LoadSpec
from auto_quantize_model.stages.build_calib_loader import BuildCalibLoader
from auto_quantize_model.stages.extract_lm import ExtractLM
from auto_quantize_model.stages.load_model import LoadModel
from auto_quantize_model.stages.run_autoquant import RunAutoQuant

ScoreTable = list[tuple[float, ...]]


def one_run(args: argparse.Namespace) -> tuple[float, ScoreTable]:
    """AutoQuant seconds and every group's scores of one fresh packed run."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    store = Pipeline(
        [
            LoadModel(LoadSpec(args.model, device=args.device, seed=0)),
            ExtractLM(),
            BuildCalibLoader(CalibSpec(captions=args.captions, max_samples=args.max_samples)),
            RunAutoQuant(AutoQuantSpec(score_size=args.score_size)),
        ]
    ).run()
    scores = store.get(SensitivityScores)
    return scores.autoquant_seconds, [group.scores for group in scores.groups]


@contextlib.contextmanager
def _plain_gc() -> Iterator[Callable[[], None]]:
    """The B side: nothing frozen, and the search's freeze at scoring does nothing either."""
    yield lambda: None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", default="builtin:tiny-qwen3-vl")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--captions", default="builtin")
    parser.add_argument("--max-samples", type=int, default=512)
    parser.add_argument("--score-size", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3, help="measured runs of each variant")
    args = parser.parse_args(argv)

    real = aq.frozen_heap
    variants = {"frozen heap": real, "plain gc": _plain_gc}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    scores: dict[str, ScoreTable] = {}
    order = ["plain gc", *[name for _ in range(args.runs) for name in ("frozen heap", "plain gc")]]
    try:
        for index, name in enumerate(order):
            aq.frozen_heap = variants[name]
            took, table = one_run(args)
            label = "warm-up, not counted" if index == 0 else "measured"
            print(f"{name}: AutoQuant {took:.2f} s ({label})", flush=True)
            if index:
                seconds[name].append(took)
                scores[name] = table
    finally:
        aq.frozen_heap = real
    for name, values in seconds.items():
        runs = ", ".join(f"{value:.2f}" for value in values)
        print(f"{name}: median {statistics.median(values):.2f} s over {len(values)} runs ({runs})")
    same = scores["frozen heap"] == scores["plain gc"]
    print(f"scores identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
