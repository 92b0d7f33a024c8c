"""Per-request input limits, filled by core/settings and checked by the readers before allocating."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from medsam2_endpoint.base.errors import PayloadTooLarge

MB = 1024 * 1024
PROMPT_BYTES_PER_ITEM = MB  # what a body may hold per item besides its base64 (prompts, window, options)


@dataclass(frozen=True)
class Limits:
    """Each error message that enforces a limit quotes it and names its setting."""

    max_items: int = 16
    max_base64_bytes: int = 256 * MB
    max_file_bytes: int = 1024 * MB  # decompressed NIfTI
    max_voxels: int = 512 * 512 * 1200
    max_slice_pixels: int = 2048 * 2048
    max_request_voxels: int = 2 * 512 * 512 * 1200  # all items of one request together, from their headers
    max_request_base64_bytes: int = 1024 * MB  # all items of one request together

    @property
    def max_body_bytes(self) -> int:
        """The largest request body these limits could accept, refused from Content-Length before it is read."""
        per_item = self.max_items * (self.max_base64_bytes + PROMPT_BYTES_PER_ITEM)
        return min(per_item, self.max_request_base64_bytes + self.max_items * PROMPT_BYTES_PER_ITEM)


@dataclass
class VoxelTally:
    """The decoded voxels one request would hold, summed item by item from each file's header (never from its
    voxels): the request is refused as soon as the sum passes the limit, before the next item is decoded."""

    limit: int
    total: int = 0
    shapes: list[str] = field(default_factory=list)
    counted: set[str] = field(default_factory=set)  # the fields (items) already added

    def add(self, where: str, shape_xyz: tuple[int, ...]) -> None:
        self.counted.add(where)
        self.total += math.prod(shape_xyz)
        self.shapes.append("x".join(map(str, shape_xyz)))
        if self.total > self.limit:
            raise PayloadTooLarge(
                f"{where}: the request's volumes ({', '.join(self.shapes)}) hold {self.total} voxels in all, over the "
                f"limit of {self.limit} voxels per request (MEDSAM2_MAX_REQUEST_VOXELS); send fewer or smaller volumes "
                "per request, or one request per volume",
                detail={"request_voxels": self.total, "limit": self.limit},
            )
