"""ByteLRU: least-recently-used eviction under a byte budget, and entries a caller asks to keep."""

from __future__ import annotations

from medsam2_endpoint.base.lru import ByteLRU


class Blob:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


def keys(cache: ByteLRU) -> list:
    return list(cache._items)  # least recently used first


def test_evicts_least_recently_used_first():
    cache = ByteLRU(100)
    for key in "abc":
        cache.put(key, Blob(30))
    assert cache.get("a") is not None  # "b" is now the least recently used
    cache.put("d", Blob(30))
    assert keys(cache) == ["c", "a", "d"] and cache.size_bytes == 90
    cache.put("huge", Blob(101))
    assert "huge" not in keys(cache) and cache.size_bytes == 90


def test_kept_entries_are_skipped_and_the_next_unkept_ones_evicted():
    cache = ByteLRU(100)
    for key in "abc":
        cache.put(key, Blob(30))
    cache.put("d", Blob(50), keep={"a"})  # 40 bytes must go: "b" and "c", never "a"
    assert keys(cache) == ["a", "d"] and cache.size_bytes == 80


def test_value_is_not_stored_when_only_kept_entries_could_make_room():
    cache = ByteLRU(100)
    for key in "abc":
        cache.put(key, Blob(30))
    cache.put("d", Blob(30), keep={"a", "b", "c"})
    assert keys(cache) == ["a", "b", "c"] and cache.size_bytes == 90  # nothing evicted, "d" not stored
    cache.put("d", Blob(50), keep={"a", "b"})  # evicting "c" frees 30 of the 40 needed: still not enough
    assert keys(cache) == ["a", "b", "c"]
    cache.put("b", Blob(80), keep={"a", "b", "c"})  # a replacement that does not fit leaves the old value
    assert keys(cache) == ["a", "c", "b"] and cache.get("b").nbytes == 30 and cache.size_bytes == 90


def test_a_walk_longer_than_the_cache_keeps_its_first_slices_for_the_next_walk():
    """What the engines do: each request keeps the keys it used, so a second walk over the same slices
    finds the first ones (a plain LRU would have kept the last ones, and evicted them before reaching them)."""
    cache = ByteLRU(3 * 10)

    def walk(order):
        used, hits = set(), 0
        for z in order:
            if cache.get(z) is None:
                cache.put(z, Blob(10), keep=used)
            else:
                hits += 1
            used.add(z)
        return hits

    order = [4, 5, 6, 7, 3, 2, 1, 0]  # up from the key slice, then down
    assert walk(order) == 0 and keys(cache) == [4, 5, 6]
    assert walk(order) == 3
    assert walk([0, 1, 2]) == 0 and keys(cache) == [0, 1, 2]  # another region of the volume: the old entries make way
