"""The MedSAM2 route equals the reference pipeline (REFERENCE.md B) voxel for voxel.

The reference is an independent, literal implementation in tests/reference_pipeline.py; both run the
same random-weight checkpoint on CPU in float32. The endpoint side goes through the whole Service
(base64 NIfTI in, JSON-ready mask out).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import request_for
from medsam2_endpoint.encode import dumps
from medsam2_endpoint.phantoms import ct_phantom, mri_phantom, oblique_direction
from reference_pipeline import build_reference_predictor, reference_segment

CASES = {
    # anisotropic spacing, oblique direction, int16, key slice away from the middle, series offset
    "ct_oblique_int16": (
        lambda: ct_phantom((12, 48, 64), spacing=(0.7, 0.9, 3.0), direction=oblique_direction(20.0), lesions=("lobulated",), seed=11),
        7,
    ),
    # float32 MR-like volume with a window, non-square slices
    "mr_float32": (
        lambda: mri_phantom((10, 56, 40), spacing=(1.1, 1.1, 4.0), lesions=("ellipsoid",), seed=12),
        0,
    ),
}


@pytest.fixture(scope="module")
def reference_predictor(medsam2_checkpoint):
    return build_reference_predictor(medsam2_checkpoint)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_medsam2_route_equals_reference(case, service, reference_predictor, tmp_path):
    make, offset = CASES[case]
    phantom = make()
    window = phantom.window or (0.0, float(phantom.array().max()) * 0.9)
    lesion = phantom.lesions[0]
    assert lesion.key_slice != phantom.labels.shape[0] // 2 or case != "ct_oblique_int16"
    path = tmp_path / "volume.nii.gz"
    path.write_bytes(phantom.nifti_bytes())

    expected = reference_segment(path, lesion.bbox, lesion.key_slice, window, predictor=reference_predictor)

    # stop rules off (0): the reference walks to both ends of the volume
    body = request_for(phantom, slice_offset=offset, dicom_window=[list(window)], model=["MedSAM2_latest"], stop_after_empty=[0])
    (result,) = json.loads(dumps(service.score(body)))
    mask = np.asarray(result["mask"], dtype=np.uint8)
    assert result["metadata"]["adjusted_key_slice_index"] == lesion.key_slice
    assert mask.shape == expected.shape == phantom.labels.shape
    assert expected.any(), "the reference produced an empty mask: the comparison would be vacuous"
    mismatched = int(np.count_nonzero(mask != expected))
    assert mismatched == 0, f"{mismatched} voxels differ from the reference"
