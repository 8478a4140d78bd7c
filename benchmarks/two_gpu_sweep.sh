#!/usr/bin/env bash
# One GPU against two: the same 8-point sweep run by one plain `aqm run` process on GPU 0 and by
# torchrun's two workers on GPUs 0 and 1; prints both wall times, the speed-up, the speed-up of
# the points alone (each run's fixed start, library imports and the model build, is paid by every
# worker at once and does not shrink), and checks that every point's ranking is the same in both.
#
#   benchmarks/two_gpu_sweep.sh              # pipelines/qwen3-vl-4b-sweep8.toml on 2 GPUs
#   benchmarks/two_gpu_sweep.sh --cpu        # the tiny model on CPU, two workers (a plumbing check)
#
# Folders go under $OUT (or a new /tmp folder): one/ and two/, each with its sweep-index.md.
# Estimate on 2 H200s from the figures in BENCHMARKS.md: library imports ~20 s and the 4B build
# ~5 s per process (paid by both workers at once), then ~10 s (max-calibrated W4A8) or ~28 s
# (AWQ-lite) per point plus a verified model copy: ~185 s for one GPU, ~110 s for two (~1.7x wall,
# ~1.9x over the points alone), about 5 minutes in all. A first try with kl_div points (55-81 s each)
# outlasted a 10-minute call on one GPU.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="${OUT:-$(mktemp -d /tmp/two-gpu-sweep.XXXXXX)}"
mkdir -p "$ROOT"
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if [[ "${1:-}" == "--cpu" ]]; then
    FILE="$ROOT/sweep8-tiny.toml"
    sed -e 's|"config:qwen3-vl-4b"|"builtin:tiny-qwen3-vl"|' -e 's|device = "cuda"|device = "cpu"|' \
        -e 's|^max_samples = 512|max_samples = 16|' -e 's|^seq_len = 512|seq_len = 32|' \
        -e 's|^batch_size = 8|batch_size = 4|' -e 's|"autoquant.score_size" = \[128, 512\]|"autoquant.score_size" = [8, 16]|' \
        -e 's|"calib.max_samples" = \[256, 512\]|"calib.max_samples" = [8, 16]|' \
        -e 's|"NVFP4_DEFAULT_CFG", ||' -e 's|^kernels = "pytorch".*||' \
        -e 's|^effective_bits = 8.0|effective_bits = 12.0|' pipelines/qwen3-vl-4b-sweep8.toml > "$FILE"
    ONE_ENV=(env OMP_NUM_THREADS=1)     # torchrun's workers get one thread each: the same sums
    TWO_ENV=(env)
else
    FILE=pipelines/qwen3-vl-4b-sweep8.toml
    ONE_ENV=(env CUDA_VISIBLE_DEVICES=0)
    TWO_ENV=(env CUDA_VISIBLE_DEVICES=0,1)
fi

rm -rf "$ROOT/one" "$ROOT/two"
start=$(date +%s.%N)
"${ONE_ENV[@]}" "$PY" -m auto_quantize_model run "$FILE" --output "$ROOT/one" > "$ROOT/one.log" 2>&1 \
    || { tail -20 "$ROOT/one.log"; exit 1; }
mid=$(date +%s.%N)
"${TWO_ENV[@]}" "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 \
    -m auto_quantize_model run "$FILE" --output "$ROOT/two" > "$ROOT/two.log" 2>&1 \
    || { tail -20 "$ROOT/two.log"; exit 1; }
end=$(date +%s.%N)

"$PY" - "$ROOT" "$start" "$mid" "$end" <<'PY'
import json
import sys
from pathlib import Path

root, start, mid, end = Path(sys.argv[1]), *map(float, sys.argv[2:])
one_wall, two_wall = mid - start, end - mid


def points(folder: Path) -> dict[str, tuple[float, str]]:
    """Each point's stage seconds (its run.json: the model copy and the six stages, no library
    imports) and its worker (the sweep's index)."""
    found = {}
    for line in (folder / "sweep-index.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.split(" | ")]
        if not line.startswith("| ") or not cells[0][2:].isdigit():
            continue
        name = cells[1].split("](")[0].lstrip("[")
        worker = cells[-2] if len(cells) == 8 else "0"
        stages = json.loads((folder / name / "run.json").read_text())["seconds"]
        found[name] = (sum(stages.values()), worker)
    return found


def ranking(folder: Path) -> list[str]:
    (manifest,) = folder.glob("*_quant_manifest.json")
    return [group["name"] for group in json.loads(manifest.read_text())["groups"]]


one, two = points(root / "one"), points(root / "two")
assert sorted(one) == sorted(two) and len(one) == 8, (sorted(one), sorted(two))
busy: dict[str, float] = {}
for seconds, worker in two.values():
    busy[worker] = busy.get(worker, 0.0) + seconds
serial = sum(seconds for seconds, _ in one.values())
print(f"one GPU : {one_wall:7.1f} s wall, points {serial:6.1f} s")
print(f"two GPUs: {two_wall:7.1f} s wall, points per worker " + ", ".join(f"{w}: {s:.1f} s" for w, s in sorted(busy.items())))
print(f"speed-up: {one_wall / two_wall:.2f}x wall, {serial / max(busy.values()):.2f}x over the points alone")
same = 0
for name in sorted(one):
    a, b = ranking(root / "one" / name), ranking(root / "two" / name)
    agree = a == b
    same += agree
    top = "top-5 " + ", ".join(n.removeprefix("model.language_model.") for n in a[:5])
    print(f"  {'same' if agree else 'DIFFERENT'} ranking ({len(a)} groups) worker {two[name][1]}: {name}  [{top}]")
print(f"rankings identical: {same} of {len(one)}")
sys.exit(0 if same == len(one) else 1)
PY
echo "folders: $ROOT/one $ROOT/two (logs: one.log, two.log)"
