"""PACS round trip on real parts: the real CT series loaded into a real Orthanc (DICOMweb plugin, basic auth),
/score on the real azmlinfsrv reads it by DICOMweb, LiteMedSAM segments the liver from a box, the DICOM SEG is
stored back by STOW-RS, read back, its frames equal the returned mask and dciodvfy finds no error in it. Then
the refusals: a URL not listed (no connection made), a study the PACS does not have, a series over the voxel
limit (refused from metadata: no instance fetched), a PACS that refuses the store (the mask still answered),
mixed sizes / multi-frame / non-image series, a slow PACS and a redirect off the listed server."""

from __future__ import annotations

import base64
import gzip
import http.server
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from functools import partial
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk

from local_server import running_server
from medsam2_endpoint.base.budget import Budget
from medsam2_endpoint.base.errors import (
    FetchFailed,
    FetchRefused,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMedia,
)
from medsam2_endpoint.io.dicom_seg import series_files
from medsam2_endpoint.io.dicomweb import DicomwebPolicy, SeriesRef, check_metadata, read_dicomweb
from medsam2_endpoint.io.fetch import FetchPolicy
from medsam2_endpoint.io.limits import Limits
from orthanc import load_series, require, running_orthanc
from test_fetch import tls_server  # noqa: F401 - the https server of the fetch tests, shared

# as test_quality.py; a worktree beside the checkout points at the data with MEDSAM2_TEST_REAL_DATA
REAL = Path(os.environ.get("MEDSAM2_TEST_REAL_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data" / "real")
CT_DICOM = REAL / "ct_dicom"
LABELS = REAL / "ct_dicom_labels.nii.gz"
PASSWORD = "pacs-S3cret-7f2c"  # must appear in no log line
USER = "medsam"
DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"
READ_ONLY_TAG = "read-only"
MAX_SLICES = 3
# Orthanc answers 403 to a STOW-RS into the read-only study: a PACS that refuses the store
LUA = """
READ_ONLY = '%s'
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  if method == 'POST' and string.find(uri, READ_ONLY, 1, true) then
    return false
  end
  return true
end
"""


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """Orthanc with the series twice: a study to write into and a read-only one (its STOW-RS answered 403)."""
    if not CT_DICOM.is_dir():  # as every real-data test; Orthanc or dciodvfy missing is a failure, not a skip
        pytest.skip(f"the real CT series is not on this machine ({CT_DICOM})")
    require(DCIODVFY, "dciodvfy (dicom3tools)")
    folder = tmp_path_factory.mktemp("orthanc")
    from pydicom.uid import generate_uid

    read_only_study = generate_uid(entropy_srcs=[READ_ONLY_TAG, "study"])  # load_series makes the same one
    with running_orthanc(folder, users={USER: PASSWORD}, lua=LUA % read_only_study) as orthanc:
        files = series_files(CT_DICOM)
        writable = load_series(orthanc, files, tag="writable")
        read_only = load_series(orthanc, files, tag=READ_ONLY_TAG)
        assert read_only[0] == read_only_study
        yield orthanc, writable, read_only


@pytest.fixture(scope="module")
def server(pacs, tmp_path_factory):
    orthanc = pacs[0]
    env = {"MEDSAM2_DICOMWEB_URLS": orthanc.dicomweb, "MEDSAM2_DICOMWEB_BASIC_AUTH": f"{orthanc.dicomweb}={USER}:{PASSWORD}"}
    with running_server(tmp_path_factory.mktemp("pacs-server"), env) as srv:
        yield srv


def liver_box() -> tuple[int, list[int], np.ndarray]:
    """The key slice (most liver) and the box around the liver there, from the series' reference labels (z as on disk)."""
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(LABELS)))
    liver = labels == 5
    z = int(liver.reshape(len(liver), -1).sum(1).argmax())
    ys, xs = np.nonzero(liver[z])
    return z, [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())], liver


def score(server, url: str, study: str, series: str, *, store: bool = True, **columns) -> requests.Response:
    z, box, _ = liver_box()
    # 3 slices each way from the key slice keep the module quick on 2 loaded cores; later requests on the same
    # pixels (the read-only study, the client) reuse the slices' features the first one computed
    cols = {"dicomweb": [{"url": url, "study": study, "series": series}], "bbox": [box], "key_slice_idx": [z],
            "mask_format": ["nifti"], "store_seg": [store], "max_slices": [MAX_SLICES], **columns}
    return requests.post(server.score, json={"input_data": cols}, timeout=170)


