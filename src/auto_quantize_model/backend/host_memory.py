"""Host memory policy for CPU passes: glibc keeps freed memory for reuse while a model runs.

Apart from the forward and loss code (:mod:`.lm_forward`) because it is a process-wide allocator
setting, not part of any computation: the search (:mod:`.modelopt.search`) and the held-out
measurement (:mod:`.measure`) each hold it around their passes.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# glibc's mallopt parameters and their defaults (malloc.h); the defaults are what a process that
# never called mallopt starts with.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
KEPT_TRIM_THRESHOLD = 2**31 - 1
"""The largest value ``mallopt`` takes: freed memory at the top of the heap stays while kept."""

_kept = threading.Lock()
_kept_depth = [0]


@functools.cache
def _glibc() -> Any:
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None.

    Looked up among the symbols the process has loaded (no ``ldconfig`` subprocess), once.
    """
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    needed = ("gnu_get_libc_version", "mallopt", "malloc_trim")
    return libc if all(hasattr(libc, symbol) for symbol in needed) else None


@contextlib.contextmanager
def host_memory_kept(device: torch.device) -> Iterator[None]:
    """While it lasts, freed host memory is reused instead of handed back and faulted in again.

    Why: glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh
    ``mmap`` and unmaps it on free, so each vocabulary-sized tensor of a CPU pass (the float64
    log-probabilities of one held-out batch of SmolLM2-135M are 86 MB, its logits 43 MB) is
    page-faulted in, zeroed by the kernel, again for every batch. On the 2-core machine that
    made a float64 log-softmax 4x slower than the same one into a reused buffer. Here the heap
    serves every size and keeps what is freed; numbers are unchanged (torch aligns its buffers
    itself, and no value depends on where a tensor lives).

    Only for a model on the CPU and only with glibc; elsewhere nothing changes. Afterwards the
    defaults come back (``mallopt`` also stops glibc adapting its mmap threshold for the rest of
    the process, which costs nothing measurable) and ``malloc_trim`` hands the kept memory back.
    Nested uses act once, at the outermost.
    """
    libc = _glibc() if device.type == "cpu" else None
    if libc is None:
        yield
        return
    with _kept:
        if _kept_depth[0] == 0:
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, KEPT_TRIM_THRESHOLD)
        _kept_depth[0] += 1
    try:
        yield
    finally:
        with _kept:
            _kept_depth[0] -= 1
            if _kept_depth[0] == 0:
                libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
                libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)
