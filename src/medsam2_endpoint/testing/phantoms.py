"""Synthetic CT-like and MRI-like volumes with exact, known ground truth.

Used by tests, sample requests and benchmarks. Conventions (as everywhere in the project):

- numpy arrays are in SimpleITK order ``(z, y, x)``; a slice is ``array[z]``.
- a box is ``(x_min, y_min, x_max, y_max)`` in pixel indices of one slice, x = column = last axis,
  inclusive, widened by ``margin`` pixels and clipped to ``[0, width-1] x [0, height-1]``.
- spacing, origin and direction are in ITK order ``(x, y, z)``; direction is 9 values, row-major.

Anatomy is an axial abdominal slice: an elliptical body (fat rim, soft tissue), a liver on the image left,
spleen, two kidneys, aorta and a vertebra; the liver tapers slightly towards the first/last slice.
Lesions are painted on the voxel grid first (labels are exact), then the image is mildly smoothed
in-plane, noise is added and the result is stored as the requested dtype. Everything is
deterministic for a given ``seed`` (one ``numpy.random.Generator``).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import SimpleITK as sitk
from scipy import ndimage, signal

LESION_KINDS = ("ellipsoid", "lobulated", "low_contrast", "touching_organ", "pair")
TISSUES = ("air", "fat", "soft_tissue", "liver", "spleen", "kidney", "aorta", "bone")
_AIR, _FAT, _SOFT, _LIVER, _SPLEEN, _KIDNEY, _AORTA, _BONE = range(len(TISSUES))

#: Noise-free tissue values: CT in Hounsfield units, MR in arbitrary T2-like units.
CT_HU = {"air": -1000.0, "fat": -100.0, "soft_tissue": 40.0, "liver": 60.0, "spleen": 100.0,
         "kidney": 180.0, "aorta": 200.0, "bone": 700.0}
MR_SIGNAL = {"air": 0.0, "fat": 650.0, "soft_tissue": 180.0, "liver": 240.0, "spleen": 420.0,
             "kidney": 480.0, "aorta": 60.0, "bone": 120.0}
#: Noise-free lesion values per kind; CT liver lesions are hypodense, MR lesions T2-bright.
CT_LESION_HU = {"ellipsoid": 15.0, "lobulated": 15.0, "low_contrast": 42.0, "touching_organ": 20.0, "pair": 15.0}
MR_LESION_SIGNAL = {"ellipsoid": 800.0, "lobulated": 780.0, "low_contrast": 320.0, "touching_organ": 760.0,
                    "pair": 800.0}
#: The tissue surrounding each lesion kind (its contrast reference). "touching_organ" lies in soft tissue
#: and shares a border with a kidney (the bright organ).
LESION_HOST = {"ellipsoid": "liver", "lobulated": "liver", "low_contrast": "liver",
               "touching_organ": "soft_tissue", "pair": "liver"}

_SMOOTH_SIGMA = 0.6  # in-plane pixels: softens edges without moving them
_MR_NOISE = 12.0
_LIVER_MIN_SCALE = 0.9

#: One ellipsoid of a lesion: ``(dz, dy, dx, rz, ry, rx, deg)`` in voxels around its anchor.
_Ellipsoid = tuple[float, float, float, float, float, float, float]


@dataclass(frozen=True)
class Lesion:
    """One labelled lesion. ``bbox`` is ``(x_min, y_min, x_max, y_max)`` on ``key_slice``."""

    label: int
    name: str
    key_slice: int
    bbox: tuple[int, int, int, int]
    z_range: tuple[int, int]
    voxels: int


@dataclass(frozen=True, eq=False)
class Phantom:
    """A synthetic volume. ``labels`` is uint8 ``(z, y, x)``: 0 background, ``lesion.label`` per lesion."""

    name: str
    modality: str
    image: sitk.Image
    labels: np.ndarray
    lesions: tuple[Lesion, ...]
    window: tuple[float, float] | None

    def array(self) -> np.ndarray:
        """The image voxels as a ``(z, y, x)`` array in the image's pixel type."""
        return sitk.GetArrayFromImage(self.image)

    def mask(self, label: int) -> np.ndarray:
        """Boolean ``(z, y, x)`` mask of the lesion with this label."""
        if label not in {les.label for les in self.lesions}:
            raise ValueError(f"no lesion with label {label}; labels are {[les.label for les in self.lesions]}")
        return cast(np.ndarray, self.labels == label)

    def nifti_bytes(self, compressed: bool = True) -> bytes:
        """The image as NIfTI file bytes (``.nii.gz`` if ``compressed`` else ``.nii``), written by SimpleITK."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "image.nii.gz" if compressed else "image.nii")
            sitk.WriteImage(self.image, path, useCompression=compressed)
            with open(path, "rb") as fh:
                return fh.read()


def oblique_direction(angle_deg: float = 15.0) -> tuple[float, ...]:
    """A proper rotation (det +1) as 9 row-major values: tilt about x by ``angle_deg``, then about z by half."""
    a, b = math.radians(angle_deg), math.radians(angle_deg / 2)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    rz = np.array([[math.cos(b), -math.sin(b), 0], [math.sin(b), math.cos(b), 0], [0, 0, 1]])
    return tuple(float(v) for v in (rz @ rx).ravel())


# --------------------------------------------------------------------------------------------- anatomy


def _anatomy(h: int, w: int, liver_scale: float = 1.0) -> np.ndarray:
    """Tissue codes ``(h, w)`` uint8 of one axial slice. Positions are fractions of height/width."""
    yy = ((np.arange(h, dtype=np.float32) - (h - 1) / 2) / h)[:, None]
    xx = ((np.arange(w, dtype=np.float32) - (w - 1) / 2) / w)[None, :]
    s_min = min(h, w)

    def ell(cx: float, cy: float, ax: float, ay: float, deg: float = 0.0) -> np.ndarray:
        c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
        u, v = (xx - cx) * w, (yy - cy) * h  # pixels, so rotation is geometric
        return ((c * u + s * v) / (ax * w)) ** 2 + ((-s * u + c * v) / (ay * h)) ** 2 <= 1.0

    def disc(cx: float, cy: float, r: float) -> np.ndarray:
        return ell(cx, cy, r * s_min / w, r * s_min / h)

    m = np.zeros((h, w), np.uint8)
    m[ell(0, 0, 0.46, 0.36)] = _FAT
    inner = ell(0, 0, 0.415, 0.32)
    m[inner] = _SOFT
    m[ell(-0.15, -0.06, 0.26 * liver_scale, 0.22 * liver_scale, -10) & inner] = _LIVER
    m[ell(0.28, 0.02, 0.06, 0.11, 20) & inner] = _SPLEEN
    m[ell(-0.19, 0.18, 0.05, 0.075, -20) | ell(0.19, 0.18, 0.05, 0.075, 20)] = _KIDNEY
    m[disc(0.035, 0.11, 0.028)] = _AORTA
    m[disc(0.0, 0.215, 0.055)] = _BONE
    return m


def _liver_scale(z: int, nz: int) -> float:
    """Liver size factor on slice z: 1 mid-volume, 0.9 at the ends; quantised so slices can be cached."""
    t = (z - (nz - 1) / 2) / max((nz - 1) / 2, 1)
    return round((1.0 - (1.0 - _LIVER_MIN_SCALE) * t * t) * 50) / 50


# --------------------------------------------------------------------------------------------- lesions


def _half_z(nz: int) -> float:
    """Lesion semi-axis along z in slices: >= 5 slices for nz >= 16, about 15 slices for nz >= 37."""
    if nz < 7:
        raise ValueError(f"shape_z must be >= 7 to hold a lesion away from the end slices, got {nz}")
    return min(max(0.2 * nz, 3.2), 7.3, (nz - 3) / 2 + 0.2)


def _lesion_parts(kind: str, s: int, hz: float, rng: np.random.Generator) -> list[list[_Ellipsoid]]:
    """Ellipsoids ``(dz, dy, dx, rz, ry, rx, deg)`` in voxels around an anchor; one list per label (pair: 2)."""
    ang = float(rng.uniform(0, 180))
    if kind == "ellipsoid":
        j = rng.uniform(0.9, 1.1, 2)
        return [[(0, 0, 0, hz, 0.07 * s * j[0], 0.085 * s * j[1], ang)]]
    if kind == "low_contrast":
        return [[(0, 0, 0, hz, 0.075 * s, 0.08 * s, ang)]]
    if kind == "touching_organ":
        return [[(0, 0, 0, 0.9 * hz, 0.06 * s, 0.065 * s, ang)]]
    if kind == "lobulated":
        r, rz = 0.065 * s, 0.75 * hz
        parts: list[_Ellipsoid] = [(0, 0, 0, rz, r, r, 0.0)]
        for k in range(4):  # satellites centred inside the main body: the union stays one piece
            th = 2 * math.pi * k / 4 + rng.uniform(-0.5, 0.5)
            parts.append((rng.uniform(-0.3, 0.3) * rz, 0.75 * r * math.sin(th), 0.75 * r * math.cos(th),
                          0.6 * rz, rng.uniform(0.45, 0.6) * r, rng.uniform(0.45, 0.6) * r, rng.uniform(0, 180)))
        return [parts]
    if kind == "pair":
        r, gap, th = 0.06 * s, max(3.0, round(0.02 * s)), math.radians(ang)
        off = r + gap / 2  # surfaces `gap` voxels apart on the line between centres
        dy, dx = off * math.sin(th), off * math.cos(th)
        dz_b = 1 if 0.8 * hz >= 3 else 0  # different key slices when there is room
        return [[(0, -dy, -dx, 0.8 * hz, r, r, 0.0)], [(dz_b, dy, dx, 0.8 * hz, 0.9 * r, 0.9 * r, 0.0)]]
    raise ValueError(f"unknown lesion kind {kind!r}; choose from {LESION_KINDS}")


def _rasterise(parts: list[list[_Ellipsoid]]) -> np.ndarray:
    """Local uint8 ``(z, y, x)`` array, cropped to the lesion: value k for part k (1, or 1 and 2 for a pair)."""
    ext = np.zeros(3)
    for part in parts:
        for dz, dy, dx, rz, ry, rx, _ in part:
            ext = np.maximum(ext, [abs(dz) + rz, abs(dy) + max(ry, rx), abs(dx) + max(ry, rx)])
    half = np.ceil(ext).astype(int) + 1
    zz, yy, xx = (np.arange(-n, n + 1, dtype=np.float32).reshape(sh)
                  for n, sh in zip(half, [(-1, 1, 1), (1, -1, 1), (1, 1, -1)], strict=True))
    local = np.zeros(tuple(2 * half + 1), np.uint8)
    for idx, part in enumerate(parts, start=1):
        m = np.zeros(local.shape, bool)
        for dz, dy, dx, rz, ry, rx, deg in part:
            c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
            u, v = c * (xx - dx) + s * (yy - dy), -s * (xx - dx) + c * (yy - dy)
            m |= (u / rx) ** 2 + (v / ry) ** 2 + ((zz - dz) / rz) ** 2 <= 1.0
        lab, n = ndimage.label(m, structure=np.ones((3, 3, 3)))
        if n > 1:  # guarantee one 26-connected component
            m = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
        local[m & (local == 0)] = idx
    return cast(np.ndarray, local[ndimage.find_objects((local > 0).astype(np.uint8))[0]])


def _correlate(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Sum of ``image`` under ``kernel`` for every window position fully inside the image (top-left index)."""
    k = kernel[::-1, ::-1].astype(np.float32)
    return cast(np.ndarray, signal.fftconvolve(image.astype(np.float32), k, mode="valid"))


