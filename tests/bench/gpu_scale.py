"""AutoQuant time and peak GPU memory per model size and format set, in one process (not a test).

Issue 13 asks what larger and MoE Qwen3-VL models cost, what each added format costs, and what one
multi-format pass costs against separate runs. ``aqm bench`` answers one model at a time and pays
the import floor and a warm-up per process; this script runs many cases after a single warm-up,
each on a freshly built model (the bench harness's :func:`run_layout`: LoadModel, ExtractLM,
packed BuildCalibLoader, RunAutoQuant, BuildManifest), so every figure is a warm AutoQuant of the
same settings. Each finished case is appended to a JSON-lines file at once: a run cut short at a
time limit keeps what it measured.

    python tests/bench/gpu_scale.py --out scale.jsonl \\
        --case config:qwen3-vl-32b=INT8_DEFAULT_CFG \\
        --case config:qwen3-vl-4b=INT8_DEFAULT_CFG+FP8_DEFAULT_CFG+NVFP4_DEFAULT_CFG+W4A8_AWQ_BETA_CFG
    python tests/bench/gpu_scale.py --device cpu --max-samples 16 --seq-len 64 --score-size 8 \\
        --case builtin:tiny-qwen3-vl=INT8_DEFAULT_CFG        # the plumbing, on CPU

Peak memory is ``torch.cuda.max_memory_allocated`` over the AutoQuant stage, kept across ModelOpt's
own reset of the peak statistics before scoring (``track_peak_gpu_memory``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

GIB = 2**30


def _gib(size: int | None) -> float | None:
    return None if size is None else round(size / GIB, 2)


def parse_case(text: str) -> tuple[str, tuple[str, ...], int | None]:
    """``MODEL=FMT[+FMT...][@N]``: N captions calibrate (``autoquant.calib_size``), all by default."""
    model, sep, rest = text.partition("=")
    formats, at, size = rest.partition("@")
    if not sep or not model or not formats or (at and not size.isdigit()):
        raise SystemExit(f"--case {text!r}: expected MODEL=FORMAT[+FORMAT...][@CALIB_CAPTIONS]")
    return model, tuple(formats.split("+")), int(size) if at else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", required=True, metavar="MODEL=FMT[+FMT...]")
    parser.add_argument("--out", type=Path, required=True, help="JSON-lines file (appended)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--captions", default="builtin")
    parser.add_argument("--max-samples", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--score-size", type=int, default=128)
    parser.add_argument("--effective-bits", type=float, default=8.0)
    parser.add_argument("--kernels", choices=("extension", "pytorch"), default="extension")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    from auto_quantize_model.bench.harness import release_memory, run_layout, warm_up
    from auto_quantize_model.bench.settings import BenchSettings
    from auto_quantize_model.specs import AutoQuantSpec, CalibSpec, LoadSpec

    cases = [parse_case(text) for text in args.case]
    calib = CalibSpec(
        captions=args.captions,
        max_samples=args.max_samples,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        layout="packed",
    )

    def settings(model: str, formats: tuple[str, ...], calib_size: int | None = None) -> BenchSettings:
        return BenchSettings(
            load=LoadSpec(path=model, device=args.device, dtype="auto", seed=0),
            calib=calib,
            autoquant=AutoQuantSpec(
                formats=formats,
                effective_bits=args.effective_bits,
                score_size=args.score_size,
                calib_size=calib_size,
                kernels=args.kernels,
            ),
            layouts=("packed",),
            pipeline=False,
        )

    every_format = tuple(dict.fromkeys(f for _, formats, _ in cases for f in formats))
    started = time.perf_counter()
    warmup, loaded, _ = warm_up(settings("builtin:tiny-qwen3-vl", every_format))
    device_name = "cpu"
    if loaded.device.startswith("cuda"):
        import torch

        device_name = torch.cuda.get_device_name(torch.device(loaded.device))
    del loaded
    release_memory(args.device)
    header = {
        "warmup": {"extensions": warmup.extensions, "seconds": round(time.perf_counter() - started, 2)},
        "device": device_name,
        "kernels": args.kernels,
    }
    with args.out.open("a", encoding="utf-8") as out:
        out.write(json.dumps(header) + "\n")
    print(json.dumps(header), flush=True)

    for model, formats, calib_size in cases:
        s = settings(model, formats, calib_size)
        case_started = time.perf_counter()
        try:
            run = run_layout(s, "packed", calib, args.score_size)
        except Exception as err:  # one case running out of memory must not lose the others
            record: dict[str, object] = {
                "model": model,
                "formats": formats,
                "error": f"{type(err).__name__}: {err}",
            }
            release_memory(args.device)
        else:
            record = {
                "model": model,
                "formats": formats,
                "calib_size": calib_size,
                "autoquant_s": round(run.autoquant_seconds, 2),
                "case_wall_s": round(time.perf_counter() - case_started, 2),
                "stage_s": {name: round(sec, 2) for name, sec in run.stage_seconds},
                "peak_gib": None if run.peak_gpu_bytes is None else round(run.peak_gpu_bytes / GIB, 2),
                "leftover_gib": None
                if run.leftover_gpu_bytes is None
                else round(run.leftover_gpu_bytes / GIB, 2),
                "groups": len(run.ranking),
                "calib_forward_steps": run.calib_forward_steps,
                "score_forward_steps": run.score_forward_steps,
                "effective_bits_lm": round(run.effective_bits_lm, 4),
                "real_tokens": run.real_tokens,
                "top5": [name for name, _ in run.ranking[:5]],
            }
        with args.out.open("a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
