"""The 3D Slicer nnInteractive plugin's protocol, driven by nninteractive-client's own session class (the plugin's
wire code) against the interactive server on a real uvicorn on loopback, with the real LiteMedSAM."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest
from nnInteractive.inference.remote import (
    ServerAtCapacityError,
    SessionExpiredError,
    nnInteractiveRemoteInferenceSession,
)
from nnInteractive.inference.remote.serialization import pack_array
from pydantic import SecretStr

from medsam2_endpoint.api.samapi import create_app
from medsam2_endpoint.base.budget import Budget
from medsam2_endpoint.core.background import DONE, GONE
from medsam2_endpoint.core.interactive3d import SegmentSession
from medsam2_endpoint.core.registry import ModelRegistry
from medsam2_endpoint.core.service import Service
from medsam2_endpoint.core.sessions import SessionLimits, SessionStore
from medsam2_endpoint.engines.base import LITE_NAME
from medsam2_endpoint.pipeline.propagate import PropagationOptions
from medsam2_endpoint.pipeline.views import (
    box_in_view,
    from_view,
    shrink_rows,
    stretch_rows,
    to_view,
    view_rows,
)
from medsam2_endpoint.pipeline.window import CT_BONE, CT_SOFT_TISSUE, window_to_uint8
from medsam2_endpoint.testing.metrics import dice
from medsam2_endpoint.testing.phantoms import ct_phantom
from test_samapi import live

KEY = "slicer-test-key"


def lite_service(service: Service, **changes) -> Service:
    """The session's engines, LiteMedSAM as the served default (a fresh install), with changed settings."""
    registry = ModelRegistry({LITE_NAME: service.registry.get(LITE_NAME)}, LITE_NAME)
    return Service(service.settings.model_copy(update=changes), registry)


@pytest.fixture(scope="module")
def app(service):
    return create_app(lite_service(service, nninteractive_token=SecretStr(KEY), nninteractive_max_sessions=2,
                                   nninteractive_prediction_s=1e6))  # answers independent of the machine's load


@pytest.fixture(scope="module")
def url(app):
    with live(app) as base:
        yield base.replace("/sam/", "/nninteractive")


@pytest.fixture(scope="module")
def phantom():
    return ct_phantom((10, 48, 48), seed=11)  # as test_interactive_models: its slice features are cached already


@pytest.fixture
def session(url, phantom):
    """A claimed session holding the phantom (int16 HU, spacing only, as the plugin sends it)."""
    s = nnInteractiveRemoteInferenceSession(url, api_key=KEY)
    image = phantom.array()
    s.set_image(image[None], {"spacing": list(phantom.image.GetSpacing())[::-1]})
    s.set_target_buffer(np.zeros(image.shape, np.uint8))
    yield s
    s.close()


def truth_of(phantom) -> np.ndarray:
    return phantom.labels == phantom.lesions[0].label


def axial_box(phantom, k: int | None = None) -> list[list[int]]:
    les = phantom.lesions[0]
    k = les.key_slice if k is None else k
    x0, y0, x1, y1 = les.bbox
    return [[k, k + 1], [y0, y1 + 1], [x0, x1 + 1]]


def test_claim_and_capabilities_come_from_the_model(url, session, phantom):
    assert session.supported_interactions == {"points": False, "bbox2d": True, "bbox3d": True, "lasso": True, "scribble": False}
    assert session.supports_initial_label and session.supports_undo and session.license
    assert session.original_image_shape == (1, *phantom.labels.shape)
    assert session.idle_timeout_seconds > 0 and session.liveness_timeout_seconds > 0
    assert session.ping() and 0 < session.heartbeat() <= session.idle_timeout_seconds


def test_axial_box_walks_and_answers_the_changed_sub_box(session, phantom):
    truth = truth_of(phantom)
    session.add_bbox_interaction(axial_box(phantom), include_interaction=True)
    assert dice(session.target_buffer > 0, truth) > 0.7
    bbox = session._last_paste_bbox
    nz = np.argwhere(session.target_buffer)
    assert bbox == [[int(nz[:, a].min()), int(nz[:, a].max()) + 1] for a in range(3)]
    # the window the server chose for int16 HU is in X-Meta; a box that changes nothing answers bbox null
    resp = session._http.post("/add_bbox_interaction", json={"bbox_coords": axial_box(phantom), "include_interaction": True})
    meta = json.loads(resp.headers["X-Meta"])
    assert meta["window"] == [-160.0, 240.0] and meta["ran_prediction"] is True and meta["partial"] is False
    assert meta["bbox"] is None and resp.content == b""