def _place(
    kinds: Sequence[str], shape: tuple[int, int, int], rng: np.random.Generator
) -> list[tuple[str, np.ndarray, tuple[int, int, int]]]:
    """Rasterise and place lesions; returns ``[(kind, local_array, (z0, y0, x0))]`` in request order.

    Each lesion's in-plane footprint, widened by ``margin`` pixels of free tissue, must lie in its host
    region (liver at its smallest, or soft tissue/kidney beside a kidney) and must not overlap another
    lesion's widened footprint on the same or adjacent slices. Lesions on disjoint slices may share x, y.
    """
    nz, h, w = shape
    s, hz = min(h, w), _half_z(nz)
    margin = max(3, round(0.025 * s))  # clean surround: contrast checks and separation
    liver = _anatomy(h, w, _LIVER_MIN_SCALE) == _LIVER
    full = _anatomy(h, w, 1.0)
    beside_kidney, kidney = np.isin(full, (_SOFT, _KIDNEY)), full == _KIDNEY
    items = []
    for kind in kinds:
        local = _rasterise(_lesion_parts(kind, s, hz, rng))
        fp = np.pad(local.any(0), margin)  # in-plane footprint over all its slices
        if fp.shape[0] > h or fp.shape[1] > w:
            raise ValueError(f"slices of {h}x{w} are too small for lesions {tuple(kinds)}")
        dist = ndimage.distance_transform_edt(~fp)
        # beside the kidney only 1 px must be host tissue: the soft-tissue pockets there are narrow
        region = beside_kidney if kind == "touching_organ" else liver
        in_host = _correlate(~region, dist <= (1 if kind == "touching_organ" else margin)) < 0.5
        if kind == "touching_organ":  # share a border with the kidney, mostly outside it
            frac = _correlate(kidney, fp) / fp.sum()
            in_host &= (frac >= 0.05) & (frac <= 0.4)
        items.append((kind, local, dist <= margin, in_host))  # window positions are top-left corners
    order = sorted(range(len(items)), key=lambda i: -int(items[i][2].sum()))  # biggest first packs best
    for attempt in range(12):
        occupied, corners = np.zeros(shape, bool), {}
        for i in order:
            _, local, dil, in_host = items[i]
            dz = local.shape[0]
            for z0 in rng.permutation(np.arange(1, nz - dz)):  # never on the first or last slice
                ok = in_host & (_correlate(cast(np.ndarray, occupied[max(z0 - 1, 0): z0 + dz + 1].any(0)), dil) < 0.5)
                cand = np.argwhere(ok)
                if len(cand) == 0:
                    continue
                if attempt < 6:  # random position: variety between seeds
                    y0, x0 = cand[rng.integers(len(cand))]
                else:  # fall back to packing against the region's edge
                    depth = ndimage.distance_transform_edt(ok)[ok]
                    y0, x0 = cand[rng.choice(np.flatnonzero(depth == depth.min()))]
                occupied[z0: z0 + dz, y0: y0 + dil.shape[0], x0: x0 + dil.shape[1]] |= dil
                corners[i] = (int(z0), int(y0) + margin, int(x0) + margin)
                break
            else:
                break
        if len(corners) == len(items):
            return [(it[0], it[1], corners[i]) for i, it in enumerate(items)]
    raise ValueError(f"no room for lesions {tuple(kinds)} in a {shape} volume; use a larger shape or fewer lesions")


