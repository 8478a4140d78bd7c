"""``benchmarks/moe_profile.py``: the split of a profiled search by package, and a run on CPU.

The script is what the lead runs on a GPU; here its arithmetic is checked on a hand-made event
tree and the whole script once on the tiny MoE on CPU (that it runs and writes what it says).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from builders import benchmark_script


@pytest.fixture(scope="module")
def moe_profile() -> ModuleType:
    module: ModuleType = benchmark_script("moe_profile")
    return module


def node(tag: str, name: str, ms: float, *children: Any) -> Any:
    return SimpleNamespace(
        tag=f"_EventType.{tag}", name=name, duration_time_ns=int(ms * 1e6), children=list(children)
    )


@pytest.mark.parametrize(
    ("name", "package"),
    [
        ("modelopt/torch/quantization/nn/modules/tensor_quantizer.py(1146): forward", "modelopt"),
        ("transformers/models/qwen3_vl_moe/modeling_qwen3_vl_moe.py(100): forward", "transformers"),
        ("/work/src/auto_quantize_model/backend/modelopt/search.py(257): run_search", "auto_quantize_model"),
        ("torch/nn/modules/module.py(1782): _call_impl", "torch"),
        ("tqdm/std.py(1160): __iter__", "other"),
        ("threading.py(331): wait", "waiting"),
    ],
)
def test_functions_are_put_in_their_package(moe_profile: ModuleType, name: str, package: str) -> None:
    assert moe_profile.package_of(name) == package


def test_self_time_goes_to_the_functions_package_and_ops_to_their_caller(moe_profile: ModuleType) -> None:
    # ours (10 ms) calls ModelOpt's quantizer (6 ms), which calls a builtin (1 ms) and an op (3 ms);
    # ours also runs a matmul itself (2 ms); a thread sleeps 50 ms
    tree = [
        node(
            "PyCall",
            "/x/auto_quantize_model/a.py(1): run",
            10,
            node(
                "PyCall",
                "modelopt/q.py(2): forward",
                6,
                node("PyCCall", "<built-in method abs>", 1),
                node("TorchOp", "aten::mul", 3, node("TorchOp", "aten::empty", 1)),
            ),
            node("TorchOp", "aten::mm", 2),
        ),
        node("PyCall", "threading.py(331): wait", 50),
    ]
    split = moe_profile.split_tree(tree)
    assert split["by_package_self_s"] == {
        "waiting": 0.05,
        "torch ops": 0.005,  # mul 2 (its own), empty 1, mm 2
        "modelopt": 0.003,  # its own 2 ms and the builtin it called
        "auto_quantize_model": 0.002,
    }
    assert split["torch_ops_by_caller_s"] == {"modelopt": 0.003, "auto_quantize_model": 0.002}
    assert split["top_ops"][0] == {"op": "aten::mul", "self_s": 0.002, "calls": 1}
    assert split["calls_by_package"] == {"auto_quantize_model": 1, "modelopt": 1, "waiting": 1}


@pytest.mark.slow
def test_the_script_profiles_the_tiny_moe_on_cpu(moe_profile: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    argv = [
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--model",
        "builtin:tiny-qwen3-vl-moe",
        "--max-samples",
        "8",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--score-size",
        "8",
        "--no-warm-up",
        "--out",
        str(out),
    ]
    assert moe_profile.main(argv) == 0
    record = json.loads(out.read_text(encoding="utf-8"))
    assert record["groups"] == 7
    assert record["calib_forward_steps"] == 2
    assert record["fused_experts"] == "batched 12, ModelOpt's loop 0"
    packages = record["by_package_self_s"]
    assert {"modelopt", "transformers", "auto_quantize_model", "torch ops"} <= packages.keys()
    assert all(value >= 0 for value in packages.values())
    assert record["torch_ops_by_caller_s"]["auto_quantize_model"] > 0  # the batched experts' own ops
    assert record["device"] == "cpu"
    assert record["settings"]["fused_experts"] == "batched"
    assert len(record["top_functions"]) == moe_profile.TOP
