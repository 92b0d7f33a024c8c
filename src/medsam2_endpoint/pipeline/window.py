"""Windowing to uint8 and box parsing: the reference pipeline's arithmetic before the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np

from medsam2_endpoint.base.errors import InvalidRequest

_CHUNK_SLICES = 16


MR_PERCENTILES = (0.5, 99.5)  # MedSAM2's MRI script: of the nonzero voxels


def percentile_window(array: np.ndarray, percentiles: tuple[float, float] = MR_PERCENTILES) -> tuple[float, float] | None:
    """The window an MR volume gets without one: the given percentiles of its nonzero voxels (None when
    there are none, or they span no range: plain min-max then applies)."""
    nonzero = array[array != 0]
    if nonzero.size == 0:
        return None
    lo, hi = (float(v) for v in np.percentile(nonzero, percentiles))
    return (lo, hi) if lo < hi else None


CT_SOFT_TISSUE = (-160.0, 240.0)  # W 400 / L 40: MedSAM2's CT script's abdominal window
CT_BONE = (-500.0, 1300.0)  # W 1800 / L 400: cortical and cancellous bone apart from soft tissue
# A first prompt whose region holds at least this share of voxels at or above DENSE_HU is on bone. On the real CT
# the vertebra T12's box holds 0.20 (its 90th percentile 448 HU); the contrast aorta's 0.07, the liver's 0.04, the
# stomach, pancreas and colon 0.01 or less.
DENSE_HU = 300.0
BONE_SHARE = 0.15


@dataclass(frozen=True)
class BoneAlternative:
    """A CT volume's bone-windowed uint8 voxels, kept until its first prompt says which window it needs."""

    image: np.ndarray  # uint8, windowed with CT_BONE
    dense_u8: float  # DENSE_HU's value in `image`

    @classmethod
    def of(cls, raw: np.ndarray) -> BoneAlternative:
        image = window_to_uint8(raw, CT_BONE, field="set_image")
        lo, hi = (float(np.clip(v, *CT_BONE)) for v in (raw.min(), raw.max()))
        return cls(image, (DENSE_HU - lo) / (hi - lo) * 255.0)

    def dense_share(self, region: tuple[slice, ...]) -> float:
        voxels = self.image[region]
        return float(np.mean(voxels >= self.dense_u8)) if voxels.size else 0.0

    def wanted(self, region: tuple[slice, ...]) -> str | None:
        """Why the prompt's `region` wants the bone window, or None when soft tissue stays."""
        share = self.dense_share(region)
        if share < BONE_SHARE:
            return None
        return f"the first prompt's region is {share:.0%} voxels >= {DENSE_HU:g} HU: bone window"


def auto_window(array: np.ndarray) -> tuple[tuple[float, float] | None, str]:
    """A window for voxels that came without one (3D Slicer sends raw voxels and spacing only), and why.

    uint8 voxels are taken as already windowed (min-max); a range reaching air (<= -500) and dense bone
    (>= 300) is CT in Hounsfield units: the soft-tissue window; anything else is MR-like: the percentiles
    of its nonzero voxels, as an MR request without a window gets."""
    if array.dtype == np.uint8:
        return None, "uint8 voxels: already windowed, min-max"
    lo, hi = float(array.min()), float(array.max())
    if lo <= -500 and hi >= 300:
        return CT_SOFT_TISSUE, f"CT-like range [{lo:g}, {hi:g}]: soft-tissue window"
    window = percentile_window(array)
    return window, f"range [{lo:g}, {hi:g}] is not CT-like: {MR_PERCENTILES} percentiles of the nonzero voxels"


