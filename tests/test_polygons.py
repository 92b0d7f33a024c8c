"""Masks to pixel-corner polygons: exact areas, holes, several parts, valid rings, simplification."""

from __future__ import annotations

import cv2
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from medsam2_endpoint.io.polygons import geometry_area, mask_to_geometry, mask_to_parts, ring_area

masks = arrays(np.bool_, st.tuples(st.integers(1, 14), st.integers(1, 14)))
# Dense random masks (about half the pixels set) hit corner contacts, holes and islands often.
dense = st.tuples(st.integers(1, 14), st.integers(1, 14), st.integers(0, 2**32 - 1)).map(
    lambda t: np.random.default_rng(t[2]).random((t[0], t[1])) < 0.5
)


def covered(parts, height: int, width: int) -> np.ndarray:
    """Which pixel centres the polygons cover (inside an exterior and outside its holes)."""
    out = np.zeros((height, width), dtype=bool)
    for y in range(height):
        for x in range(width):
            centre = (x + 0.5, y + 0.5)
            for part in parts:
                inside = cv2.pointPolygonTest(part.exterior.astype(np.float32).reshape(-1, 1, 2), centre, False) > 0
                if inside and not any(cv2.pointPolygonTest(h.astype(np.float32).reshape(-1, 1, 2), centre, False) > 0 for h in part.holes):
                    out[y, x] = True
    return out


@settings(max_examples=150, deadline=None)
@given(st.one_of(masks, dense))
def test_polygon_area_equals_pixel_count(mask):
    geometry = mask_to_geometry(mask)
    assert geometry_area(geometry) == mask.sum()


@settings(max_examples=60, deadline=None)
@given(st.one_of(masks, dense))
def test_polygons_cover_exactly_the_mask_with_valid_rings(mask):
    parts = mask_to_parts(mask)
    np.testing.assert_array_equal(covered(parts, *mask.shape), mask)
    for part in parts:
        assert ring_area(part.exterior) > 0
        for ring in [part.exterior, *part.holes]:
            edges = np.roll(ring, -1, axis=0) - ring
            assert np.all((edges[:, 0] == 0) | (edges[:, 1] == 0)), "every edge runs along pixel borders"
            assert len({tuple(v) for v in ring.tolist()}) == len(ring), "rings are simple (no vertex twice)"
        for hole in part.holes:
            assert ring_area(hole) < 0


def test_one_pixel_is_its_square_in_corner_coordinates():
    mask = np.zeros((8, 8), dtype=bool)
    mask[5, 3] = True  # row 5, column 3
    geometry = mask_to_geometry(mask)
    assert geometry["type"] == "Polygon"
    (ring,) = geometry["coordinates"]
    assert ring[0] == ring[-1]
    assert {tuple(v) for v in ring} == {(3, 5), (4, 5), (4, 6), (3, 6)}


def test_holes_and_parts_are_kept():
    mask = np.zeros((12, 20), dtype=bool)
    mask[1:8, 1:8] = True
    mask[3:5, 3:6] = False  # a 3 x 2 hole
    mask[9:11, 12:18] = True  # a second part
    geometry = mask_to_geometry(mask)
    assert geometry["type"] == "MultiPolygon"
    assert sorted(len(p) for p in geometry["coordinates"]) == [1, 2]  # one part with a hole, one without
    assert geometry_area(geometry) == 49 - 6 + 12


def test_parts_touching_at_a_corner_become_separate_simple_polygons():
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = mask[1, 1] = True
    geometry = mask_to_geometry(mask)
    assert geometry["type"] == "MultiPolygon" and len(geometry["coordinates"]) == 2
    assert geometry_area(geometry) == 2


def test_hole_inside_a_lobe_stays_with_that_lobe():
    mask = np.zeros((10, 10), dtype=bool)
    mask[0:5, 0:5] = True
    mask[2, 2] = False  # hole in the first lobe
    mask[5:8, 5:8] = True  # touches the first lobe at corner (5, 5)
    parts = mask_to_parts(mask)
    assert len(parts) == 2
    with_hole = [p for p in parts if p.holes]
    assert len(with_hole) == 1 and with_hole[0].area == 24
    np.testing.assert_array_equal(covered(parts, 10, 10), mask)


def test_island_touching_the_rim_of_its_hole_becomes_its_own_part():
    mask = np.zeros((7, 7), dtype=bool)
    mask[0, :] = mask[6, :] = mask[:, 0] = mask[:, 6] = True
    mask[1, 1] = mask[2, 2] = True  # (2, 2) touches the frame only through the corner it shares with (1, 1)
    parts = mask_to_parts(mask)
    assert sorted(p.area for p in parts) == [1, 25] and sum(len(p.holes) for p in parts) == 1
    np.testing.assert_array_equal(covered(parts, 7, 7), mask)


def test_empty_mask_and_edges_of_the_image():
    assert mask_to_geometry(np.zeros((3, 3), dtype=bool)) == {"type": "Polygon", "coordinates": []}
    full = np.ones((3, 5), dtype=bool)
    (ring,) = mask_to_geometry(full)["coordinates"]
    assert {tuple(v) for v in ring} == {(0, 0), (5, 0), (5, 3), (0, 3)}


def test_simplification_reduces_vertices_within_tolerance():
    yy, xx = np.mgrid[:64, :64]
    disc = (xx - 31.5) ** 2 + (yy - 31.5) ** 2 < 25**2
    exact = mask_to_parts(disc)[0]
    simple = mask_to_geometry(disc, simplify_tolerance=1.0)
    ring = np.asarray(simple["coordinates"][0][:-1])
    assert len(ring) < len(exact.exterior) / 2
    assert abs(geometry_area(simple) - disc.sum()) < 0.02 * disc.sum()


def test_offset_shifts_coordinates():
    mask = np.zeros((2, 2), dtype=bool)
    mask[0, 0] = True
    (ring,) = mask_to_geometry(mask, offset=(10.0, 20.0))["coordinates"]
    assert {tuple(v) for v in ring} == {(10, 20), (11, 20), (11, 21), (10, 21)}
