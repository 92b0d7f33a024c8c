"""Interactive 3D without a model: the prompt contract, RECIST derivation, anchors, previous_mask, volume_id.

Stub engines stand in for the models (a box filled on every slice it reaches), so what is checked is the
plumbing: which slices each prompt reaches, what the earlier mask keeps, what a held volume saves.
The models themselves run in test_interactive_models.py.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from conftest import request_for
from medsam2_endpoint.api.azure import score as score_body
from medsam2_endpoint.api.errors import body_of
from medsam2_endpoint.base.errors import InvalidRequest, VolumeNotHeld
from medsam2_endpoint.contract.score3d import parse_request
from medsam2_endpoint.core.registry import ModelRegistry
from medsam2_endpoint.core.service import Service
from medsam2_endpoint.core.sessions import SessionLimits, SessionStore
from medsam2_endpoint.core.settings import Settings
from medsam2_endpoint.engines.base import Capabilities, ModelInfo, PromptedVolumeEngine, SlicePrompt
from medsam2_endpoint.io.encode import decode_mask, dumps, rle_counts, value_rle
from medsam2_endpoint.io.limits import Limits
from medsam2_endpoint.io.volume import Volume
from medsam2_endpoint.pipeline.interactive import segment_prompts
from medsam2_endpoint.pipeline.propagate import PropagationOptions
from medsam2_endpoint.pipeline.recist import derive, recist_box, recist_points
from medsam2_endpoint.testing.phantoms import ct_phantom

SHAPE = (12, 32, 32)


def box_logits(shape, box, value=1.0):
    logits = np.full(shape, -1.0, np.float32)
    x0, y0, x1, y1 = (int(v) for v in box)
    logits[y0 : y1 + 1, x0 : x1 + 1] = value
    return logits


class ReachEngine:
    """Fills the prompt box on the key slice and the next `reach` slices each way, then empty slices."""

    info = ModelInfo("reach", "test", "none.pt", "ab" * 32)

    def __init__(self, reach: int = 2) -> None:
        self.reach, self.calls = reach, []

    def start(self, volume, volume_key=None):
        return volume.shape

    def image_engine(self):
        return None

    def track(self, shape, *, key_index, box, reverse):
        self.calls.append((key_index, reverse))
        z = key_index
        while 0 <= z < shape[0]:
            near = abs(z - key_index) <= self.reach
            yield z, box_logits(shape[1:], box) if near else np.full(shape[1:], -1.0, np.float32)
            z += -1 if reverse else 1


class ConditionedEngine(ReachEngine):
    """A PromptedVolumeEngine stub: every slice gets the union of the prompts' boxes and point squares."""

    # a stub of MedSAM2's abilities: it declares them as every engine does
    info = ModelInfo("conditioned", "test", "none.pt", "cd" * 32,
                     Capabilities(points=True, negative_points=True, mask_prompts=True, multi_slice=True))

    def track_prompts(self, shape, *, prompts, reverse, mask_prompt=False):
        self.calls.append(("prompts", reverse, mask_prompt, tuple(p.z for p in prompts)))
        union = np.full(shape[1:], -1.0, np.float32)
        for p in prompts:
            if p.box is not None:
                union = np.maximum(union, box_logits(shape[1:], p.box))
            for (x, y), label in zip(p.points if p.points is not None else [], p.labels if p.labels is not None else [], strict=True):
                if label == 1:
                    union = np.maximum(union, box_logits(shape[1:], [x - 1, y - 1, x + 1, y + 1]))
        zs = sorted(p.z for p in prompts)
        z = zs[-1] if reverse else zs[0]
        while 0 <= z < shape[0]:
            yield z, union
            z += -1 if reverse else 1


def service_with(engine):
    return Service(Settings.from_env({"MEDSAM2_WARMUP": "0"}), ModelRegistry({engine.info.name: engine}, engine.info.name))


