"""Synthetic phantoms: exact ground truth, realistic intensities, geometry and determinism."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from medsam2_endpoint.testing.phantoms import (
    _SETS,
    CT_HU,
    CT_LESION_HU,
    LESION_HOST,
    LESION_KINDS,
    MR_LESION_SIGNAL,
    MR_SIGNAL,
    Lesion,
    Phantom,
    ct_phantom,
    mri_phantom,
    oblique_direction,
    phantom_set,
)

FULL = np.ones((3, 3, 3), bool)  # 26-connectivity


def _kind(lesion: Lesion) -> str:
    return "pair" if lesion.name.startswith("pair_") else lesion.name


@pytest.fixture(scope="module")
def phantoms() -> dict[str, Phantom]:
    return {
        "ct_multi": ct_phantom((24, 96, 128), lesions=("ellipsoid", "lobulated", "low_contrast"), seed=5),
        "ct_pair": ct_phantom((20, 96, 96), lesions=("pair", "touching_organ"), seed=6, dtype="float32"),
        "ct_small": ct_phantom((16, 64, 64), seed=3),
        "mr_multi": mri_phantom((20, 96, 96), lesions=("lobulated", "touching_organ", "low_contrast"), seed=7),
        "mr_pair": mri_phantom((16, 96, 96), lesions=("pair", "ellipsoid"), seed=8, dtype="int16"),
    }


@pytest.fixture(scope="module")
def quality() -> list[Phantom]:
    return phantom_set("quality")


def _check_lesions(ph: Phantom) -> None:
    nz, h, w = ph.labels.shape
    assert ph.labels.dtype == np.uint8
    assert ph.array().shape == ph.labels.shape
    assert [les.label for les in ph.lesions] == list(range(1, len(ph.lesions) + 1))
    assert set(np.unique(ph.labels)) == {0, *(les.label for les in ph.lesions)}
    for les in ph.lesions:
        m = ph.mask(les.label)
        area = m.sum(axis=(1, 2))
        zs = np.flatnonzero(area)
        assert les.voxels == m.sum() > 0
        assert les.z_range == (zs[0], zs[-1])
        assert 0 < zs[0] and zs[-1] < nz - 1, "lesion touches the first or last slice"
        assert (np.diff(zs) == 1).all()
        if nz >= 16:
            assert len(zs) >= 5
        assert area[les.key_slice] == area.max()
        ys, xs = np.nonzero(m[les.key_slice])
        x0, y0, x1, y1 = les.bbox
        assert 0 <= x0 <= xs.min() and xs.max() <= x1 <= w - 1
        assert 0 <= y0 <= ys.min() and ys.max() <= y1 <= h - 1
        assert (x0, y0, x1, y1) == (max(xs.min() - 2, 0), max(ys.min() - 2, 0),
                                    min(xs.max() + 2, w - 1), min(ys.max() + 2, h - 1))
        width = xs.max() - xs.min() + 1
        assert 0.10 * w <= width <= 0.26 * w, (les.name, width, w)
        _, n = ndimage.label(m, structure=FULL)
        assert n == 1, f"{les.name} has {n} components"


def _core_and_ring(ph: Phantom, les: Lesion) -> tuple[np.ndarray, np.ndarray]:
    """Key-slice values deep inside the lesion and 2 px outside it (away from every lesion)."""
    key = les.key_slice
    m = ph.labels[key] == les.label
    d_this = ndimage.distance_transform_edt(~m)
    d_any = ndimage.distance_transform_edt(ph.labels[key] == 0)
    ring = (d_this >= 1.5) & (d_this <= 2.5) & (d_any >= 1.5)
    core = ndimage.distance_transform_edt(m) >= 2  # clear of the smoothed edge
    sl = ph.array()[key].astype(np.float64)
    return sl[core], sl[ring]


def test_lesion_facts_match_labels(phantoms):
    for ph in phantoms.values():
        _check_lesions(ph)
    names = [les.name for les in phantoms["ct_pair"].lesions]
    assert names == ["pair_a", "pair_b", "touching_organ"]


def test_quality_set_lesions_are_consistent(quality):
    for ph in quality:
        _check_lesions(ph)


def test_pair_is_two_separate_labels(phantoms):
    for key in ("ct_pair", "mr_pair"):
        ph = phantoms[key]
        a, b = (ph.mask(les.label) for les in ph.lesions if les.name in ("pair_a", "pair_b"))
        _, n = ndimage.label(a | b, structure=FULL)
        assert n == 2
        assert not (ndimage.binary_dilation(a, structure=FULL) & b).any(), "pair must be separated"
        # "a few voxels" apart in-plane: some slice has them within 6 px of each other
        gap = min(ndimage.distance_transform_edt(~a[z])[b[z]].min() for z in range(a.shape[0]) if a[z].any() and b[z].any())
        assert 2 <= gap <= 6


def test_ct_intensities(phantoms):
    ph = phantoms["ct_multi"]
    arr = ph.array()
    assert arr.dtype == np.int16 and ph.modality == "CT" and ph.window == (-160.0, 240.0)
    corner = arr[:, :6, :6].astype(np.float64)
    assert abs(corner.mean() - CT_HU["air"]) < 3
    assert 6.5 < corner.std() < 9.5  # noise_hu=8
    assert 600 < np.percentile(arr, 99.9) < 800  # bone
    for les in ph.lesions:
        core, ring = _core_and_ring(ph, les)
        kind = _kind(les)
        assert abs(core.mean() - CT_LESION_HU[kind]) < 5, (les.name, core.mean())
        assert abs(ring.mean() - CT_HU[LESION_HOST[kind]]) < 6, (les.name, ring.mean())
        contrast = ring.mean() - core.mean()
        expected = CT_HU["liver"] - CT_LESION_HU[kind]
        assert abs(contrast - expected) < 8, (les.name, contrast)
    contrasts = {les.name: np.subtract(*[v.mean() for v in _core_and_ring(ph, les)[::-1]]) for les in ph.lesions}
    assert 38 <= contrasts["ellipsoid"] <= 52 and 12 <= contrasts["low_contrast"] <= 24


def test_touching_lesion_borders_the_bright_organ(phantoms):
    for key, tissue in (("ct_pair", CT_HU), ("mr_multi", MR_SIGNAL)):
        ph = phantoms[key]
        les = next(le for le in ph.lesions if le.name == "touching_organ")
        core, ring = _core_and_ring(ph, les)
        bright = (tissue["kidney"] + tissue["soft_tissue"]) / 2
        assert np.mean(ring > bright) >= 0.05, "a kidney must lie right next to the lesion"
        assert np.mean(ring < bright) >= 0.3, "most of the surround is soft tissue"
        if ph.modality == "CT":
            assert abs(core.mean() - CT_LESION_HU["touching_organ"]) < 6
        else:  # within the bias field's range
            assert abs(core.mean() / MR_LESION_SIGNAL["touching_organ"] - 1) < 0.25


def test_mr_intensities(phantoms):
    ph = phantoms["mr_multi"]
    arr = ph.array()
    assert arr.dtype == np.float32 and ph.modality == "MR" and ph.window is None
    assert arr.min() >= 0 and arr.max() < 1400
    for les in ph.lesions:
        kind = _kind(les)
        if kind == "touching_organ":  # its surround mixes two tissues; see the touching test
            continue
        core, ring = _core_and_ring(ph, les)
        ratio = core.mean() / ring.mean()
        expected = MR_LESION_SIGNAL[kind] / MR_SIGNAL[LESION_HOST[kind]]
        assert abs(ratio / expected - 1) < 0.15, (les.name, ratio, expected)
        assert ratio > 1.15  # T2-bright lesions
    assert phantoms["mr_pair"].array().dtype == np.int16


def test_mr_bias_field_is_mild_and_present():
    flat = mri_phantom((16, 64, 64), lesions=(), seed=4)
    assert flat.lesions == () and not flat.labels.any()
    from medsam2_endpoint.testing.phantoms import _anatomy

    liver = ndimage.binary_erosion(_anatomy(64, 64, 0.9) == 3, iterations=2)  # tissue code 3 = liver
    per_slice = np.array([sl[liver].mean() for sl in flat.array()]) / MR_SIGNAL["liver"]
    assert 0.8 < per_slice.min() and per_slice.max() < 1.2
    left, right = (flat.array()[:, liver & half].mean() for half in (np.arange(64) < 25, np.arange(64) >= 25))
    assert abs(left / right - 1) > 0.005  # a smooth field makes the same tissue vary across the image


@pytest.mark.parametrize("compressed", [True, False])
def test_nifti_round_trip(tmp_path, compressed):
    ph = ct_phantom((16, 64, 80), spacing=(0.7, 0.9, 3.0), origin=(-10.5, 20.25, 7.0),
                    direction=oblique_direction(20.0), seed=9)
    data = ph.nifti_bytes(compressed=compressed)
    assert (data[:2] == b"\x1f\x8b") == compressed
    if compressed:
        data_raw = gzip.decompress(data)
    else:
        data_raw = data
    assert int.from_bytes(data_raw[:4], "little") == 348  # NIfTI-1 header
    path = tmp_path / ("x.nii.gz" if compressed else "x.nii")
    path.write_bytes(data)
    back = sitk.ReadImage(str(path))
    assert back.GetSize() == (80, 64, 16)
    assert back.GetPixelID() == ph.image.GetPixelID() == sitk.sitkInt16
    np.testing.assert_allclose(back.GetSpacing(), (0.7, 0.9, 3.0), atol=1e-5)
    np.testing.assert_allclose(back.GetOrigin(), (-10.5, 20.25, 7.0), atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), oblique_direction(20.0), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), ph.array())


def test_float32_round_trip(tmp_path):
    ph = mri_phantom((12, 64, 64), seed=1)
    path = tmp_path / "m.nii.gz"
    path.write_bytes(ph.nifti_bytes())
    back = sitk.ReadImage(str(path))
    assert back.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), ph.array())
    assert ph.image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def test_deterministic_by_seed():
    a = ct_phantom((16, 64, 64), lesions=("lobulated",), seed=21)
    b = ct_phantom((16, 64, 64), lesions=("lobulated",), seed=21)
    c = ct_phantom((16, 64, 64), lesions=("lobulated",), seed=22)
    np.testing.assert_array_equal(a.array(), b.array())
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.lesions == b.lesions and a.name == b.name
    assert not np.array_equal(a.array(), c.array())
    assert not np.array_equal(a.labels, c.labels)


def test_labels_do_not_depend_on_noise():
    quiet = ct_phantom((16, 64, 64), seed=2, noise_hu=0.0, dtype="float32")
    noisy = ct_phantom((16, 64, 64), seed=2, noise_hu=20.0)
    np.testing.assert_array_equal(quiet.labels, noisy.labels)
    les = quiet.lesions[0]
    core, _ = _core_and_ring(quiet, les)
    np.testing.assert_allclose(core, CT_LESION_HU["ellipsoid"], atol=1.0)  # smoothing only touches edges


def test_oblique_direction_is_proper_rotation():
    for angle in (15.0, 30.0, -7.5):
        d = np.array(oblique_direction(angle)).reshape(3, 3)
        np.testing.assert_allclose(d @ d.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(d) == pytest.approx(1.0)
        assert not np.allclose(d, np.eye(3))
    assert len(oblique_direction()) == 9
    assert oblique_direction() == oblique_direction(15.0)


def test_geometry_is_set_on_image():
    d = oblique_direction(10.0)
    ph = mri_phantom((12, 64, 64), spacing=(1.1, 1.2, 4.0), origin=(1.0, 2.0, 3.0), direction=d)
    assert ph.image.GetSpacing() == (1.1, 1.2, 4.0)
    assert ph.image.GetOrigin() == (1.0, 2.0, 3.0)
    np.testing.assert_allclose(ph.image.GetDirection(), d)


def test_accepts_a_single_kind_and_array_direction():
    d = np.array(oblique_direction(5.0)).reshape(3, 3)
    ph = ct_phantom((12, 64, 64), lesions="low_contrast", direction=d, dtype="float32")
    assert [les.name for les in ph.lesions] == ["low_contrast"]
    np.testing.assert_allclose(ph.image.GetDirection(), d.ravel())
    assert ph.array().dtype == np.float32


def test_errors():
    with pytest.raises(ValueError, match="tiny.*quality.*speed|quality.*speed.*tiny"):
        phantom_set("huge")
    with pytest.raises(ValueError, match="unknown lesion kind"):
        ct_phantom(lesions=("cyst",))
    with pytest.raises(ValueError, match="dtype"):
        ct_phantom(dtype="uint8")
    with pytest.raises(ValueError, match="no room|too small"):
        ct_phantom((16, 64, 64), lesions=("ellipsoid", "lobulated", "low_contrast", "pair"))
    with pytest.raises(ValueError, match="orthonormal"):
        ct_phantom(direction=(1, 0, 0, 0, 2, 0, 0, 0, 1))
    with pytest.raises(ValueError, match="no lesion with label"):
        ct_phantom().mask(7)


def test_tiny_set():
    tiny = phantom_set("tiny")
    assert 2 <= len(tiny) <= 3
    for ph in tiny:
        nz, h, w = ph.labels.shape
        assert (h, w) == (64, 64) and 16 <= nz <= 24 and len(ph.lesions) >= 1
        _check_lesions(ph)
    assert {ph.modality for ph in tiny} == {"CT", "MR"}


def test_quality_set_coverage(quality):
    assert 6 <= len(quality) <= 8
    assert len({ph.name for ph in quality}) == len(quality)
    for modality in ("CT", "MR"):
        kinds = {_kind(les) for ph in quality if ph.modality == modality for les in ph.lesions}
        assert kinds == set(LESION_KINDS), modality
    assert {ph.array().dtype.name for ph in quality} == {"int16", "float32"}
    assert all(ph.labels.shape[0] <= 40 and max(ph.labels.shape[1:]) <= 128 for ph in quality)
    assert any(ph.image.GetSpacing()[2] > 2 * ph.image.GetSpacing()[0] for ph in quality)  # anisotropic
    identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert sum(ph.image.GetDirection() != identity for ph in quality) == 1


def test_speed_set_spec_and_smallest_member():
    specs = _SETS["speed"]
    assert [kw["shape_zyx"] for _, _, kw in specs] == [(40, 512, 512), (120, 512, 512), (300, 512, 512)]
    name, factory, kwargs = specs[0]
    ph = factory(name=name, **kwargs)
    assert ph.array().shape == (40, 512, 512) and ph.modality == "CT"
    (les,) = ph.lesions
    assert 13 <= les.z_range[1] - les.z_range[0] + 1 <= 17  # about 15 slices
