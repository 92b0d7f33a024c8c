"""A box answered on a zoomed crop of its slice, for a structure too small for the model to see whole-slice.

LiteMedSAM sees a 512 x 512 slice at 256 x 256 and its image embedding at 64 x 64: a structure ten pixels
across covers a cell or two, and the decoder may answer its box with nothing. The crop around the box
(`CONTEXT` times its side, at least `MIN_CROP_PX`) is upsampled to the model's input and answered there, as
a Slicer user zooms in to draw on a small structure. The crop is a one-slice volume of its own (a private
state, nothing cached under the volume's key).
"""

from __future__ import annotations

import cv2
import numpy as np

from medsam2_endpoint.engines.base import SliceEngine

# The crop's side in box sides (benchmarks/zoom_keys.py): on the 95 labelled slices of ../shared/data/real whose box
# is at most 40 px, mean Dice whole-slice 0.801; on the crop, 1.5: 0.802, 2: 0.809, 3: 0.796, 4: 0.797, 6: 0.762;
# where the model answered with nothing whole-slice (CT colon slices 9 and 10) 0.609 and 0.536 at 2. So little
# better on average where the model answers that it is only the fallback for an empty answer (and, in coronal and
# sagittal views, an alternative: pipeline/tracking.TrackRule.key_zoom).
CONTEXT: float = 2
MIN_CROP_PX = 32
INPUT_PX = 256  # LiteMedSAM's input side: the crop is upsampled to it, so the engine does not resize again


def zoomed_logits(engine: SliceEngine, state: object, z: int, box: np.ndarray) -> tuple[np.ndarray, float]:
    """float32 (Y, X) logits of slice z from `box` [x_min, y_min, x_max, y_max], answered on a crop around it
    (-1 outside the crop), and the model's predicted IoU there."""
    pixels = engine.slice_pixels(state, z)
    h, w = pixels.shape
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(MIN_CROP_PX, int(np.ceil(CONTEXT * max(x1 - x0, y1 - y0, 1.0))))
    side_y, side_x = min(side, h), min(side, w)
    top = int(np.clip(round((y0 + y1) / 2 - side_y / 2), 0, h - side_y))
    left = int(np.clip(round((x0 + x1) / 2 - side_x / 2), 0, w - side_x))
    crop = np.ascontiguousarray(pixels[top:top + side_y, left:left + side_x])
    scale = INPUT_PX / max(side_y, side_x)
    size = (max(1, round(side_x * scale)), max(1, round(side_y * scale)))  # cv2: (width, height)
    zoomed = cv2.resize(crop, size, interpolation=cv2.INTER_CUBIC)
    sub = engine.start(zoomed[None])
    zoomed_box = (np.array([x0, y0, x1, y1]) - [left, top, left, top]) * scale
    logits, iou = engine.slice_logits(sub, 0, zoomed_box)
    out = np.full((h, w), -1.0, dtype=np.float32)
    out[top:top + side_y, left:left + side_x] = cv2.resize(logits.astype(np.float32), (side_x, side_y),
                                                            interpolation=cv2.INTER_LINEAR)
    return out, iou
