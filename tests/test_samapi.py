"""The samapi server, driven like the QuPath SAM extension drives it, on a real uvicorn on a loopback port.

Bodies are shaped as the extension's Gson output: fields in its class order, nulls omitted, integer
pixel coordinates, background points first, `Content-Type: application/json; charset=utf-8`.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
import uvicorn
from pydantic import SecretStr

from medsam2_endpoint import __version__
from medsam2_endpoint.api.samapi import VERSION_TEXT, create_app
from medsam2_endpoint.core import registration
from medsam2_endpoint.core.registry import ModelRegistry
from medsam2_endpoint.core.service import Service
from medsam2_endpoint.core.settings import Settings
from medsam2_endpoint.io.polygons import geometry_area, mask_to_parts
from medsam2_endpoint.pipeline.prompt2d import Prompt2D
from medsam2_endpoint.testing.phantoms import ct_phantom
from test_polygons import covered
from test_prompt2d import LITE, MEDSAM2, phantom_slice, png_b64

HEADERS = {"accept": "application/json", "Content-Type": "application/json; charset=utf-8"}


@contextlib.contextmanager
def live(app) -> Iterator[str]:
    """Serve `app` with uvicorn on a free loopback port; yields the base URL QuPath would use."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/sam/"
    finally:
        server.should_exit = True
        thread.join(30)


def post(endpoint: str, /, **fields) -> requests.Response:
    """POST fields in the given order, nulls omitted (Gson's defaults)."""
    body = json.dumps({k: v for k, v in fields.items() if v is not None})
    return requests.post(endpoint, data=body.encode(), headers=HEADERS, timeout=300)


def with_settings(service: Service, *, registry: ModelRegistry | None = None, **changes) -> Service:
    """A Service with changed settings over the same registry (or another), sharing the 2D embedding cache."""
    other = Service(service.settings.model_copy(update=changes), registry or service.registry)
    other.prompter = service.prompter if registry is None else other.prompter
    return other


@pytest.fixture(scope="module")
def base(service, tmp_path_factory) -> Iterator[str]:
    with live(create_app(with_settings(service, samapi_weights_dir=tmp_path_factory.mktemp("samapi-weights")))) as url:
        yield url


def rgb_png(grey: np.ndarray, mode: str = "RGB") -> str:
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "RGBA":
        return png_b64(np.concatenate([rgb, np.full(grey.shape + (1,), 200, np.uint8)], axis=2))
    if mode == "L":
        return png_b64(grey)
    return png_b64(rgb)


def expected_mask(service, name: str, grey: np.ndarray, **prompt) -> np.ndarray:
    result = service.prompter.segment(name, np.repeat(grey[:, :, None], 3, axis=2), Prompt2D(**prompt))
    return result.masks[0].mask


def test_version_weights_and_progress(base):
    answer = requests.get(base + "version/", timeout=30)
    assert answer.text == VERSION_TEXT == f"0.7.1+medsam2-endpoint.{__version__}"
    assert answer.headers["X-MedSAM2-Version"] == __version__ and answer.headers["X-Samapi-Protocol-Version"] == "0.7.1"
    listed = requests.get(base + "weights/", timeout=30).json()
    assert {"type": "vit_t", "name": LITE, "url": f"local://{LITE}"} in listed
    assert {"type": "sam2_t", "name": MEDSAM2, "url": f"local://{MEDSAM2}"} in listed
    for sam_type in ("vit_t", "sam2_t"):
        assert requests.get(base + "weights/", params={"type": sam_type}, timeout=30).json(), "never empty for an available type"
    missing = requests.get(base + "weights/", params={"type": "vit_h"}, timeout=30)
    assert missing.status_code == 404
    assert missing.json() == {
        "error": f"type: vit_h is not available on this server; available types: vit_t ({LITE}); sam2_t ({MEDSAM2})", "status": 404, "code": "not_found",
    }
    assert requests.get(base + "weights/", params={"type": "sam9"}, timeout=30).status_code == 400
    assert requests.get(base + "progress/", timeout=30).json() == {"message": None, "percent": -1}