def mask_of(result: dict) -> np.ndarray:
    image = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(result["mask"])))
    return np.asarray(image.dataobj).transpose(2, 1, 0)  # NIfTI x first -> (Z, Y, X)


def client_for(orthanc):
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    session.auth = orthanc.auth
    return DICOMwebClient(orthanc.dicomweb, session=session)


def test_round_trip_ct_series_to_seg_in_the_pacs(pacs, server, tmp_path):
    orthanc, (study, series), _ = pacs
    started = time.perf_counter()
    response = score(server, orthanc.dicomweb, study, series)
    seconds = time.perf_counter() - started
    assert response.status_code == 200, response.text
    (result,) = response.json()
    meta = result["metadata"]
    mask = mask_of(result).astype(bool)
    assert mask.shape == (20, 512, 512)
    z, _, liver = liver_box()
    dice = 2 * (mask[z] & liver[z]).sum() / (mask[z].sum() + liver[z].sum())
    assert dice > 0.8, dice  # the box is on the liver: the answer is the liver (not a figure of merit)
    assert 0 < mask.reshape(20, -1).any(1).sum() <= 2 * MAX_SLICES + 1  # slices without mask get no SEG frame

    source = meta["source"]["dicomweb"]
    assert (source["study"], source["series"]) == (study, series) and len(source["instances"]) == 20
    stored = meta["dicom_seg"]
    assert "error" not in stored, stored
    assert stored["study_uid"] == study

    # read the SEG back from the PACS, as a viewer would
    seg_ds = client_for(orthanc).retrieve_instance(study, stored["series_uid"], stored["sop_instance_uid"])
    path = tmp_path / "seg.dcm"
    seg_ds.save_as(path, enforce_file_format=True)
    seg = hd.seg.segread(path)
    pixels = pydicom.dcmread(path).pixel_array.reshape(-1, seg.Rows, seg.Columns).astype(bool)
    frames = {}
    for i, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        frames[str(group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)] = pixels[i]
    for z, uid in enumerate(source["instances"]):  # mask z = the instances' order
        expected = mask[z]
        if uid in frames:
            np.testing.assert_array_equal(frames[uid], expected)
        else:
            assert not expected.any(), f"slice {z} has mask voxels but the SEG has no frame for it"
    assert set(frames) <= set(source["instances"]) and len(frames) == int(mask.reshape(20, -1).any(1).sum())
    assert seg.FrameOfReferenceUID and seg.StudyInstanceUID == study

    check = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    report = check.stdout + check.stderr
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert not errors, report
    print(f"\nround trip (DICOMweb read, LiteMedSAM, SEG, STOW-RS): {seconds:.2f} s; dciodvfy: {len(errors)} errors, "
          f"{sum(line.startswith('Warning') for line in report.splitlines())} warnings")

    log = server.log_text()
    assert PASSWORD not in log and base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode() not in log
    assert PASSWORD not in response.text


