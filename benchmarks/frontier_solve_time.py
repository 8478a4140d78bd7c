"""How long the budget frontier takes to re-solve, on a 4B-sized synthetic search (no model).

A Qwen3-VL-4B language model has 145 recipe groups (36 layers x 4 + lm_head); 250 groups with
five formats each (NONE plus four) is a generous stand-in. Scores are log-uniform over six
decades, as real sensitivities are, and sized so CBC's absolute tolerances do not stop it early.

    python benchmarks/frontier_solve_time.py [--groups 250] [--budgets 4:16:0.04] [--workers N]

Prints one line per method: budgets solved, wall seconds, CPU count, load average.
"""

from __future__ import annotations

import argparse
import os
import random
import time

from auto_quantize_model.artifacts import GroupScore
from auto_quantize_model.core.frontier import solve_frontier
from auto_quantize_model.core.frontier_space import space_from_scores
from auto_quantize_model.spec_values import parse_budgets

FORMATS = (("NVFP4", 4.5), ("INT4_BLOCK", 4.25), ("FP8", 8.0), ("INT8", 8.0), ("NONE", 16.0))


def synthetic_groups(count: int, seed: int = 0) -> list[GroupScore]:
    rng = random.Random(seed)
    groups = []
    for index in range(count):
        weights = float(rng.choice((6_553_600, 26_214_400, 24_903_680)))
        base = 10 ** rng.uniform(-3, 3)
        scores = tuple(
            0.0 if name == "NONE" else base * (16.0 / bits) ** 2 * rng.uniform(0.8, 1.2)
            for name, bits in FORMATS
        )
        groups.append(
            GroupScore(
                name=f"model.layers.{index}.mlp",
                module_names=(f"model.layers.{index}.mlp",),
                formats=tuple(name for name, _ in FORMATS),
                bits=tuple(bits for _, bits in FORMATS),
                scores=scores,
                costs=tuple(weights * bits / 16.0 for _, bits in FORMATS),
                best_format="NONE",
            )
        )
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=250)
    parser.add_argument("--budgets", default="4.5:16:0.04")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    groups = synthetic_groups(args.groups)
    budgets = parse_budgets(args.budgets)
    for method in ("kl_div", "gradient"):
        space = space_from_scores(groups, method)
        started = time.perf_counter()
        frontier = solve_frontier(space, budgets, workers=args.workers)
        seconds = time.perf_counter() - started
        reachable = sum(point.reachable for point in frontier.points)
        print(
            f"{method}: {len(frontier.points)} budgets ({reachable} reachable) x {args.groups} groups x "
            f"{len(FORMATS)} formats in {seconds:.1f} s; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
        )


if __name__ == "__main__":
    main()