def test_version_is_a_version_clients_can_compare(base):
    """Clients parse version/ as a version: the protocol's comes first, the package's is build metadata."""
    from packaging.version import Version

    assert Version(requests.get(base + "version/", timeout=30).text).public == "0.7.1"


def test_sam3_is_an_unserved_type_like_any_other(base):
    """samapi 0.7.1's sam3 type and routes, with the bodies the extension (v0.9.1) sends for them."""
    grey, _, _ = phantom_slice()
    listed = requests.get(base + "weights/?type=sam3", timeout=30)
    assert listed.status_code == 404
    assert listed.json()["error"] == f"type: sam3 is not available on this server; available types: vit_t ({LITE}); sam2_t ({MEDSAM2})"
    assert all(w["type"] != "sam3" for w in requests.get(base + "weights/", timeout=30).json())
    # SAM3DetectionTask's body (SAM3PromptParameters, Gson order, nulls left out)
    prompt = post(base + "sam3/", type="sam3", b64img=rgb_png(grey), text_prompt="disk", positive_bboxes=[[10, 10, 40, 40]],
                  negative_bboxes=[], reset_prompts=False, confidence_threshold=0.4)
    assert prompt.status_code == 404 and prompt.json()["code"] == "not_found"
    assert prompt.json()["error"].startswith(f"sam3/: SAM 3 (type sam3) is not available on this server; available types: vit_t ({LITE})")
    video = post(base + "sam3video/", type="sam3", dirname="d-1", axes="XYZ", plane_position=0,
                 objs={"0": [{"obj_id": 0, "text": "visual", "positive_bboxes": [[100, 70, 100, 100]]}]})
    assert video.status_code == 404 and video.json()["error"].startswith("sam3video/: SAM 3 (type sam3) is not available")
    same_route = post(base, type="sam3", bbox=[1, 1, 20, 20], b64img=rgb_png(grey), multimask_output=False)
    assert same_route.status_code == 404 and "available types: vit_t" in same_route.json()["error"]
    nowhere = requests.get(base + "nothing/", timeout=30).json()
    assert nowhere["status"] == 404 and "samapi routes (under /sam/): GET version/" in nowhere["error"]


@pytest.mark.parametrize(("sam_type", "name"), [("vit_t", LITE), ("sam2_t", MEDSAM2)])
def test_box_past_the_field_of_view_is_clipped_as_sam_does(base, service, sam_type, name):
    """The extension sends the drawn rectangle unclipped (SAMDetectionTask): past the right, then the left edge."""
    grey, truth, box = phantom_slice()
    height, width = grey.shape
    x0, y0, x1, y1 = (int(v) for v in box)
    for sent, used in (([x0, y0, width + 16, y1], [x0, y0, width, y1]), ([-24, y0, x1, y1], [0, y0, x1, y1])):
        response = post(base, type=sam_type, bbox=sent, b64img=rgb_png(grey), multimask_output=False,
                        checkpoint_url=f"local://{name}")
        assert response.status_code == 200, response.text
        features = response.json()
        assert features and all(f["properties"]["bbox_clipped_to"] == used for f in features)
        mask = expected_mask(service, name, grey, box=np.array(used, float))
        assert geometry_area(features[0]["geometry"]) == mask.sum()
    inside = post(base, type=sam_type, bbox=list(box), b64img=rgb_png(grey), multimask_output=False).json()
    assert all("bbox_clipped_to" not in f["properties"] for f in inside)
    gone = post(base, type=sam_type, bbox=[width + 5, y0, width + 40, y1], b64img=rgb_png(grey))
    assert gone.status_code == 400 and "is outside the image of 128 x 96 pixels" in gone.json()["error"]