def test_the_client_reads_from_the_pacs_and_stores_the_seg(pacs, server, tmp_path, capsys):
    from medsam2_endpoint.client.cli import predict_main

    orthanc, (study, series), _ = pacs
    z, box, _ = liver_box()
    out = tmp_path / "liver.nii.gz"
    code = predict_main(["--dicomweb", orthanc.dicomweb, "--study", study, "--series", series, "--store-seg", "--bbox",
                         *map(str, box), "--key-slice", str(z), "--max-slices", str(MAX_SLICES), "--endpoint", server.score,
                         "-o", str(out), "-q"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    mask = sitk.ReadImage(str(out))
    assert mask.GetSize() == (512, 512, 20) and sitk.GetArrayViewFromImage(mask).any()
    assert "DICOM SEG stored: study " + study in printed


def test_a_url_not_listed_is_refused_before_any_connection(pacs, server):
    _, (study, series), _ = pacs
    with socket.socket() as listener:  # a server on loopback that must never be contacted
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.3)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/dicom-web"
        response = score(server, url, study, series)
        assert response.status_code == 400
        body = response.json()
        assert "MEDSAM2_DICOMWEB_URLS" in body["error"] and body["error"].startswith("input_data.dicomweb[0].url")
        with pytest.raises(TimeoutError):
            listener.accept()


def test_a_study_the_pacs_does_not_have_is_a_404(pacs, server):
    orthanc, (_, series), _ = pacs
    response = score(server, orthanc.dicomweb, "1.2.3.4.5", series)
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error.startswith("input_data.dicomweb[0]") and "HTTP 404" in error


def test_a_refused_store_still_answers_the_mask(pacs, server):
    orthanc, _, (study, series) = pacs
    response = score(server, orthanc.dicomweb, study, series)
    assert response.status_code == 200, response.text
    (result,) = response.json()
    assert mask_of(result).any()
    stored = result["metadata"]["dicom_seg"]
    assert stored["pacs_status"] == 403 and "HTTP 403" in stored["error"] and "STOW-RS" in stored["error"]
    assert PASSWORD not in response.text


def test_a_series_over_the_voxel_limit_is_refused_from_its_metadata(pacs, monkeypatch):
    from dicomweb_client.api import DICOMwebClient

    orthanc, (study, series), _ = pacs
    fetched = []
    monkeypatch.setattr(DICOMwebClient, "retrieve_instance", lambda self, *a, **k: fetched.append(a))
    policy = DicomwebPolicy(urls=(orthanc.dicomweb,), basic={orthanc.dicomweb: (USER, PASSWORD)})
    with pytest.raises(PayloadTooLarge, match=r"\[512, 512, 20\] has 5242880 voxels, over the limit of 1000000 \(MEDSAM2_MAX_VOXELS\)"):
        read_dicomweb(SeriesRef(orthanc.dicomweb, study, series), policy, field="f", limits=Limits(max_voxels=1_000_000))
    assert fetched == []


def test_wrong_credentials_name_the_pacs_answer_not_the_password(pacs):
    orthanc, (study, series), _ = pacs
    policy = DicomwebPolicy(urls=(orthanc.dicomweb,), basic={orthanc.dicomweb: (USER, "wrong-" + PASSWORD)})
    with pytest.raises(ServiceError, match="HTTP 401") as caught:
        read_dicomweb(SeriesRef(orthanc.dicomweb, study, series), policy, field="f", limits=Limits())
    assert PASSWORD not in caught.value.message


def _meta(k: int, *, rows: int = 512, columns: int = 512, frames: int | None = None, sop_class: str = "1.2.840.10008.5.1.4.1.1.2",
          orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0)) -> dict:
    meta = {"00080016": {"vr": "UI", "Value": [sop_class]}, "00080018": {"vr": "UI", "Value": [f"1.2.3.{k}"]},
            "00280010": {"vr": "US", "Value": [rows]}, "00280011": {"vr": "US", "Value": [columns]},
            "00280100": {"vr": "US", "Value": [16]}, "00200032": {"vr": "DS", "Value": [0, 0, k]},
            "00200037": {"vr": "DS", "Value": list(orientation)}}
    if frames is not None:
        meta["00280008"] = {"vr": "IS", "Value": [frames]}
    return meta


@pytest.mark.parametrize(("series", "error", "match"), [
    ([_meta(0), _meta(1, rows=256)], UnsupportedMedia, "mixes slice sizes"),
    ([_meta(0), _meta(1, orientation=(0, 1, 0, 0, 0, 1))], UnsupportedMedia, "mixes slice orientations"),
    ([_meta(0, frames=40)], UnsupportedMedia, "multi-frame"),
    ([_meta(0, sop_class="1.2.840.10008.5.1.4.1.1.66.4")], UnsupportedMedia, "not a CT, MR or PET image"),
    ([{k: v for k, v in _meta(0).items() if k != "00200032"}], UnsupportedMedia, "ImagePositionPatient"),
    ([], NotFound, "no instances"),
    ([_meta(k) for k in range(5)], PayloadTooLarge, "MEDSAM2_MAX_VOXELS"),
])
def test_series_metadata_is_refused_before_any_pixel(series, error, match):
    with pytest.raises(error, match=match):
        check_metadata(series, field="f", limits=Limits(max_voxels=512 * 512 * 4))