def volume_body(phantom, objects, **columns):
    body = request_for(phantom, **columns)
    cols = body["input_data"]
    del cols["bbox"], cols["key_slice_idx"]
    cols["objects"] = [objects]
    return body


@pytest.fixture(scope="module")
def phantom():
    return ct_phantom(SHAPE, seed=5)


def labels_of(result):
    return decode_mask(result["mask"], tuple(result["metadata"]["mask_shape"]), field="mask", limits=Limits())


# ------------------------------------------------------------------------------------------ RECIST


def test_recist_box_is_the_square_around_the_long_axis():
    # centre int((10 + 30) / 2, (20 + 20) / 2) = (20, 20); half side int(20 / 2) = 10
    assert recist_box(np.array([[10, 20], [30, 20]]), width=64, height=64).tolist() == [10, 10, 30, 30]
    # a 6-8-10 diagonal: centre (3, 4), half side 5; clamped to the slice at 0
    assert recist_box(np.array([[0, 0], [6, 8]]), width=64, height=64).tolist() == [0, 0, 8, 9]
    # int() truncates: centre (int(12.5), int(7.5)) = (12, 7), length sqrt(5^2 + 5^2) = 7.07 -> half 3
    assert recist_box(np.array([[10, 5], [15, 10]]), width=64, height=64).tolist() == [9, 4, 15, 10]
    # clamped at the far edges too
    assert recist_box(np.array([[50, 60], [62, 60]]), width=60, height=62).tolist() == [50, 54, 59, 61]


def test_recist_short_axis_widens_the_box_to_both_diameters():
    box = recist_box(np.array([[10, 20], [30, 20]]), width=64, height=64, short_axis=np.array([[20, 8.5], [20, 33.2]]))
    assert box.tolist() == [10, 8, 30, 34]


def test_recist_point_modes():
    line = np.array([[10.0, 20.0], [30.0, 20.0]])
    assert recist_points(line, "points", width=64, height=64).tolist() == [[10, 20], [15, 20], [20, 20], [25, 20], [30, 20]]
    assert recist_points(line, "center", width=64, height=64).tolist() == [[20, 20]]
    assert recist_points(line, "three", width=64, height=64).tolist() == [[10, 20], [20, 20], [30, 20]]
    grid = recist_points(line, "box_points", width=64, height=64).tolist()
    assert grid == [[x, y] for y in (10, 20, 30) for x in (10, 20, 30)]
    short = recist_points(line, "three", width=64, height=64, short_axis=np.array([[20.0, 14.0], [20.0, 26.0]]))
    assert sorted(map(tuple, short.tolist())) == [(10, 20), (20, 14), (20, 20), (20, 26), (30, 20)]  # shared midpoint once
    assert derive([[10, 20], [30, 20]], None, "box", width=64, height=64).as_metadata() == {
        "mode": "box", "box": [10, 10, 30, 30], "points": None}


# ------------------------------------------------------------------------------------------ contract


