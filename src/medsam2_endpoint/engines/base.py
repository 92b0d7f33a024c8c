"""The small interface every 3D engine implements, so `propagate` stays engine-independent."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np


def sha256_file(path: str | Path) -> str:
    """Checksum of a checkpoint file, reported in every response's metadata."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelInfo:
    """What a response reports about the model that produced it."""

    name: str  # registry name, e.g. "MedSAM2_latest" or "lite-medsam"
    family: str  # "medsam2" or "lite-medsam"
    checkpoint: str  # file name of the checkpoint
    sha256: str  # checksum of the checkpoint file


class VolumeEngine(Protocol):
    """A promptable 3D segmenter driven slice by slice.

    `start` takes the windowed volume, uint8 (Z, Y, X), and returns an opaque per-volume state
    (frames are prepared lazily: only visited slices are resized and normalised).
    `track` segments the key slice from a box [x_min, y_min, x_max, y_max] (original pixel
    indices) and walks away from it, one slice per step: towards higher z (reverse=False) or
    lower z (reverse=True). It yields (z, mask) with mask a bool (Y, X) array, the key slice
    first. The caller may stop iterating at any time (stop rules, deadlines); the engine must
    leave the state reusable for the next `track` call.
    """

    info: ModelInfo

    def start(self, volume_u8: np.ndarray) -> Any: ...

    def track(self, state: Any, *, key_index: int, box: np.ndarray, reverse: bool) -> Iterator[tuple[int, np.ndarray]]: ...
