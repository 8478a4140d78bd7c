"""Same-process A/B of RunAutoQuant with and without :func:`frozen_heap` (not a test).

Why a separate script: the effect is a fixed cost of a few hundredths of a second to a second,
smaller than the spread between lent machines, so it can only be measured by alternating the
variants in one process on one model. Three variants: the heap frozen before the search and again
when scoring starts (what the search does), frozen before the search only (its behaviour until
commit ba12c54: the quantizers ModelOpt inserts stay walked), and nothing frozen. Runs alternate
(the first is a discarded warm-up) and the scores are compared, since freezing must not change them.

    python benchmarks/frozen_heap_ab.py --model config:qwen3-vl-4b --device cuda \\
        --captions coco2017_captions_large.txt --runs 3
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time
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


def one_run(args: argparse.Namespace) -> tuple[float, ScoreTable, list[float]]:
    """AutoQuant seconds, every group's scores and each ``gc.collect`` (seconds) of one fresh packed run."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    passes: list[float] = []
    collect = gc.collect

    def timed(generation: int = 2) -> int:
        started = time.perf_counter()
        found = collect(generation)
        passes.append(time.perf_counter() - started)
        return found

    gc.collect = timed
    try:
        store = Pipeline(
            [
                LoadModel(LoadSpec(args.model, device=args.device, seed=0)),
                ExtractLM(),
                BuildCalibLoader(CalibSpec(captions=args.captions, max_samples=args.max_samples)),
                RunAutoQuant(AutoQuantSpec(score_size=args.score_size)),
            ]
        ).run()
    finally:
        gc.collect = collect
    scores = store.get(SensitivityScores)
    return scores.autoquant_seconds, [group.scores for group in scores.groups], passes


_SEARCHS_OWN = aq.frozen_heap
"""The real one, kept before ``main`` swaps the module attribute."""


@contextlib.contextmanager
def _plain_gc() -> Iterator[Callable[[], None]]:
    """Nothing frozen, and the search's freeze at scoring does nothing either."""
    yield lambda: None


@contextlib.contextmanager
def _frozen_once() -> Iterator[Callable[[], None]]:
    """The heap frozen before the search only (until commit ba12c54): ModelOpt's quantizers stay walked."""
    with _SEARCHS_OWN():
        yield lambda: None


VARIANTS = ("frozen heap", "frozen once", "plain gc")

SAME_SCORES = 1e-5
"""Largest relative score difference between variants accepted as "the same scores": two runs of one
variant differ by up to 1.75e-7 on a 12-layer MoE checkout on CPU (threaded float sums)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", default="builtin:tiny-qwen3-vl")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--captions", default="builtin")
    parser.add_argument("--max-samples", type=int, default=512)
    parser.add_argument("--score-size", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3, help="measured runs of each variant")
    args = parser.parse_args(argv)

    real = _SEARCHS_OWN
    variants = {"frozen heap": real, "frozen once": _frozen_once, "plain gc": _plain_gc}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    scores: dict[str, ScoreTable] = {}
    order = ["plain gc", *[name for _ in range(args.runs) for name in VARIANTS]]
    try:
        for index, name in enumerate(order):
            aq.frozen_heap = variants[name]
            took, table, passes = one_run(args)
            label = "warm-up, not counted" if index == 0 else "measured"
            each = ", ".join(f"{seconds:.3f}" for seconds in passes)
            print(f"{name}: AutoQuant {took:.2f} s ({label}); gc passes during the run: {each} s", flush=True)
            if index:
                seconds[name].append(took)
                scores[name] = table
    finally:
        aq.frozen_heap = real
    for name, values in seconds.items():
        runs = ", ".join(f"{value:.2f}" for value in values)
        print(f"{name}: median {statistics.median(values):.2f} s over {len(values)} runs ({runs})")
    worst = max(_apart(scores["frozen heap"], scores[name]) for name in VARIANTS[1:])
    print(f"scores: largest relative difference between variants {worst:.2e} (accepted {SAME_SCORES:.0e})")
    return 0 if worst <= SAME_SCORES else 1


def _apart(first: ScoreTable, second: ScoreTable) -> float:
    if [len(row) for row in first] != [len(row) for row in second]:
        return float("inf")
    return max(
        (
            abs(a - b) / max(abs(a), abs(b))
            for ra, rb in zip(first, second, strict=True)
            for a, b in zip(ra, rb, strict=True)
            if a != b
        ),
        default=0.0,
    )


if __name__ == "__main__":
    raise SystemExit(main())