def test_plain_bbox_stays_one_box_prompt(phantom):
    (item,) = parse_request(request_for(phantom), max_items=4)
    (spec,) = item.objects
    assert spec.plain_box and len(spec.prompts) == 1 and spec.prompts[0].box == list(phantom.lesions[0].bbox)


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"id": 1, "prompts": [{"slice": 2, "points": [[3, 3]]}]}, r"prompts\[0\]: points and labels go together"),
        ({"id": 1, "prompts": [{"slice": 2, "points": [[3, 3]], "labels": [1, 0]}]}, r"prompts\[0\].labels: 2 labels for 1 points"),
        ({"id": 1, "prompts": [{"slice": 2}]}, r"prompts\[0\]: give a box, points with labels, or a recist mark"),
        ({"id": 1, "bbox": [1, 1, 5, 5], "key_slice_idx": 2, "prompts": [{"slice": 2, "box": [1, 1, 5, 5]}]},
         r"objects\[0\]\[0\]: give prompts, or bbox with key_slice_idx, not both"),
        ({"id": 1, "key_slice_idx": 2}, r"give one of bbox .* or recist"),
        ({"id": 1, "bbox": [1, 1, 5, 5], "recist": [[1, 1], [4, 4]], "key_slice_idx": 2}, r"give one of bbox"),
        ({"id": 1, "recist_short": [[1, 1], [4, 4]], "bbox": [1, 1, 5, 5], "key_slice_idx": 2}, r"recist_short: needs recist"),
        ({"id": 1, "prompts": [{"slice": 2, "box": [1, 1, 5, 5], "scribble": []}]}, r"prompts\[0\]\.scribble: unknown field; allowed fields are slice, box"),
    ],
)
def test_prompt_errors_name_the_field(phantom, obj, message):
    with pytest.raises(InvalidRequest, match=message):
        parse_request(volume_body(phantom, [obj]), max_items=4)


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"id": 1, "prompts": [{"slice": 40, "box": [1, 1, 5, 5]}]}, r"prompts\[0\]\.slice: slice 40 minus slice_offset 0 is 40"),
        ({"id": 1, "prompts": [{"slice": 2, "box": [1, 1, 5, 5]}, {"slice": 2, "box": [2, 2, 6, 6]}]}, r"prompts\[1\]\.box: a second box on slice 2"),
        ({"id": 1, "prompts": [{"slice": 2, "box": [1, 1, 50, 5]}]}, r"prompts\[0\]\.box: x 50 is outside"),
        ({"id": 1, "prompts": [{"slice": 2, "points": [[40, 3]], "labels": [1]}]}, r"prompts\[0\]\.points\[0\]: point \[40, 3\] is outside"),
        ({"id": 1, "recist": [[5, 5], [5.5, 5]], "key_slice_idx": 2}, r"objects\[0\]\[0\]\.recist: the long axis \[\[5, 5\], \[5.5, 5\]\] is shorter than a pixel"),
        ({"id": 1, "recist": [[5, 5], [40, 5]], "key_slice_idx": 2}, r"objects\[0\]\[0\]\.recist\[1\]: point \[40, 5\] is outside"),
    ],
)
def test_prompt_geometry_errors_are_400_before_inference(phantom, obj, message):
    engine = ConditionedEngine()
    with pytest.raises(InvalidRequest, match=message):
        score_body(service_with(engine), volume_body(phantom, [obj]))
    assert engine.calls == []


def test_points_on_a_box_only_model_say_send_a_box_or_use_medsam2(phantom):
    engine = ReachEngine()
    obj = {"id": 1, "prompts": [{"slice": 3, "box": [4, 4, 12, 12]}, {"slice": 6, "points": [[8, 8]], "labels": [1]}]}
    with pytest.raises(InvalidRequest, match=r"prompts\[1\]\.points: reach takes boxes only; send a box on slice 6, or use a MedSAM2"):
        score_body(service_with(engine), volume_body(phantom, [obj]))
    with pytest.raises(InvalidRequest, match=r"objects\[0\]\[0\]\.recist_mode: 'points' gives point prompts"):
        score_body(service_with(engine), volume_body(phantom, [{"id": 1, "recist": [[4, 8], [12, 8]], "key_slice_idx": 3,
                                                                  "recist_mode": "points"}]))
    assert engine.calls == []


# ------------------------------------------------------------------------------------------ anchors


def test_anchors_walk_from_each_prompt_and_the_nearer_anchor_wins_between(phantom):
    engine = ReachEngine(reach=12)
    low, high = [2, 2, 10, 10], [20, 20, 28, 28]
    obj = {"id": 1, "prompts": [{"slice": 2, "box": low}, {"slice": 9, "box": high}]}
    (result,) = json.loads(dumps(score_body(service_with(engine), volume_body(phantom, [obj], mask_format=["rle"]))))
    labels = labels_of(result)
    for z in range(SHAPE[0]):
        near_low = abs(z - 2) < abs(z - 9) or (abs(z - 2) == abs(z - 9))
        expected = box_logits(SHAPE[1:], low if near_low else high) > 0
        assert np.array_equal(labels[z] > 0, expected), z
    assert sorted(engine.calls) == [(2, False), (2, True), (9, False), (9, True)]
    used = result["metadata"]["objects"][0]["prompts_used"]
    assert [(u["slice"], u["box"], u["from"]) for u in used] == [(2, low, "request"), (9, high, "request")]


