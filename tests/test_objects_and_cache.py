"""Several objects per item, stop-rule options, and slice features reused across objects and requests."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import request_for
from medsam2_endpoint.api.azure import score as score_body
from medsam2_endpoint.base.errors import InvalidRequest
from medsam2_endpoint.core.registry import ModelRegistry
from medsam2_endpoint.core.service import Service
from medsam2_endpoint.core.settings import Settings
from medsam2_endpoint.engines.base import ModelInfo
from medsam2_endpoint.engines.lite import LiteMedSAMEngine
from medsam2_endpoint.io.encode import dumps
from medsam2_endpoint.testing.metrics import dice
from medsam2_endpoint.testing.phantoms import ct_phantom


class LogitBoxEngine:
    """Logit 100/box-width inside the box on every slice: narrower boxes are more confident."""

    info = ModelInfo("logit-box", "test", "none.pt", "cd" * 32)

    def start(self, volume, volume_key=None):
        return volume.shape

    def track(self, shape, *, key_index, box, reverse):
        z = key_index
        while 0 <= z < shape[0]:
            logits = np.full(shape[1:], -1.0, np.float32)
            logits[box[1] : box[3], box[0] : box[2]] = 100.0 / (box[2] - box[0])
            yield z, logits
            z += -1 if reverse else 1


def service_with(engine):
    return Service(Settings.from_env({"MEDSAM2_WARMUP": "0"}), ModelRegistry({engine.info.name: engine}, engine.info.name))


@pytest.fixture(scope="module")
def pair():
    return ct_phantom((20, 96, 96), lesions=("pair",), seed=7)


def objects_body(phantom, objects, **columns):
    body = request_for(phantom, **columns)
    cols = body["input_data"]
    del cols["bbox"], cols["key_slice_idx"]
    cols["objects"] = [objects]
    return body


def test_overlaps_go_to_the_highest_logit(pair):
    wide = {"id": 3, "bbox": [10, 10, 50, 50], "key_slice_idx": 5}
    narrow = {"id": 200, "bbox": [30, 30, 40, 40], "key_slice_idx": 8}
    (result,) = json.loads(dumps(score_body(service_with(LogitBoxEngine()), objects_body(pair, [wide, narrow]))))
    labels = np.asarray(result["mask"])
    assert labels[0, 35, 35] == 200 and labels[0, 20, 20] == 3 and labels[0, 60, 60] == 0
    meta = {o["id"]: o for o in result["metadata"]["objects"]}
    assert meta[200]["voxel_count"] == 10 * 10 * 20 and meta[3]["voxel_count"] == (40 * 40 - 100) * 20
    assert meta[200]["adjusted_key_slice_index"] == 8 and meta[3]["bbox_used"] == [10, 10, 50, 50]
    assert result["metadata"]["voxel_count"] == 40 * 40 * 20


@pytest.mark.parametrize(
    ("objects", "extra", "message"),
    [
        ([], {}, r"input_data.objects\[0\]: the list is empty"),
        ([{"id": 1, "bbox": [1, 1, 5, 5], "key_slice_idx": 0}] * 2, {}, "object ids must be unique"),
        ([{"id": 1, "bbox": [1, 1, 500, 5], "key_slice_idx": 0}], {}, r"input_data.objects\[0\]\[0\].bbox: x 500 is outside"),
        ([{"id": 1, "bbox": [1, 1, 5, 5], "key_slice_idx": 99}], {}, r"input_data.objects\[0\]\[0\].key_slice_idx: slice 99"),
        ([{"id": 0, "bbox": [1, 1, 5, 5], "key_slice_idx": 0}], {}, r"input_data.objects\[0\]\[0\].id"),
        ([{"id": 1, "bbox": [1, 1, 5, 5], "key_slice_idx": 0, "colour": 1}], {}, r"colour: unknown field; allowed fields are id, bbox, key_slice_idx"),
        ([{"id": 1, "bbox": [1, 1, 5, 5], "key_slice_idx": 0}], {"bbox": [[1, 1, 5, 5]]}, "not both"),
    ],
)
def test_object_errors(pair, objects, extra, message):
    body = objects_body(pair, objects)
    body["input_data"].update(extra)
    with pytest.raises(InvalidRequest, match=message):
        score_body(service_with(LogitBoxEngine()), body)


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"propagation": ["sideways"]}, r"input_data.propagation\[0\]"),
        ({"stop_after_empty": [-1]}, r"input_data.stop_after_empty\[0\]"),
        ({"max_slices": [0]}, r"input_data.max_slices\[0\]"),
    ],
)
def test_propagation_option_errors(pair, columns, message):
    with pytest.raises(InvalidRequest, match=message):
        score_body(service_with(LogitBoxEngine()), request_for(pair, **columns))


def test_propagation_options_reach_the_algorithm(pair):
    service = service_with(LogitBoxEngine())
    key = pair.lesions[0].key_slice
    (up,) = score_body(service, request_for(pair, propagation=["up"], max_slices=[3], mask_format=["rle"]))
    assert up["metadata"]["slices_processed"] == 3 and up["metadata"]["propagation"] == "up"
    from medsam2_endpoint.io.encode import rle_decode

    mask = rle_decode(up["mask"]["counts"], tuple(up["mask"]["size"]))
    assert np.flatnonzero(mask.any(axis=(1, 2))).tolist() == [key, key + 1, key + 2]
    assert up["metadata"]["stop_after_empty"] == 2  # the default


@pytest.mark.slow
def test_lite_features_reused_across_objects_and_requests(pair):
    engine = LiteMedSAMEngine()
    service = service_with(engine)
    a, b = pair.lesions
    single = [json.loads(dumps(score_body(service, request_for(pair, lesion=i)))) [0] for i in (0, 1)]
    first_misses = engine.features.misses
    assert engine.features.hits > 0  # the key slice is shared by both directions
    # the same volume again, both objects in one item: every slice's embedding comes from the cache
    objects = [{"id": 1, "bbox": list(a.bbox), "key_slice_idx": a.key_slice}, {"id": 2, "bbox": list(b.bbox), "key_slice_idx": b.key_slice}]
    (multi,) = json.loads(dumps(score_body(service, objects_body(pair, objects))))
    assert engine.features.misses == first_misses
    labels = np.asarray(multi["mask"])
    for obj_id, result in zip((1, 2), single, strict=True):
        alone = np.asarray(result["mask"]).astype(bool)
        assert dice(labels == obj_id, alone) > 0.95  # identical except where the two overlap
        assert dice(labels == obj_id, pair.mask(pair.lesions[obj_id - 1].label)) > 0.7  # small lesions, 96 px
    # a different window is different input to the model: no reuse
    score_body(service, request_for(pair, dicom_window=[[-100.0, 200.0]]))
    assert engine.features.misses > first_misses
