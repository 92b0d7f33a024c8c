"""A PNG to look at before opening a viewer: the key slice and its neighbours, and below them three
orthogonal planes through the object's centre (axial z, coronal y, sagittal x), with the mask outlined,
so the propagation along z shows before a viewer is opened. 2D: the image with its masks and prompt.

Uses matplotlib's Agg canvas directly (no pyplot, no global backend state, no display needed).
Slices are drawn as stored, `array[z]` with row 0 at the top and x to the right; coronal and sagittal
planes with z growing upwards. Pixel aspects come from the spacing; labels are outlined in one colour
each, prompt boxes dashed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

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
    figure = Figure(figsize=(panel_w * max(len(zs), 3), 2 * panel_h + 1.0), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    rows = cast(np.ndarray, figure.subfigures(2, 1))  # an array of 2 SubFigures for 2 rows
    top, bottom = rows[0], rows[1]
    axes = top.subplots(1, len(zs), squeeze=False)[0]
    values = [int(v) for v in np.unique(labels) if v != 0]
    _planes(bottom.subplots(1, 3, squeeze=False)[0], voxels, labels, values, image.GetSpacing(), (lo, hi))
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


def centre(labels: np.ndarray) -> tuple[int, int, int]:
    """(z, y, x) voxel nearest the centroid of the foreground (the volume's centre when empty)."""
    found = np.nonzero(labels)
    if found[0].size == 0:
        depth, height, width = labels.shape
        return depth // 2, height // 2, width // 2
    z, y, x = (int(round(float(np.mean(axis)))) for axis in found)
    return z, y, x


def _outline(ax: Any, labels_2d: np.ndarray, values: Sequence[int]) -> None:
    for value in values:
        region = labels_2d == value
        if region.any():
            ax.contour(region.astype(np.uint8), levels=[0.5], colors=[COLOURS[(value - 1) % len(COLOURS)]], linewidths=1.2)


def _planes(axes: Sequence[Any], voxels: np.ndarray, labels: np.ndarray, values: Sequence[int],
            spacing: Sequence[float], grey: tuple[float, float]) -> None:
    """Axial, coronal and sagittal planes through the labels' centre, each at its physical aspect."""
    z, y, x = centre(labels)
    sx, sy, sz = (float(v) for v in spacing)
    depth, height, width = labels.shape
    # a thin stack (20 slices of 2 mm under a 50 cm field) would be a strip: stretch z to a third of the width
    stretch = max(1.0, (width * sx) / (3.0 * depth * sz))
    note = f", z x{stretch:.1f}" if stretch > 1.0 else ""
    views = (
        (f"axial z = {z}", voxels[z], labels[z], sy / sx, "upper"),
        (f"coronal y = {y}{note}", voxels[:, y, :], labels[:, y, :], stretch * sz / sx, "lower"),
        (f"sagittal x = {x}{note}", voxels[:, :, x], labels[:, :, x], stretch * sz / sy, "lower"),
    )
    for ax, (name, plane, plane_labels, aspect, origin) in zip(axes, views, strict=True):
        ax.imshow(plane, cmap="gray", vmin=grey[0], vmax=grey[1], aspect=aspect, origin=origin, interpolation="nearest")
        _outline(ax, plane_labels, values)
        ax.set_title(f"{name}: {int(np.count_nonzero(plane_labels))} px", fontsize=9)
        ax.set_axis_off()


def render_preview_2d(image: np.ndarray, masks: Sequence[np.ndarray], path: str | Path, *, window: Sequence[float] | None = None,
                      box: Sequence[float] | None = None, points: Sequence[tuple[float, float, int]] = (),
                      title: str | None = None) -> Path:
    """PNG of a grey (H, W) image with each bool mask outlined, the box dashed, points as + (foreground) / x."""
    lo, hi = (float(v) for v in window) if window is not None else np.percentile(image, DISPLAY_PERCENTILES)
    height, width = image.shape
    figure = Figure(figsize=(5.0, 5.0 * height / width + 0.5), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    for i, mask in enumerate(masks):
        _outline(ax, mask.astype(np.int32) * (i + 1), [i + 1])
    if box is not None:
        x0, y0, x1, y1 = box
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="#ffffff", linestyle="--", linewidth=1.0))
    for x, y, label in points:
        ax.plot([x], [y], marker="+" if label else "x", color="#34c759" if label else "#ff9500", markersize=10, mew=2)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    path = Path(path)
    figure.savefig(path)
    return path
