"""MedSAM2's own 3D Slicer plugin against the interactive server: a real uvicorn on loopback, the real
LiteMedSAM, and the plugin's own HTTP code (SAM2Logic.middle_mask_helper / segment_helper from
../shared/tools/slicer_client, run as medsam2_plugin_client.py runs them, unchanged)."""

from __future__ import annotations

import http.client
import importlib
import io
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests

from medsam2_endpoint.api.samapi import create_app
from medsam2_endpoint.base.errors import PayloadTooLarge
from medsam2_endpoint.core import plugin
from medsam2_endpoint.core.plugin import SIZES
from medsam2_endpoint.core.plugin_state import ClientState, PluginStore
from medsam2_endpoint.core.registry import ModelRegistry
from medsam2_endpoint.core.service import Service
from medsam2_endpoint.engines.base import LITE_NAME
from medsam2_endpoint.testing.metrics import dice
from medsam2_endpoint.testing.phantoms import ct_phantom
from test_samapi import live, with_settings

# ../shared beside the checkout (/work/main, or a worktree one level deeper)
SLICER = next((p / "shared" / "tools" / "slicer_client" for p in Path(__file__).resolve().parents
               if (p / "shared" / "tools" / "slicer_client").is_dir()), Path("shared/tools/slicer_client"))
MID = 6


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def harness():
    """The harness module: it installs the Slicer stand-ins and loads the plugin's SAM2.py unchanged. The stand-ins
    (`vtk`, `qt`, `slicer`, ...) leave sys.modules again at once: the loaded plugin keeps its own references."""
    before = set(sys.modules)
    sys.path.insert(0, str(SLICER))
    try:
        return importlib.import_module("medsam2_plugin_client")
    finally:
        sys.path.remove(str(SLICER))
        for name in set(sys.modules) - before:
            if type(sys.modules[name]).__name__ == "_StubModule":
                del sys.modules[name]


@pytest.fixture(scope="module")
def lite(service) -> Service:
    """The session Service's engines with LiteMedSAM as the served default (as on a fresh install)."""
    return with_settings(service, registry=ModelRegistry(service.registry.snapshot(), LITE_NAME))


@pytest.fixture(scope="module")
def clock() -> Clock:
    return Clock()


@pytest.fixture(scope="module")
def base(lite, clock):
    app = create_app(lite)
    app.state.medsam2_plugin = PluginStore(64 << 20, 600.0, clock=clock)
    with live(app) as url:
        yield url.removesuffix("sam/")


@pytest.fixture(scope="module")
def phantom():
    return ct_phantom((12, 96, 96), lesions=("ellipsoid", "ellipsoid"), seed=3)


def preprocessed(harness, phantom) -> np.ndarray:
    """The volume after the plugin's own "Preprocessing" (Abdominal CT, W400/L40): uint8."""
    lg = harness.logic(phantom.array().copy(), "tiny")
    return lg.preprocess_CT(win_level=40.0, win_width=400.0)


def truth_box(phantom, label: int, z: int = MID) -> list[int]:
    ys, xs = np.nonzero(phantom.labels[z] == label)
    return [int(xs.min()) - 1, int(ys.min()) - 1, int(xs.max()) + 1, int(ys.max()) + 1]


def host_port(base: str) -> tuple[str, str]:
    parts = urlsplit(base)
    return parts.hostname or "", str(parts.port)


def middle_mask(harness, base, image, boxes, z_range, tmp: Path, size: str = "tiny") -> np.ndarray:
    """The plugin's "Get middle mask": img_data.npz written as getMiddleMask writes it, its helper unchanged."""
    lg = harness.logic(image, size)
    img_path, res_path = tmp / "img_data.npz", tmp / "result.npz"
    np.savez(img_path, imgs=image, boxes=[np.array(b) for b in boxes], z_range=z_range)
    lg.middle_mask_helper(str(img_path), str(res_path), *host_port(base), threading.Event())
    return np.load(res_path, allow_pickle=False)["segs"]


def propagate(harness, base, image, gts, tmp: Path, size: str = "tiny") -> np.ndarray:
    """The plugin's "Segment" after the user edited the middle mask: gts.npz as `segment` writes it."""
    lg = harness.logic(image, size)
    img_path, gts_path, res_path = tmp / "img_data.npz", tmp / "gts.npz", tmp / "result.npz"
    np.savez(gts_path, segs=gts.astype(image.dtype))
    lg.segment_helper(str(img_path), str(gts_path), str(res_path), *host_port(base), threading.Event())
    return np.load(res_path, allow_pickle=False)["segs"]


