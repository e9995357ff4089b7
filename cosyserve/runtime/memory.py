"""Process memory on CPU: glibc allocator policy, handing free heap pages back, paging cold weights out."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import sys
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

from torch import Tensor

logger = logging.getLogger(__name__)

_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8
_HEAP_BLOCKS = 32 << 20  # blocks below this come from the heap (glibc's own ceiling for its threshold)
_VOCODER_BLOCKS = 256 << 10  # while vocoding: blocks from this size get their own mmap
_libc: Any = None  # set by tune_cpu_allocator on glibc; the functions below are no-ops until then


def tune_cpu_allocator() -> str | None:
    """Fast activations, bounded memory (Linux/glibc only).

    Measured on the full-size model (2-core VM): serving every block >= 256 KB with its own mmap
    keeps peak RSS lowest but costs 20 % end to end (each activation page-faults afresh: the torch
    estimator 0.65 -> 1.2 s per call, HiFT 1.3 -> 1.9 s); serving them from the heap is fast, but
    the heap keeps what it frees, and HiFT's 14 MB activations fragment it (+150-250 MB peak). So:
    blocks come from the heap (2 arenas), and :func:`release_free_memory` hands free heap pages back
    after each audio step and after loading; :func:`vocoder_allocation` (opt-in,
    ``COSYSERVE_VOCODER_MMAP=1``) gives HiFT's blocks their own mmaps for a lower peak.
    ``COSYSERVE_MALLOC_TUNING=0`` leaves the allocator alone."""
    global _libc
    if os.environ.get("COSYSERVE_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_ARENA_MAX, 2) == 1 and libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_BLOCKS) == 1
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return None
    if not ok:
        return None
    _libc = libc
    return "malloc: heap blocks, free heap returned after each audio step"


def allocator_tuned() -> bool:
    """Whether :func:`tune_cpu_allocator` took effect (glibc, not switched off)."""
    return _libc is not None


_MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now (older kernels: EINVAL, nothing happens)
# Weights read only to fill a cache (the relative-position projections): paged out between steps.
_cold_weights: weakref.WeakSet[Tensor] = weakref.WeakSet()


def keep_paged_out(tensors: Iterable[Tensor]) -> int:
    """Page these CPU tensors out at every :func:`release_free_memory` (when the allocator policy
    is on); returns how many. Meant for weights that are read rarely, e.g. only when a cache grows:
    memory-mapped from the checkpoint, their pages leave RSS and are read back from the file if
    they are ever needed again."""
    count = 0
    for tensor in tensors:
        if tensor.device.type == "cpu" and tensor.numel():
            _cold_weights.add(tensor)
            count += 1
    return count


@functools.cache
def _madvise() -> Any:
    """libc's ``madvise`` (Linux), whatever the allocator policy; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL("libc.so.6").madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def page_out(tensor: Tensor) -> None:
    """Ask the kernel to reclaim the whole pages under a CPU tensor (``MADV_PAGEOUT``). Never loses
    data: clean file-backed pages are dropped (and re-read on access), anonymous pages go to swap
    or, without swap, stay. Works with or without the allocator policy (weights replaced by an
    accelerated copy are paged out either way)."""
    madvise = _madvise()
    if madvise is None:
        return
    page = os.sysconf("SC_PAGE_SIZE")
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // page) * page, end // page * page  # only pages the tensor fills
    if last > first:
        madvise(first, last - first, _MADV_PAGEOUT)


def release_free_heap_pages() -> None:
    """``malloc_trim`` alone (no page-out), when :func:`tune_cpu_allocator` enabled it."""
    if _libc is not None:
        _libc.malloc_trim(0)


def page_out_cold_weights() -> None:
    """Page out the tensors given to :func:`keep_paged_out` (microseconds when they are already out)."""
    for tensor in list(_cold_weights):
        page_out(tensor)


def release_free_memory() -> None:
    """Return the heap's free pages to the OS (``malloc_trim``) and page out the cold weights, when
    :func:`tune_cpu_allocator` enabled it. Cheap (a few ms); called between steps, never inside one."""
    if _libc is not None:
        release_free_heap_pages()
        page_out_cold_weights()


@contextlib.contextmanager
def vocoder_allocation() -> Iterator[None]:
    """While HiFT runs, new blocks >= 256 KB get their own mmap (returned when freed) instead of
    growing the heap. Free heap chunks that fit are still reused, and stay resident once freed
    again, so the heap's free pages are handed back first (the flow's activations, just freed)."""
    if _libc is None:
        yield
        return
    release_free_heap_pages()
    _libc.mallopt(_M_MMAP_THRESHOLD, _VOCODER_BLOCKS)
    try:
        yield
    finally:
        _libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_BLOCKS)