def test_box_prompt_with_vit_t(base, service):
    grey, truth, box = phantom_slice()
    response = post(base, type="vit_t", bbox=list(box), b64img=rgb_png(grey), multimask_output=False)
    assert response.status_code == 200
    (feature,) = response.json()
    assert feature["type"] == "Feature"
    assert feature["properties"]["object_idx"] == 0 and feature["properties"]["label"] == "object"
    assert feature["properties"]["sam_model"] == "vit_t" and 0 < feature["properties"]["quality"] <= 1
    mask = expected_mask(service, LITE, grey, box=np.array(box, float))
    assert 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) > 0.9
    assert geometry_area(feature["geometry"]) == mask.sum()  # pixel corners: no half-pixel shrink
    assert post(base, type="vit_t", bbox=list(box), b64img=rgb_png(grey), checkpoint_url=f"local://{LITE}").status_code == 200
    unknown = post(base, type="vit_t", bbox=list(box), b64img=rgb_png(grey), checkpoint_url="https://e.org/w.pt?sig=SECRET")
    assert unknown.status_code == 404 and "SECRET" not in unknown.text and "local://lite-medsam" in unknown.json()["error"]


def test_grey_and_rgba_pngs_give_the_same_answer(base):
    grey, _, box = phantom_slice()
    answers = [post(base, type="vit_t", bbox=list(box), b64img=rgb_png(grey, mode)).json() for mode in ("RGB", "L", "RGBA")]
    assert answers[0] == answers[1] == answers[2]


def test_points_with_sam2_t_report_each_masks_own_quality(base, service):
    grey, _, _ = phantom_slice()
    points = [[4, 90], [58, 34]]  # one background point first, then the foreground click
    response = post(base, type="sam2_t", b64img=rgb_png(grey), point_coords=points, point_labels=[0, 1], multimask_output=True)
    features = response.json()
    prompter = service.prompter
    embedding, cached = prompter.embedding(MEDSAM2, np.repeat(grey[:, :, None], 3, axis=2))
    assert cached
    masks, ious, _ = prompter.image_engine(MEDSAM2).predict_2d(
        embedding, points=np.array(points, float), labels=np.array([0, 1]), multimask=True
    )
    expected = [i for i in range(3) if masks[i].any()]
    assert [f["properties"]["object_idx"] for f in features] == expected
    for f in features:
        i = f["properties"]["object_idx"]
        assert f["properties"]["quality"] == pytest.approx(ious[i], abs=1e-6)
        assert geometry_area(f["geometry"]) == masks[i].sum()


def test_holes_and_every_part_reach_the_client(base, service, monkeypatch):
    """Whatever the model returns travels as exact polygons: a ring with its hole, and a second part."""
    grey, _, box = phantom_slice()
    mask = np.zeros((96, 128), dtype=bool)
    mask[10:40, 10:50] = True
    mask[20:30, 20:30] = False
    mask[60:70, 90:120] = True

    def predict_2d(embedding, **prompt):
        return mask[None], np.array([0.77]), np.zeros((1, 256, 256), np.float32)

    monkeypatch.setattr(service.registry.get(LITE), "predict_2d", predict_2d)
    (feature,) = post(base, type="vit_t", bbox=list(box), b64img=rgb_png(grey)).json()
    geometry = feature["geometry"]
    assert geometry["type"] == "MultiPolygon" and sorted(len(p) for p in geometry["coordinates"]) == [1, 2]
    assert geometry_area(geometry) == mask.sum() == 30 * 40 - 100 + 300
    assert feature["properties"]["quality"] == pytest.approx(0.77)
    np.testing.assert_array_equal(covered(mask_to_parts(mask), 96, 128), mask)
    assert [10, 10] in geometry["coordinates"][0][0] or [10, 10] in geometry["coordinates"][1][0]  # pixel corners


def test_automask(base):
    grey, _, _ = phantom_slice()
    response = post(
        base + "automask/", type="sam2_t", b64img=rgb_png(grey), points_per_side=4, points_per_batch=64, pred_iou_thresh=0.0,
        stability_score_thresh=0.0, stability_score_offset=1.0, box_nms_thresh=0.7, crop_n_layers=0, crop_nms_thresh=0.7,
        crop_overlap_ratio=512 / 1500, crop_n_points_downscale_factor=1, min_mask_region_area=0,
        output_type="Multi-mask (all)", include_image_edge=True,
    )
    assert response.status_code == 200, response.text
    features = response.json()
    assert features and [f["properties"]["object_idx"] for f in features] == list(range(len(features)))
    assert all(geometry_area(f["geometry"]) > 0 and "quality" in f["properties"] for f in features)
    wrong = post(base + "automask/", type="sam2_t", b64img=rgb_png(grey), output_type="Multi-mask (biggest)")
    assert wrong.status_code == 400 and "output_type" in wrong.json()["error"]