def test_anchor_walks_stop_where_they_stop_and_the_other_anchor_covers():
    engine = ReachEngine(reach=1)
    shape = SHAPE
    box = np.array([4, 4, 12, 12])
    result = segment_prompts(engine, shape, prompts=[SlicePrompt(2, box), SlicePrompt(9, box)], shape=shape,
                             options=PropagationOptions(stop_after_empty=1))
    assert [int(z) for z in np.flatnonzero(result.mask.any(axis=(1, 2)))] == [1, 2, 3, 8, 9, 10]


# ------------------------------------------------------------------------------------------ conditioned


def test_conditioned_engine_gets_every_prompt_at_once_both_ways(phantom):
    engine = ConditionedEngine()
    assert isinstance(engine, PromptedVolumeEngine)
    obj = {"id": 1, "prompts": [{"slice": 3, "box": [4, 4, 12, 12]}, {"slice": 7, "points": [[13, 8], [5, 25]], "labels": [1, 0]}]}
    (result,) = json.loads(dumps(score_body(service_with(engine), volume_body(phantom, [obj], mask_format=["rle"]))))
    assert sorted(engine.calls) == [("prompts", False, False, (3, 7)), ("prompts", True, False, (3, 7))]
    labels = labels_of(result)
    expected = (box_logits(SHAPE[1:], [4, 4, 12, 12]) > 0) | (box_logits(SHAPE[1:], [12, 7, 14, 9]) > 0)  # joined to the box: one component
    assert all(np.array_equal(labels[z] > 0, expected) for z in range(SHAPE[0]))
    used = result["metadata"]["objects"][0]["prompts_used"]
    assert used[1]["points"] == [[13, 8], [5, 25]] and used[1]["labels"] == [1, 0]


def test_recist_on_a_conditioned_engine_defaults_to_points_and_re_adds_the_mask(phantom):
    engine = ConditionedEngine()
    obj = {"id": 4, "recist": [[8, 10], [16, 10]], "key_slice_idx": 5}
    (result,) = json.loads(dumps(score_body(service_with(engine), volume_body(phantom, [obj], mask_format=["rle"]))))
    assert {c[2] for c in engine.calls} == {True}  # mask_prompt: the RECIST script's add_new_mask step
    (used,) = result["metadata"]["objects"][0]["prompts_used"]
    assert used["from"] == "recist" and used["recist_mode"] == "points" and used["box"] is None
    assert used["points"] == [[8, 10], [10, 10], [12, 10], [14, 10], [16, 10]] and used["labels"] == [1] * 5


def test_recist_box_mode_on_a_box_model(phantom):
    engine = ReachEngine(reach=0)
    obj = {"id": 1, "recist": [[8, 10], [16, 10]], "recist_short": [[12, 7], [12, 15]], "key_slice_idx": 5}
    (result,) = json.loads(dumps(score_body(service_with(engine), volume_body(phantom, [obj], mask_format=["rle"]))))
    (used,) = result["metadata"]["objects"][0]["prompts_used"]
    assert used["box"] == [8, 6, 16, 15] and used["recist_mode"] == "box"  # square [8, 6, 16, 14] widened to y 15
    assert np.array_equal(labels_of(result)[5] > 0, box_logits(SHAPE[1:], [8, 6, 16, 15]) > 0)


# ------------------------------------------------------------------------------------------ previous_mask


