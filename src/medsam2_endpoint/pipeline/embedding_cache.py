"""A thread-safe LRU cache of image embeddings, bounded by bytes.

Keys are (image content hash, model name): the hash is taken over the decoded pixels the encoder
sees (`content_key`), so the same picture sent again (as PNG, as JPEG of identical pixels, through
/score or through samapi) reuses its embedding. Values are opaque engine objects with an `nbytes`
attribute (their tensors' size, counted whether they sit on the CPU or the GPU).

Concurrent requests for a missing key compute it once: the first caller computes, the others wait
for its result (or compute themselves if it failed).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np

from medsam2_endpoint.base.lru import ByteLRU


def content_key(pixels: np.ndarray) -> str:
    """A 128-bit BLAKE2b digest of an array's dtype, shape and bytes."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{pixels.dtype.str}{pixels.shape}".encode())
    digest.update(np.ascontiguousarray(pixels).data)
    return digest.hexdigest()


class EmbeddingCache:
    """`lru.ByteLRU` (LRU with a byte budget; values larger than the budget are not kept) plus
    compute-once for concurrent misses of the same key."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self._lru = ByteLRU(max_bytes)
        self._pending: dict[Hashable, threading.Event] = {}
        self._lock = threading.Lock()

    @property
    def size_bytes(self) -> int:
        return self._lru.size_bytes

    def get(self, key: Hashable) -> Any | None:
        return self._lru.get(key)

    def put(self, key: Hashable, value: Any) -> None:
        self._lru.put(key, value)

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> tuple[Any, bool]:
        """(value, True) from the cache, or (compute(), False) after storing it; value.nbytes is its size."""
        while True:
            value = self._lru.get(key)
            if value is not None:
                return value, True
            with self._lock:
                waiting = self._pending.get(key)
                if waiting is None:
                    self._pending[key] = threading.Event()
                    break
            waiting.wait()  # another thread computes this key; then look again
        try:
            value = compute()
            self._lru.put(key, value)
            return value, False
        finally:
            with self._lock:
                self._pending.pop(key).set()
