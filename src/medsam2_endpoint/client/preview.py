"""A PNG to look at before opening a viewer: the key slice and its neighbours, and below them three
orthogonal planes through the object's centre (axial, coronal, sagittal), with the mask outlined, so the
propagation along z shows before a viewer is opened. 2D: the image with its masks and prompt.

Uses matplotlib's Agg canvas directly (no pyplot, no global backend state, no display needed).
Planes are shown in the patient's orientation (radiological conventions), from the volume's direction
rather than the array as stored: axial with anterior up and the patient's right on the image's left;
coronal with superior up, right on the left; sagittal with superior up, anterior on the left. The volume
is put in LPS order (each stored axis to the patient axis nearest its direction, flipped where it runs the
other way), so a series stored with rows running posterior to anterior is not shown upside down. Pixel
aspects come from the spacing; labels are outlined in one colour each, prompt boxes dashed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import SimpleITK as sitk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

COLOURS = ("#ff3b30", "#34c759", "#0a84ff", "#ffcc00", "#af52de", "#ff9500", "#5ac8fa", "#ff2d55")
DISPLAY_PERCENTILES = (0.5, 99.5)  # grey range when no window is given
PLANE_NAMES = ("sagittal", "coronal", "axial")  # the plane normal to patient axis L, P, S


def slice_range(key_slice: int, depth: int, panels: int) -> range:
    """`panels` consecutive slices around the key slice, shifted to stay inside the volume."""
    panels = max(1, min(panels, depth))
    start = min(max(key_slice - panels // 2, 0), depth - panels)
    return range(start, start + panels)


@dataclass(frozen=True)
class Orientation:
    """How a stored (z, y, x) array maps to an LPS-ordered (S, P, L) one: index k of that array runs inferior ->
    superior, j anterior -> posterior, i the patient's right -> left."""

    patient_axis: tuple[int, int, int]  # per stored ITK axis (x, y, z): the patient axis (0 L, 1 P, 2 S) nearest it
    flipped: tuple[bool, bool, bool]  # per stored ITK axis: it runs against that patient axis
    shape: tuple[int, int, int]  # the stored array's (z, y, x)

    @classmethod
    def of(cls, image: sitk.Image) -> Orientation:
        direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)  # column a: stored axis a in LPS
        axes: list[tuple[int, int, bool]] = []
        free = [0, 1, 2]
        for a in np.argsort(-np.abs(direction).max(axis=0)):  # most clearly aligned axes choose first
            p = max(free, key=lambda q: abs(direction[q, a]))
            free.remove(p)
            axes.append((int(a), p, bool(direction[p, a] < 0)))
        axes.sort()
        x, y, z = image.GetSize()
        return cls(cast("tuple[int, int, int]", tuple(p for _, p, _ in axes)),
                   cast("tuple[bool, bool, bool]", tuple(f for _, _, f in axes)), (z, y, x))

    def array(self, stored: np.ndarray) -> np.ndarray:
        """The stored (z, y, x) array as (S, P, L)."""
        flips = tuple(2 - a for a in range(3) if self.flipped[a])  # numpy axis of ITK axis a is 2 - a
        oriented = np.flip(stored, axis=flips) if flips else stored
        # output numpy axis m holds patient axis 2 - m; find the stored numpy axis that carries it
        return np.transpose(oriented, [2 - self.patient_axis.index(2 - m) for m in range(3)])

    def index(self, x: float, y: float, z: float) -> tuple[float, float, float]:
        """A stored (x, y, z) index as (k, j, i) in the (S, P, L) array."""
        out = [0.0, 0.0, 0.0]
        for a, (value, size) in enumerate(zip((x, y, z), self.shape[::-1], strict=True)):
            out[2 - self.patient_axis[a]] = (size - 1 - value) if self.flipped[a] else value
        return out[0], out[1], out[2]

    def spacing(self, image: sitk.Image) -> tuple[float, float, float]:
        """(S, P, L) spacing in mm."""
        out = [0.0, 0.0, 0.0]
        for a, value in enumerate(image.GetSpacing()):
            out[2 - self.patient_axis[a]] = float(value)
        return out[0], out[1], out[2]


def _plane(volume: np.ndarray, normal: int, at: int) -> np.ndarray:
    """The plane of an (S, P, L) array normal to patient axis `normal` (0 L, 1 P, 2 S) at index `at`: rows S (or P
    for axial), columns P (sagittal) or L."""
    return cast(np.ndarray, np.take(volume, at, axis=2 - normal))


def _show(ax: Any, normal: int, plane: np.ndarray, plane_labels: np.ndarray, values: Sequence[int], spacing: Sequence[float],
          grey: tuple[float, float], stretch: float = 1.0) -> None:
    """One plane at its physical aspect: axial row 0 (anterior) at the top, the others superior up."""
    s_mm, p_mm, l_mm = spacing
    rows_mm, cols_mm = {2: (p_mm, l_mm), 1: (stretch * s_mm, l_mm), 0: (stretch * s_mm, p_mm)}[normal]
    ax.imshow(plane, cmap="gray", vmin=grey[0], vmax=grey[1], aspect=rows_mm / cols_mm, origin="upper" if normal == 2 else "lower",
              interpolation="nearest")
    _outline(ax, plane_labels, values)
    ax.set_axis_off()