def test_previous_mask_keeps_the_slices_the_new_prompt_does_not_reach(phantom):
    engine = ReachEngine(reach=1)
    service = service_with(engine)
    earlier = np.zeros(SHAPE, np.uint8)
    earlier[0:6, 2:9, 2:9] = 1  # an earlier answer on slices 0-5 ...
    earlier[10, 0:3, 0:3] = 1  # ... and a speck on slice 10
    obj = {"id": 1, "prompts": [{"slice": 8, "box": [20, 20, 28, 28]}]}
    body = volume_body(phantom, [obj], mask_format=["rle"], previous_mask=[{**value_rle(earlier), "size": list(SHAPE)}],
                       stop_after_empty=[1])
    (result,) = json.loads(dumps(score_body(service, body)))
    labels = labels_of(result)
    new = box_logits(SHAPE[1:], [20, 20, 28, 28]) > 0
    for z in (7, 8, 9):  # reached by the new prompt
        assert np.array_equal(labels[z] > 0, new), z
    for z in (0, 1, 2, 3, 4, 5, 6, 11):  # not reached: the earlier answer, as it was
        assert np.array_equal(labels[z], earlier[z]), z
    assert result["metadata"]["changed_slices"] == [7, 8, 9, 10] and result["metadata"]["previous_mask_used"]


def test_a_walk_rejoining_the_earlier_answer_stops_there(phantom):
    engine = ReachEngine(reach=5)
    box = [4, 4, 12, 12]
    earlier = np.zeros(SHAPE, np.uint8)
    earlier[:, 4:13, 4:13] = 1  # the earlier answer already has the box everywhere ...
    earlier[6, 4:13, 4:13] = 0  # ... but missed slice 6
    earlier[6, 20:25, 20:25] = 1  # (where it leaked elsewhere)
    obj = {"id": 1, "prompts": [{"slice": 6, "box": box}]}
    body = volume_body(phantom, [obj], mask_format=["rle"], previous_mask=[{"counts": rle_counts(earlier), "size": list(SHAPE)}])
    (result,) = json.loads(dumps(score_body(service_with(engine), body)))
    assert result["metadata"]["changed_slices"] == [6]
    assert result["metadata"]["objects"][0]["slices_processed"] == 2  # slice 6 up and down; 5 and 7 agreed and stopped the walks


def test_previous_mask_of_other_shape_or_form_is_a_400(phantom):
    engine = ReachEngine()
    obj = {"id": 1, "prompts": [{"slice": 2, "box": [4, 4, 12, 12]}]}
    wrong = np.zeros((3, 4, 5), np.uint8)
    with pytest.raises(InvalidRequest, match=r"input_data.previous_mask\[0\]: the mask has shape \[3, 4, 5\] \(z, y, x\), the volume \[12, 32, 32\]"):
        score_body(service_with(engine), volume_body(phantom, [obj], previous_mask=[{"counts": rle_counts(wrong), "size": [3, 4, 5]}]))
    with pytest.raises(InvalidRequest, match=r"previous_mask\[0\]: not base64"):
        score_body(service_with(engine), volume_body(phantom, [obj], previous_mask=["%%%"]))
    with pytest.raises(InvalidRequest, match=r"previous_mask\[0\].counts: the runs cover 5 voxels"):
        score_body(service_with(engine), volume_body(phantom, [obj], previous_mask=[{"counts": [5], "size": list(SHAPE)}]))


def test_previous_nifti_mask_as_the_answer_sent_it(phantom):
    engine = ReachEngine(reach=0)
    service = service_with(engine)
    obj = {"id": 1, "prompts": [{"slice": 4, "box": [4, 4, 12, 12]}]}
    (first,) = json.loads(dumps(score_body(service, volume_body(phantom, [obj], mask_format=["nifti"]))))
    second = {"id": 1, "prompts": [{"slice": 9, "box": [16, 16, 24, 24]}]}
    (result,) = json.loads(dumps(score_body(service, volume_body(phantom, [second], mask_format=["nifti"], previous_mask=[first["mask"]]))))
    labels = labels_of(result)
    assert labels[4].any() and labels[9].any() and result["metadata"]["changed_slices"] == [9]