def frames(z_values) -> tuple[list[np.ndarray], object]:
    phantom = ct_phantom((12, 96, 128), lesions=("ellipsoid",), seed=3)
    lo, hi = phantom.window
    values = np.clip(phantom.array().astype(np.float64), lo, hi)
    volume = np.uint8((values - values.min()) / (values.max() - values.min()) * 255.0)  # as phantom_slice
    return [volume[z] for z in z_values], phantom


def test_video_xyz_from_uploaded_jpeg_frames_with_two_objects(base):
    grey_frames, phantom = frames([5, 6, 7])
    lesion = phantom.lesions[0]
    for i, grey in enumerate(grey_frames):
        ok, jpeg = cv2.imencode(".jpg", grey, [cv2.IMWRITE_JPEG_QUALITY, 95])
        response = requests.post(base + "upload/", data={"dirname": "stack-1"}, files={"file": (f"{i}.jpg", jpeg.tobytes(), "image/jpeg")}, timeout=60)
        assert response.json() == {"filename": f"{i}.jpg"}
    objs = {"1": [{"obj_id": 0, "bbox": list(lesion.bbox)}], "0": [{"obj_id": 1, "bbox": [8, 8, 40, 30]}]}
    response = post(base + "video/", type="vit_t", dirname="stack-1", axes="XYZ", plane_position=3, objs=objs)
    assert response.status_code == 200, response.text
    features = response.json()
    planes = {(f["properties"]["object_idx"], f["geometry"]["plane"]["z"]) for f in features}
    assert (0, 1) in planes and (1, 0) in planes  # each object on its prompted frame
    assert all(f["geometry"]["plane"]["c"] == -1 and f["geometry"]["plane"]["t"] == 3 for f in features)
    assert all(f["properties"]["sam_model"] == "vit_t" and geometry_area(f["geometry"]) > 0 for f in features)
    gone = post(base + "video/", type="vit_t", dirname="stack-1", axes="XYZ", objs=objs)
    assert gone.status_code == 400 and "nothing was uploaded" in gone.json()["error"]


def test_video_xyt_inline_frames_with_points_and_box_on_sam2_t(base):
    grey_frames, phantom = frames([5, 6, 7])
    lesion = phantom.lesions[0]
    objs = {"1": [{"obj_id": 4, "point_coords": [[4, 90], [58, 34]], "point_labels": [0, 1]}], "2": [{"obj_id": 7, "bbox": list(lesion.bbox)}]}
    response = post(base + "video/", type="sam2_t", b64imgs=[png_b64(g) for g in grey_frames], axes="XYT", plane_position=5, objs=objs)
    assert response.status_code == 200, response.text
    features = response.json()
    assert features and {f["properties"]["object_idx"] for f in features} <= {4, 7}
    for f in features:
        plane = f["geometry"]["plane"]
        assert plane["c"] == -1 and plane["z"] == 5 and 0 <= plane["t"] < 3
        assert f["properties"]["object_idx"] in (4, 7)
    bad = post(base + "video/", type="sam2_t", b64imgs=[png_b64(g) for g in grey_frames], axes="XYT", objs={"5": [{"obj_id": 1, "bbox": [1, 1, 9, 9]}]})
    assert bad.status_code == 400 and bad.json()["error"].startswith("objs.5[0]: frame 5 is outside the 3 frames")


def test_upload_names_cannot_escape(base):
    refused = requests.post(base + "upload/", data={"dirname": "../outside"}, files={"file": ("0.jpg", b"x", "image/jpeg")}, timeout=30)
    assert refused.status_code == 400 and refused.json()["error"].startswith("dirname: '../outside' is not allowed")
    stripped = requests.post(base + "upload/", data={"dirname": "d"}, files={"file": ("../../../etc/evil.jpg", b"x", "image/jpeg")}, timeout=30)
    assert stripped.json() == {"filename": "evil.jpg"}  # reduced to its last component, kept in the private folder
    assert not Path("/etc/evil.jpg").exists()
    for name in ("..", ".hidden"):
        response = requests.post(base + "upload/", data={"dirname": "d"}, files={"file": (name, b"x", "image/jpeg")}, timeout=30)
        assert response.status_code == 400


