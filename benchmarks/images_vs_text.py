"""Image + caption calibration against captions alone: AutoQuant time, peak and cost per LM token.

Issue 22 asks what image-conditioned calibration costs on a GPU: N image + caption pairs (square
pictures of one size, generated here: no network) against the same N captions alone, same
settings, each on a freshly built model after one warm-up case. Printed and appended as JSON
lines: the calibration loader's time (processor, vision tower once per batch, the image/text
range pass) apart from AutoQuant's, AutoQuant's peak GPU memory, the LM tokens calibrated on and
AutoQuant seconds per 1,000 of them.

    python benchmarks/images_vs_text.py --model config:qwen3-vl-4b --pairs 512 --size 448 --out r.jsonl
    python benchmarks/images_vs_text.py --model builtin:tiny-qwen3-vl --device cpu --pairs 16 --size 64
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def make_pairs(folder: Path, count: int, size: int) -> Path:
    """``count`` pictures of ``size`` x ``size`` (noise over a few flat shapes) with the bundled captions."""
    import numpy as np
    from PIL import Image

    from auto_quantize_model.data import builtin_captions_path

    captions = builtin_captions_path().read_text(encoding="utf-8").splitlines()
    rng = np.random.default_rng(0)
    lines = []
    for index in range(count):
        base = rng.integers(0, 256, size=(1, 1, 3))
        noise = rng.integers(-40, 40, size=(size, size, 3))
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        name = f"{index:04d}.png"
        Image.fromarray(pixels).save(folder / name)
        lines.append(json.dumps({"image": name, "text": captions[index % len(captions)]}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def run_case(args: argparse.Namespace, images: str | None) -> dict[str, Any]:
    import torch

    from auto_quantize_model.artifacts import CalibData
    from auto_quantize_model.bench.harness import track_peak_gpu_memory
    from auto_quantize_model.pipeline import Pipeline
    from auto_quantize_model.specs import AutoQuantSpec, CalibSpec, LoadSpec
    from auto_quantize_model.stages.build_calib_loader import BuildCalibLoader
    from auto_quantize_model.stages.extract_lm import ExtractLM
    from auto_quantize_model.stages.load_model import LoadModel
    from auto_quantize_model.stages.run_autoquant import RunAutoQuant

    cuda = args.device.startswith("cuda")
    load = LoadModel(LoadSpec(path=args.model, device=args.device, dtype="bfloat16" if cuda else "float32"))
    store = Pipeline([load, ExtractLM()]).run()
    calib = CalibSpec(
        captions="builtin",
        images=images,
        max_samples=args.pairs,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
    )
    started = time.perf_counter()
    store = Pipeline([BuildCalibLoader(calib)], supplied=tuple(store)).run()
    loader_seconds = time.perf_counter() - started
    data = store.get(CalibData)
    spec = AutoQuantSpec(
        formats=tuple(args.formats.split("+")),
        effective_bits=args.bits,
        score_size=args.score_size,
        kernels=args.kernels,
    )
    with track_peak_gpu_memory(args.device) as peaks:
        started = time.perf_counter()
        Pipeline([RunAutoQuant(spec)], supplied=tuple(store)).run()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        autoquant_seconds = time.perf_counter() - started
        if args.device.startswith("cuda"):
            peaks.append(torch.cuda.max_memory_allocated())
    tokens = data.stats.real_tokens
    mix = data.stats.images
    result = {
        "model": args.model,
        "kind": "images" if images else "captions",
        "samples": data.stats.samples,
        "lm_tokens": tokens,
        "image_tokens": None if mix is None else mix.image_tokens,
        "padding": round(data.stats.padding_fraction, 4),
        "batches": data.stats.batches,
        "loader_s": round(loader_seconds, 2),
        "autoquant_s": round(autoquant_seconds, 2),
        "autoquant_s_per_1k_tokens": round(1000 * autoquant_seconds / tokens, 4),
        "peak_gib": round(max(peaks) / 2**30, 2) if peaks else None,
    }
    del store
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    from auto_quantize_model.bench.settings import add_spec_options

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="config:qwen3-vl-4b")
    add_spec_options(parser, "--device")
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--size", type=int, default=448)
    add_spec_options(
        parser,
        *("--seq-len", "--batch-size", "--score-size"),
        changes={"--seq-len": {"default": 2048}, "--batch-size": {"default": 4}},
    )
    parser.add_argument("--formats", default="INT8_DEFAULT_CFG+FP8_DEFAULT_CFG")
    parser.add_argument("--bits", type=float, default=8.0)
    add_spec_options(parser, "--kernels", changes={"--kernels": {"default": "pytorch"}})
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_pairs(Path(tmp), args.pairs, args.size)
        warm = argparse.Namespace(**{**vars(args), "pairs": min(8, args.pairs), "score_size": 4})
        run_case(warm, str(folder))  # imports, kernels, allocator: paid once, measured in neither case
        for images in (None, str(folder)):
            result = run_case(args, images)
            print(json.dumps(result), flush=True)
            if args.out is not None:
                with args.out.open("a", encoding="utf-8") as out:
                    out.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