# ------------------------------------------------------------------------------------------ volume_id


def test_volume_id_hit_skips_the_upload_and_miss_is_409(phantom):
    service = service_with(ReachEngine(reach=0))
    obj = {"id": 1, "prompts": [{"slice": 4, "box": [4, 4, 12, 12]}]}
    (first,) = json.loads(dumps(score_body(service, volume_body(phantom, [obj], mask_format=["rle"]))))
    volume_id = first["metadata"]["volume_id"]
    assert len(volume_id) == 32
    again = volume_body(phantom, [obj], mask_format=["rle"])
    again["input_data"].update(nii_image=[None], volume_id=[volume_id])
    (second,) = json.loads(dumps(score_body(service, again)))
    assert second["metadata"]["volume_id"] == volume_id and second["mask"] == first["mask"]
    again["input_data"]["volume_id"] = ["0" * 32]
    with pytest.raises(VolumeNotHeld) as caught:
        score_body(service, again)
    body = body_of(caught.value)
    assert body["status"] == 409 and body["code"] == "volume_not_held" and "send nii_image again" in body["error"]


def test_neither_nii_image_nor_volume_id_names_both(phantom):
    body = request_for(phantom)
    body["input_data"]["nii_image"] = [None]
    with pytest.raises(InvalidRequest, match=r"input_data.nii_image\[0\]: required \(or give input_data.volume_id\[0\]"):
        parse_request(body, max_items=4)


def test_held_volumes_evict_the_least_recently_used():
    def volume(seed):
        return Volume(np.random.default_rng(seed).integers(0, 9, (4, 8, 8)).astype(np.int16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0),
                      (1, 0, 0, 0, 1, 0, 0, 0, 1))

    held = SessionStore(SessionLimits(held_bytes=2 * 4 * 8 * 8 * 2), object)  # room for two
    a, b, c = (held.hold(volume(s)) for s in (1, 2, 3))
    assert len({a, b, c}) == 3 and held.held_volumes() == 2
    with pytest.raises(VolumeNotHeld):
        held.held(a, field="input_data.volume_id[0]")
    held.held(b, field="f")  # b is now the most recent: c goes next
    held.hold(volume(4))
    held.held(b, field="f")
    with pytest.raises(VolumeNotHeld):
        held.held(c, field="f")
    assert held.hold(volume(2)) == b  # the id is the content's: the same volume, the same id
    moved = volume(2)
    shifted = Volume(moved.array, moved.spacing, (1.0, 0.0, 0.0), moved.direction)
    assert shifted.content_id() != b  # geometry is part of it


def test_held_volumes_off_means_every_volume_id_is_409(phantom):
    engine = ReachEngine(reach=0)
    service = Service(Settings.from_env({"MEDSAM2_WARMUP": "0", "MEDSAM2_HELD_VOLUMES_MB": "0"}),
                      ModelRegistry({engine.info.name: engine}, engine.info.name))
    obj = {"id": 1, "prompts": [{"slice": 4, "box": [4, 4, 12, 12]}]}
    (first,) = json.loads(dumps(score_body(service, volume_body(phantom, [obj]))))
    again = volume_body(phantom, [obj])
    again["input_data"].update(nii_image=[None], volume_id=[first["metadata"]["volume_id"]])
    with pytest.raises(VolumeNotHeld):
        score_body(service, again)


def test_volume_id_is_the_hash_of_what_the_client_uploads(phantom):
    from medsam2_endpoint.io.volume import read_nifti

    service = service_with(ReachEngine(reach=0))
    (first,) = json.loads(dumps(score_body(service, request_for(phantom))))
    data = base64.b64decode(request_for(phantom)["input_data"]["nii_image"][0])
    assert read_nifti(data, field="x", limits=Limits()).content_id() == first["metadata"]["volume_id"]


