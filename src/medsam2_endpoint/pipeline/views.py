"""Prompts drawn in a coronal or sagittal view: the volume resliced so that view's axis comes first.

The engines walk along axis 0 of a (Z, Y, X) volume. A box drawn on a coronal slice (a fixed row j) or a
sagittal slice (a fixed column i) runs the same walk along j or i: `to_view` transposes the volume so that
axis is first (its slices are then (Z, X) or (Z, Y) images, z the image row), `from_view` transposes an
answer back, and `box_in_view` turns a half-open (k, j, i) box into the view's [x_min, y_min, x_max, y_max].
"""

from __future__ import annotations

from typing import Literal

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
