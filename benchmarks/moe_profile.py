"""Where a MoE AutoQuant's time goes, split by whose code spends it (torch.profiler; not a test).

One model is loaded, its calibration batches built, and only the RunAutoQuant stage runs under
``torch.profiler`` with its Python tracer on: every Python call and every torch op of the search,
as a tree. Each node's self time (its time minus its children's) goes to the code it belongs to:

* ``modelopt``, ``transformers``, ``auto_quantize_model``, ``torch`` (torch's own Python),
  ``other`` (the standard library, pulp, tqdm, ...): Python functions, by the package of their file;
  a built-in called from Python counts for its caller's package;
* ``waiting``: other threads asleep in ``threading``/``queue`` (buckets are summed over threads);
* ``torch ops``: the host side of aten operators, also split by the package of the Python code
  that called them (``torch_ops_by_caller_s``: is a matmul ModelOpt's, transformers' or ours?).

GPU kernel time is reported as one total (``device_busy_s``; null when torch's own event parse
fails, as it can on an event name that is not UTF-8), and the wall time of the stage beside it.
The profiler's own overhead inflates the wall time (most where Python calls are many: ModelOpt's
per-expert loop); the split is the point, not the total.

    python benchmarks/moe_profile.py --out moe-profile-loop.json --fused-experts modelopt
    python benchmarks/moe_profile.py --out moe-profile-batched.json --fused-experts batched
    python benchmarks/moe_profile.py --device cpu --model builtin:tiny-qwen3-vl-moe \\
        --max-samples 8 --seq-len 32 --batch-size 4 --score-size 8 --out tiny.json   # on CPU

The JSON also holds the top functions and ops by self time with their call counts, the stage's
own counts (AutoQuant seconds, groups, forward steps) and, when the patch ran, how many
fused-experts forwards were batched.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

PACKAGES = ("auto_quantize_model", "modelopt", "transformers", "torch")
"""Buckets by the first of these names found as a folder in a function's file path, in this order."""

TORCH_OPS = "torch ops"
WAITING = "waiting"
"""Threads sleeping in the standard library (tqdm's monitor, a queue): not work, kept apart."""
_WAITS = ("threading.py(", "queue.py(", "selectors.py(")
TOP = 25


def package_of(name: str) -> str:
    """The package a profiled Python function belongs to, from the profiler's ``file(line): func`` name.

    The profiler shortens site-packages paths (``modelopt/torch/quantization/...``) and keeps
    others whole (``/work/src/auto_quantize_model/...``), so a folder name is searched either way.
    """
    if name.startswith(_WAITS):
        return WAITING
    path = name.split("(", 1)[0]
    for package in PACKAGES:
        if path.startswith(f"{package}/") or f"/{package}/" in path:
            return package
    return "other"


def _name(node: Any) -> str:
    """The event's name; torch's profiler sometimes holds one that is not valid UTF-8."""
    try:
        return str(node.name)
    except UnicodeDecodeError:
        return "<name not readable>"


def _children(node: Any) -> list[Any]:
    return list(getattr(node, "children", ()) or ())


def _walk(roots: Iterable[Any]) -> Iterator[tuple[Any, str]]:
    """Every node with the package of the nearest Python function above it (iteratively: trees are deep)."""
    stack: list[tuple[Any, str]] = [(root, "other") for root in reversed(list(roots))]
    while stack:
        node, caller = stack.pop()
        yield node, caller
        kind = str(node.tag).rsplit(".", 1)[-1]
        here = package_of(_name(node)) if kind == "PyCall" else caller
        stack.extend((child, here) for child in reversed(_children(node)))


def split_tree(roots: Iterable[Any]) -> dict[str, Any]:
    """Self time by package, torch ops by calling package, and the top functions/ops (seconds, calls).

    ``roots`` are the profiler's event tree (``kineto_results.experimental_event_tree()``): nodes
    with ``tag`` (``PyCall``, ``PyCCall``, ``TorchOp``, ...), ``name``, ``duration_time_ns`` and
    ``children``.
    """
    by_package: dict[str, float] = defaultdict(float)
    ops_by_caller: dict[str, float] = defaultdict(float)
    functions: dict[tuple[str, str], float] = defaultdict(float)
    function_calls: Counter[tuple[str, str]] = Counter()
    ops: dict[str, float] = defaultdict(float)
    op_calls: Counter[str] = Counter()
    for node, caller in _walk(roots):
        duration = max(0, int(node.duration_time_ns))
        inner = sum(max(0, int(child.duration_time_ns)) for child in _children(node))
        own = max(0, duration - inner) / 1e9
        kind = str(node.tag).rsplit(".", 1)[-1]
        name = _name(node)
        if kind == "PyCall":
            package = package_of(name)
            by_package[package] += own
            functions[(package, name)] += own
            function_calls[(package, name)] += 1
        elif kind == "TorchOp":
            by_package[TORCH_OPS] += own
            ops_by_caller[caller] += own
            ops[name] += own
            op_calls[name] += 1
        else:  # a built-in called from Python, allocations, ...: the caller's cost
            by_package[caller] += own
    top_functions = sorted(functions.items(), key=lambda kv: -kv[1])[:TOP]
    top_ops = sorted(ops.items(), key=lambda kv: -kv[1])[:TOP]
    return {
        "by_package_self_s": _rounded(by_package),
        "torch_ops_by_caller_s": _rounded(ops_by_caller),
        "top_functions": [
            {
                "package": package,
                "function": name,
                "self_s": round(sec, 4),
                "calls": function_calls[(package, name)],
            }
            for (package, name), sec in top_functions
        ],
        "top_ops": [{"op": name, "self_s": round(sec, 4), "calls": op_calls[name]} for name, sec in top_ops],
        "calls_by_package": _calls(function_calls),
    }


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {key: round(value, 3) for key, value in sorted(values.items(), key=lambda kv: -kv[1])}