# --------------------------------------------------------------------------------------------- building


def _build(
    modality: str, shape_zyx: Sequence[int], spacing: Sequence[float], origin: Sequence[float],
    direction: Sequence[float] | None, dtype: str, lesions: str | Sequence[str], seed: int, noise: float,
    name: str | None, margin: int,
) -> Phantom:
    shape = cast("tuple[int, int, int]", tuple(int(v) for v in shape_zyx))
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape_zyx must be 3 positive ints (z, y, x), got {shape_zyx}")
    if dtype not in ("int16", "float32"):
        raise ValueError(f"dtype must be 'int16' or 'float32', got {dtype!r}")
    lesions = (lesions,) if isinstance(lesions, str) else tuple(lesions)
    for kind in lesions:
        if kind not in LESION_KINDS:
            raise ValueError(f"unknown lesion kind {kind!r}; choose from {LESION_KINDS}")
    direction = tuple(float(v) for v in (np.eye(3).ravel() if direction is None else np.ravel(direction)))
    dmat = np.array(direction).reshape(3, 3) if len(direction) == 9 else None
    if dmat is None or not np.allclose(dmat @ dmat.T, np.eye(3), atol=1e-6):
        raise ValueError("direction must be 9 row-major values of an orthonormal 3x3 matrix")
    if len(spacing) != 3 or min(spacing) <= 0 or len(origin) != 3:
        raise ValueError("spacing (positive) and origin must have 3 values each, ITK order (x, y, z)")
    rng = np.random.default_rng(seed)
    nz, h, w = shape
    labels = np.zeros(shape, np.uint8)
    names: dict[int, str]
    boxes: dict[int, tuple[slice, slice, slice]]
    value_of: dict[int, float]
    names, boxes, value_of = {}, {}, {}  # per label; boxes bound the lesion so no full-volume scans
    for kind, local, (z0, y0, x0) in _place(lesions, shape, rng):
        box = (slice(z0, z0 + local.shape[0]), slice(y0, y0 + local.shape[1]), slice(x0, x0 + local.shape[2]))
        for part, lname in enumerate([kind] if local.max() == 1 else ["pair_a", "pair_b"], start=1):
            label = len(names) + 1
            labels[box][local == part] = label
            names[label], boxes[label] = lname, box
            value_of[label] = (CT_LESION_HU if modality == "CT" else MR_LESION_SIGNAL)[kind]
    tissue_lut = np.array([(CT_HU if modality == "CT" else MR_SIGNAL)[t] for t in TISSUES], np.float32)
    bias = rng.uniform([-0.08, -0.08, -0.05, -0.06], [0.08, 0.08, 0.05, 0.0]) if modality == "MR" else None
    arr = _render(shape, labels, boxes, value_of, tissue_lut, noise, bias, dtype, rng)
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetDirection(direction)
    out = tuple(_describe(labels, lab, names[lab], boxes[lab], margin) for lab in names)
    if name is None:
        name = f"{modality.lower()}_{nz}x{h}x{w}_{'-'.join(lesions) or 'none'}_s{seed}"
    window = (-160.0, 240.0) if modality == "CT" else None
    return Phantom(name, modality, image, labels, out, window)


