"""Prompts drawn in a coronal or sagittal view: the volume resliced so that view's axis comes first.

The engines walk along axis 0 of a (Z, Y, X) volume. A box drawn on a coronal slice (a fixed row j) or a
sagittal slice (a fixed column i) runs the same walk along j or i: `to_view` transposes the volume so that
axis is first (its slices are then (Z, X) or (Z, Y) images, z the image row), `from_view` transposes an
answer back, and `box_in_view` turns a half-open (k, j, i) box into the view's [x_min, y_min, x_max, y_max].
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np

Axis = Literal[0, 1, 2]  # 0 axial (k fixed), 1 coronal (j fixed), 2 sagittal (i fixed)
VIEW_NAMES = {0: "axial", 1: "coronal", 2: "sagittal"}
_ORDER: dict[int, tuple[int, int, int]] = {0: (0, 1, 2), 1: (1, 0, 2), 2: (2, 0, 1)}


def to_view(volume: np.ndarray, axis: int) -> np.ndarray:
    """A (K, J, I) array with `axis` first: axial as it is, coronal (J, K, I), sagittal (I, K, J); a view, no copy."""
    return volume if axis == 0 else volume.transpose(_ORDER[axis])


def from_view(array: np.ndarray, axis: int) -> np.ndarray:
    """The inverse of `to_view`: an array in the view's order back in (K, J, I) order (a view, no copy)."""
    return array if axis == 0 else array.transpose(np.argsort(_ORDER[axis]))


def box_in_view(bbox: list[list[int]], axis: int) -> tuple[int, np.ndarray]:
    """(slice index along `axis`, box [x_min, y_min, x_max, y_max] on that view's slice) of a half-open
    (k, j, i) box; the ends stay half-open (pixel corners), as a box around whole pixels is drawn."""
    order = _ORDER[axis]
    slab, rows, cols = (bbox[a] for a in order)
    return int(slab[0]), np.array([cols[0], rows[0], cols[1], rows[1]], dtype=np.int64)


# A coronal or sagittal slice of a CT or MR with thick slices is squashed: 20 slices of 5 mm under 512 columns of
# 0.7 mm make a 20 x 512 image of a 100 x 360 mm field, which the model sees at 10 x 256. Slicer shows the view
# at its physical aspect, and so does the walk: the view's rows (k) are stretched by the slice spacing over the
# in-plane spacing, at most to the view's width, and the answer is taken back at each slice's centre row.
MIN_STRETCH = 1.2  # thinner anisotropy than this: the view is used as it is


def view_rows(shape: tuple[int, int, int], spacing: list[float] | None, axis: int) -> int:
    """Rows (k) of the view `axis` at its physical aspect; shape (K, J, I), spacing (k, j, i) in mm."""
    depth = shape[0]
    if axis == 0 or spacing is None or min(spacing) <= 0:
        return depth
    across = spacing[2] if axis == 1 else spacing[1]  # the columns of a coronal slice are i, of a sagittal one j
    stretch = spacing[0] / across
    if stretch < MIN_STRETCH:
        return depth
    width = shape[2] if axis == 1 else shape[1]
    return max(depth, min(round(depth * stretch), width))


def stretch_rows(view: np.ndarray, rows: int, *, labels: bool = False) -> np.ndarray:
    """A (N, K, W) view with each slice's K rows resampled to `rows` (linear; nearest for `labels`). Slice by slice
    into one uint8 array: a whole-volume float copy of a 512-wide view would be four times its size, twice over."""
    if rows == view.shape[1]:
        return view
    if labels:
        source = ((np.arange(rows) + 0.5) * view.shape[1] / rows).astype(np.int64)
        return np.ascontiguousarray(view[:, np.minimum(source, view.shape[1] - 1)])
    out = np.empty((view.shape[0], rows, view.shape[2]), dtype=view.dtype)
    for n in range(view.shape[0]):
        out[n] = cv2.resize(view[n], (view.shape[2], rows), interpolation=cv2.INTER_LINEAR)
    return out


def shrink_rows(view: np.ndarray, depth: int) -> np.ndarray:
    """The inverse of `stretch_rows` for an answer: each of the `depth` rows taken at its centre in the stretched rows."""
    rows = view.shape[1]
    if rows == depth:
        return view
    return view[:, np.minimum(((np.arange(depth) + 0.5) * rows / depth).astype(np.int64), rows - 1)]


def stretch_box(box: np.ndarray, factor: float) -> np.ndarray:
    """A view's box [x_min, y_min, x_max, y_max] (half-open pixel corners) with its rows in the stretched view's."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return np.array([x0, np.floor(y0 * factor), x1, np.ceil(y1 * factor)], dtype=np.int64)
