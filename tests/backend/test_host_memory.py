"""The host allocator setting: kept once however deeply nested, defaults back afterwards, libc found."""

from __future__ import annotations

import pytest

from auto_quantize_model.backend import host_memory
from auto_quantize_model.backend.host_memory import (
    DEFAULT_MMAP_MAX,
    DEFAULT_TRIM_THRESHOLD,
    M_MMAP_MAX,
    M_TRIM_THRESHOLD,
    host_memory_kept,
)


class FakeLibc:
    """Records ``mallopt`` and ``malloc_trim`` calls instead of changing the allocator."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad, 0))
        return 1


def test_host_memory_is_kept_once_and_the_defaults_come_back_also_on_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    libc = FakeLibc()
    monkeypatch.setattr(host_memory, "_glibc", lambda: libc)
    cpu = torch.device("cpu")

    def nested_then_failing() -> None:
        with host_memory_kept(cpu):
            with host_memory_kept(cpu):
                assert [c[1:] for c in libc.calls] == [(M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1)]
            assert len(libc.calls) == 2  # the inner exit changes nothing
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        nested_then_failing()
    assert libc.calls[2:] == [
        ("mallopt", M_MMAP_MAX, DEFAULT_MMAP_MAX),
        ("mallopt", M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD),
        ("malloc_trim", 0, 0),
    ]
    libc.calls.clear()
    with host_memory_kept(torch.device("meta")):  # not the host: nothing to keep
        pass
    assert libc.calls == []


def test_the_c_library_is_found_on_glibc_systems() -> None:
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not a glibc system")
    assert host_memory._glibc() is not None