def test_views_reslice_and_come_back():
    volume = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    for axis, shape in ((0, (2, 3, 4)), (1, (3, 2, 4)), (2, (4, 2, 3))):
        view = to_view(volume, axis)
        assert view.shape == shape and np.array_equal(from_view(view, axis), volume)
    # a box drawn on coronal slice j=1 (rows k, columns i) and on sagittal slice i=3 (rows k, columns j)
    assert (lambda z, b: (z, b.tolist()))(*box_in_view([[0, 2], [1, 2], [1, 3]], 1)) == (1, [1, 0, 3, 2])
    assert (lambda z, b: (z, b.tolist()))(*box_in_view([[1, 2], [0, 3], [3, 4]], 2)) == (3, [0, 1, 3, 2])
    assert to_view(volume, 1)[1][0, 2] == volume[0, 1, 2] and to_view(volume, 2)[3][1, 0] == volume[1, 0, 3]


def test_views_of_thick_slices_are_stretched_to_their_physical_aspect_and_answers_come_back():
    shape = (10, 64, 80)  # 5 mm slices under 1 x 0.5 mm pixels
    assert view_rows(shape, [5.0, 1.0, 0.5], 0) == 10
    assert view_rows(shape, [5.0, 1.0, 0.5], 1) == 80  # coronal: k against i (0.5 mm): x10, capped at the width 80
    assert view_rows(shape, [5.0, 1.0, 0.5], 2) == 50  # sagittal: k against j (1 mm): x5
    assert view_rows(shape, [1.1, 1.0, 1.0], 1) == 10 and view_rows(shape, None, 1) == 10  # near-isotropic, unknown
    labels = np.zeros((3, 10, 7), np.uint8)
    labels[:, 4:7, 2:5] = 1
    tall = stretch_rows(labels, 50, labels=True)
    assert tall.shape == (3, 50, 7) and tall[:, 20:35].all(axis=1).any() and not tall[:, :19].any()
    assert np.array_equal(shrink_rows(tall, 10), labels)  # every row comes back from its centre
    ramp = np.repeat(np.arange(10, dtype=np.uint8)[None, :, None] * 20, 2, axis=0)
    smooth = stretch_rows(ramp, 40)[0, :, 0]
    assert smooth[0] == 0 and smooth[-1] == 180 and np.all(np.diff(smooth.astype(int)) >= 0)  # linear, monotone


def test_coronal_box_walks_along_j(session, phantom):
    """A box drawn in the coronal view (flat along j); sagittal runs the same code along i (test above)."""
    truth = truth_of(phantom)
    for axis in (1,):
        session.reset_interactions()
        at = int(np.argmax(truth.sum(axis=tuple(a for a in range(3) if a != axis))))
        plane = np.take(truth, at, axis=axis)
        rows, cols = np.nonzero(plane)
        box: list[list[int]] = [[at, at + 1]] * 3
        first, second = (a for a in range(3) if a != axis)
        box[first], box[second] = [int(rows.min()), int(rows.max()) + 1], [int(cols.min()), int(cols.max()) + 1]
        session.add_bbox_interaction(box, include_interaction=True)
        got = session.target_buffer > 0
        assert np.take(got, at, axis=axis).any(), f"axis {axis}: nothing on the drawn slice"
        assert dice(got, truth) > 0.4, f"axis {axis}"


def test_lasso_is_its_slice_as_drawn_and_seeds_the_walk(session, phantom):
    truth = truth_of(phantom)
    k = phantom.lesions[0].key_slice
    ys, xs = np.nonzero(truth[k])
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = truth[k, y0:y1, x0:x1].astype(np.uint8)[None]
    session.add_lasso_interaction(crop, include_interaction=True, interaction_bbox=[[k, k + 1], [y0, y1], [x0, x1]])
    got = session.target_buffer > 0
    assert np.array_equal(got[k], truth[k])
    assert got[k - 1].any() and got[k + 1].any() and dice(got, truth) > 0.7


def test_negative_box_erases_its_region_on_its_slice(session, phantom):
    session.add_bbox_interaction(axial_box(phantom), include_interaction=True)
    before = session.target_buffer.copy()
    k = phantom.lesions[0].key_slice + 1
    assert before[k].any()
    session.add_bbox_interaction([[k, k + 1], [0, 48], [0, 48]], include_interaction=False)
    after = session.target_buffer
    assert not after[k].any()
    others = np.ones(len(after), bool)
    others[k] = False
    assert np.array_equal(after[others], before[others])
    x, y = phantom.lesions[0].bbox[:2]  # a box one voxel wide along every axis is an axial one
    session.add_bbox_interaction([[k - 1, k], [y, y + 1], [x, x + 1]], include_interaction=False)


