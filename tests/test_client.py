"""The client (`medsam2-endpoint predict`, `client.segment`) against a real local azmlinfsrv and a fake front end.

Real server: score.py under azmlinfsrv on a loopback port, with no MedSAM2 weights (LiteMedSAM serves),
started once and shared with test_cli_clinical.py (conftest `lite_server`). Fake server: a tiny HTTP server on 127.0.0.1 playing Azure's front end
(503/429 then success, 424 with `ms-azureml-model-error-statuscode`) to check retries, error reading
and the Bearer key without running a model. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from local_server import free_port
from medsam2_endpoint.client import ClientError, EndpointError, ObjectPrompt, read_volume, segment
from medsam2_endpoint.client.cli import predict_main
from medsam2_endpoint.client.presets import PRESETS, resolve_window
from medsam2_endpoint.client.prompts import load_objects
from medsam2_endpoint.client.transport import post_request
from medsam2_endpoint.io.encode import rle_counts, value_rle
from medsam2_endpoint.testing.metrics import dice
from medsam2_endpoint.testing.phantoms import Phantom, ct_phantom, oblique_direction

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key-not-a-secret-0123"


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    """16 x 64 x 64 CT (int16 HU) with one ellipsoid lesion and an oblique direction."""
    return ct_phantom((16, 64, 64), direction=oblique_direction(12.0), lesions=("ellipsoid",), seed=1, name="client")


@pytest.fixture(scope="module")
def server(lite_server):
    """The real azmlinfsrv on score.py with an empty model folder (LiteMedSAM serves; conftest's, shared); its /score URL."""
    return lite_server.score


def write_dicom_series(image: sitk.Image, folder: Path, *, series: str = "2") -> None:
    """One CT file per slice with the tags GDCM sorts and places slices by (SimpleITK's DicomSeriesReadModifyWrite pattern)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # keep the UIDs set below instead of generating new ones per file
    d = image.GetDirection()
    uid = "1.2.826.0.1.3680043.8.498.4242"
    tags = {
        "0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0010|0010": "Phantom^Client", "0010|0020": "PHANTOM",
        "0020|000d": f"{uid}.1", "0020|000e": f"{uid}.{series}", "0018|0050": f"{image.GetSpacing()[2]:.10g}",
        "0020|0037": "\\".join(f"{v:.10g}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),  # row and column directions
        "0028|1052": "0", "0028|1053": "1",
    }
    for z in range(image.GetDepth()):
        plane = image[:, :, z]
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        plane.SetMetaData("0020|0032", "\\".join(f"{v:.10g}" for v in image.TransformIndexToPhysicalPoint((0, 0, z))))
        plane.SetMetaData("0020|0013", str(z + 1))
        plane.SetMetaData("0008|0018", f"{uid}.{series}.{z + 1}")
        writer.SetFileName(str(folder / f"s{series}_{z:03d}.dcm"))
        writer.Execute(plane)


def assert_same_geometry(mask: sitk.Image, source: sitk.Image) -> None:
    assert mask.GetSize() == source.GetSize()
    for name in ("GetSpacing", "GetOrigin", "GetDirection"):
        assert np.allclose(getattr(mask, name)(), getattr(source, name)(), atol=1e-5), name


def assert_png(path: Path, panels: int) -> None:
    with Image.open(path) as png:
        assert png.format == "PNG"
        width, height = png.size
        pixels = np.asarray(png.convert("RGB"))
    assert 150 * panels <= width <= 600 * panels and 150 <= height <= 800, png.size
    assert pixels.std() > 10  # an image, not a blank canvas
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 100) & (pixels[..., 2] < 100)
    assert red.sum() > 20  # the first label's outline colour (#ff3b30) is drawn


# ---------------------------------------------------------------------------------- real server


@pytest.mark.slow
def test_segment_nifti_file_through_real_server(server, phantom, tmp_path):
    source = tmp_path / "ct.nii.gz"
    sitk.WriteImage(phantom.image, str(source), useCompression=True)
    lesion = phantom.lesions[0]
    result = segment(source, bbox=lesion.bbox, key_slice=lesion.key_slice, preset="ct-soft-tissue", endpoint=server,
                     mask_format="rle", retries=0)
    assert result.metadata[0]["model"]["name"] == "lite-medsam"
    assert result.metadata[0]["dicom_window"] == list(PRESETS["ct-soft-tissue"])
    saved = sitk.ReadImage(str(result.save(tmp_path / "mask.nii.gz")))
    assert_same_geometry(saved, sitk.ReadImage(str(source)))
    labels = sitk.GetArrayFromImage(saved)
    assert set(np.unique(labels)) <= {0, 1}
    assert dice(labels, phantom.mask(lesion.label)) >= 0.8
    assert_png(result.preview(tmp_path / "preview.png", panels=3), panels=3)


@pytest.mark.slow
def test_predict_cli_dicom_folder_through_real_server(server, phantom, tmp_path, capsys):
    folder = tmp_path / "dicom"
    write_dicom_series(phantom.image, folder)
    lesion = phantom.lesions[0]
    out, png = tmp_path / "mask.nii.gz", tmp_path / "preview.png"
    argv = [str(folder), "--bbox", *map(str, lesion.bbox), "--key-slice", str(lesion.key_slice), "--window", "-160", "240",
            "--endpoint", server, "-o", str(out), "--preview", str(png), "--quiet"]
    assert predict_main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"mask: {out}" in printed and "lite-medsam" in printed
    mask = sitk.ReadImage(str(out))
    dicom = read_volume(folder)
    assert_same_geometry(mask, dicom)
    assert np.allclose(dicom.GetDirection(), phantom.image.GetDirection(), atol=1e-6)  # the series kept the tilt
    assert dice(sitk.GetArrayFromImage(mask), phantom.mask(lesion.label)) >= 0.8
    assert_png(png, panels=5)


# ---------------------------------------------------------------------------------- fake front end

Responder = Callable[[dict, dict], tuple[int, dict, bytes]]


class FakeFrontEnd:
    """Answers POSTs on 127.0.0.1 from a script of responders (the last one repeats); records what it got."""

    def __init__(self, script: list[Responder]) -> None:
        self.script, self.requests = script, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"headers": dict(self.headers), "body": body})
                respond = outer.script[min(len(outer.requests), len(outer.script)) - 1]
                status, headers, payload = respond(body, dict(self.headers))
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeFrontEnd:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def error(status: int, message: str, *, azure: bool = False, headers: dict | None = None, code: str | None = None) -> Responder:
    """Our service's JSON error; `azure`: as a managed endpoint relays it (424 + original status header)."""
    extra = {"ms-azureml-model-error-statuscode": str(status)} if azure else {}
    payload = json.dumps({"error": message, "status": status, **({"code": code} if code else {})}).encode()
    return lambda body, hdrs: (424 if azure else status, {**extra, **(headers or {})}, payload)


def box_masks(shape: tuple[int, int, int]) -> Responder:
    """Success: per item, an RLE mask filling its box on its key slice (what a model would roughly return)."""

    def respond(body: dict, headers: dict) -> tuple[int, dict, bytes]:
        cols, results = body["input_data"], []
        if "objects" in cols:  # one item, several objects: a label map as value runs, as the server sends it
            labels = np.zeros(shape, np.uint8)
            for obj in cols["objects"][0]:
                x0, y0, x1, y1 = (int(v) for v in obj["bbox"])
                labels[obj["key_slice_idx"], y0 : y1 + 1, x0 : x1 + 1] = obj["id"]
            runs = value_rle(labels)
            meta = {"mask_format": "rle", "voxel_count": int(np.count_nonzero(labels)), "model": {"name": "fake"},
                    "objects": [{"id": o["id"]} for o in cols["objects"][0]]}
            return 200, {}, json.dumps([{"mask": {**runs, "size": list(shape), "order": "F"}, "metadata": meta}]).encode()
        for bbox, key in zip(cols["bbox"], cols["key_slice_idx"], strict=True):
            mask = np.zeros(shape, np.uint8)
            x0, y0, x1, y1 = (int(v) for v in bbox)
            mask[key, y0 : y1 + 1, x0 : x1 + 1] = 1
            results.append({"mask": {"counts": rle_counts(mask), "size": list(shape), "order": "F"},
                            "metadata": {"mask_format": "rle", "voxel_count": int(mask.sum()), "model": {"name": "fake"}}})
        return 200, {}, json.dumps(results).encode()

    return respond


@pytest.fixture()
def small_volume(tmp_path) -> Path:
    image = sitk.GetImageFromArray(np.random.default_rng(0).integers(-200, 200, (6, 24, 32)).astype(np.int16))
    image.SetSpacing((0.7, 0.8, 3.0))
    image.SetOrigin((10.0, -5.0, 2.0))
    path = tmp_path / "small.nrrd"
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize("first", [error(503, "the model is still loading; retry shortly"), error(429, "too many requests"),
                                   error(503, "the model is still loading", azure=True)], ids=["503", "429", "424-503"])
def test_retries_then_succeeds(first, small_volume):
    with FakeFrontEnd([first, first, box_masks((6, 24, 32))]) as fake:
        result = segment(small_volume, bbox=[2, 3, 10, 12], key_slice=2, endpoint=fake.url, backoff_s=0.01)
    assert len(fake.requests) == 3
    assert result.array()[2, 3:13, 2:11].all() and result.array().sum() == 9 * 10
    assert_same_geometry(result.mask, sitk.ReadImage(str(small_volume)))


def test_retries_are_bounded_and_honour_retry_after(small_volume):
    with FakeFrontEnd([error(503, "busy", headers={"Retry-After": "0"}, code="busy")]) as fake:
        with pytest.raises(EndpointError) as caught:
            segment(small_volume, bbox=[2, 3, 10, 12], key_slice=2, endpoint=fake.url, retries=2, backoff_s=30)
    assert len(fake.requests) == 3 and caught.value.status == 503  # Retry-After 0 beat the 30 s back-off


def test_a_deadline_503_is_not_retried_decided_by_its_code(small_volume):
    with FakeFrontEnd([error(503, "ran out after 40 slices", azure=True, code="deadline")]) as fake:
        with pytest.raises(EndpointError, match="ran out") as caught:
            segment(small_volume, bbox=[2, 3, 10, 12], key_slice=2, endpoint=fake.url, backoff_s=0.01)
    assert len(fake.requests) == 1 and caught.value.code == "deadline"


def test_424_reports_original_status_and_json_and_sends_bearer_key(small_volume, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDSAM2_ENDPOINT_KEY", KEY)
    message = "input_data.bbox[0]: x 600 is outside the slice width 32 (x is the column index, 0..31)"
    with FakeFrontEnd([error(400, message, azure=True)]) as fake:
        code = predict_main([str(small_volume), "--bbox", "2", "3", "10", "12", "--key-slice", "2", "--endpoint", fake.url,
                             "--deployment", "blue", "-o", str(tmp_path / "m.nii.gz")])
    assert code == 1 and len(fake.requests) == 1  # a 400 is never retried
    headers = {k.lower(): v for k, v in fake.requests[0]["headers"].items()}
    assert headers["authorization"] == f"Bearer {KEY}" and headers["azureml-model-deployment"] == "blue"
    captured = capsys.readouterr()
    assert "HTTP 400 (reported by Azure as HTTP 424)" in captured.err
    assert json.loads(captured.err.strip().splitlines()[-1]) == {"error": message, "status": 400}
    assert KEY not in captured.err + captured.out
    assert not (tmp_path / "m.nii.gz").exists()


def test_objects_file_gives_label_map_from_one_multi_object_item(small_volume, tmp_path, capsys):
    objects = tmp_path / "objects.json"
    objects.write_text(json.dumps({"objects": [{"id": 3, "bbox": [1, 1, 5, 5], "key_slice": 1},
                                               {"id": 7, "bbox": [20, 10, 30, 20], "key_slice": 4}]}))
    out = tmp_path / "labels.nii.gz"
    with FakeFrontEnd([box_masks((6, 24, 32))]) as fake:
        code = predict_main([str(small_volume), "--objects", str(objects), "--preset", "mri", "--mask-format", "rle",
                             "--endpoint", fake.url, "-o", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    cols = fake.requests[0]["body"]["input_data"]
    assert len(cols["nii_image"]) == 1 and "bbox" not in cols  # the volume is uploaded once
    assert cols["objects"] == [[{"id": 3, "bbox": [1, 1, 5, 5], "key_slice_idx": 1}, {"id": 7, "bbox": [20, 10, 30, 20], "key_slice_idx": 4}]]
    assert cols["mask_format"] == ["rle"] and len(cols["dicom_window"]) == 1
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert (labels[1, 1:6, 1:6] == 3).all() and (labels[4, 10:21, 20:31] == 7).all()
    assert set(np.unique(labels)) == {0, 3, 7}


# ---------------------------------------------------------------------------------- no network


def test_presets_and_mri_window():
    image = sitk.GetImageFromArray(np.concatenate([np.zeros(1000), np.arange(1, 1001)]).reshape(10, 10, 20).astype(np.float32))
    assert resolve_window(image, None, "ct-lung") == PRESETS["ct-lung"]
    assert resolve_window(image, [0, 100], None) == (0.0, 100.0)
    assert resolve_window(image, None, None) is None
    lo, hi = resolve_window(image, None, "mri")
    assert (lo, hi) == tuple(np.percentile(np.arange(1, 1001), [0.5, 99.5]))  # zeros are not counted
    for window, preset in (([5, 1], None), ([0, 1], "mri"), (None, "ct-brain")):
        with pytest.raises(ClientError):
            resolve_window(image, window, preset)


def test_bad_inputs_fail_before_any_request(small_volume, tmp_path):
    with pytest.raises(ClientError, match="key slice 9"):
        segment(small_volume, bbox=[1, 1, 5, 5], key_slice=9, endpoint="http://127.0.0.1:9/score")
    with pytest.raises(ClientError, match="box"):
        segment(small_volume, bbox=[1, 1, 40, 5], key_slice=0, endpoint="http://127.0.0.1:9/score")
    with pytest.raises(ClientError, match="plain http"):  # a key never travels unencrypted beyond loopback
        post_request("http://example.com/score", {}, key=KEY)
    with pytest.raises(ClientError, match="cannot connect"):
        segment(small_volume, objects=[ObjectPrompt((1, 1, 5, 5), 0)], endpoint=f"http://127.0.0.1:{free_port()}/score")
    bad = tmp_path / "objects.json"
    bad.write_text(json.dumps([{"id": 1, "bbox": [1, 1, 5, 5], "key_slice": 0}, {"id": 1, "bbox": [2, 2, 6, 6], "key_slice": 1}]))
    with pytest.raises(ClientError, match="unique"):
        load_objects(bad)
    bad.write_text(json.dumps([{"bbox": [1, 1, 5, 5]}]))
    with pytest.raises(ClientError, match="key_slice"):
        load_objects(bad)


def test_dicom_folder_with_two_series_asks_which(tmp_path):
    image = sitk.GetImageFromArray(np.zeros((3, 8, 8), np.int16))
    write_dicom_series(image, tmp_path, series="2")
    write_dicom_series(image, tmp_path, series="3")
    with pytest.raises(ClientError, match="2 DICOM series; choose one with --series"):
        read_volume(tmp_path)
    assert read_volume(tmp_path, series_uid="1.2.826.0.1.3680043.8.498.4242.3").GetSize() == (8, 8, 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClientError, match="no DICOM series"):
        read_volume(tmp_path / "empty")


# ---------------------------------------------------------------------------------- corrections


def not_held_then_masks(shape: tuple[int, int, int]) -> Responder:
    """As a worker that does not hold the volume: 409 volume_not_held without nii_image, else a mask on each prompted slice."""

    def respond(body: dict, headers: dict) -> tuple[int, dict, bytes]:
        cols = body["input_data"]
        if cols["nii_image"] == [None]:
            return error(409, "input_data.volume_id[0]: this worker does not hold volume x; send nii_image again",
                         azure=True, code="volume_not_held")(body, headers)
        labels = np.zeros(shape, np.uint8)
        for obj in cols["objects"][0]:
            for p in obj["prompts"]:
                x0, y0, x1, y1 = (int(v) for v in p["box"])
                labels[p["slice"], y0 : y1 + 1, x0 : x1 + 1] = obj["id"]
        meta = {"mask_format": "rle", "model": {"name": "fake"}, "volume_id": "v", "objects": [{"id": o["id"]} for o in cols["objects"][0]]}
        return 200, {}, json.dumps([{"mask": {**value_rle(labels), "size": list(shape), "order": "F"}, "metadata": meta}]).encode()

    return respond


def test_correction_sends_volume_id_first_and_uploads_on_409(small_volume, tmp_path):
    import base64

    from medsam2_endpoint.io.limits import Limits
    from medsam2_endpoint.io.volume import read_nifti

    previous = tmp_path / "previous.nii.gz"
    earlier = sitk.GetImageFromArray(np.zeros((6, 24, 32), np.uint8))
    earlier.CopyInformation(sitk.ReadImage(str(small_volume)))
    sitk.WriteImage(earlier, str(previous))
    prompts = [{"id": 2, "prompts": [{"slice": 1, "box": [2, 3, 10, 12]}, {"slice": 4, "box": [5, 5, 9, 9]}]}]
    with FakeFrontEnd([not_held_then_masks((6, 24, 32))]) as fake:
        result = segment(small_volume, prompts=prompts, previous=previous, endpoint=fake.url, mask_format="rle", backoff_s=0.01)
    first, second = (r["body"]["input_data"] for r in fake.requests)
    assert len(fake.requests) == 2 and first["nii_image"] == [None] and first["objects"] == [prompts]
    assert "volume_id" not in second and second["nii_image"][0] and second["objects"] == [prompts]
    uploaded = read_nifti(base64.b64decode(second["nii_image"][0]), field="x", limits=Limits())
    assert first["volume_id"] == [uploaded.content_id()]  # the id the server would give this upload
    assert first["previous_mask"] == second["previous_mask"] and first["previous_mask"][0]
    labels = result.array()
    assert (labels[1, 3:13, 2:11] == 2).all() and (labels[4, 5:10, 5:10] == 2).all()


def test_correction_on_a_worker_that_holds_the_volume_is_one_request(small_volume, tmp_path, capsys):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"id": 1, "prompts": [{"slice": 2, "box": [2, 3, 10, 12]}]}]))
    earlier = sitk.GetImageFromArray(np.zeros((6, 24, 32), np.uint8))
    earlier.CopyInformation(sitk.ReadImage(str(small_volume)))
    sitk.WriteImage(earlier, str(tmp_path / "m0.nii.gz"))

    def held(body, headers):
        cols = body["input_data"]
        assert cols["nii_image"] == [None] and cols["volume_id"][0]
        return not_held_then_masks((6, 24, 32))({"input_data": {**cols, "nii_image": ["x"]}}, headers)

    with FakeFrontEnd([held]) as fake:
        code = predict_main([str(small_volume), "--prompts", str(prompts), "--previous", str(tmp_path / "m0.nii.gz"),
                             "--endpoint", fake.url, "-o", str(tmp_path / "m1.nii.gz"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert len(fake.requests) == 1
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "m1.nii.gz")))[2, 3:13, 2:11].all()
