import numpy as np
import pytest

from medsam2_endpoint.testing.metrics import dice, hd95, nsd


def test_dice_values():
    a = np.zeros((4, 4, 4), bool)
    b = a.copy()
    assert dice(a, b) == 1.0
    a[0, 0, :2] = True
    b[0, 0, 1:3] = True
    assert dice(a, b) == pytest.approx(0.5)


def test_hd95_in_mm_uses_spacing():
    truth = np.zeros((1, 1, 20), bool)
    truth[0, 0, 5:10] = True
    shifted = np.roll(truth, 2, axis=2)
    assert hd95(truth, truth, (1.0, 1.0, 1.0)) == 0.0
    assert hd95(shifted, truth, (1.0, 1.0, 0.5)) == pytest.approx(1.0)  # 2 voxels of 0.5 mm
    assert hd95(np.zeros_like(truth), truth, (1.0, 1.0, 1.0)) == float("inf")


def test_nsd_counts_surface_within_the_tolerance_in_mm():
    truth = np.zeros((1, 12, 40), bool)
    truth[0, 2:10, 5:25] = True
    assert nsd(truth, truth, (1.0, 1.0, 1.0)) == 1.0
    shifted = np.roll(truth, 3, axis=2)  # 3 voxels of 0.5 mm = 1.5 mm: inside a 2 mm tolerance
    assert nsd(shifted, truth, (1.0, 1.0, 0.5), 2.0) == 1.0
    assert nsd(shifted, truth, (1.0, 1.0, 1.0), 2.0) < 1.0  # 3 mm: the shifted ends fall outside
    assert nsd(np.zeros_like(truth), truth, (1.0, 1.0, 1.0)) == 0.0
    assert nsd(np.zeros_like(truth), np.zeros_like(truth), (1.0, 1.0, 1.0)) == 1.0