def test_initial_segment_then_box_then_undo(session, phantom):
    truth = truth_of(phantom).astype(np.uint8)
    zs = np.flatnonzero(truth.any(axis=(1, 2)))
    seed = np.zeros_like(truth)
    seed[zs[1]:zs[-1]] = truth[zs[1]:zs[-1]]
    session.reset_interactions()
    session.add_initial_seg_interaction(seed, run_prediction=False)
    assert np.array_equal(session.target_buffer, seed)
    session.add_bbox_interaction(axial_box(phantom, int(zs[0])), include_interaction=True)
    assert session.target_buffer[zs[0]].any()
    assert session.undo() is True
    assert np.array_equal(session.target_buffer, seed)
    session.undo()  # the seed itself
    assert not session.target_buffer.any()
    assert session.undo() is False  # nothing left


def test_points_and_scribbles_are_refused_naming_the_model(session, phantom):
    for call in (lambda: session.add_point_interaction([5, 24, 24], include_interaction=True),
                 lambda: session.add_scribble_interaction(np.ones((1, 2, 2), np.uint8), include_interaction=True,
                                                          interaction_bbox=[[5, 6], [24, 26], [24, 26]])):
        with pytest.raises(httpx.HTTPStatusError) as err:
            call()
        assert err.value.response.status_code == 400 and LITE_NAME in err.value.response.json()["error"]


def test_leases_released_full_and_keyed(url):
    first = nnInteractiveRemoteInferenceSession(url, api_key=KEY)
    token = first._lease_token
    second = nnInteractiveRemoteInferenceSession(url, api_key=KEY)
    with pytest.raises(ServerAtCapacityError):
        nnInteractiveRemoteInferenceSession(url, api_key=KEY)
    full = httpx.post(url + "/claim", headers={"Authorization": f"Bearer {KEY}"})
    assert full.status_code == 503 and int(full.headers["Retry-After"]) >= 1
    first.close()
    gone = httpx.post(url + "/heartbeat", headers={"Authorization": f"Bearer {KEY}", "X-Lease-Token": token})
    assert gone.status_code == 410
    second.close()
    with pytest.raises(httpx.HTTPStatusError) as err:
        nnInteractiveRemoteInferenceSession(url, api_key="wrong")
    assert err.value.response.status_code == 401
    assert httpx.get(url + "/healthz").status_code == 200  # the plugin's connection test needs no lease


def test_idle_sessions_are_reaped(service):
    app = create_app(lite_service(service, nninteractive_idle_s=0.6, nninteractive_liveness_s=30.0))
    with live(app) as base:
        url = base.replace("/sam/", "/nninteractive")
        s = nnInteractiveRemoteInferenceSession(url)
        time.sleep(0.4)
        s.heartbeat()  # liveness only: the idle clock goes on
        time.sleep(1.0)
        with pytest.raises(SessionExpiredError):
            s.heartbeat()
        s.close()


def test_store_reaps_silent_leases_and_caps_bytes():
    now = [0.0]

    class Payload:
        nbytes = 100

    store = SessionStore(SessionLimits(max_sessions=3, max_bytes=250, idle_s=100, liveness_s=10), Payload,
                         clock=lambda: now[0])
    a, b = store.claim(), store.claim()
    store.make_room(b.payload, 150, field_name="x")  # 100 held by a: 250 fits
    with pytest.raises(Exception) as err:
        store.make_room(b.payload, 151, field_name="x")
    assert getattr(err.value, "code", "") == "busy"
    now[0] = 5.0
    store.get(a.token, action=False)  # a heartbeat keeps a alive
    now[0] = 12.0
    assert store.reap() == 1 and len(store) == 1
    with pytest.raises(Exception) as gone:
        store.get(b.token)
    assert getattr(gone.value, "code", "") == "lease_gone"


