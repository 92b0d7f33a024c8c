"""Each prompt kind through both real engines on a phantom: LiteMedSAM (real weights) and MedSAM2 (random weights).

LiteMedSAM's answers are scored against the phantom's truth; the random-weight MedSAM2 checks the plumbing
(every prompt conditions the predictor, points and RECIST reach it, a correction round on a held volume).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import request_for
from medsam2_endpoint.api.azure import score as score_body
from medsam2_endpoint.io.encode import decode_mask, dumps
from medsam2_endpoint.io.limits import Limits
from medsam2_endpoint.testing.metrics import dice
from medsam2_endpoint.testing.phantoms import ct_phantom

MEDSAM2 = "MedSAM2_latest"
LITE = "lite-medsam"


@pytest.fixture(scope="module")
def phantom():
    return ct_phantom((10, 48, 48), seed=11)


def objects_body(phantom, objects, **columns):
    body = request_for(phantom, mask_format=["rle"], **columns)
    cols = body["input_data"]
    del cols["bbox"], cols["key_slice_idx"]
    cols["objects"] = [objects]
    return body


def answer(service, body):
    (result,) = json.loads(dumps(score_body(service, body)))
    return result, decode_mask(result["mask"], tuple(result["metadata"]["mask_shape"]), field="mask", limits=Limits())


def test_lite_box_anchors_on_two_slices(service, phantom):
    les = phantom.lesions[0]
    truth = phantom.labels == les.label
    lo, hi = les.z_range
    second = int(np.argmax(truth[lo + 1 : hi].sum(axis=(1, 2)) * (np.arange(lo + 1, hi) != les.key_slice))) + lo + 1
    ys, xs = np.nonzero(truth[second])
    box2 = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
    obj = {"id": 1, "prompts": [{"slice": les.key_slice, "box": list(les.bbox)}, {"slice": second, "box": box2}]}
    result, labels = answer(service, objects_body(phantom, [obj], model=[LITE]))
    meta = result["metadata"]
    assert meta["model"]["name"] == "lite-medsam" and meta["objects"][0]["prompts_used"][1]["box"] == box2
    assert dice(labels[les.key_slice] > 0, truth[les.key_slice]) > 0.7 and dice(labels[second] > 0, truth[second]) > 0.7
    assert dice(labels > 0, truth) > 0.6


def test_lite_recist_box(service, phantom):
    les = phantom.lesions[0]
    x0, y0, x1, y1 = les.bbox
    cy = (y0 + y1) / 2
    obj = {"id": 1, "recist": [[x0 + 1, cy], [x1 - 1, cy]], "key_slice_idx": les.key_slice}
    result, labels = answer(service, objects_body(phantom, [obj], model=[LITE]))
    (used,) = result["metadata"]["objects"][0]["prompts_used"]
    assert used["from"] == "recist" and used["recist_mode"] == "box" and used["points"] is None
    assert dice(labels[les.key_slice] > 0, phantom.labels[les.key_slice] == les.label) > 0.5


def test_lite_correction_round_on_the_held_volume_keeps_untouched_slices(service, phantom):
    les = phantom.lesions[0]
    first, earlier = answer(service, request_for(phantom, mask_format=["rle"], stop_after_empty=[1], model=[LITE]))
    volume_id = first["metadata"]["volume_id"]
    lo, _ = les.z_range
    obj = {"id": 1, "prompts": [{"slice": les.key_slice, "box": list(les.bbox)}, {"slice": lo, "box": list(les.bbox)}]}
    body = objects_body(phantom, [obj], previous_mask=[first["mask"]], stop_after_empty=[1], model=[LITE])
    body["input_data"].update(nii_image=[None], volume_id=[volume_id])
    result, labels = answer(service, body)
    changed = result["metadata"]["changed_slices"]
    assert result["metadata"]["volume_id"] == volume_id and result["metadata"]["timing_ms"]["decode"] < 1000
    for z in range(labels.shape[0]):
        if z not in changed:
            assert np.array_equal(labels[z] > 0, earlier[z] > 0), z


def test_medsam2_boxes_and_points_on_several_slices(service, phantom):
    les = phantom.lesions[0]
    x0, y0, x1, y1 = les.bbox
    obj = {"id": 1, "prompts": [{"slice": les.key_slice, "box": list(les.bbox)},
                                {"slice": les.key_slice - 1, "points": [[(x0 + x1) / 2, (y0 + y1) / 2], [1, 1]], "labels": [1, 0]}]}
    result, labels = answer(service, objects_body(phantom, [obj], model=[MEDSAM2], max_slices=[2]))
    meta = result["metadata"]
    assert meta["model"]["family"] == "medsam2" and labels.shape == phantom.labels.shape
    used = meta["objects"][0]["prompts_used"]
    assert used[1]["points"] == [[(x0 + x1) / 2, (y0 + y1) / 2], [1.0, 1.0]] and used[1]["labels"] == [1, 0]
    # the walk covers both prompted slices and at most 2 past them each way
    reached = meta["objects"][0]["slices_processed"]
    assert 2 <= reached <= 2 * (2 + 2)


def test_medsam2_recist_points_and_the_mask_prompt(service, phantom):
    les = phantom.lesions[0]
    x0, y0, x1, y1 = les.bbox
    cy = (y0 + y1) / 2
    obj = {"id": 3, "recist": [[x0, cy], [x1, cy]], "key_slice_idx": les.key_slice}
    result, _ = answer(service, objects_body(phantom, [obj], model=[MEDSAM2], max_slices=[2]))
    (used,) = result["metadata"]["objects"][0]["prompts_used"]
    assert used["recist_mode"] == "points" and len(used["points"]) == 5 and used["labels"] == [1] * 5
    box_mode = {**obj, "recist_mode": "box"}
    result, _ = answer(service, objects_body(phantom, [box_mode], model=[MEDSAM2], max_slices=[2]))
    (used,) = result["metadata"]["objects"][0]["prompts_used"]
    cx, half = int((x0 + x1) / 2), int((x1 - x0) / 2)
    assert used["box"] == [cx - half, int(cy) - half, cx + half, int(cy) + half]
