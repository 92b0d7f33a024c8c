"""The MedSAM2 route equals the reference pipeline (REFERENCE.md B) voxel for voxel.

The reference is an independent, literal implementation in tests/reference_pipeline.py; both run the
same random-weight checkpoint on CPU in float32. The endpoint side goes through the whole Service
(base64 NIfTI in, JSON-ready mask out), starting from an empty feature cache: a cold request.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import request_for
from medsam2_endpoint.api.azure import score as score_body
from medsam2_endpoint.base.lru import ByteLRU
from medsam2_endpoint.engines.medsam2 import CachedFeatures
from medsam2_endpoint.io.encode import dumps
from medsam2_endpoint.pipeline.propagate import PropagationOptions, segment_object
from medsam2_endpoint.pipeline.window import window_to_uint8
from medsam2_endpoint.testing.metrics import dice
from medsam2_endpoint.testing.phantoms import ct_phantom, mri_phantom, oblique_direction
from reference_pipeline import build_reference_predictor, reference_segment

MODEL = "MedSAM2_latest"
SLICE_FEATURE_BYTES = (32 * 128 * 128 + 64 * 64 * 64 + 256 * 32 * 32) * 2  # bfloat16 FPN features of a 512 px slice
CASES = {
    # anisotropic spacing, oblique direction, int16, key slice away from the middle, series offset
    "ct_oblique_int16": (
        lambda: ct_phantom((12, 48, 64), spacing=(0.7, 0.9, 3.0), direction=oblique_direction(20.0), lesions=("lobulated",), seed=11),
        7,
        None,
    ),
    # float32 MR-like volume with a window, non-square slices
    "mr_float32": (
        lambda: mri_phantom((10, 56, 40), spacing=(1.1, 1.1, 4.0), lesions=("ellipsoid",), seed=12),
        0,
        None,
    ),
    # a pass longer than memory attention's reach (18 frames): older tracking outputs are dropped on the way
    "ct_long_pass": (lambda: ct_phantom((24, 32, 32), lesions=("ellipsoid",), seed=13), 0, 2),
}


@pytest.fixture(scope="module")
def reference_predictor(medsam2_checkpoint):
    return build_reference_predictor(medsam2_checkpoint)


def cold(cold_service):
    """A Service of its own (conftest `cold_service`) and its MedSAM2 engine: an empty feature cache of the
    configured size, the session Service's caches untouched."""
    service = cold_service()
    return service, service.registry.get(MODEL)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_medsam2_route_equals_reference(case, cold_service, reference_predictor, tmp_path, monkeypatch):
    make, offset, key_slice = CASES[case]
    phantom = make()
    window = phantom.window or (0.0, float(phantom.array().max()) * 0.9)
    lesion = phantom.lesions[0]
    key = lesion.key_slice if key_slice is None else key_slice
    assert key != phantom.labels.shape[0] // 2 or case != "ct_oblique_int16"
    path = tmp_path / "volume.nii.gz"
    path.write_bytes(phantom.nifti_bytes())

    expected = reference_segment(path, lesion.bbox, key, window, predictor=reference_predictor)

    service, engine = cold(cold_service)
    held = []  # tracking outputs held after each step
    forget = engine.predictor.forget_frame

    def counting_forget(state, frame_idx):
        forget(state, frame_idx)
        held.append(len(state["output_dict"]["non_cond_frame_outputs"]))

    monkeypatch.setattr(engine.predictor, "forget_frame", counting_forget)
    # stop rules off (0): the reference walks to both ends of the volume
    body = request_for(
        phantom, slice_offset=offset, key_slice_idx=[key + offset], dicom_window=[list(window)], model=[MODEL], stop_after_empty=[0]
    )
    (result,) = json.loads(dumps(score_body(service, body)))
    mask = np.asarray(result["mask"], dtype=np.uint8)
    assert result["metadata"]["adjusted_key_slice_index"] == key
    assert mask.shape == expected.shape == phantom.labels.shape
    assert expected.any(), "the reference produced an empty mask: the comparison would be vacuous"
    mismatched = int(np.count_nonzero(mask != expected))
    assert mismatched == 0, f"{mismatched} voxels differ from the reference"
    reach = engine.predictor.memory_reach
    assert max(held) <= reach
    if case == "ct_long_pass":
        assert len(held) == phantom.labels.shape[0] + 1 and max(held) == reach < phantom.labels.shape[0] - key - 1


