"""Does a model split over two GPUs rank its layers as on one? (issue 14, part 1)

    python benchmarks/sharded_ranking.py --out sharded.json                  # 2 GPUs: the check
    python benchmarks/sharded_ranking.py --model builtin:tiny-qwen3-vl --device cpu \\
        --samples 24 --seq-len 64 --batch 4 --score-size 16                    # CPU smoke run

Runs the same AutoQuant (``INT8_DEFAULT_CFG``, packed captions, gradient scores) twice, each in a
fresh subprocess so the second starts with empty GPUs:

1. ``device_map={"": "cuda:0"}``: the whole model on one GPU;
2. ``device_map=<strategy>`` with ``max_memory`` capped per GPU so that the model must split
   (``config:qwen3-vl-32b`` is 67 GB in bf16; 40 GiB per GPU cannot hold it on one).

Both runs build the same weights: ``config:`` sources with a device_map seed each module by its
name (:mod:`auto_quantize_model.backend.sharding`). With ``--device cpu`` run 1 is ``{"": "cpu"}``
and run 2 a table naming every decoder layer (a different layout on the only device).

Prints and writes JSON: per run the build (LoadModel) and AutoQuant seconds, peak memory per GPU,
the placement (layers per device and a summary); between the runs the Spearman correlation of
the group importances, whether the top 20 are the same groups in the same order, and the largest
absolute difference of any score. Target (issue 14): Spearman >= 0.999 and an identical top 20.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TOP = 20


def child(options: dict[str, Any]) -> dict[str, Any]:
    """One run in this process: load with the given placement, calibrate, score; report."""
    import torch

    from auto_quantize_model.artifacts import LoadedModel, SensitivityScores
    from auto_quantize_model.backend.sharding import layers_per_device, model_placement, placement_summary
    from auto_quantize_model.core.scores import importance
    from auto_quantize_model.pipeline import Pipeline
    from auto_quantize_model.specs import AutoQuantSpec, CalibSpec, LoadSpec
    from auto_quantize_model.stages.build_calib_loader import BuildCalibLoader
    from auto_quantize_model.stages.extract_lm import ExtractLM
    from auto_quantize_model.stages.load_model import LoadModel
    from auto_quantize_model.stages.run_autoquant import RunAutoQuant

    gpus = torch.cuda.device_count()  # a fresh process: the peaks start at zero (a reset before CUDA
    # is initialised fails with "Invalid device argument" on torch 2.11)
    spec = LoadSpec(options["model"], device_map=options["device_map"], max_memory=options["max_memory"])
    started = time.perf_counter()
    loaded = Pipeline([LoadModel(spec)]).run()
    build_seconds = time.perf_counter() - started
    model = loaded.get(LoadedModel)
    placement = model_placement(model.model)
    calib = CalibSpec(
        captions=options["captions"],
        max_samples=options["samples"],
        seq_len=options["seq_len"],
        batch_size=options["batch"],
        layout="packed",
    )
    search = AutoQuantSpec(
        formats=("INT8_DEFAULT_CFG",),
        method="gradient",
        effective_bits=8.0,
        score_size=options["score_size"],
        kernels=options.get("kernels", "extension"),
    )
    store = Pipeline([ExtractLM(), BuildCalibLoader(calib), RunAutoQuant(search)], supplied=[model]).run()
    scores = store.get(SensitivityScores)
    return {
        "device_map": options["device_map"],
        "max_memory": options["max_memory"],
        "build_seconds": build_seconds,
        "autoquant_seconds": scores.autoquant_seconds,
        "peak_gib": [torch.cuda.max_memory_allocated(i) / 2**30 for i in range(gpus)],
        "layers_per_device": layers_per_device(placement),
        "placement": placement_summary(placement),
        "importance": {g.name: importance(g.formats, g.scores) for g in scores.groups},
        "scores": {g.name: list(g.scores) for g in scores.groups},
    }


def compare(one: dict[str, Any], two: dict[str, Any]) -> dict[str, Any]:
    """Agreement of two runs' rankings and scores (same groups expected)."""
    from auto_quantize_model.core.stats import spearman

    names = sorted(one["importance"])
    if names != sorted(two["importance"]):
        raise SystemExit("the two runs scored different groups; nothing to compare")
    first = [one["importance"][n] for n in names]
    second = [two["importance"][n] for n in names]

    def top(run: dict[str, Any]) -> list[str]:
        return sorted(names, key=lambda n: (-run["importance"][n], n))[:TOP]

    diffs = [abs(a - b) for n in names for a, b in zip(one["scores"][n], two["scores"][n], strict=True)]
    return {
        "groups": len(names),
        "spearman": spearman(first, second),
        f"top{TOP}_identical": top(one) == top(two),
        "max_abs_score_diff": max(diffs, default=0.0),
        "max_abs_importance": max((abs(v) for v in first), default=0.0),
    }


def layer_table(layers: int) -> dict[str, str]:
    """A CPU layout other than one key: each decoder layer named, the rest under ""."""
    return {**{f"model.language_model.layers.{i}": "cpu" for i in range(layers)}, "": "cpu"}


def run_child(options: dict[str, Any], folder: Path, name: str) -> dict[str, Any]:
    request = folder / f"{name}.request.json"
    result = folder / f"{name}.result.json"
    request.write_text(json.dumps(options), encoding="utf-8")
    subprocess.run([sys.executable, __file__, "--child", str(request), str(result)], check=True)
    loaded: dict[str, Any] = json.loads(result.read_text(encoding="utf-8"))
    return loaded


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        options = json.loads(Path(sys.argv[2]).read_text(encoding="utf-8"))
        Path(sys.argv[3]).write_text(json.dumps(child(options)), encoding="utf-8")
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="config:qwen3-vl-32b")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--captions", default="builtin", help="a captions file, one per line, or builtin")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--score-size", type=int, default=128)
    parser.add_argument("--strategy", default="balanced", help="device_map of the split run")
    parser.add_argument("--max-memory", default="40GiB", help="cap per GPU (GPUs 0 and 1) in the split run")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of --model (CPU layout only)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    parser.add_argument(
        "--kernels",
        choices=("extension", "pytorch"),
        default="extension",
        help="autoquant.kernels of both runs",
    )
    args = parser.parse_args()

    common = {
        "model": args.model,
        "captions": args.captions,
        "samples": args.samples,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "score_size": args.score_size,
        "kernels": args.kernels,
    }
    if args.device == "cuda":
        runs = {
            "one_gpu": {**common, "device_map": {"": "cuda:0"}, "max_memory": None},
            "split": {
                **common,
                "device_map": args.strategy,
                "max_memory": {"0": args.max_memory, "1": args.max_memory},
            },
        }
    else:
        runs = {
            "one_key": {**common, "device_map": {"": "cpu"}, "max_memory": None},
            "per_layer": {**common, "device_map": layer_table(args.layers), "max_memory": None},
        }
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: run_child(options, Path(tmp), name) for name, options in runs.items()}
    first, second = results.values()
    report = {
        "model": args.model,
        "runs": {
            name: {k: v for k, v in r.items() if k not in ("importance", "scores")}
            for name, r in results.items()
        },
        "agreement": compare(first, second),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
