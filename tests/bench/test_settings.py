"""Benchmark settings: the scaling items."""

from __future__ import annotations

import pytest

from auto_quantize_model.bench.settings import ScalingSource, parse_scaling_item
from auto_quantize_model.errors import ConfigError

# --------------------------------------------------------------------------------------------------
# Scaling items
# --------------------------------------------------------------------------------------------------


def test_parse_scaling_item() -> None:
    assert parse_scaling_item("builtin") == ScalingSource("builtin", None)
    assert parse_scaling_item("builtin:128") == ScalingSource("builtin", 128)
    assert parse_scaling_item("/data/c4096.txt:4096") == ScalingSource("/data/c4096.txt", 4096)
    assert parse_scaling_item("C:/data/caps.txt") == ScalingSource("C:/data/caps.txt", None)
    with pytest.raises(ConfigError, match="must be > 0"):
        parse_scaling_item("builtin:0")
    with pytest.raises(ConfigError, match="missing"):
        parse_scaling_item(":12")
