"""Segmentation quality is a behaviour: LiteMedSAM (real weights) must segment the phantoms' lesions and real anatomy."""

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import request_for
from medsam2_endpoint.api.azure import score as score_body
from medsam2_endpoint.core.service import Service
from medsam2_endpoint.core.settings import Settings
from medsam2_endpoint.io.encode import dumps, rle_decode
from medsam2_endpoint.io.volume import write_nifti
from medsam2_endpoint.testing.metrics import dice
from medsam2_endpoint.testing.phantoms import phantom_set


@pytest.fixture(scope="module")
def lite_service(tmp_path_factory):
    empty = tmp_path_factory.mktemp("no-weights")
    return Service.from_settings(Settings.from_env({"MEDSAM2_WARMUP": "0"}, model_dir=str(empty)))


@pytest.mark.slow
def test_lite_mean_dice_on_tiny_set(lite_service):
    scores = []
    for phantom in phantom_set("tiny"):
        for index, lesion in enumerate(phantom.lesions):
            (result,) = json.loads(dumps(score_body(lite_service, request_for(phantom, lesion=index, mask_format=["rle"]))))
            assert result["metadata"]["model"]["name"] == "lite-medsam"
            mask = rle_decode(result["mask"]["counts"], tuple(result["mask"]["size"]))
            scores.append(dice(mask, phantom.mask(lesion.label)))
    assert np.mean(scores) >= 0.85, scores


REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def real_request(image: sitk.Image, truth: np.ndarray, **columns) -> tuple[dict, int]:
    """One box (the label's bounding box) on the label's largest slice, as a user would send it."""
    key = int(np.argmax(truth.sum(axis=(1, 2))))
    ys, xs = np.nonzero(truth[key])
    box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    body = {"input_data": {"nii_image": [base64.b64encode(write_nifti(image)).decode()], "bbox": [box],
                           "key_slice_idx": [key], "mask_format": ["rle"], **{k: [v] for k, v in columns.items()}}}
    return body, key


LESION = "lesions/CT_Lesion_000009_03_01_036-048"


@pytest.mark.slow
@pytest.mark.parametrize(("scan", "labels", "label", "columns", "floor"), [
    (f"{LESION}.nii.gz", f"{LESION}_label.nii.gz", 1, {"dicom_window": [0, 255]}, 0.85),  # MedSAM2's own use case
    ("mr.nii.gz", "mr_labels.nii.gz", 2, {"modality": "MR"}, 0.75),  # right kidney, windowed by the server's MR rule
])
def test_lite_on_real_anatomy_keeps_a_dice_floor(lite_service, scan, labels, label, columns, floor):
    """Real scans (../shared/data/real): floors well below what benchmarks/real_anatomy.py measures (BENCHMARKS.md)."""
    image = sitk.ReadImage(str(REAL / scan))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(REAL / labels))) == label
    body, _ = real_request(image, truth, **columns)
    (result,) = score_body(lite_service, body)
    mask = rle_decode(result["mask"]["counts"], tuple(result["mask"]["size"]))
    assert dice(mask, truth) >= floor