def test_batch_sidecar_takes_prompts_recist_and_previous_mask(tmp_path):
    from medsam2_endpoint.api.batch_files import read_prompt

    volume = tmp_path / "case.nii.gz"
    volume.write_bytes(b"not read by read_prompt")
    prompt = {"objects": [{"id": 1, "prompts": [{"slice": 3, "box": [1, 1, 9, 9]}, {"slice": 6, "box": [2, 2, 8, 8]}]},
                          {"id": 2, "recist": [[1, 1], [9, 9]], "key_slice_idx": 4, "recist_mode": "box"}],
              "previous_mask": {"counts": [10], "size": [1, 2, 5]}}
    (tmp_path / "case.prompt.json").write_text(json.dumps(prompt))
    item, _ = read_prompt(volume)
    first, second = item.objects
    assert [p.slice for p in first.prompts] == [3, 6] and second.prompts[0].recist == [[1, 1], [9, 9]]
    assert second.recist_mode == "box" and item.previous_mask == {"counts": [10], "size": [1, 2, 5]}


def test_an_anchor_the_earlier_answer_follows_is_not_walked_again(phantom):
    engine = ReachEngine(reach=1)
    # no held volumes: no walk memory either, so every walk that runs calls the engine
    service = Service(Settings.from_env({"MEDSAM2_WARMUP": "0", "MEDSAM2_HELD_VOLUMES_MB": "0"}),
                      ModelRegistry({engine.info.name: engine}, engine.info.name))
    first = {"id": 1, "prompts": [{"slice": 3, "box": [4, 4, 12, 12]}]}
    (answer,) = json.loads(dumps(score_body(service, volume_body(phantom, [first], mask_format=["rle"]))))
    engine.calls.clear()
    both = {"id": 1, "prompts": [{"slice": 3, "box": [4, 4, 12, 12]}, {"slice": 9, "box": [16, 16, 24, 24]}]}
    (result,) = json.loads(dumps(score_body(service, volume_body(phantom, [both], mask_format=["rle"], previous_mask=[answer["mask"]]))))
    # slice 3's box is in the earlier answer: its walk stops at its first step (one call, no way down);
    # slice 9 is new and walks both ways
    assert sorted(engine.calls) == [(3, False), (9, False), (9, True)]
    assert result["metadata"]["changed_slices"] == [8, 9, 10]
    assert np.array_equal(labels_of(result)[2:5] > 0, labels_of(answer)[2:5] > 0)


def test_a_correction_overwrites_only_its_neighbours_where_the_earlier_answer_has_foreground(phantom):
    engine = ReachEngine(reach=12)
    earlier = np.zeros(SHAPE, np.uint8)
    earlier[:, 20:28, 20:28] = 1  # the earlier answer: another box on every slice but the last two
    earlier[10:] = 0
    obj = {"id": 1, "prompts": [{"slice": 6, "box": [4, 4, 12, 12]}]}
    body = volume_body(phantom, [obj], mask_format=["rle"], previous_mask=[{"counts": rle_counts(earlier), "size": list(SHAPE)}],
                       stop_after_empty=[0])
    (result,) = json.loads(dumps(score_body(service_with(engine), body)))
    # slices 5 and 7 are overwritten (OVERWRITE_REACH = 1 each way); 4 and 8 and beyond keep the earlier answer
    assert result["metadata"]["changed_slices"] == [5, 6, 7]


class LeakEngine(ReachEngine):
    """The prompt box on the key slice; on every other slice a box that leaks over most of the slice."""

    def track(self, shape, *, key_index, box, reverse):
        self.calls.append((key_index, reverse))
        z = key_index
        while 0 <= z < shape[0]:
            yield z, box_logits(shape[1:], box if z == key_index else [0, 0, 30, 30])
            z += -1 if reverse else 1


def earlier_answer(slices, box):
    earlier = np.zeros(SHAPE, np.uint8)
    x0, y0, x1, y1 = box
    earlier[slices, y0 : y1 + 1, x0 : x1 + 1] = 1
    return {"counts": rle_counts(earlier), "size": list(SHAPE)}, earlier


