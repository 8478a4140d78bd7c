"""AutoQuant time and peak GPU memory per model size and format set, in one process (not a test).

Issue 13 asks what larger and MoE Qwen3-VL models cost, what each added format costs, and what one
multi-format pass costs against separate runs. ``aqm bench`` answers one model at a time and pays
the import floor and a warm-up per process; this script runs many cases after a single warm-up,
each on a freshly built model (the bench harness's :func:`run_layout`: LoadModel, ExtractLM,
packed BuildCalibLoader, RunAutoQuant, BuildManifest), so every figure is a warm AutoQuant of the
same settings. Each finished case is appended to a JSON-lines file at once: a run cut short at a
time limit keeps what it measured.

    python benchmarks/gpu_scale.py --out scale.jsonl \\
        --case config:qwen3-vl-32b=INT8_DEFAULT_CFG \\
        --case config:qwen3-vl-4b=INT8_DEFAULT_CFG+FP8_DEFAULT_CFG+NVFP4_DEFAULT_CFG+W4A8_AWQ_BETA_CFG
    python benchmarks/gpu_scale.py --device cpu --max-samples 16 --seq-len 64 --score-size 8 \\
        --case builtin:tiny-qwen3-vl=INT8_DEFAULT_CFG        # the plumbing, on CPU
    python benchmarks/gpu_scale.py --kernels pytorch --out moe.jsonl \\
        --fused-experts modelopt --fused-experts batched \\
        --case config:qwen3-vl-30b-a3b=INT8_DEFAULT_CFG      # MoE: ModelOpt's expert loop, then batched

With several ``--fused-experts`` every case runs once per path, in the order given (case numbers
for ``--profile`` / ``--python-profile`` count those runs).

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
    from auto_quantize_model.bench.settings import BenchSettings, add_spec_options, packed_calib

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", required=True, metavar="MODEL=FMT[+FMT...]")
    parser.add_argument("--out", type=Path, required=True, help="JSON-lines file (appended)")
    add_spec_options(
        parser,
        *("--device", "--captions", "--max-samples", "--seq-len", "--batch-size", "--score-size"),
        *("--effective-bits", "--kernels", "--experts", "--fused-experts"),
        changes={
            "--experts": {"help": "extract.experts"},
            "--fused-experts": {
                "action": "append",
                "default": [],
                "help": "autoquant.fused_experts (repeat to run each case under each; default batched)",
            },
        },
    )
    parser.add_argument(
        "--python-profile",
        type=int,
        action="append",
        default=[],
        metavar="K",
        help="run case K (1-based) a second time under cProfile: Python time by package and function",
    )
    parser.add_argument(
        "--rankings", action="store_true", help="also record each case's group ranking (name, importance)"
    )
    parser.add_argument(
        "--profile",
        type=int,
        action="append",
        default=[],
        metavar="K",
        help="run case K (1-based) a second time under torch.profiler; its op tables go to OUT.profile-K.txt",
    )
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    from auto_quantize_model.bench.harness import release_memory, run_layout, warm_up
    from auto_quantize_model.specs import AutoQuantSpec, ExtractSpec, LoadSpec

    cases = [parse_case(text) for text in args.case]
    calib = packed_calib(args)

    paths = tuple(args.fused_experts) or ("batched",)
    runs = [(model, formats, calib_size, path) for model, formats, calib_size in cases for path in paths]

    def settings(
        model: str, formats: tuple[str, ...], calib_size: int | None = None, path: str = "batched"
    ) -> BenchSettings:
        return BenchSettings(
            load=LoadSpec(path=model, device=args.device, dtype="auto", seed=0),
            extract=ExtractSpec(experts=args.experts),
            calib=calib,
            autoquant=AutoQuantSpec(
                formats=formats,
                effective_bits=args.effective_bits,
                score_size=args.score_size,
                calib_size=calib_size,
                kernels=args.kernels,
                fused_experts=path,  # type: ignore[arg-type]
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
        "experts": args.experts,
        "fused_experts": list(paths),
    }
    with args.out.open("a", encoding="utf-8") as out:
        out.write(json.dumps(header) + "\n")
    print(json.dumps(header), flush=True)

    for number, (model, formats, calib_size, path) in enumerate(runs, start=1):
        s = settings(model, formats, calib_size, path)
        case_started = time.perf_counter()
        try:
            run = run_layout(s, "packed", calib, args.score_size)
        except Exception as err:  # one case running out of memory must not lose the others
            record: dict[str, object] = {
                "model": model,
                "formats": formats,
                "fused_experts": path,
                "error": f"{type(err).__name__}: {err}",
            }
            release_memory(args.device)
        else:
            record = {
                "model": model,
                "formats": formats,
                "fused_experts": path,
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
            if args.rankings:
                record["ranking"] = [[name, value] for name, value in run.ranking]
        with args.out.open("a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
        print({k: v for k, v in record.items() if k != "ranking"}, flush=True)
        if number in args.profile:
            profile_case(s, calib, args.score_size, args.out.with_suffix(f".profile-{number}.txt"))
        if number in args.python_profile:
            python_profile_case(s, calib, args.score_size, args.out.with_suffix(f".pyprofile-{number}.txt"))
    return 0


def profile_case(settings: object, calib: object, score_size: int, path: Path) -> None:
    """One more run of a case under torch.profiler: where its time goes, GPU kernels against host work.

    The profiler's own overhead inflates the run's wall time; the tables are for the split, not the total.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    from auto_quantize_model.bench.harness import run_layout

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        run_layout(settings, "packed", calib, score_size)  # type: ignore[arg-type]
    wall = time.perf_counter() - started
    averages = prof.key_averages()
    device_busy = sum(event.self_device_time_total for event in averages) / 1e6
    lines = [
        f"profiled wall {wall:.2f} s; device kernels busy {device_busy:.2f} s in total",
        "",
        "by self device time:",
        averages.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60),
        "",
        "by calls:",
        averages.table(sort_by="count", row_limit=25, max_name_column_width=60),
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
    print(f"profile of the case: {path} (wall {wall:.1f} s, device busy {device_busy:.1f} s)", flush=True)