def test_two_objects_middle_mask_then_propagate_without_reupload(harness, base, phantom, tmp_path):
    image = preprocessed(harness, phantom)
    box1, box2 = truth_box(phantom, 1), truth_box(phantom, 2)
    flipped = [box2[0], box2[3], box2[2], box2[1]]  # y_min > y_max, as Slicer's ROI corners can give it
    z_range = [MID + 1, MID - 1, MID]  # k_end before k_start: ends in either order, and narrower than both lesions
    segs = middle_mask(harness, base, image, [box1, flipped], z_range, tmp_path)
    assert segs.shape == image.shape and segs.dtype == np.uint8
    assert set(np.unique(segs)) == {0, 1, 2}
    assert not np.delete(segs, MID, axis=0).any()  # the middle slice only
    for label in (1, 2):
        assert dice(segs[MID] == label, phantom.labels[MID] == label) > 0.8
    # the normalised box gives the same mask
    again = middle_mask(harness, base, image, [box1, box2], z_range, tmp_path)
    np.testing.assert_array_equal(again, segs)

    edited = segs.copy()
    edited[MID, :, :box1[0] + 3][edited[MID, :, :box1[0] + 3] == 1] = 0  # the user trims object 1's left edge
    full = propagate(harness, base, image, edited, tmp_path)
    assert full.shape == image.shape and set(np.unique(full)) == {0, 1, 2}
    np.testing.assert_array_equal(full[MID], edited[MID])  # the user's middle slice exactly as drawn
    assert not full[:MID - 1].any() and not full[MID + 2:].any()  # within z_range
    for label in (1, 2):
        truth = phantom.labels == label
        truth[:MID - 1] = truth[MID + 2:] = False
        assert dice(full == label, truth) > 0.75, label
        assert (full == label).any(axis=(1, 2)).sum() == 3  # walked up and down from the middle slice


def plugin_form(propagate: str, size: str) -> dict[str, str]:
    """run_script's form exactly as the plugin fills it."""
    return {"checkpoint": f"sam2.1_hiera_{size}.pt", "input": "img_data.npz", "gts": "X" if propagate == "N" else "gts.npz",
            "propagate": propagate, "size": size}


def upload(base: str, name: str, **arrays) -> requests.Response:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return requests.post(base + "upload", files={"file": (name, buffer.getvalue())}, timeout=60)


def test_every_size_runs_the_served_model_and_says_so(harness, base, phantom):
    image = preprocessed(harness, phantom)
    assert upload(base, "img_data.npz", imgs=image, boxes=[truth_box(phantom, 1)], z_range=[2, 8, MID]).status_code == 200
    for size in SIZES:
        answer = requests.post(base + "run_script", data=plugin_form("N", size), timeout=60)
        assert answer.status_code == 200, answer.text
        assert f"size '{size}'" in answer.text and "lite-medsam" in answer.text
        segs = np.load(io.BytesIO(requests.get(base + "download_file", data={"output": "data/video/segs_tiny/img_data.npz"},
                                                timeout=60).content))["segs"]
        assert dice(segs[MID] == 1, phantom.labels[MID] == 1) > 0.8
    bad = requests.post(base + "run_script", data=plugin_form("N", "huge"), timeout=60)
    assert bad.status_code == 400 and bad.json()["error"].startswith("size:")


