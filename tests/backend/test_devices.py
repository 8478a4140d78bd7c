"""Device and dtype names resolved and refused (backend/devices.py)."""

from __future__ import annotations

import pytest
import torch
from pytest_mock import MockerFixture

from auto_quantize_model.backend.devices import resolve_device, resolve_dtype
from auto_quantize_model.errors import ConfigError

# ---------------------------------------------------------------- devices and dtypes


def test_resolve_device_auto_follows_cuda(mocker: MockerFixture) -> None:
    mocker.patch("torch.cuda.is_available", return_value=False)
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"
    mocker.patch("torch.cuda.is_available", return_value=True)
    mocker.patch("torch.cuda.device_count", return_value=2)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda:1") == "cuda:1"


@pytest.mark.parametrize(
    ("device", "cuda", "message"),
    [
        ("gpu", False, "'gpu' is not one of auto, cpu, cuda, cuda:N"),
        ("cuda", False, "'cuda' asked for, but CUDA is not available"),
        ("cuda:0", False, "'cuda:0' asked for, but CUDA is not available"),
        ("cuda:3", True, "'cuda:3' asked for, but only 2 GPU(s) exist"),
    ],
)
def test_resolve_device_errors(mocker: MockerFixture, device: str, cuda: bool, message: str) -> None:
    mocker.patch("torch.cuda.is_available", return_value=cuda)
    mocker.patch("torch.cuda.device_count", return_value=2)
    with pytest.raises(ConfigError, match=r"^device ") as err:
        resolve_device(device)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_resolve_dtype() -> None:
    assert resolve_dtype("auto", "cuda:0") is torch.bfloat16
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("float16", "cpu") is torch.float16
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16
