"""Freed heap memory goes back to the operating system (the per-slice release in propagation)."""

from __future__ import annotations

import numpy as np
import pytest

from medsam2_endpoint.base import heap


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


@pytest.mark.skipif(not heap.AVAILABLE, reason="malloc_trim is glibc's; this C library has none")
def test_release_if_grown_acts_only_past_the_slack():
    heap.release_free_memory()
    assert heap.release_if_grown(slack=32 * 2**20) is False  # the first reading after a release is the baseline
    kept, dropped = [], []
    for i in range(2000):
        (kept if i % 2 else dropped).append(np.ones(8192))
    dropped.clear()
    before = rss_anon_mb()
    assert heap.release_if_grown(slack=32 * 2**20) is True  # grew 125 MiB, half of it free
    assert before - rss_anon_mb() > 30
    assert heap.release_if_grown(slack=32 * 2**20) is False  # new baseline
    assert heap.release_if_grown(slack=32 * 2**20) is False  # no growth since
    del kept
