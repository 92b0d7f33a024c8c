"""A RECIST mark (a lesion's long-axis line on its key slice) turned into a box or point prompt.

The arithmetic of MedSAM2's CT-lesion inference (REFERENCE.md E): for the long axis p1-p2 the centre is
`int((p1 + p2) / 2)` and the half side `int(|p1 - p2| / 2)` (Euclidean length); the box is the square
`[cx - h, cy - h, cx + h, cy + h]` grown by `shift` px and clamped to the slice. Point modes, all positive:
"points" n = 5 points evenly along the line (endpoints included), "center" the midpoint, "three" the
midpoint and both endpoints, "box_points" a 3 x 3 grid in the box (its corners, edge midpoints, centre).

The optional short axis (our addition; the script uses the long axis only): in box mode the box is the
bounding box of the square and the short axis's endpoints; in point modes its points are added the same
way as the long axis's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

RECIST_POINTS = 5  # the script's default n for "from_recist_n"
POINT_MODES = ("points", "center", "three", "box_points")


@dataclass(frozen=True)
class Derived:
    """The prompt derived from a RECIST mark: a box (int64 (4,)) or positive points (float64 (N, 2))."""

    mode: str
    box: np.ndarray | None
    points: np.ndarray | None

    def as_metadata(self) -> dict[str, Any]:
        return {"mode": self.mode, "box": None if self.box is None else self.box.tolist(),
                "points": None if self.points is None else self.points.tolist()}


def recist_box(long_axis: np.ndarray, *, width: int, height: int, shift: int = 0,
               short_axis: np.ndarray | None = None) -> np.ndarray:
    """int64 [x_min, y_min, x_max, y_max] from a (2, 2) line [[x1, y1], [x2, y2]]."""
    p1, p2 = long_axis.astype(np.float64)
    cx, cy = (int(v) for v in (p1 + p2) / 2)
    half = int(np.linalg.norm(p1 - p2) / 2)
    x0, y0, x1, y1 = cx - half - shift, cy - half - shift, cx + half + shift, cy + half + shift
    if short_axis is not None:
        xs, ys = short_axis[:, 0], short_axis[:, 1]
        x0, y0 = min(x0, int(np.floor(xs.min()))), min(y0, int(np.floor(ys.min())))
        x1, y1 = max(x1, int(np.ceil(xs.max()))), max(y1, int(np.ceil(ys.max())))
    return np.array([max(x0, 0), max(y0, 0), min(x1, width - 1), min(y1, height - 1)], dtype=np.int64)


def _along(line: np.ndarray, n: int) -> np.ndarray:
    return np.linspace(line[0], line[1], n).astype(np.float64)


def recist_points(long_axis: np.ndarray, mode: str, *, width: int, height: int,
                  short_axis: np.ndarray | None = None) -> np.ndarray:
    """float64 (N, 2) positive points [x, y] for a point mode (module docstring)."""
    lines = [long_axis.astype(np.float64)] + ([short_axis.astype(np.float64)] if short_axis is not None else [])
    if mode == "box_points":
        x0, y0, x1, y1 = recist_box(long_axis, width=width, height=height, short_axis=short_axis).astype(np.float64)
        grid = [(x, y) for y in (y0, (y0 + y1) / 2, y1) for x in (x0, (x0 + x1) / 2, x1)]
        return np.array(grid, dtype=np.float64)
    count = {"points": RECIST_POINTS, "three": 3, "center": 1}[mode]
    parts = [_along(line, count) if count > 1 else line.mean(axis=0, keepdims=True) for line in lines]
    points = np.concatenate(parts)
    return np.unique(points, axis=0) if short_axis is not None else points  # the two axes share their midpoint


def derive(long_axis: list[list[float]], short_axis: list[list[float]] | None, mode: str, *,
           width: int, height: int) -> Derived:
    """The prompt a RECIST mark stands for under `mode` ("box" or one of POINT_MODES)."""
    line = np.asarray(long_axis, dtype=np.float64)
    short = None if short_axis is None else np.asarray(short_axis, dtype=np.float64)
    if mode == "box":
        return Derived(mode, recist_box(line, width=width, height=height, short_axis=short), None)
    return Derived(mode, None, recist_points(line, mode, width=width, height=height, short_axis=short))
