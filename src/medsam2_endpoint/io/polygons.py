"""Masks to polygons in pixel-corner coordinates, with holes and several parts (GeoJSON geometry).

Convention: pixel (x, y) of a mask, x the column and y the row, is the unit square x..x+1, y..y+1
(QuPath's convention; samapi put vertices on pixel centres and so shrank every shape by half a
pixel). A one-pixel mask at (3, 5) becomes the ring (3, 5), (4, 5), (4, 6), (3, 6). Without
simplification every edge is horizontal or vertical and the polygon covers exactly the mask's
pixels: shoelace area of the exterior minus the holes equals the pixel count.

How: OpenCV's `findContours` (RETR_CCOMP: outer boundaries and their holes) runs on the mask
upsampled 2x, so every region is at least two sub-pixels thick. Its contours pass through the
centres of boundary sub-pixels; sub-pixel u is the left (even u) or right (odd u) half of pixel
u // 2, so the crack between pixels lies at corner (u + 1) // 2 either way, for outer boundaries
and holes alike. Diagonal steps of the trace (where two pixels touch at a corner) collapse onto
that corner. Rings passing twice through a corner (lobes touching at a corner, an island touching the
rim of its hole) are split there into separate parts, so every ring is simple (valid for JTS/QuPath).

Orientation (in image coordinates, y down): exterior rings have positive shoelace area, holes
negative. Rings are closed (first vertex repeated last), as GeoJSON requires.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

Ring = np.ndarray  # (N, 2) int or float vertices (x, y), not closed


@dataclass
class Part:
    """One polygon: an exterior ring and its holes, each (N, 2) vertices, not closed."""

    exterior: Ring
    holes: list[Ring] = field(default_factory=list)

    @property
    def area(self) -> float:
        return ring_area(self.exterior) + sum(ring_area(h) for h in self.holes)


def ring_area(ring: Ring) -> float:
    """Signed shoelace area: positive for exteriors, negative for holes (this module's orientation)."""
    if len(ring) < 3:
        return 0.0
    x = ring[:, 0].astype(np.float64)
    y = ring[:, 1].astype(np.float64)
    return float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)) / 2.0


def _dedupe(points: np.ndarray) -> np.ndarray:
    """Drop consecutive repeats (also across the closing edge)."""
    if len(points) == 0:
        return points
    keep = np.any(points != np.roll(points, 1, axis=0), axis=1)
    if not keep.any():
        return points[:1]
    return points[keep]


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    """Drop vertices in the middle of a straight run (exact: the outline does not change)."""
    while len(points) > 3:
        prev, nxt = np.roll(points, 1, axis=0), np.roll(points, -1, axis=0)
        cross = (points[:, 0] - prev[:, 0]) * (nxt[:, 1] - points[:, 1]) - (points[:, 1] - prev[:, 1]) * (nxt[:, 0] - points[:, 0])
        keep = cross != 0
        if keep.all():
            break
        points = points[keep]
    return points


def _split_loops(ring: np.ndarray) -> list[np.ndarray]:
    """Split a ring that passes twice through a vertex into simple rings (each keeps its own orientation).

    This happens where two lobes touch at a corner (both loops positive), or where an island touches
    the rim of a hole at a corner (a positive loop inside a negative hole ring). Shoelace areas add up,
    so the total area is unchanged.
    """
    done: list[np.ndarray] = []
    pending = [ring]
    while pending:
        current = pending.pop()
        seen: dict[tuple[int, int], int] = {}
        for i, vertex in enumerate(map(tuple, current.tolist())):
            j = seen.get(vertex)
            if j is not None:
                pending += [_drop_collinear(current[j:i]), _drop_collinear(np.concatenate([current[:j], current[i:]]))]
                break
            seen[vertex] = i
        else:
            done.append(current)
    return [r for r in done if len(r) >= 3 and ring_area(r) != 0]


def _inner_point(hole: np.ndarray) -> tuple[float, float]:
    """The centre of the hole pixel next to the hole ring's first unit step."""
    (x0, y0), (x1, y1) = hole[0], hole[1]
    dx, dy = np.sign(x1 - x0), np.sign(y1 - y0)
    # A hole ring has negative shoelace area, so its inside lies to the right of the direction of
    # travel in the shoelace sense: (dy, -dx).
    return x0 + 0.5 * dx + 0.5 * dy, y0 + 0.5 * dy - 0.5 * dx