def render_preview(
    image: sitk.Image, mask: sitk.Image, key_slice: int, path: str | Path, *, window: Sequence[float] | None = None,
    boxes: Sequence[tuple[int, Sequence[float]]] = (), panels: int = 5, title: str | None = None,
) -> Path:
    """Write the PNG and return its path.

    image, mask: 3D SimpleITK images of the same size (mask: 0 background, label values elsewhere).
    key_slice: stored z index the panels centre on (titles name stored z). window: [lower, upper] grey range
    (default: the volume's 0.5-99.5 percentiles). boxes: (z, [x_min, y_min, x_max, y_max]) prompts in stored
    indices, drawn on their slices.
    """
    stored_voxels, stored_labels = sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(mask)
    if stored_voxels.shape != stored_labels.shape:
        raise ValueError(f"image {stored_voxels.shape} and mask {stored_labels.shape} differ in size")
    lo, hi = (float(v) for v in window) if window is not None else np.percentile(stored_voxels, DISPLAY_PERCENTILES)
    orient = Orientation.of(image)
    voxels, labels, spacing = orient.array(stored_voxels), orient.array(stored_labels), orient.spacing(image)
    normal = orient.patient_axis[2]  # the stored slices are planes normal to this patient axis
    zs = slice_range(key_slice, stored_voxels.shape[0], panels)
    first = _plane(voxels, normal, int(orient.index(0, 0, zs[0])[2 - normal]))
    rows_mm = {2: spacing[1], 1: spacing[0], 0: spacing[0]}[normal] * first.shape[0]
    cols_mm = {2: spacing[2], 1: spacing[2], 0: spacing[1]}[normal] * first.shape[1]
    panel_w = 3.0
    panel_h = panel_w * min(rows_mm / cols_mm, 3.0)
    figure = Figure(figsize=(panel_w * max(len(zs), 3), 2 * panel_h + 1.0), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    rows = cast(np.ndarray, figure.subfigures(2, 1))  # an array of 2 SubFigures for 2 rows
    top, bottom = rows[0], rows[1]
    axes = top.subplots(1, len(zs), squeeze=False)[0]
    values = [int(v) for v in np.unique(stored_labels) if v != 0]
    _planes(bottom.subplots(1, 3, squeeze=False)[0], voxels, labels, values, spacing, (lo, hi))
    for ax, z in zip(axes, zs, strict=True):
        at = int(orient.index(0, 0, z)[2 - normal])
        _show(ax, normal, _plane(voxels, normal, at), _plane(labels, normal, at), values, spacing, (lo, hi))
        for box_z, (x0, y0, x1, y1) in boxes:
            if box_z == z:
                _box(ax, normal, orient.index(x0, y0, z), orient.index(x1, y1, z))
        ax.set_title(f"z = {z}{' (key)' if z == key_slice else ''}: {int(np.count_nonzero(stored_labels[z]))} px", fontsize=9)
    if title:
        figure.suptitle(title, fontsize=10)
    path = Path(path)
    figure.savefig(path)
    return path


def _box(ax: Any, normal: int, corner: tuple[float, float, float], other: tuple[float, float, float]) -> None:
    """A stored box, its corners mapped to (S, P, L) indices, dashed on a plane normal to `normal`."""
    row_axis, col_axis = {2: (1, 2), 1: (0, 2), 0: (0, 1)}[normal]  # (k, j, i) positions
    r0, r1 = sorted((corner[row_axis], other[row_axis]))
    c0, c1 = sorted((corner[col_axis], other[col_axis]))
    ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0 + 1, r1 - r0 + 1, fill=False, edgecolor="#ffffff", linestyle="--",
                           linewidth=1.0))


def centre(labels: np.ndarray) -> tuple[int, int, int]:
    """Index nearest the centroid of the foreground (the volume's centre when empty)."""
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
    """Axial, coronal and sagittal planes of the (S, P, L) arrays through the labels' centre, each at its physical aspect."""
    centre_at = centre(labels)
    s_mm, p_mm, l_mm = spacing
    depth, height, width = labels.shape
    # a thin stack (20 slices of 2 mm under a 50 cm field) would be a strip: stretch S to a third of the width
    stretch = max(1.0, (width * l_mm) / (3.0 * depth * s_mm))
    note = f", S x{stretch:.1f}" if stretch > 1.0 else ""
    for ax, normal in zip(axes, (2, 1, 0), strict=True):
        at = centre_at[2 - normal]
        plane_labels = _plane(labels, normal, at)
        _show(ax, normal, _plane(voxels, normal, at), plane_labels, values, spacing, grey, stretch)
        ax.set_title(f"{PLANE_NAMES[normal]}{note if normal != 2 else ''}: {int(np.count_nonzero(plane_labels))} px", fontsize=9)


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
