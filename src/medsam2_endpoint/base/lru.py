"""A thread-safe LRU cache bounded by bytes, for image features shared across requests."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Container, Hashable
from typing import Any


def nbytes(value: Any) -> int:
    """Bytes held by an array or tensor (anything with `nbytes`), or by those inside nested lists, tuples and
    dicts. No torch import here: base/ is the ground every layer stands on."""
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(nbytes(v) for v in value)
    return getattr(value, "nbytes", 0)


class ByteLRU:
    """Least-recently-used entries are evicted once the total size passes `max_bytes` (0 disables caching).

    Safe to share between threads (the samapi server's thread pool, azmlinfsrv's threads); each
    gunicorn worker process has its own instance.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: Hashable, value: Any, keep: Container[Hashable] = ()) -> None:
        """Store `value`, evicting least-recently-used entries to make room, but never those whose keys are in
        `keep`: when the others cannot free enough, the value is not stored and nothing is evicted.

        `keep` is how a request walking more slices than the cache holds avoids evicting the slices it cached
        itself (an LRU would keep only its last ones, which the next walk over the volume reaches last).
        """
        size = nbytes(value)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= old[1]
            excess = self._size + size - self.max_bytes
            victims = []
            for candidate, (_, candidate_size) in self._items.items():  # least recently used first
                if excess <= 0:
                    break
                if candidate not in keep:
                    victims.append(candidate)
                    excess -= candidate_size
            if excess > 0:
                if old is not None:  # not replaced after all
                    self._items[key] = old
                    self._size += old[1]
                return
            for victim in victims:
                self._size -= self._items.pop(victim)[1]
            self._items[key] = (value, size)
            self._size += size

    def __contains__(self, key: Hashable) -> bool:
        """Whether `key` is cached; neither a hit nor a miss, and its place in the LRU order stays."""
        with self._lock:
            return key in self._items

    @property
    def size_bytes(self) -> int:
        return self._size

    def __len__(self) -> int:
        return len(self._items)
