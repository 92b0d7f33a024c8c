"""Freed heap memory goes back to the operating system (the per-slice release in propagation)."""

from __future__ import annotations

import numpy as np
import pytest

from medsam2_endpoint import heap


def rss_anon_mb() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("RssAnon:"))
    return int(line.split()[1]) / 1024


@pytest.mark.skipif(not heap.AVAILABLE, reason="malloc_trim is glibc's; this C library has none")
def test_release_returns_free_pages_inside_the_heap():
    kept, dropped = [], []
    for i in range(2000):  # 64 KiB blocks come from the heap (below the mmap threshold), interleaved
        (kept if i % 2 else dropped).append(np.ones(8192))
    dropped.clear()  # 1000 free holes between live blocks: glibc keeps them for reuse
    before = rss_anon_mb()
    heap.release_free_memory()
    assert before - rss_anon_mb() > 30  # of the 62.5 MiB freed
    assert all(block[0] == 1.0 for block in kept)  # live memory untouched
