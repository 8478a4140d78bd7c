#!/usr/bin/env bash
# Issue 23 on one GPU (H100 or H200), in one device call: the two 4B ship pipelines (each ends with
# ModelOpt's own HF export and read-back), then `aqm export --format compressed-tensors` of both runs
# read back through transformers, then the gpu-marked compressed-tensors tests (NVFP4 with ModelOpt's
# CUDA kernels). Prints every read-back figure; the run logs go to OUTDIR.
#
#   benchmarks/gpu_ct_export.sh OUTDIR [WHEELS...]
#
# The GPU image lacks ModelOpt and compressed-tensors: pass the folders of their wheels (default:
# shared/wheels and wheels, the latter filled here beforehand with
# `pip download compressed-tensors==0.20.1 loguru pytest pluggy iniconfig --no-deps -d wheels`
# (and `cp /work/shared/wheels/*.whl wheels/` where the checkout has no shared/), then carried:
# run(command="bash benchmarks/gpu_ct_export.sh $OUT wheels", carry=["wheels"]). About 6-8 minutes.
set -u
out=$(realpath -m "$1")
shift
mkdir -p "$out"
wheels=("$@")
[ ${#wheels[@]} -eq 0 ] && wheels=(shared/wheels wheels)
site=/tmp/aqm-site
mkdir -p "$site"
for dir in "${wheels[@]}"; do
    [ -d "$dir" ] || continue
    python3 -m pip install -q --no-index --no-deps --upgrade --target "$site" "$dir"/*.whl || exit 1
done
export PYTHONPATH="$PWD/src:$PWD/tests:$site"
work=$(mktemp -d /tmp/aqm-ct.XXXXXX)  # a folder of this run's own: nothing else is cleared
echo "runs and exports in $work" | tee "$out/work.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

step() {
    local name=$1
    shift
    local started=$SECONDS
    "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc wall_s=$((SECONDS - started))" | tee -a "$out/walls.txt"
    [ $rc -eq 0 ] || tail -5 "$out/$name.log"
}

aqm=(python3 -m auto_quantize_model)
step w4a8_block python3 benchmarks/w4a8_block_check.py --out "$out/w4a8_block.json"
step gpu_tests python3 -m pytest -q -p no:cacheprovider -m gpu -s tests/backend/test_export_ct.py
# AQM_KERNELS=pytorch skips ModelOpt's two-minute JIT build of its CUDA extensions on a fresh machine;
# AQM_SHIP_QUICK=1 runs the pipelines without their own export and measured points (the exports
# below are the two formats' `aqm export --checkpoint`, ModelOpt's format last)
run_set=()
[ -n "${AQM_KERNELS:-}" ] && run_set+=(--set "autoquant.kernels=\"$AQM_KERNELS\"")
[ -n "${AQM_SHIP_QUICK:-}" ] && run_set+=(--set "export.checkpoint=false" --set "frontier.measure=0")
for kind in nvfp4-fp8 int8-fp8; do
    step "run_$kind" "${aqm[@]}" run "pipelines/qwen3-vl-4b-ship-$kind.toml" --output "$work/ship-$kind" "${run_set[@]}"
    step "ct_$kind" "${aqm[@]}" export "$work/ship-$kind" --output "$work/ct-$kind" --checkpoint \
        --format compressed-tensors
    cp "$work/ct-$kind/export.json" "$out/ct_$kind.export.json" 2>/dev/null
done
if [ -n "${AQM_SHIP_QUICK:-}" ]; then
    for kind in nvfp4-fp8 int8-fp8; do
        step "modelopt_$kind" "${aqm[@]}" export "$work/ship-$kind" --output "$work/modelopt-$kind" --checkpoint
        cp "$work/modelopt-$kind/export.json" "$out/modelopt_$kind.export.json" 2>/dev/null
    done
fi

python3 - "$work" <<'PY'
import json, sys
from pathlib import Path

work = Path(sys.argv[1])
for record in sorted(work.glob("*/export.json")) + sorted(work.glob("ship-*/export*/export.json")):
    data = json.loads(record.read_text())
    back = data.get("read_back") or {}
    weights = back.get("weights") or {}
    print(
        f"{record.parent.relative_to(work)}: format {data['format']}, {data['effective_bits_lm']:.3f} LM bits, "
        f"formats {data['formats']}; NLL in memory {back.get('in_memory_nll')}, exported "
        f"{back.get('exported_nll')}, read back {back.get('read_back_nll')} (difference "
        f"{back.get('difference')}, tolerance {back.get('tolerance')}, ok {back.get('ok')})"
    )
    if weights:
        print(f"  weights: worst {weights['worst_layer']} relative {weights['relative']:.2e} "
              f"(tolerance {weights['tolerance']:.1e}); per format {weights['per_format']}")
    for key in ("exporter_rounding", "weights_sample"):
        if back.get(key):
            print(f"  {key}: {back[key]}")
PY
grep -h "passed\|failed\|NVFP4.*CtReadBack" "$out/gpu_tests.log" | cut -c1-600