def _calls(counts: Counter[tuple[str, str]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for (package, _), calls in counts.items():
        total[package] += calls
    return dict(total.most_common())


def main(argv: list[str] | None = None) -> int:
    from auto_quantize_model.bench.settings import add_spec_options, packed_calib

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file (written whole at the end)")
    parser.add_argument("--model", default="config:qwen3-vl-30b-a3b")
    parser.add_argument("--formats", default="INT8_DEFAULT_CFG", help="FMT[+FMT...]")
    add_spec_options(parser, "--device")
    parser.add_argument("--dtype", default="auto")
    add_spec_options(
        parser,
        *("--captions", "--max-samples", "--seq-len", "--batch-size", "--score-size", "--effective-bits"),
        *("--kernels", "--experts", "--fused-experts"),
        changes={"--kernels": {"default": "pytorch"}},
    )
    parser.add_argument(
        "--no-warm-up",
        action="store_true",
        help="skip the unprofiled first search (first-use costs then land in the profile)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")

    from auto_quantize_model.specs import AutoQuantSpec, CalibSpec, ExtractSpec, LoadSpec

    load = LoadSpec(path=args.model, device=args.device, dtype=args.dtype, seed=0)
    extract = ExtractSpec(experts=args.experts)
    calib = packed_calib(args)
    spec = AutoQuantSpec(
        formats=tuple(args.formats.split("+")),
        effective_bits=args.effective_bits,
        score_size=args.score_size,
        kernels=args.kernels,
        fused_experts=args.fused_experts,
    )
    if not args.no_warm_up:
        # first-use costs (allocator growth, lazy imports, kernel selection) stay out of the profile
        warm = LoadSpec(path="builtin:tiny-qwen3-vl-moe", device=args.device, dtype=args.dtype, seed=0)
        _profiled_search(
            warm, extract, CalibSpec(max_samples=8, seq_len=32, batch_size=4), spec, profile=False
        )
    record = _profiled_search(load, extract, calib, spec, profile=True)
    record["settings"] = {
        key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
    }
    args.out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(
        json.dumps(
            {key: record[key] for key in ("wall_s", "autoquant_s", "by_package_self_s", "fused_experts")}
        )
    )
    return 0


class _PathLine(logging.Handler):
    """Keeps the search's count of batched and ModelOpt-loop fused-experts forwards (its log line)."""

    PREFIX = "MoE fused experts forwards: "

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.summary: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(self.PREFIX):
            self.summary = message.removeprefix(self.PREFIX)


def _profiled_search(load: Any, extract: Any, calib: Any, spec: Any, *, profile: bool) -> dict[str, Any]:
    """Load, extract and calibrate unprofiled; RunAutoQuant under the profiler when ``profile``."""
    import torch
    from torch.profiler import ProfilerActivity

    from auto_quantize_model.artifacts import SensitivityScores
    from auto_quantize_model.bench.harness import release_memory
    from auto_quantize_model.pipeline import Pipeline
    from auto_quantize_model.stages.build_calib_loader import BuildCalibLoader
    from auto_quantize_model.stages.extract_lm import ExtractLM
    from auto_quantize_model.stages.load_model import LoadModel
    from auto_quantize_model.stages.run_autoquant import RunAutoQuant

    store = Pipeline([LoadModel(load), ExtractLM(extract), BuildCalibLoader(calib)]).run()
    stage = RunAutoQuant(spec)
    if not profile:
        stage.run(store)
        del store
        release_memory(load.device)
        return {}
    activities = [ProfilerActivity.CPU]
    cuda = load.device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        activities.append(ProfilerActivity.CUDA)
    paths = _PathLine()
    logger = logging.getLogger("auto_quantize_model")
    level = logger.level
    logger.addHandler(paths)
    if not logger.isEnabledFor(logging.INFO):
        logger.setLevel(logging.INFO)  # the line is logged at INFO
    try:
        with torch.profiler.profile(activities=activities, with_stack=True) as prof:
            started = time.perf_counter()
            scores, _ = stage.run(store)
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - started
    finally:
        logger.removeHandler(paths)
        logger.setLevel(level)
    record: dict[str, Any] = {"wall_s": round(wall, 2)}
    assert isinstance(scores, SensitivityScores)
    record.update(
        {
            "autoquant_s": round(scores.autoquant_seconds, 2),
            "groups": len(scores.groups),
            "calib_forward_steps": scores.calib_forward_steps,
            "score_forward_steps": scores.score_forward_steps,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "fused_experts": paths.summary,
        }
    )
    record.update(split_tree(prof.profiler.kineto_results.experimental_event_tree()))
    try:
        averages = prof.key_averages()
    except UnicodeDecodeError:  # torch's own parse trips on an event name that is not UTF-8
        record["device_busy_s"] = None
    else:
        record["device_busy_s"] = round(sum(event.self_device_time_total for event in averages) / 1e6, 3)
    del store, scores
    release_memory(load.device)
    return record


if __name__ == "__main__":
    sys.exit(main())
