"""A PNG to look at before opening a viewer: the key slice and its neighbours, with the mask outlined.

Uses matplotlib's Agg canvas directly (no pyplot, no global backend state, no display needed).
Slices are drawn as stored, `array[z]` with row 0 at the top and x to the right, with the in-plane
pixel aspect taken from the spacing; labels are outlined in one colour each, prompt boxes dashed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

COLOURS = ("#ff3b30", "#34c759", "#0a84ff", "#ffcc00", "#af52de", "#ff9500", "#5ac8fa", "#ff2d55")
DISPLAY_PERCENTILES = (0.5, 99.5)  # grey range when no window is given


def slice_range(key_slice: int, depth: int, panels: int) -> range:
    """`panels` consecutive slices around the key slice, shifted to stay inside the volume."""
    panels = max(1, min(panels, depth))
    start = min(max(key_slice - panels // 2, 0), depth - panels)
    return range(start, start + panels)


def render_preview(
    image: sitk.Image, mask: sitk.Image, key_slice: int, path: str | Path, *, window: Sequence[float] | None = None,
    boxes: Sequence[tuple[int, Sequence[float]]] = (), panels: int = 5, title: str | None = None,
) -> Path:
    """Write the PNG and return its path.

    image, mask: 3D SimpleITK images of the same size (mask: 0 background, label values elsewhere).
    key_slice: z index the panels centre on. window: [lower, upper] grey range (default: the volume's
    0.5-99.5 percentiles). boxes: (z, [x_min, y_min, x_max, y_max]) prompts to draw on their slices.
    """
    voxels, labels = sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(mask)
    if voxels.shape != labels.shape:
        raise ValueError(f"image {voxels.shape} and mask {labels.shape} differ in size")
    lo, hi = (float(v) for v in window) if window is not None else np.percentile(voxels, DISPLAY_PERCENTILES)
    spacing_x, spacing_y = image.GetSpacing()[:2]
    zs = slice_range(key_slice, voxels.shape[0], panels)
    height, width = voxels.shape[1:]
    panel_w = 3.0
    panel_h = panel_w * (height * spacing_y) / (width * spacing_x)
    figure = Figure(figsize=(panel_w * len(zs), panel_h + 0.5), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(zs), squeeze=False)[0]
    values = [int(v) for v in np.unique(labels) if v != 0]
    for ax, z in zip(axes, zs, strict=True):
        ax.imshow(voxels[z], cmap="gray", vmin=lo, vmax=hi, aspect=spacing_y / spacing_x, interpolation="nearest")
        for value in values:
            region = labels[z] == value
            if region.any():
                colour = COLOURS[(value - 1) % len(COLOURS)]
                ax.contour(region.astype(np.uint8), levels=[0.5], colors=[colour], linewidths=1.2)
        for box_z, (x0, y0, x1, y1) in boxes:
            if box_z == z:
                ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False, edgecolor="#ffffff",
                                       linestyle="--", linewidth=1.0))
        ax.set_title(f"z = {z}{' (key)' if z == key_slice else ''}: {int(np.count_nonzero(labels[z]))} px", fontsize=9)
        ax.set_axis_off()
    if title:
        figure.suptitle(title, fontsize=10)
    path = Path(path)
    figure.savefig(path)
    return path