def test_errors_are_json_with_the_field_named(base):
    grey, _, _ = phantom_slice()
    lite_points = post(base, type="vit_t", b64img=rgb_png(grey), point_coords=[[58, 34]], point_labels=[1])
    assert lite_points.status_code == 400
    assert lite_points.json()["error"] == f"point_coords: model {LITE} takes box prompts only; send a bbox instead, or choose a MedSAM2 model ({MEDSAM2})"
    outside = post(base, type="sam2_t", b64img=rgb_png(grey), point_coords=[[4, 90], [130, 5]], point_labels=[0, 1])
    assert outside.json()["error"].startswith("point_coords[1]: point (130, 5) is outside the image of 128 x 96 pixels")
    unavailable = post(base, type="sam2_l", b64img=rgb_png(grey), bbox=[1, 1, 20, 20])
    assert unavailable.status_code == 404 and "available types: vit_t" in unavailable.json()["error"]
    broken = requests.post(base, data=b"{not json", headers=HEADERS, timeout=30)
    assert broken.status_code == 400 and broken.json()["status"] == 400
    missing = post(base, type="vit_t", bbox=[1, 1, 20, 20])
    assert missing.json() == {"error": "body.b64img: required field is missing", "status": 400, "code": "invalid_request"}
    assert requests.get(base + "nothing/", timeout=30).json()["status"] == 404


def register(url: str, body: str) -> requests.Response:
    """POST weights/ as SAMRegisterWeightsTask does: Gson's SAMWeights (type, name, url), '=' escaped as \\u003d."""
    return requests.post(url + "weights/", data=body.replace("=", "\\u003d").encode(), headers=HEADERS, timeout=60)


def test_every_registration_outcome_is_a_200_message_the_extension_shows(base):
    """Any non-200 shows only "Registration request failed" in the extension (REFERENCE.md C2)."""
    off = register(base, '{"type":"sam2_t","name":"qupath_client_probe","url":"https://weights.example.org/medsam2/MedSAM2_custom.pt?a=b"}')
    assert off.status_code == 200 and off.headers["X-MedSAM2-Status"] == "403" and off.headers["X-MedSAM2-Code"] == "forbidden"
    assert off.text.startswith("Registration refused: weight registration is disabled on this server; the administrator can enable it")
    bad = register(base, '{"type":"vit_q","name":"x","url":"https://e.org/x.pt"}')
    assert bad.status_code == 200 and bad.headers["X-MedSAM2-Status"] == "400" and bad.text.startswith("Registration refused: type: Input should be")
    broken = requests.post(base + "weights/", data=b"{not json", headers=HEADERS, timeout=30)
    assert broken.status_code == 200 and broken.text.startswith("Registration refused: body: not valid JSON")


def test_slow_work_does_not_block_other_requests(base, service, monkeypatch):
    grey, _, box = phantom_slice()
    entered, release = threading.Event(), threading.Event()
    original = service.registry.get(LITE).predict_2d

    def slow_predict(*args, **kwargs):
        entered.set()
        release.wait(60)
        return original(*args, **kwargs)

    monkeypatch.setattr(service.registry.get(LITE), "predict_2d", slow_predict)
    answers = []
    worker = threading.Thread(target=lambda: answers.append(post(base, type="vit_t", bbox=list(box), b64img=rgb_png(grey))))
    worker.start()
    try:
        assert entered.wait(120)
        assert requests.get(base + "progress/", timeout=10).status_code == 200  # answered while the prompt is running
    finally:
        release.set()
        worker.join(120)
    assert answers[0].status_code == 200