def get_from(address: str, base: str, path: str, body: str) -> tuple[int, bytes]:
    """A GET with a form body from another loopback source address (another client)."""
    host, port = host_port(base)
    conn = http.client.HTTPConnection(host, int(port), timeout=60, source_address=(address, 0))
    try:
        conn.request("GET", "/" + path, body=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def test_download_answers_only_this_addresss_result_never_a_path(harness, base, phantom):
    image = preprocessed(harness, phantom)
    upload(base, "img_data.npz", imgs=image, boxes=[truth_box(phantom, 2)], z_range=[4, 10, MID])
    assert requests.post(base + "run_script", data=plugin_form("N", "tiny"), timeout=60).status_code == 200
    for output in ("../../etc/passwd", "/etc/passwd", "..%2F..%2Fetc%2Fpasswd", "data/video/segs_tiny/../../../../etc/hostname"):
        answer = requests.get(base + "download_file", data={"output": output}, timeout=60)
        assert answer.status_code == 200 and answer.content.startswith(b"PK")  # this client's own result, an .npz
        assert b"root:" not in answer.content
        assert np.load(io.BytesIO(answer.content))["segs"].shape == image.shape
    status, body = get_from("127.0.0.2", base, "download_file", "output=../../etc/passwd")
    assert status == 404 and b"no result for this address" in body and b"root:" not in body


def test_state_expires(harness, base, phantom, clock, lite):
    image = preprocessed(harness, phantom)
    upload(base, "img_data.npz", imgs=image, boxes=[truth_box(phantom, 1)], z_range=[2, 8, MID])
    assert requests.post(base + "run_script", data=plugin_form("N", "small"), timeout=60).status_code == 200
    clock.now += 601  # past the store's TTL: volume and result are gone
    gone = requests.get(base + "download_file", data={"output": "x"}, timeout=60)
    assert gone.status_code == 404 and gone.json()["code"] == "not_found"
    again = requests.post(base + "run_script", data=plugin_form("Y", "small"), timeout=60)
    assert again.status_code == 409 and again.json()["error"].startswith("input:")


def test_bad_uploads_are_4xx_naming_the_field(base):
    not_npz = requests.post(base + "upload", files={"file": ("img_data.npz", b"hello")}, timeout=60)
    assert not_npz.status_code == 400 and not_npz.json()["error"].startswith("file:")
    pickled = io.BytesIO()
    np.savez(pickled, imgs=np.array([{"a": 1}], dtype=object))
    refused = requests.post(base + "upload", files={"file": ("img_data.npz", pickled.getvalue())}, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"].startswith("file.imgs:")
    image = np.zeros((4, 32, 32), np.uint8)
    outside = upload(base, "img_data.npz", imgs=image, boxes=[[2, 2, 20, 20]], z_range=[0, 3, 9])
    assert outside.status_code == 400 and outside.json()["error"].startswith("file.z_range[2]:")
    empty = upload(base, "img_data.npz", imgs=image, boxes=[[40, 2, 50, 20]], z_range=[0, 3, 1])
    assert empty.status_code == 400 and empty.json()["error"].startswith("file.boxes[0]:")
    assert upload(base, "gts.npz", segs=np.zeros((4, 32, 32), np.int32) - 1).json()["error"].startswith("file.segs:")


def test_upload_model_follows_weight_registration_rules(lite, tmp_path):
    checkpoint = {"file": ("my_medsam2.pt", b"\x80\x02not a checkpoint" * 100)}
    with live(create_app(with_settings(lite, samapi_weights_dir=tmp_path, max_voxels=1000))) as url:
        base = url.removesuffix("sam/")
        off = requests.post(base + "upload_model", files=checkpoint, timeout=60)
        assert off.status_code == 403 and "MEDSAM2_SAMAPI_ALLOW_WEIGHT_REGISTRATION" in off.json()["error"]
        big = upload(base, "img_data.npz", imgs=np.zeros((2, 32, 32), np.uint8), boxes=[[1, 1, 9, 9]], z_range=[0, 1, 0])
        assert big.status_code == 413 and "MEDSAM2_MAX_VOXELS" in big.json()["error"]
    with live(create_app(with_settings(lite, samapi_weights_dir=tmp_path, samapi_allow_weight_registration=True))) as url:
        base = url.removesuffix("sam/")
        junk = requests.post(base + "upload_model", files=checkpoint, timeout=60)
        assert junk.status_code == 400 and junk.json()["error"].startswith("file:")
        unsafe = requests.post(base + "upload_model", files={"file": ("-x.pt", b"x")}, timeout=60)
        assert unsafe.status_code == 400
    assert not list(tmp_path.glob("*.pt"))  # nothing stored
    assert "my_medsam2" not in lite.registry


def test_store_expiry_and_byte_cap():
    clock = Clock()
    store = PluginStore(1000, 10.0, clock=clock)
    store.update("a", result=b"x" * 400)
    clock.now += 5
    store.update("b", result=b"y" * 400)
    assert store.get("a").result is not None  # a read counts as use: "b" is now the least recently used
    store.update("c", result=b"z" * 400)  # over the cap: the least recently used address goes
    assert store.get("b") == ClientState() and store.get("a").result and store.get("c").result
    with pytest.raises(PayloadTooLarge):
        store.update("a", result=b"w" * 1001)
    assert store.get("a").result == b"x" * 400  # a refused update leaves the state as it was
    clock.now += 11
    assert len(store) == 0


def test_medsam2_starts_from_the_users_mask_itself(service, monkeypatch):
    """With MedSAM2 served (mask prompts), step 2 gives the edited middle mask to the model (`add_new_mask`)."""
    engine = service.registry.get(service.default)
    assert engine.info.capabilities.mask_prompts
    calls = []
    original = engine.track_mask

    def spy(state, *, key_index, mask, reverse):
        calls.append((key_index, int(mask.sum()), reverse))
        return original(state, key_index=key_index, mask=mask, reverse=reverse)

    monkeypatch.setattr(engine, "track_mask", spy)
    image = np.zeros((4, 48, 48), np.uint8)
    image[:, 14:34, 12:30] = 200
    volume = plugin.parse_image({"imgs": image, "boxes": np.array([[12, 14, 30, 34]]), "z_range": np.array([1, 1, 1])},
                                limits=service.settings.limits)
    gts = np.zeros_like(image)
    gts[1, 15:33, 13:27] = 1  # the user's edit: narrower than the box
    labels = plugin.propagate(service, service.default, volume, gts, service.budget())
    assert sorted(calls) == [(1, int(gts.sum()), False), (1, int(gts.sum()), True)]
    np.testing.assert_array_equal(labels[1], gts[1])
    assert not np.delete(labels, 1, axis=0).any()  # z_range 1..1: the key slice only (one slice encoded: cheap)