@pytest.mark.slow
def test_medsam2_cache_keeps_bfloat16_features_for_later_requests(cold_service):
    phantom = ct_phantom((8, 40, 40), lesions=("ellipsoid",), seed=14)
    depth = phantom.labels.shape[0]
    service, engine = cold(cold_service)
    body = request_for(phantom, model=[MODEL], stop_after_empty=[0])
    (first,) = json.loads(dumps(score_body(service, body)))
    # every slice encoded once: the key slice's second pass used the features it had computed, not the cache
    assert (engine.features.misses, engine.features.hits, len(engine.features)) == (depth, 0, depth)
    entries = [engine.features.get(key) for key in list(engine.features._items)]
    assert all(isinstance(e, CachedFeatures) and {t.dtype for t in e.tensors} == {torch.bfloat16} for e in entries)
    assert {e.dtypes for e in entries} == {(torch.float32,) * 3}
    assert engine.features.size_bytes == depth * SLICE_FEATURE_BYTES  # 2 MiB a slice

    misses = engine.features.misses
    (second,) = json.loads(dumps(score_body(service, body)))  # the same prompt again, from the cache
    assert engine.features.misses == misses
    a, b = np.asarray(first["mask"], bool), np.asarray(second["mask"], bool)
    assert dice(a, b) > 0.99  # rounded features, nearly the same mask (measured: 7 of 12,800 voxels differ)


@pytest.mark.slow
def test_medsam2_cache_keeps_a_requests_first_slices_when_it_is_too_small(cold_service):
    """With room for 3 slices, an 8-slice walk keeps its first 3 (the key slice and the two above it)
    rather than its last 3, which the next request's up pass would evict before its down pass reached them."""
    phantom = ct_phantom((8, 40, 40), lesions=("ellipsoid",), seed=14)
    key = phantom.lesions[0].key_slice
    service, engine = cold(cold_service)
    engine.features = ByteLRU(3 * SLICE_FEATURE_BYTES)  # this Service's own engine: the session's keeps its size
    body = request_for(phantom, model=[MODEL], stop_after_empty=[0])
    score_body(service, body)
    assert sorted(z for _, z in engine.features._items) == [key, key + 1, key + 2]
    hits, misses = engine.features.hits, engine.features.misses
    score_body(service, body)
    assert (engine.features.hits - hits, engine.features.misses - misses) == (3, 8 - 3)


@pytest.mark.slow
def test_medsam2_state_serves_objects_with_different_key_slices(cold_service):
    """Objects of one item share the state (and its cached slices); each starts from its own key slice's
    features, not the previous object's."""
    phantom = ct_phantom((8, 40, 40), lesions=("ellipsoid",), seed=14)
    volume = window_to_uint8(phantom.array(), phantom.window)
    box = np.asarray(phantom.lesions[0].bbox)
    options = PropagationOptions(stop_after_empty=None)
    _, engine = cold(cold_service)
    shared = engine.start(volume, "shared")
    segment_object(engine, shared, key_index=3, box=box, shape=volume.shape, options=options)
    second = segment_object(engine, shared, key_index=5, box=box, shape=volume.shape, options=options)
    with torch.inference_mode():
        key_features = engine.predictor.forward_image(shared["images"][5].float()[None])["backbone_fpn"]
    # slice 5 was cached (bfloat16) by the first object's walk: its key features are those, restored
    restored = [f.to(torch.bfloat16).float() for f in key_features]
    assert all(torch.equal(a, b) for a, b in zip(shared["key_frame_features"], restored, strict=True))
    alone = segment_object(engine, cold(cold_service)[1].start(volume, None), key_index=5, box=box, shape=volume.shape, options=options)
    assert alone.mask.any()
    assert dice(second.mask, alone.mask) > 0.99  # the shared state read cached bfloat16 features