class _Slow(http.server.BaseHTTPRequestHandler):
    delay = 5.0
    redirect_to = ""

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.redirect_to:
            self.send_response(302)
            self.send_header("Location", self.redirect_to + self.path)
            self.end_headers()
            return
        time.sleep(self.delay)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def _serve(handler) -> tuple[http.server.ThreadingHTTPServer, str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}/dicom-web"


def test_a_slow_pacs_is_bounded_by_the_budget():
    httpd, url = _serve(_Slow)
    try:
        started = time.monotonic()
        with pytest.raises(ServiceError) as caught:
            read_dicomweb(SeriesRef(url, "1.2.3", "1.2.4"), DicomwebPolicy(urls=(url,)), field="f", limits=Limits(),
                          budget=Budget(0.5))
        assert time.monotonic() - started < 3
        assert caught.value.code in ("fetch_timeout", "deadline")
    finally:
        httpd.shutdown()


def test_a_redirect_off_the_listed_server_is_refused():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.3)
        handler = type("Redirect", (_Slow,), {"redirect_to": f"http://127.0.0.1:{listener.getsockname()[1]}"})
        httpd, url = _serve(handler)
        try:
            with pytest.raises(FetchRefused, match="not a server listed in MEDSAM2_DICOMWEB_URLS"):
                read_dicomweb(SeriesRef(url, "1.2.3", "1.2.4"), DicomwebPolicy(urls=(url,)), field="f", limits=Limits())
            with pytest.raises(TimeoutError):
                listener.accept()
        finally:
            httpd.shutdown()


def test_a_listed_host_name_on_a_private_address_is_refused():
    """Only a listed literal IP may be non-public; a name that resolves to one is refused (DNS cannot open the door)."""
    url = "http://pacs.example.test:8042/dicom-web"
    with pytest.raises(FetchRefused, match=r"non-public address \(10.0.0.5 is private\)"):
        read_dicomweb(SeriesRef(url, "1.2.3", "1.2.4"), DicomwebPolicy(urls=(url,), fetch=FetchPolicy()), field="f",
                      limits=Limits(), resolver=lambda host, port: ["10.0.0.5"])


def test_a_batch_prompt_file_can_name_a_series_in_the_pacs(pacs, service, tmp_path):
    """The batch endpoint: a sidecar alone with `dicomweb` is the work item; its SEG goes into the PACS."""
    from medsam2_endpoint.api.batch import BatchApp
    from medsam2_endpoint.core.service import Service
    from medsam2_endpoint.core.settings import Settings

    orthanc, (study, series), _ = pacs
    settings = Settings.from_env({"MEDSAM2_WARMUP": "0", "MEDSAM2_DICOMWEB_URLS": orthanc.dicomweb,
                                  "MEDSAM2_DICOMWEB_BASIC_AUTH": f"{orthanc.dicomweb}={USER}:{PASSWORD}"})
    from medsam2_endpoint.api.batch_files import FileScorer

    app = BatchApp()
    app.output_dir = tmp_path / "out"
    app.local = FileScorer(app.output_dir, Service(settings, service.registry))  # the session's models
    app.output_dir.mkdir()
    z, box, _ = liver_box()
    prompt = tmp_path / "liver.prompt.json"
    prompt.write_text(json.dumps({"dicomweb": {"url": orthanc.dicomweb, "study": study, "series": series}, "store_seg": True,
                                  "bbox": box, "key_slice_idx": z, "model": "lite-medsam", "max_slices": 1, "propagation": "up"}))
    (row,) = map(json.loads, app.run([str(prompt)]))
    assert row["status"] == "ok" and row["error"] is None, row
    assert row["mask_file"] == "liver_mask.nii.gz" and (app.output_dir / row["mask_file"]).is_file()
    assert row["seg_file"].startswith(f"dicomweb:{study}/")