def test_held_volumes_and_leases_share_one_store_without_taking_each_others_room():
    """The JSON route's volume_id and 3D Slicer's leases live in one store; a re-sendable held volume never
    takes a lease's room, and filling the leases' bytes evicts no held volume."""
    from medsam2_endpoint.io.volume import Volume

    class Payload:
        nbytes = 0

    store = SessionStore(SessionLimits(max_sessions=2, max_bytes=300, held_bytes=2 * 4 * 8 * 8 * 2), Payload)
    volumes = [Volume(np.full((4, 8, 8), v, np.int16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
               for v in (1, 2)]
    ids = [store.hold(v) for v in volumes]
    lease = store.claim()
    store.make_room(lease.payload, 300, field_name="set_image")  # the held volumes count nothing against it
    lease.payload.nbytes = 300
    assert [store.held(i, field="f").array[0, 0, 0] for i in ids] == [1, 2] and store.held_volumes() == 2
    with pytest.raises(Exception) as full:
        store.make_room(store.claim().payload, 1, field_name="set_image")
    assert getattr(full.value, "code", "") == "busy"


def test_the_service_has_one_store_for_the_json_route_and_slicer(service):
    from medsam2_endpoint.core.slicer import SlicerSessions

    own = lite_service(service)
    assert SlicerSessions(own).store is own.sessions


def test_capabilities_follow_the_default_model(service):
    """With MedSAM2 weights served (the fixture's random checkpoint is the default), points are advertised."""
    from medsam2_endpoint.core.slicer import SlicerSessions

    caps = SlicerSessions(service).capabilities()
    assert service.default != LITE_NAME and caps["supported_interactions"]["points"] is True
    assert caps["model"]["name"] == service.default


def test_a_walk_out_of_time_answers_what_it_reached(service, phantom):
    """Past MEDSAM2_NNINTERACTIVE_PREDICTION_S the walk stops and says so in X-Meta; the key slice is answered."""
    with live(create_app(lite_service(service, nninteractive_prediction_s=1e-6))) as base:
        s = nnInteractiveRemoteInferenceSession(base.replace("/sam/", "/nninteractive"))
        image = phantom.array()
        s.set_image(image[None], {"spacing": [2.5, 0.8, 0.8]})
        s.set_target_buffer(np.zeros(image.shape, np.uint8))
        resp = s._http.post("/add_bbox_interaction", json={"bbox_coords": axial_box(phantom), "include_interaction": True})
        meta = json.loads(resp.headers["X-Meta"])
        assert meta["partial"] is True and "MEDSAM2_NNINTERACTIVE_PREDICTION_S" in meta["not_done"]
        k = phantom.lesions[0].key_slice
        assert meta["bbox"][0][0] <= k < meta["bbox"][0][1] and meta["slices_processed"] <= 4
        s.close()


# ------------------------------------------------------------------------------------ background encoding
# Each test its own three-slice volume that no other test encodes, so the shared engine's cache holds none of its
# slices before; the runs are awaited (a hang guard, not a timing assertion).
DISC_BOX = [[1, 2], [9, 24], [9, 24]]  # the disc's box on the middle slice


def disc_volume(seed: int) -> np.ndarray:
    """uint8 (3, 32, 32): noise, and a bright disc through every slice (uint8: the server windows it min-max)."""
    volume = np.random.default_rng(seed).integers(20, 60, size=(3, 32, 32), dtype=np.uint8)
    yy, xx = np.mgrid[:32, :32]
    volume[:, (yy - 16) ** 2 + (xx - 16) ** 2 <= 36] = 200
    return volume


def wait_for(condition, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.02)


def test_set_image_encodes_the_slices_in_the_background(url, app):
    """After set_image every axial slice is in the engine's feature cache under the session's volume key (the JSON
    route's key of the same voxels), so the first box walks without encoding a slice itself."""
    slicer = app.state.slicer
    volume = disc_volume(41)
    s = nnInteractiveRemoteInferenceSession(url, api_key=KEY)
    try:
        s.set_image(volume[None])
        run = slicer.encoder.latest
        assert run is not None and run.wait(300) and (run.reason, run.cached) == (DONE, 3)
        session = slicer.store.get(s._lease_token).payload
        features = slicer.service.registry.get(LITE_NAME).features
        assert all((session.volume_key, z) in features for z in range(3))
        s.set_target_buffer(np.zeros(volume.shape, np.uint8))
        s.add_bbox_interaction(DISC_BOX, include_interaction=True)
        assert s.target_buffer[1].any()
        assert session.states[0].encoder_calls == 0  # every slice the walk visited was cached
    finally:
        s.close()


def test_a_new_image_or_the_release_ends_the_background_run(url, app):
    """While a request holds the model's slot the runs wait and encode nothing; a second set_image ends the first
    run, the release the second; neither volume's slices reach the cache."""
    slicer = app.state.slicer
    s = nnInteractiveRemoteInferenceSession(url, api_key=KEY)
    features = slicer.service.registry.get(LITE_NAME).features
    try:
        with slicer.service.slots.hold(LITE_NAME):  # a request computing
            s.set_image(disc_volume(42)[None])
            old = slicer.encoder.latest
            old_key = slicer.store.get(s._lease_token).payload.volume_key
            wait_for(lambda: old.yielded > 0, "the first run to meet the busy slot")
            s.set_image(disc_volume(43)[None])
            new = slicer.encoder.latest
            assert new is not old and old.wait(60) and (old.reason, old.cached) == ("a new image", 0)
            new_key = slicer.store.get(s._lease_token).payload.volume_key
            wait_for(lambda: new.yielded > 0, "the second run to meet the busy slot")
            s.close()  # the release
            assert new.wait(60) and (new.reason, new.cached) == (GONE, 0)
        assert not any((key, z) in features for key in (old_key, new_key) for z in range(3))
    finally:
        s.close()


def test_a_box_right_after_set_image_is_answered(url, app):
    """The box does not wait for the background run: it takes the slot, the run waits, and both finish."""
    slicer = app.state.slicer
    volume = disc_volume(44)
    s = nnInteractiveRemoteInferenceSession(url, api_key=KEY)
    try:
        resp = s._http.post("/set_image", content=pack_array(volume[None]), headers={"X-Meta": "{}"})
        assert resp.json()["background_encoding"] is True
        run = slicer.encoder.latest
        s.set_target_buffer(np.zeros(volume.shape, np.uint8))
        s.add_bbox_interaction(DISC_BOX, include_interaction=True)
        assert s.target_buffer[1].any()
        assert run is not None and run.wait(300) and run.reason == DONE
    finally:
        s.close()


def test_each_objects_first_prompt_on_a_ct_picks_soft_tissue_or_bone():
    """Raw HU without a window: soft tissue at set_image; an object's first prompt drawn on dense bone switches to the
    bone window, one drawn on soft tissue back (both windowed volumes held)."""
    raw = np.full((6, 40, 40), -1000, np.int16)  # air
    raw[:, 4:20, 4:36] = 50  # soft tissue
    raw[:, 24:36, 10:30] = 200  # cancellous bone around a dense cortex
    raw[:, 26:34, 12:28] = 700
    soft, bone = (slice(2, 3), slice(4, 20), slice(4, 36)), (slice(2, 3), slice(24, 36), slice(10, 30))
    session = SegmentSession()
    session.set_image(raw, None, "lite-medsam")
    soft_image, soft_key = session.image, session.volume_key
    assert session.window == CT_SOFT_TISSUE and not session.settle_window(soft)
    assert session.settle_window(bone)
    assert session.window == CT_BONE and "bone window" in session.window_reason and session.volume_key != soft_key
    assert np.array_equal(session.image, window_to_uint8(raw, CT_BONE))
    assert session.nbytes == 3 * raw.size  # both windows and the label map
    assert session.settle_window(soft) and session.window == CT_SOFT_TISSUE
    assert session.image is soft_image and session.volume_key == soft_key
    mr = SegmentSession()
    mr.set_image((raw + 1000).astype(np.int16), None, "lite-medsam")  # no air-to-bone HU range: MR-like, no choice
    assert mr.bone is None and not mr.settle_window(bone)


def test_an_objects_first_lasso_on_medsam2_is_a_mask_prompt(service, phantom):
    """MedSAM2 starts the walk from the lasso itself (`track_mask`, its `add_new_mask`); LiteMedSAM from its box."""
    from medsam2_endpoint.core.interactive3d import Pacing, Pin
    from medsam2_endpoint.engines.base import SlicePrompt

    medsam2 = service.registry.get(service.default)
    truth = truth_of(phantom)
    k = phantom.lesions[0].key_slice
    ys, xs = np.nonzero(truth[k])
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    seen: list[np.ndarray] = []
    original = medsam2.track_mask

    def recording(state, *, key_index, mask, reverse):
        seen.append(mask)
        return original(state, key_index=key_index, mask=mask, reverse=reverse)

    medsam2.track_mask = recording
    try:
        for engine in (medsam2, service.registry.get(LITE_NAME)):
            session = SegmentSession()
            session.set_image(phantom.array(), None, engine.info.name)
            calls = len(seen)
            session.walk(engine, 0, SlicePrompt(k, box=box), pacing=Pacing(1e6), budget=Budget.unlimited(),
                         pin=Pin(0, k, truth[k], 1), lasso=truth[k], options=PropagationOptions(max_slices=2))
            assert np.array_equal(session.labels[k] > 0, truth[k])  # the lasso's slice as drawn, both models
            assert len(seen) - calls == (2 if engine is medsam2 else 0)  # MedSAM2: up and down from the mask
        assert all(np.array_equal(m, truth[k]) for m in seen)
    finally:
        del medsam2.track_mask