def mask_to_parts(mask: np.ndarray) -> list[Part]:
    """All parts of a bool (H, W) mask as exact pixel-corner polygons (integer vertices)."""
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2D (H, W), got shape {mask.shape}")
    if not mask.any():
        return []
    # Pad one pixel so OpenCV never meets the image border; upsample 2x so every region is 2 sub-pixels thick.
    padded = np.pad(mask, 1).astype(np.uint8)
    upsampled = np.repeat(np.repeat(padded, 2, axis=0), 2, axis=1)
    contours, hierarchy = cv2.findContours(upsampled, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None:
        return []
    links = hierarchy[0]

    def corners(contour: np.ndarray) -> np.ndarray:
        points = (contour.reshape(-1, 2).astype(np.int64) + 1) // 2 - 1  # sub-pixel -> corner, minus the pad
        return _drop_collinear(_dedupe(points))

    parts: list[Part] = []
    for i, link in enumerate(links):
        if link[3] != -1:
            continue  # a hole; collected from its parent below
        exterior = corners(contours[i])
        rings = _split_loops(exterior if ring_area(exterior) > 0 else exterior[::-1])
        child = link[2]
        while child != -1:
            hole = corners(contours[child])
            rings += _split_loops(hole if ring_area(hole) < 0 else hole[::-1])
            child = links[child][0]
        component = [Part(r) for r in rings if ring_area(r) > 0]
        holes = [r for r in rings if ring_area(r) < 0]
        if len(component) == 1:
            component[0].holes = holes
        else:
            for hole in holes:
                x, y = _inner_point(hole)
                owners = [p for p in component if cv2.pointPolygonTest(p.exterior.astype(np.float32).reshape(-1, 1, 2), (x, y), False) > 0]
                min(owners or component, key=lambda p: ring_area(p.exterior)).holes.append(hole)
        parts.extend(component)
    return parts


def simplify_parts(parts: list[Part], tolerance: float) -> list[Part]:
    """Douglas-Peucker (cv2.approxPolyDP) on every ring, `tolerance` in pixels.

    Rings that would collapse below 3 vertices keep their exact form (exteriors) or are dropped (holes,
    which at that size are smaller than the tolerance). The outline may then differ from the mask by up
    to `tolerance` pixels, and the area is no longer exact.
    """
    if tolerance <= 0:
        return parts
    out = []
    for part in parts:
        exterior = _approx(part.exterior, tolerance)
        exterior = exterior if exterior is not None else part.exterior
        holes = [h for h in (_approx(h, tolerance) for h in part.holes) if h is not None]
        out.append(Part(exterior, holes))
    return out


def _approx(ring: np.ndarray, tolerance: float) -> np.ndarray | None:
    approx = cv2.approxPolyDP(ring.astype(np.float32).reshape(-1, 1, 2), tolerance, True).reshape(-1, 2)
    return approx if len(approx) >= 3 and ring_area(approx) != 0 else None


def _closed(ring: np.ndarray) -> list[list[float]]:
    coords = [[_number(x), _number(y)] for x, y in ring.tolist()]
    return coords + [coords[0]]


def _number(v: float) -> float | int:
    return int(v) if float(v).is_integer() else float(v)


def parts_to_geometry(parts: list[Part]) -> dict[str, Any]:
    """GeoJSON geometry: a Polygon for one part, a MultiPolygon for several, an empty Polygon for none."""
    rings = [[_closed(p.exterior)] + [_closed(h) for h in p.holes] for p in parts]
    if len(rings) == 1:
        return {"type": "Polygon", "coordinates": rings[0]}
    if not rings:
        return {"type": "Polygon", "coordinates": []}
    return {"type": "MultiPolygon", "coordinates": rings}


def mask_to_geometry(
    mask: np.ndarray, *, simplify_tolerance: float = 0.0, offset: tuple[float, float] = (0.0, 0.0)
) -> dict[str, Any]:
    """A bool (H, W) mask as a GeoJSON Polygon/MultiPolygon in pixel-corner coordinates (+ offset)."""
    parts = simplify_parts(mask_to_parts(mask), simplify_tolerance)
    if offset != (0.0, 0.0):
        shift = np.asarray(offset, dtype=np.float64)
        parts = [Part(p.exterior + shift, [h + shift for h in p.holes]) for p in parts]
    return parts_to_geometry(parts)


def geometry_area(geometry: dict[str, Any]) -> float:
    """Area of a Polygon/MultiPolygon geometry from this module (holes subtracted)."""
    polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    total = 0.0
    for rings in polygons:
        for ring in rings:
            total += ring_area(np.asarray(ring[:-1], dtype=np.float64))
    return total