def test_a_listed_host_name_is_connected_at_the_address_that_was_checked(pacs):
    """`pacs.test` resolves nowhere but in the checked lookup: the series is read, so the connection went to the
    vetted address (no second DNS lookup), as io/fetch.py pins URL inputs."""
    orthanc, (study, series), _ = pacs
    url = orthanc.dicomweb.replace("127.0.0.1", "pacs.test")
    policy = DicomwebPolicy(urls=(url,), basic={url: (USER, PASSWORD)}, fetch=FetchPolicy(allow_networks=("127.0.0.1/32",)))
    lookups = []
    got = read_dicomweb(SeriesRef(url, study, series), policy, field="f", limits=Limits(),
                        resolver=lambda host, port: lookups.append(host) or ["127.0.0.1"])
    try:
        assert len(got.files) == 20 and set(lookups) == {"pacs.test"}
    finally:
        got.close()


def test_https_is_pinned_and_checked_against_the_listed_name(tls_server, monkeypatch):  # noqa: F811 - the imported fixture
    """https at the vetted address keeps the listed host name for SNI and the certificate (test_fetch's server,
    whose certificate names only medsam.test)."""
    from medsam2_endpoint.io import fetch

    monkeypatch.setattr(fetch, "_CA_CERTS", tls_server.ca)
    tls_server.sni.clear()
    for host in ("medsam.test", "other.test"):
        url = f"https://{host}:{tls_server.port}/dicom-web"
        policy = DicomwebPolicy(urls=(url,), fetch=FetchPolicy(allow_networks=("127.0.0.0/8",)))
        call = partial(read_dicomweb, SeriesRef(url, "1.2.3", "1.2.4"), policy, field="f", limits=Limits(),
                       resolver=lambda host, port: ["127.0.0.1"])
        if host == "medsam.test":
            with pytest.raises(ServiceError, match="answered HTTP"):  # the handshake passed: the server answered
                call()
        else:
            with pytest.raises(FetchRefused, match="TLS verification failed for https://other.test"):
                call()
    assert tls_server.sni == ["medsam.test", "other.test"]


class _FakeAzureML(http.server.BaseHTTPRequestHandler):
    """Azure ML's managed-identity token endpoint (MSI_ENDPOINT) and a DICOMweb server, on loopback."""

    seen: list[tuple[str, str | None]] = []
    token_status = 200

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.seen.append((self.path, self.headers.get("Authorization")))
        status, body = 200, b"[]"  # DICOMweb: a series without instances
        if self.path.startswith("/msi/"):
            status = self.token_status
            body = json.dumps({"access_token": "entra-token-1", "expires_on": str(int(time.time()) + 3600),
                               "resource": "https://dicom.healthcareapis.azure.com", "token_type": "Bearer"}
                              if status == 200 else {"error": "invalid_request", "error_description": "local-secret"}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("token_status", [200, 500])
def test_the_managed_identity_token_is_for_the_dicom_service(monkeypatch, token_status):
    """azure-identity (the real one) gets the token from Azure ML's managed-identity endpoint for the DICOM
    service's audience; it is sent as a bearer token; a failure says so without the endpoint's answer."""
    from medsam2_endpoint.io import dicomweb

    handler = type("Fake", (_FakeAzureML,), {"seen": [], "token_status": token_status})
    httpd, url = _serve(handler)
    base = url.rsplit("/", 1)[0]
    monkeypatch.setenv("MSI_ENDPOINT", base + "/msi/token")
    monkeypatch.setenv("MSI_SECRET", "local-secret")
    dicomweb._credential.cache_clear()
    try:
        policy = DicomwebPolicy(urls=(url,), managed_identity="system")
        expected = NotFound if token_status == 200 else FetchFailed
        with pytest.raises(expected) as caught:
            read_dicomweb(SeriesRef(url, "1.2.3", "1.2.4"), policy, field="f", limits=Limits())
        token_path = handler.seen[0][0]
        assert token_path.startswith("/msi/token") and "resource=https://dicom.healthcareapis.azure.com" in token_path
        if token_status == 200:
            assert handler.seen[-1] == ("/dicom-web/studies/1.2.3/series/1.2.4/metadata", "Bearer entra-token-1")
        else:
            assert "managed identity" in caught.value.message and "local-secret" not in caught.value.message
            assert not any(path.startswith("/dicom-web") for path, _ in handler.seen)  # nothing sent unsigned
    finally:
        dicomweb._credential.cache_clear()
        httpd.shutdown()
