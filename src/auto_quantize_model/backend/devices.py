"""Which device and dtype a load spec means here: ``auto`` resolved against what this machine has.

Its own module because loading (models), GGUF conversion (gguf), placement over GPUs (sharding)
and the benchmark all need the same answer, and none of them should import another for it: the
three loaders used to reach into each other for these two functions, a runtime import cycle.
torch is imported inside the functions.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from auto_quantize_model.errors import ConfigError
from auto_quantize_model.specs import Dtype

if TYPE_CHECKING:
    import torch

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` when a GPU is visible, else ``cpu``; CUDA asked but absent fails."""
    import torch

    if not _DEVICE_RE.match(device):
        raise ConfigError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {device!r} asked for, but CUDA is not available here; use device='cpu'"
            )
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist"
            )
    return device


def resolve_dtype(dtype: Dtype, device: str) -> torch.dtype:
    """``auto``: bfloat16 on CUDA (what Qwen3-VL ships in), float32 on CPU (bf16 matmuls are slow there)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
