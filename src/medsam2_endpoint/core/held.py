"""Decoded volumes a worker holds between requests, by `volume_id`, so a correction round needs no upload.

A bounded LRU (bytes, `MEDSAM2_HELD_VOLUMES_MB`); each worker process holds its own, so behind a load
balancer a request may reach a worker that does not hold the volume: the 409 `volume_not_held` tells the
client to upload it again.
"""

from __future__ import annotations

from medsam2_endpoint.base.errors import VolumeNotHeld
from medsam2_endpoint.base.lru import ByteLRU
from medsam2_endpoint.io.volume import Volume


class HeldVolumes:
    def __init__(self, max_bytes: int) -> None:
        self._cache = ByteLRU(max_bytes)

    def hold(self, volume: Volume) -> str:
        """Keep `volume` (least recently used ones make room); its volume_id."""
        volume_id = volume.content_id()
        self._cache.put(volume_id, volume)
        return volume_id

    def get(self, volume_id: str, *, field: str) -> Volume:
        volume: Volume | None = self._cache.get(volume_id)
        if volume is None:
            raise VolumeNotHeld(
                f"{field}: this worker does not hold volume {volume_id[:64]} (evicted, restarted, or another worker); "
                "send nii_image again"
            )
        return volume

    def __len__(self) -> int:
        return len(self._cache)
