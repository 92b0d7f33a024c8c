"""What MedSAM2's own Slicer plugin left on this server, per client address, in memory only.

The plugin's protocol has no session: it uploads `img_data.npz`, asks for a run, then downloads "the"
result, all by fixed file names (REFERENCE.md G). Its own server keeps them as files in one folder, so
two users overwrite each other and any path can be downloaded. Here each client address has one entry
(the volume, the uploaded masks, the last result's bytes) that nothing but this server's own code ever
fills; entries expire after `ttl_s` without use, and all entries together stay under `max_bytes`
(least recently used addresses are dropped first).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from medsam2_endpoint.base.errors import PayloadTooLarge


@dataclass(frozen=True)
class PluginVolume:
    """The `img_data.npz` of the first step, checked: uint8 voxels as the model sees them."""

    imgs: np.ndarray  # uint8 (D, H, W)
    boxes: np.ndarray  # int64 (N, 4) [x_min, y_min, x_max, y_max], normalised and inside the slice
    z_range: tuple[int, int, int]  # (k_low, k_high, mid), k_low <= k_high, all inside the volume
    key: str  # content key of imgs (shared slice features across requests)
    scaled_from: str | None = None  # the dtype min-max scaled to uint8, when the plugin sent unscaled voxels

    @property
    def nbytes(self) -> int:
        return int(self.imgs.nbytes + self.boxes.nbytes)


@dataclass(frozen=True)
class ClientState:
    volume: PluginVolume | None = None
    gts: np.ndarray | None = None  # uint8 (D, H, W) object labels from `gts.npz`
    result: bytes | None = None  # the last run's answer, an .npz this server wrote

    @property
    def nbytes(self) -> int:
        return (self.volume.nbytes if self.volume else 0) + (int(self.gts.nbytes) if self.gts is not None else 0) + len(self.result or b"")


class PluginStore:
    """client address -> ClientState, with expiry and a byte cap. Thread-safe; values are immutable."""

    def __init__(self, max_bytes: int, ttl_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._items: OrderedDict[str, tuple[ClientState, float]] = OrderedDict()  # oldest use first
        self._lock = threading.Lock()

    def _expire(self, now: float) -> None:
        while self._items:
            client, (_, used) = next(iter(self._items.items()))
            if now - used < self.ttl_s:
                break
            del self._items[client]

    def get(self, client: str) -> ClientState:
        """The client's state (empty when it has none or it expired); a read counts as use."""
        with self._lock:
            now = self._clock()
            self._expire(now)
            entry = self._items.get(client)
            if entry is None:
                return ClientState()
            self._items[client] = (entry[0], now)
            self._items.move_to_end(client)
            return entry[0]

    def update(self, client: str, **changes: Any) -> ClientState:
        """Replace some of the client's fields; other clients' least recently used entries make room."""
        with self._lock:
            now = self._clock()
            self._expire(now)
            old = self._items.pop(client, None)
            state = replace(old[0] if old else ClientState(), **changes)
            size = state.nbytes
            if size > self.max_bytes:
                if old is not None:
                    self._items[client] = old  # a refused upload leaves the earlier state as it was
                raise PayloadTooLarge(
                    f"file: this upload would make this client's state {size} bytes, over the {self.max_bytes} bytes all "
                    "clients may hold together (MEDSAM2_PLUGIN_STATE_MB); send a smaller volume",
                    detail={"state_bytes": size, "limit": self.max_bytes},
                )
            total = size + sum(s.nbytes for s, _ in self._items.values())
            while total > self.max_bytes and self._items:
                _, (dropped, _) = self._items.popitem(last=False)
                total -= dropped.nbytes
            self._items[client] = (state, now)
            return state

    def __len__(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return len(self._items)