def test_bearer_token(service, tmp_path):
    with live(create_app(with_settings(service, samapi_token=SecretStr("s3cret"), samapi_weights_dir=tmp_path))) as url:
        refused = requests.get(url + "version/", timeout=30)
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
        assert requests.get(url + "version/", headers={"Authorization": "Bearer s3cret"}, timeout=30).text == VERSION_TEXT
        assert requests.get(url + "version/", headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401


def test_weight_registration_https_only_cancellable_and_recorded(service, medsam2_checkpoint, tmp_path, monkeypatch):
    own = with_settings(service, registry=ModelRegistry(service.registry.snapshot(), service.default),  # grows this registry only
                        samapi_allow_weight_registration=True, samapi_weights_dir=tmp_path / "weights")
    settings = own.settings.samapi
    data = medsam2_checkpoint.read_bytes()
    hold = threading.Event()

    def fake_fetch(url, policy, *, field="url", **kwargs):
        assert policy.allow_http is False and policy.max_bytes == settings.max_weight_bytes
        if "slow" in url:
            hold.wait(60)
        return data

    with live(create_app(own)) as url:
        plain = post(url + "weights/", type="sam2_t", name="Plain", url="http://example.org/w.pt")
        assert plain.status_code == 200 and plain.headers["X-MedSAM2-Status"] == "400" and "only https URLs are accepted" in plain.text
        monkeypatch.setattr(registration, "fetch_bytes", fake_fetch)
        answers = []
        worker = threading.Thread(target=lambda: answers.append(post(url + "weights/", type="sam2_t", name="Slow", url="https://example.org/slow.pt")))
        worker.start()
        deadline = time.monotonic() + 60
        while requests.get(url + "progress/", timeout=10).json()["percent"] != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert requests.get(url + "weights/cancel/", timeout=10).text == "Cancel signal sent"
        worker.join(60)
        hold.set()
        assert answers[0].status_code == 200 and answers[0].text == "Cancelled to register Slow (https://example.org/slow.pt)."
        done = post(url + "weights/", type="sam2_t", name="MyMedSAM2", url="https://example.org/w/my.pt?sig=SECRET")
        assert done.status_code == 200 and done.text == "MyMedSAM2 (https://example.org/w/my.pt) is registered. Choose it in the weights list of type sam2_t."
        assert requests.get(url + "progress/", timeout=10).json()["percent"] == 100
        listed = requests.get(url + "weights/", params={"type": "sam2_t"}, timeout=10).json()
        assert {"type": "sam2_t", "name": "MyMedSAM2", "url": "https://example.org/w/my.pt"} in listed
        again = post(url + "weights/", type="sam2_t", name="MyMedSAM2", url="https://example.org/other.pt")
        assert again.text.startswith("Model file with the name 'MyMedSAM2' already exists. Skip registration. Choose MyMedSAM2")
        wrong_type = post(url + "weights/", type="vit_t", name="Lite2", url="https://example.org/l.pt")
        assert wrong_type.status_code == 200 and wrong_type.text.startswith("Registration refused: type: only sam2_t")
    record = json.loads((tmp_path / "weights" / "MyMedSAM2.json").read_text())
    assert record["sha256"] == own.registry.get("MyMedSAM2").info.sha256 and "SECRET" not in json.dumps(record)
    assert (tmp_path / "weights" / "MyMedSAM2.pt").stat().st_size == len(data)
    assert "MyMedSAM2" not in service.registry


def test_settings_from_environment(tmp_path):
    env = {"MEDSAM2_SAMAPI_TOKEN": " t ", "MEDSAM2_SAMAPI_ALLOW_WEIGHT_REGISTRATION": "1"}
    settings = Settings.from_env(env, model_dir=tmp_path).samapi
    assert settings.token == "t" and settings.allow_weight_registration and settings.weights_dir == tmp_path.resolve() / "registered"
    assert Settings.from_env({}).samapi.token is None and not Settings.from_env({}).samapi.allow_weight_registration
    assert Settings.from_env({"MEDSAM2_SAMAPI_TOKEN": "  "}).samapi.token is None
    assert replace(settings, token=None).token is None


def test_extra_fields_from_other_client_versions_are_ignored(base):
    grey, _, box = phantom_slice()
    response = post(base, type="vit_t", bbox=list(box), b64img=rgb_png(grey), multimask_output=False, some_future_field=1)
    assert response.status_code == 200
