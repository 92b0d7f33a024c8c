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