def _render(
    shape: tuple[int, int, int], labels: np.ndarray, boxes: dict[int, tuple[slice, slice, slice]],
    value_of: dict[int, float], lut: np.ndarray, noise: float, bias: np.ndarray | None, dtype: str,
    rng: np.random.Generator,
) -> np.ndarray:
    """Slice by slice (bounded memory): smoothed anatomy + smoothed lesion delta, bias, noise, cast."""
    nz, h, w = shape
    out = np.empty(shape, np.int16 if dtype == "int16" else np.float32)
    pad = int(math.ceil(4 * _SMOOTH_SIGMA)) + 1  # crop margin so the cropped smoothing equals the full one
    cache: dict[float, tuple[np.ndarray, np.ndarray]] = {}
    if bias is not None:
        yb = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
        xb = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
        field2d = 1 + bias[0] * xb + bias[1] * yb + bias[3] * (xb * xb + yb * yb)
    for z in range(nz):
        sc = _liver_scale(z, nz)
        if sc not in cache:
            tissue = lut[_anatomy(h, w, sc)]
            cache[sc] = (tissue, ndimage.gaussian_filter(tissue, _SMOOTH_SIGMA))
        tissue, sl = cache[sc][0], cache[sc][1].copy()
        for lab, (bz, by, bx) in boxes.items():
            if bz.start <= z < bz.stop:  # smoothing is linear: add the smoothed lesion-minus-tissue difference
                y_lo, y_hi, x_lo, x_hi = max(by.start - pad, 0), by.stop + pad, max(bx.start - pad, 0), bx.stop + pad
                m = labels[z, y_lo:y_hi, x_lo:x_hi] == lab
                delta = np.where(m, value_of[lab] - tissue[y_lo:y_hi, x_lo:x_hi], 0).astype(np.float32)
                sl[y_lo:y_hi, x_lo:x_hi] += ndimage.gaussian_filter(delta, _SMOOTH_SIGMA, mode="constant")
        if bias is not None:  # smooth multiplicative MR bias field, within about +-20 %
            sl *= field2d + bias[2] * (2 * z / max(nz - 1, 1) - 1)
        sl += np.float32(noise) * rng.standard_normal((h, w), dtype=np.float32)
        if bias is not None:
            np.abs(sl, out=sl)  # magnitude images are non-negative (Rician-like background)
        if dtype == "int16":
            out[z] = np.clip(np.rint(sl), -32768, 32767)
        else:
            out[z] = sl
    return out


