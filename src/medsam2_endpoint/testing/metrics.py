"""Segmentation quality metrics against ground truth (used by samples, tests and benchmarks)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two masks (1.0 when both are empty)."""
    a, b = a.astype(bool), b.astype(bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    surface: np.ndarray = mask & ~ndimage.binary_erosion(mask, structure=np.ones((3, 3, 3), bool), border_value=0)
    return surface


def hd95(pred: np.ndarray, truth: np.ndarray, spacing_zyx: tuple[float, float, float]) -> float:
    """95th percentile of the symmetric surface distances, in mm (inf if exactly one mask is empty)."""
    pred, truth = pred.astype(bool), truth.astype(bool)
    if not pred.any() and not truth.any():
        return 0.0
    if not pred.any() or not truth.any():
        return float("inf")
    sp, st = _surface(pred), _surface(truth)
    to_truth = ndimage.distance_transform_edt(~st, sampling=spacing_zyx)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing_zyx)
    distances = np.concatenate([to_truth[sp], to_pred[st]])
    return float(np.percentile(distances, 95))


def nsd(pred: np.ndarray, truth: np.ndarray, spacing_zyx: tuple[float, float, float], tolerance_mm: float = 2.0) -> float:
    """Normalised surface Dice: the share of both surfaces lying within `tolerance_mm` of the other (1.0 if both empty)."""
    pred, truth = pred.astype(bool), truth.astype(bool)
    if not pred.any() and not truth.any():
        return 1.0
    if not pred.any() or not truth.any():
        return 0.0
    sp, st = _surface(pred), _surface(truth)
    to_truth = ndimage.distance_transform_edt(~st, sampling=spacing_zyx)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing_zyx)
    close = int((to_truth[sp] <= tolerance_mm).sum()) + int((to_pred[st] <= tolerance_mm).sum())
    return close / (int(sp.sum()) + int(st.sum()))