def _package(filename: str) -> str:
    """Which package a profiled function's file belongs to (its top-level import name)."""
    for name in ("auto_quantize_model", "modelopt", "transformers", "accelerate", "torch"):
        if f"/{name}/" in filename:
            return name
    return "other" if filename != "~" else "builtins"


def python_profile_case(settings: object, calib: object, score_size: int, path: Path) -> None:
    """One more run of a case under cProfile: host time by package and by function.

    Where a MoE model's time goes is mostly host-side Python (per-expert loops, quantizer set-up):
    self time summed by package says whose loops they are; the function tables say which.
    cProfile's overhead inflates the wall time; the split is what matters.
    """
    import cProfile
    import io
    import pstats

    from auto_quantize_model.bench.harness import run_layout

    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    run_layout(settings, "packed", calib, score_size)  # type: ignore[arg-type]
    profiler.disable()
    wall = time.perf_counter() - started
    profiler.dump_stats(path.with_suffix(".prof"))  # for pstats' print_callers: who calls a hot function
    stats = pstats.Stats(profiler)
    by_package: dict[str, float] = {}
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, object]] = stats.stats  # type: ignore[attr-defined]
    for (filename, _, _), (_, _, self_time, _, _) in raw.items():
        by_package[_package(filename)] = by_package.get(_package(filename), 0.0) + self_time
    lines = [f"profiled wall {wall:.2f} s; self time by package:"]
    lines += [f"  {name:<22} {sec:8.2f} s" for name, sec in sorted(by_package.items(), key=lambda kv: -kv[1])]
    for key in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(45)
        lines += ["", f"by {key}:", text.getvalue()]
    path.write_text("\n".join(lines), encoding="utf-8")
    print(f"python profile of the case: {path} (wall {wall:.1f} s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