def _describe(labels: np.ndarray, label: int, name: str, box: tuple[slice, ...], margin: int) -> Lesion:
    """Ground-truth facts of one lesion, read from the label array inside its bounding ``box``."""
    m = labels[box] == label
    area = m.sum(axis=(1, 2))
    zs = np.flatnonzero(area) + box[0].start
    ties = np.flatnonzero(area == area.max())
    key = int(ties[len(ties) // 2])  # digital plateaus: take the middle slice of equal maxima
    ys, xs = np.nonzero(m[key])
    ys, xs = ys + box[1].start, xs + box[2].start
    h, w = labels.shape[1:]
    bbox = (max(int(xs.min()) - margin, 0), max(int(ys.min()) - margin, 0),
            min(int(xs.max()) + margin, w - 1), min(int(ys.max()) + margin, h - 1))
    return Lesion(label, name, key + box[0].start, bbox, (int(zs[0]), int(zs[-1])), int(area.sum()))


def ct_phantom(shape_zyx: Sequence[int] = (16, 64, 64), *, spacing: Sequence[float] = (0.8, 0.8, 2.5),
               origin: Sequence[float] = (-100.0, -120.0, 50.0), direction: Sequence[float] | None = None,
               dtype: str = "int16", lesions: str | Sequence[str] = ("ellipsoid",), seed: int = 0,
               noise_hu: float = 8.0, name: str | None = None, margin: int = 2) -> Phantom:
    """Abdominal CT phantom in HU (see ``CT_HU``); ``lesions`` are kinds from ``LESION_KINDS``.

    ``shape_zyx`` is the array shape ``(z, y, x)``; spacing/origin/direction are ITK order; ``direction``
    None is identity. Labels are numbered 1..n in request order ("pair" gives two: pair_a, pair_b).
    ``margin`` widens each lesion's box. Raises ValueError when the lesions do not fit.
    """
    return _build("CT", shape_zyx, spacing, origin, direction, dtype, lesions, seed, noise_hu, name, margin)


def mri_phantom(shape_zyx: Sequence[int] = (16, 64, 64), *, spacing: Sequence[float] = (1.0, 1.0, 3.0),
                origin: Sequence[float] = (0.0, 0.0, 0.0), direction: Sequence[float] | None = None,
                dtype: str = "float32", lesions: str | Sequence[str] = ("ellipsoid",), seed: int = 0,
                name: str | None = None, margin: int = 2) -> Phantom:
    """T2-like abdominal MR phantom (see ``MR_SIGNAL``): positive intensities, bright lesions, bias field.

    Same conventions and lesion kinds as ``ct_phantom``; ``window`` is None.
    """
    return _build("MR", shape_zyx, spacing, origin, direction, dtype, lesions, seed, _MR_NOISE, name, margin)


# --------------------------------------------------------------------------------------------- sets

_SETS: dict[str, tuple[tuple[str, Callable[..., Phantom], dict[str, Any]], ...]] = {
    "tiny": (
        ("tiny_ct_ellipsoid", ct_phantom, dict(shape_zyx=(16, 64, 64), lesions=("ellipsoid",), seed=1)),
        ("tiny_mr_ellipsoid", mri_phantom, dict(shape_zyx=(16, 64, 64), lesions=("ellipsoid",), seed=2)),
        ("tiny_ct_lobulated_f32", ct_phantom,
         dict(shape_zyx=(24, 64, 64), dtype="float32", lesions=("lobulated",), seed=3)),
    ),
    "quality": (
        ("q_ct_liver3", ct_phantom, dict(shape_zyx=(32, 128, 128), spacing=(0.75, 0.75, 2.5),
                                         lesions=("ellipsoid", "lobulated", "low_contrast"), seed=11)),
        ("q_ct_pair_touching", ct_phantom, dict(shape_zyx=(40, 128, 128), spacing=(0.9, 0.9, 3.0),
                                                lesions=("pair", "touching_organ"), seed=12)),
        ("q_ct_oblique_f32", ct_phantom, dict(shape_zyx=(24, 96, 128), spacing=(0.7, 0.85, 4.0),
                                              direction=oblique_direction(15.0), dtype="float32",
                                              lesions=("ellipsoid",), seed=13)),
        ("q_ct_low_contrast_noisy", ct_phantom, dict(shape_zyx=(20, 96, 96), spacing=(0.8, 0.8, 5.0),
                                                     lesions=("low_contrast",), noise_hu=14.0, seed=14)),
        ("q_ct_thin_f32", ct_phantom, dict(shape_zyx=(40, 128, 128), spacing=(0.6, 0.6, 1.0), dtype="float32",
                                           lesions=("lobulated", "touching_organ"), seed=15)),
        ("q_mr_liver", mri_phantom, dict(shape_zyx=(32, 128, 128), spacing=(1.4, 1.4, 4.0),
                                         lesions=("ellipsoid", "lobulated"), seed=16)),
        ("q_mr_touching_int16", mri_phantom, dict(shape_zyx=(24, 112, 128), spacing=(1.2, 1.2, 6.0), dtype="int16",
                                                  lesions=("touching_organ", "low_contrast"), seed=17)),
        ("q_mr_pair", mri_phantom, dict(shape_zyx=(28, 128, 128), spacing=(1.0, 1.0, 3.5),
                                        lesions=("pair",), seed=18)),
    ),
    "speed": tuple(
        (f"speed_ct_{nz}", ct_phantom, dict(shape_zyx=(nz, 512, 512), spacing=(0.78, 0.78, sz),
                                            lesions=("ellipsoid",), seed=20 + i))
        for i, (nz, sz) in enumerate([(40, 5.0), (120, 2.5), (300, 1.0)])
    ),
}


def phantom_set(name: str) -> list[Phantom]:
    """Build a named set: "tiny" (fast, 64x64), "quality" (all lesion kinds, CT+MR), "speed" (512x512 CT).

    Builds every phantom of the set (the 300-slice speed phantom takes a few seconds, ~0.4 GB).
    """
    if name not in _SETS:
        raise ValueError(f"unknown phantom set {name!r}; choose from {sorted(_SETS)}")
    return [factory(name=pname, **kwargs) for pname, factory, kwargs in _SETS[name]]


def disk_image(height: int = 240, width: int = 320, *, centre_xy: tuple[float, float] = (180.0, 110.0), radius: float = 45.0,
               value: float = 200.0, background: float = 40.0, noise: float = 3.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A field of view holding one obvious bright disk on a noisy flat background (the automask check).

    Returns (uint8 RGB (H, W, 3), the disk's bool (H, W) mask).
    """
    yy, xx = np.mgrid[:height, :width]
    disk = (xx - centre_xy[0]) ** 2 + (yy - centre_xy[1]) ** 2 <= radius**2
    pixels = np.full((height, width), background) + np.random.default_rng(seed).normal(0.0, noise, (height, width))
    pixels[disk] = value
    grey = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2), disk
