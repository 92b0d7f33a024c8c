"""Per-request input limits, filled by core/settings and checked by the readers before allocating."""

from __future__ import annotations

from dataclasses import dataclass

MB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Each error message that enforces a limit quotes it and names its setting."""

    max_items: int = 16
    max_base64_bytes: int = 256 * MB
    max_file_bytes: int = 1024 * MB  # decompressed NIfTI
    max_voxels: int = 512 * 512 * 1200
    max_slice_pixels: int = 2048 * 2048
