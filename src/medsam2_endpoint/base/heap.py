"""Hand freed heap memory back to the operating system.

glibc keeps memory that a process frees for reuse, and with the many short-lived tensors of a
propagation step (and one malloc arena per thread) it reuses it poorly: over a 300-slice MedSAM2 request
the freed-but-kept heap grew past 1 GB, on top of what was live. `malloc_trim(0)` returns the free pages
inside the heap, not only those at its top. Elsewhere (macOS, musl) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from collections.abc import Callable

GROWTH_SLACK_BYTES = 64 * 1024 * 1024


def _load_malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _load_malloc_trim()
AVAILABLE = _malloc_trim is not None
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_lock = threading.Lock()
_baseline: int | None = None  # resident bytes at the first check after the last release


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


def release_free_memory() -> None:
    """Return the heap's free pages to the OS (about 20 ms during a MedSAM2 request on 512-px slices)."""
    global _baseline
    if _malloc_trim is not None:
        _malloc_trim(0)
        _baseline = None


def release_if_grown(slack: int = GROWTH_SLACK_BYTES) -> bool:
    """`release_free_memory` once resident memory has grown `slack` bytes past a baseline: the first
    reading after the last release (so it includes one step's working set, which a release only makes the
    next step fault back in), or the lowest reading since. Cheap enough for every slice: one read of
    /proc/self/statm, and a release only while glibc keeps piling up freed memory."""
    global _baseline
    if _malloc_trim is None:
        return False
    with _lock:
        rss = resident_bytes()
        if _baseline is None or rss < _baseline:
            _baseline = rss
            return False
        if rss - _baseline < slack:
            return False
        release_free_memory()
        return True