def test_a_neighbour_keeps_the_earlier_mask_when_that_continues_the_corrected_slice_better(phantom):
    previous, earlier = earlier_answer(slice(2, 10), [4, 4, 12, 12])
    obj = {"id": 1, "prompts": [{"slice": 6, "box": [5, 5, 13, 13]}]}
    body = volume_body(phantom, [obj], mask_format=["rle"], previous_mask=[previous])
    (result,) = json.loads(dumps(score_body(service_with(LeakEngine()), body)))
    labels = labels_of(result)
    # the leaking neighbours (Dice 0.3 with the corrected slice) lose to the earlier masks (Dice 0.77)
    assert result["metadata"]["changed_slices"] == [6]
    assert np.array_equal(labels[6] > 0, box_logits(SHAPE[1:], [5, 5, 13, 13]) > 0)
    for z in (5, 7):
        assert np.array_equal(labels[z], earlier[z]), z


def test_a_correction_on_a_small_end_slice_leaves_the_larger_slices_inwards_of_it(phantom):
    # the earlier answer: a large box on slices 0-8; the correction: a small box on its end slice 0. The
    # walk's mask on slice 1 is the small box again (a box grown from a small end slice under-segments
    # inwards); the earlier large mask fits between slice 0's small one and slice 2's large one better.
    previous, earlier = earlier_answer(slice(0, 9), [4, 4, 15, 15])
    obj = {"id": 1, "prompts": [{"slice": 0, "box": [8, 8, 11, 11]}]}
    body = volume_body(phantom, [obj], mask_format=["rle"], previous_mask=[previous])
    (result,) = json.loads(dumps(score_body(service_with(ReachEngine(reach=12)), body)))
    assert result["metadata"]["changed_slices"] == [0]
    assert np.array_equal(labels_of(result)[1:], earlier[1:])


def test_a_correction_extends_the_answer_only_past_an_end_it_moves(phantom):
    engine = ReachEngine(reach=12)
    service = service_with(engine)
    obj = {"id": 1, "prompts": [{"slice": 6, "box": [5, 5, 13, 13]}]}
    # the earlier answer ends right before the corrected slice: the end moves to it, no further (the engine would
    # go on to the volume's edge)
    previous, _ = earlier_answer(slice(2, 6), [4, 4, 12, 12])
    (moved,) = json.loads(dumps(score_body(service, volume_body(phantom, [obj], mask_format=["rle"], previous_mask=[previous]))))
    assert moved["metadata"]["changed_slices"] == [5, 6]
    # it ends three slices before (2-3, then 4 and 5 empty): the gap is filled, and the walk goes on as far again
    previous, _ = earlier_answer(slice(2, 4), [4, 4, 12, 12])
    (far,) = json.loads(dumps(score_body(service, volume_body(phantom, [obj], mask_format=["rle"], previous_mask=[previous]))))
    assert far["metadata"]["changed_slices"] == [3, 4, 5, 6, 7, 8]
    # the earlier answer ends at the corrected slice: the walk stops there, as the earlier one did
    previous, _ = earlier_answer(slice(2, 7), [4, 4, 12, 12])
    (at_end,) = json.loads(dumps(score_body(service, volume_body(phantom, [obj], mask_format=["rle"], previous_mask=[previous]))))
    assert at_end["metadata"]["changed_slices"] == [5, 6]
    # the earlier answer goes on one slice past it: that slice is overwritten, and the empty ones after it stay empty
    previous, _ = earlier_answer(slice(2, 8), [4, 4, 12, 12])
    (inside,) = json.loads(dumps(score_body(service, volume_body(phantom, [obj], mask_format=["rle"], previous_mask=[previous]))))
    assert inside["metadata"]["changed_slices"] == [5, 6, 7]
    assert not labels_of(inside)[8:].any()
