#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md's third-wave section, on one GPU of a fresh machine (not a test).
#
#   benchmarks/h200_figures.sh kernels  OUTDIR   # first run with and without ModelOpt's CUDA extension
#   benchmarks/h200_figures.sh ship     OUTDIR   # run -> frontier -> measured points -> export, 4B
#   benchmarks/h200_figures.sh scale    OUTDIR   # 8B / 32B / 30B-A3B, per-format and four-format passes
#   benchmarks/h200_figures.sh startup  OUTDIR   # fresh-process import split, this tree vs BASE
#   benchmarks/h200_figures.sh matrix   OUTDIR   # the format matrix sweep (resumable: run it again)
#
# "kernels" must be the first thing on a fresh machine: its first extension run includes the JIT build.
# Every step's wall time goes to OUTDIR/walls.txt, its output to OUTDIR/<step>.log; nvidia-smi samples
# the memory in use (the allocator's reserve included, so above torch's own peak) into OUTDIR/smi.csv;
# the run folders (minus weights and search states) are packed into OUTDIR/<phase>-runs.tgz.
set -u
phase=$1
out=$(realpath -m "$2")
mkdir -p "$out"
work=/tmp/aqm-figures
mkdir -p "$work"
aqm=(python3 -m auto_quantize_model)

step() {
    local name=$1
    shift
    local started
    started=$(date +%s.%N)
    echo "[$(date +%T)] $name: $*" | tee -a "$out/walls.txt"
    "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc wall_s=$(python3 -c "print(round($(date +%s.%N) - $started, 1))") ended=$(date +%T)" |
        tee -a "$out/walls.txt"
}

nvidia-smi --query-gpu=timestamp,index,memory.used --format=csv,noheader,nounits -lms 500 >>"$out/smi.csv" &
sampler=$!
trap 'kill $sampler 2>/dev/null' EXIT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt"

bench4b=pipelines/qwen3-vl-4b-random-bench.toml
two='autoquant.formats=["INT8_DEFAULT_CFG","FP8_DEFAULT_CFG"]'
case $phase in
kernels)
    step k_pytorch_first "${aqm[@]}" run $bench4b --output "$work/k-pytorch-1" --set "$two" \
        --set 'autoquant.kernels="pytorch"'
    step k_extension_first "${aqm[@]}" run $bench4b --output "$work/k-extension-1" --set "$two"
    step k_extension_warm "${aqm[@]}" run $bench4b --output "$work/k-extension-2" --set "$two"
    step k_pytorch_warm "${aqm[@]}" run $bench4b --output "$work/k-pytorch-2" --set "$two" \
        --set 'autoquant.kernels="pytorch"'
    dirs=(k-pytorch-1 k-extension-1 k-extension-2 k-pytorch-2)
    ;;
ship)
    step ship_nvfp4 "${aqm[@]}" run pipelines/qwen3-vl-4b-ship-nvfp4-fp8.toml --output "$work/ship-nvfp4"
    step ship_int8 "${aqm[@]}" run pipelines/qwen3-vl-4b-ship-int8-fp8.toml --output "$work/ship-int8"
    # the frontier again from the finished folder alone (no model): what a user re-solving later pays
    step frontier_resolve "${aqm[@]}" frontier "$work/ship-nvfp4" --bits 4.5:8:0.01 --output "$work/resolve"
    dirs=(ship-nvfp4 ship-int8 resolve)
    ;;
scale)
    four=INT8_DEFAULT_CFG+FP8_DEFAULT_CFG+NVFP4_DEFAULT_CFG+W4A8_AWQ_BETA_CFG
    step scale python3 benchmarks/gpu_scale.py --out "$out/scale.jsonl" \
        --case config:qwen3-vl-32b=INT8_DEFAULT_CFG \
        --case config:qwen3-vl-8b=INT8_DEFAULT_CFG \
        --case config:qwen3-vl-30b-a3b=INT8_DEFAULT_CFG \
        --case config:qwen3-vl-4b=INT8_DEFAULT_CFG \
        --case config:qwen3-vl-4b=FP8_DEFAULT_CFG \
        --case config:qwen3-vl-4b=NVFP4_DEFAULT_CFG \
        --case config:qwen3-vl-4b=W4A8_AWQ_BETA_CFG \
        --case config:qwen3-vl-4b=wint4-b128_afp8 \
        --case config:qwen3-vl-4b=$four \
        --case config:qwen3-vl-4b=INT8_DEFAULT_CFG+FP8_DEFAULT_CFG+NVFP4_DEFAULT_CFG+wint4-b128_afp8 \
        --case config:qwen3-vl-32b=$four
    dirs=()
    ;;
startup)
    # The tiny default with the GPUs hidden: the split is the imports' and ours, and no run waits for
    # a JIT build. BASE=<folder of another checkout's src/ and pipelines/> (e.g. `git archive 996d3fb
    # src pipelines | tar -x -C base`) adds its split, run with its own tiny pipeline file.
    hidden=(--env CUDA_VISIBLE_DEVICES=)
    step startup_ours python3 benchmarks/startup_split.py --repeat "${REPEAT:-2}" "${hidden[@]}"
    if [ -n "${BASE:-}" ]; then
        step startup_base python3 benchmarks/startup_split.py --repeat "${REPEAT:-2}" "${hidden[@]}" \
            --src "$BASE/src" --pipeline "$BASE/pipelines/tiny-qwen3-vl.toml"
    fi
    dirs=()
    ;;
matrix)
    # MATRIX_LIMIT=SECONDS stops the sweep there (SIGTERM) so the folder still comes back: a rerun
    # with the folder unpacked at $work/matrix goes on from the first unfinished point
    step matrix ${MATRIX_LIMIT:+timeout "$MATRIX_LIMIT"} "${aqm[@]}" run pipelines/qwen3-vl-4b-format-matrix.toml \
        --output "$work/matrix"
    dirs=(matrix)
    ;;
*)
    echo "unknown phase $phase (kernels, ship, scale, startup, matrix)" >&2
    exit 2
    ;;
esac

if [ ${#dirs[@]} -gt 0 ]; then
    tar -czf "$out/$phase-runs.tgz" -C "$work" --exclude='*.safetensors' --exclude='*.pt' \
        --exclude='*.pt.*' --exclude='*.bin' "${dirs[@]}"
fi
