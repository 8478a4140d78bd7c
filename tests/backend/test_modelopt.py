"""The ModelOpt door itself: the version guard and the compile-decorator switch."""

from __future__ import annotations

import os

import pytest

from auto_quantize_model.backend.modelopt import (
    DYNAMO_DISABLE,
    SUPPORTED_RANGE,
    check_version,
    compile_decorators_off,
    installed_version,
)
from auto_quantize_model.errors import ConfigError


def test_compile_decorators_off_sets_the_variable_for_the_block_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DYNAMO_DISABLE, raising=False)
    with compile_decorators_off():
        assert os.environ[DYNAMO_DISABLE] == "1"
    assert DYNAMO_DISABLE not in os.environ


def test_compile_decorators_off_restores_after_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DYNAMO_DISABLE, raising=False)
    with pytest.raises(ImportError), compile_decorators_off():
        raise ImportError("no such library")
    assert DYNAMO_DISABLE not in os.environ


@pytest.mark.parametrize("value", ["0", "1"])
def test_compile_decorators_off_leaves_the_users_value(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(DYNAMO_DISABLE, value)
    with compile_decorators_off():
        assert os.environ[DYNAMO_DISABLE] == value
    assert os.environ[DYNAMO_DISABLE] == value


# --------------------------------------------------------------------------------------------------
# Version guard
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.47.0", "0.47.1", "0.47.0rc1", "0.47.2+cu12"])
def test_version_guard_accepts_the_version_the_adapter_was_written_for(version: str) -> None:
    check_version(version)


@pytest.mark.parametrize("version", ["0.48.0", "0.46.3", "1.0.0", "0.4.7", "unknown"])
def test_version_guard_refuses_any_other_naming_both_versions(version: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_version(version)
    message = str(caught.value)
    assert f"nvidia-modelopt {version} is installed" in message
    assert SUPPORTED_RANGE in message
    assert "pip install" in message
    assert "\n" not in message


def test_the_installed_modelopt_passes_the_guard() -> None:
    check_version(installed_version())