def window_to_uint8(array: np.ndarray, window: tuple[float, float] | None, *, field: str = "input_data.dicom_window") -> np.ndarray:
    """Clip to the window, min-max scale by the clipped volume's own min and max, truncate to uint8.

    Same arithmetic (and dtypes) as the reference: np.clip with float bounds, then
    (v - min) / (max - min) * 255.0, then np.uint8 (truncation). Every step is element-wise once
    min and max are known (clip is monotonic, so min(clip(v)) = clip(min(v))), so 8/16-bit volumes
    go through a table of every value and wider ones in chunks of slices: no float copy of the
    whole volume, identical results.
    A volume that is constant after windowing cannot be scaled: 400.
    """
    lo_hi = (float(window[0]), float(window[1])) if window is not None else None
    raw_min, raw_max = array.min(), array.max()
    if lo_hi is not None:
        vmin, vmax = np.clip(raw_min, *lo_hi), np.clip(raw_max, *lo_hi)
    else:
        # Without a window there is no reference to match; float64 avoids integer overflow in v - min.
        vmin, vmax = np.float64(raw_min), np.float64(raw_max)
    if vmax == vmin:
        where = f"inside the window [{lo_hi[0]}, {lo_hi[1]}]" if lo_hi else "(no window given)"
        raise InvalidRequest(
            f"{field}: the volume is constant {where} (every voxel is {float(vmin)}), so it cannot be scaled; "
            "choose a window that covers the tissue's intensities"
        )
    with np.errstate(over="ignore"):
        span = np.float64(vmax) - np.float64(vmin)
    if not np.isfinite(span):
        raise InvalidRequest(
            f"{field}: the intensity range [{float(vmin):g}, {float(vmax):g}] is too wide to scale; give a dicom_window"
        )

    def scale(values: np.ndarray) -> np.ndarray:
        values = np.clip(values, *lo_hi) if lo_hi is not None else values.astype(np.float64)
        # Same expression as the reference so numpy picks the same dtypes (float32 stays float32).
        return cast(np.ndarray, np.uint8((values - vmin) / (vmax - vmin) * 255.0))

    table = None
    if array.dtype.kind in "iu" and array.dtype.itemsize <= 2:
        # 8/16-bit voxels (most CT and MR): scale every possible value once, then look each voxel up.
        # Bit-identical, since each voxel's result depends on its value alone; no float copy at all.
        info = np.iinfo(array.dtype)
        unsigned = np.dtype(f"u{array.dtype.itemsize}")
        values = np.arange(info.min, info.max + 1, dtype=np.int64).astype(array.dtype)
        table = np.empty(values.size, dtype=np.uint8)
        table[values.view(unsigned)] = scale(values)
        index = array.view(unsigned)
    out = np.empty(array.shape, dtype=np.uint8)
    for start in range(0, array.shape[0], _CHUNK_SLICES):
        chunk = slice(start, start + _CHUNK_SLICES)
        if table is not None:
            np.take(table, index[chunk], out=out[chunk])  # in chunks: take widens the indices to int64
        else:
            out[chunk] = scale(array[chunk])
    return out


def parse_box(values: list[float], *, width: int, height: int, field: str) -> np.ndarray:
    """[x_min, y_min, x_max, y_max] floats -> int64 array, truncated as the reference (int(float(v))), checked against the slice."""
    box = np.array([int(float(v)) for v in values], dtype=np.int64)
    x_min, y_min, x_max, y_max = (int(v) for v in box)
    if x_min < 0 or y_min < 0:
        raise InvalidRequest(f"{field}: box corners must be non-negative pixel indices, got {box.tolist()}")
    if x_max >= width + 1 or x_min >= width:
        bad = x_max if x_max >= width + 1 else x_min
        raise InvalidRequest(f"{field}: x {bad} is outside the slice width {width} (x is the column index, 0..{width - 1})")
    if y_max >= height + 1 or y_min >= height:
        bad = y_max if y_max >= height + 1 else y_min
        raise InvalidRequest(f"{field}: y {bad} is outside the slice height {height} (y is the row index, 0..{height - 1})")
    if x_min >= x_max or y_min >= y_max:
        raise InvalidRequest(
            f"{field}: the box {box.tolist()} is empty; the order is [x_min, y_min, x_max, y_max] with x_min < x_max and y_min < y_max"
        )
    return box
