"""Box prompts for the automatic masks of box-only models (LiteMedSAM): grid points -> image regions -> boxes.

A box-only model cannot be prompted with SAM's grid points, and a blind grid of squares rarely frames an
object: LiteMedSAM segments what fills the box, so a square smaller than the object cuts it and a larger
one takes in background (BENCHMARKS.md "Automask"). Instead each grid point seeds the image region it
sits in, at a few tolerances (SAM's three mask granularities in image terms), and that region's bounding
box, grown by MARGINS, is the prompt.

The regions are connected components of the lightly smoothed grey image, joined where neighbouring pixels
differ by at most the tolerance (cv2.floodFill's floating range). That relation does not depend on the seed,
so every grid point inside an already-filled region would give the same box and the same mask: it is
skipped before decoding (`BoxPrompts.pruned`). Flat background is one region, decoded once.

Conventions: grey uint8 (H, W); points (P, 2) as (x, y) pixels, x the column; boxes float (B, 4)
[x_min, y_min, x_max, y_max] in pixels, inside the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# Flood-fill tolerances, as fractions of the image's robust intensity range (1st to 99th percentile).
TOLERANCES = (0.02, 0.05, 0.1)
# Each region's box is grown by these fractions of its own width/height on every side. LiteMedSAM gives its
# best masks from boxes somewhat larger than the object (on bright disks, 8-16 % a side: stability >= 0.95).
MARGINS = (0.08, 0.16)
SMOOTH_SIGMA = 1.0  # px: pixel noise should not split a region
MIN_SIDE = 3  # px: regions narrower than this are noise specks, not objects


@dataclass(frozen=True)
class BoxPrompts:
    boxes: np.ndarray  # float (B, 4)
    seeds: np.ndarray  # float (B, 2): the grid point that found each box's region
    seeds_total: int  # grid points x tolerances considered
    pruned: int  # of those, seeds that fell in a region already found (same box, same mask) or in a speck


def grid_points(height: int, width: int, per_side: int) -> np.ndarray:
    """SAM's point grid: per_side x per_side cell centres, (P, 2) as (x, y) pixels, row by row."""
    xs = (np.arange(per_side) + 0.5) * width / per_side
    ys = (np.arange(per_side) + 0.5) * height / per_side
    return np.array([(x, y) for y in ys for x in xs], dtype=np.float64)


def _smoothed(grey_u8: np.ndarray) -> tuple[np.ndarray, float]:
    """float32 grey after a small Gaussian, and its 1st-99th percentile range (at least 1)."""
    image = cv2.GaussianBlur(grey_u8.astype(np.float32), (0, 0), SMOOTH_SIGMA)
    lo, hi = np.percentile(image, [1, 99])
    return image, max(float(hi - lo), 1.0)


def region_boxes(grey_u8: np.ndarray, points: np.ndarray) -> BoxPrompts:
    """The distinct box prompts the grid points' regions give, at every tolerance and margin."""
    height, width = grey_u8.shape
    image, span = _smoothed(grey_u8)
    boxes: list[list[float]] = []
    seeds: list[np.ndarray] = []
    pruned = 0
    for tolerance in TOLERANCES:
        filled = np.zeros((height + 2, width + 2), np.uint8)  # floodFill's mask: 1 where a region was found
        diff = tolerance * span
        for point in points:
            x, y = min(int(point[0]), width - 1), min(int(point[1]), height - 1)
            if filled[y + 1, x + 1]:
                pruned += 1
                continue
            flags = 4 | cv2.FLOODFILL_MASK_ONLY | (1 << 8)
            _, _, _, (rx, ry, rw, rh) = cv2.floodFill(image, filled, (x, y), 0.0, diff, diff, flags)
            if min(rw, rh) < MIN_SIDE:
                pruned += 1
                continue
            for margin in MARGINS:
                gx, gy = margin * rw, margin * rh
                boxes.append([max(rx - gx, 0.0), max(ry - gy, 0.0), min(rx + rw + gx, width), min(ry + rh + gy, height)])
                seeds.append(point)
    if not boxes:
        return BoxPrompts(np.zeros((0, 4)), np.zeros((0, 2)), len(points) * len(TOLERANCES), pruned)
    all_boxes = np.array(boxes, dtype=np.float64)
    # the same region at two tolerances gives the same boxes: decode each once
    _, first = np.unique(np.round(all_boxes, 3), axis=0, return_index=True)
    first = np.sort(first)
    return BoxPrompts(all_boxes[first], np.array(seeds)[first], len(points) * len(TOLERANCES), pruned)
