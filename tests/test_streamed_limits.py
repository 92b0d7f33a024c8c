"""Limits enforced while the bytes arrive (SECURITY.md's former known gaps), each on real loopback servers:
a chunked body stops at its cap (samapi JSON and uploads here; azmlinfsrv's /score in test_limits_server.py);
a URL item's NIfTI header is counted from the first bytes and the download is cut; inline video frames are
checked from their image headers before their base64 is decoded; a refused video request's folder goes at once."""

from __future__ import annotations

import base64
import gzip
import http.client
import http.server
import io
import socket
import threading
from collections.abc import Iterator

import nibabel as nib
import numpy as np
import pytest
import requests
from PIL import Image

from medsam2_endpoint.api.samapi import create_app
from medsam2_endpoint.base.errors import PayloadTooLarge
from medsam2_endpoint.contract.score3d import parse_request
from medsam2_endpoint.core import images
from medsam2_endpoint.core.images import Frame
from medsam2_endpoint.io.limits import Limits
from test_samapi import live, post, with_settings

MB = 1024 * 1024


# ----------------------------------------------------------------------------------------------- chunked bodies


class _Answer(io.BytesIO):
    def makefile(self, *args, **kwargs):
        return self


def chunked_post(port: int, path: str, *, content_type: str, prefix: bytes, total: int, timeout: float = 15) -> http.client.HTTPResponse | None:
    """POST `prefix` then filler in 64 KiB chunks (Transfer-Encoding: chunked, no Content-Length) until `total`
    bytes were sent, never ending the body; the answer the server gave meanwhile, or None if it gave none
    within `timeout` s (a server reading the body whole waits for its end, which never comes)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(timeout)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n".encode())
    block, sent = b"A" * 65536, 0
    try:
        for data in [prefix] + [block] * ((total - len(prefix)) // len(block) + 1):
            sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            sent += len(data)
    except OSError:  # the server answered and closed while we were sending
        pass
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except OSError:  # time-out (no answer) or a reset after the answer
        pass
    finally:
        sock.close()
    if not answer:
        return None
    response = http.client.HTTPResponse(_Answer(answer))  # type: ignore[arg-type]
    response.begin()
    return response


def refusal(response: http.client.HTTPResponse | None) -> dict:
    import json

    assert response is not None, "no answer while the body was still arriving: the server waited for all of it"
    body = json.loads(response.read())
    assert response.status == 413 and body["status"] == 413 and body["code"] == "too_large", body
    return body


@pytest.fixture(scope="module")
def small(service, tmp_path_factory) -> Iterator[tuple[str, object]]:
    """samapi with small caps: JSON bodies 1 MiB of base64 (+1 MiB), uploads 1 MiB a file (+1 MiB)."""
    app = create_app(with_settings(service, max_request_mb=1, samapi_max_upload_mb=1,
                                   samapi_weights_dir=tmp_path_factory.mktemp("small-weights")))
    with live(app) as url:
        yield url, app


def port_of(url: str) -> int:
    return int(url.split(":")[2].split("/")[0])


def test_samapi_chunked_json_body_stops_at_its_cap(small):
    url, _ = small
    answer = chunked_post(port_of(url), "/sam/", content_type="application/json", prefix=b'{"type": "vit_t", "b64img": "',
                          total=2 * MB + 256 * 1024)
    body = refusal(answer)
    assert "MEDSAM2_MAX_REQUEST_MB" in body["error"] and str(2 * MB) in body["error"], body


def test_samapi_chunked_upload_stops_at_its_cap(small):
    url, _ = small
    prefix = (b'--B\r\nContent-Disposition: form-data; name="dirname"\r\n\r\nbig\r\n--B\r\nContent-Disposition: form-data; '
              b'name="file"; filename="0.png"\r\nContent-Type: image/png\r\n\r\n')
    answer = chunked_post(port_of(url), "/sam/upload/", content_type="multipart/form-data; boundary=B", prefix=prefix,
                          total=2 * MB + 256 * 1024)
    body = refusal(answer)
    assert "MEDSAM2_SAMAPI_MAX_UPLOAD_MB" in body["error"], body


def test_samapi_declared_length_over_the_cap_is_refused_unread(small):
    url, _ = small
    response = requests.post(url + "upload/", data=b"x" * (3 * MB), headers={"Content-Type": "multipart/form-data; boundary=B"},
                             timeout=60)
    assert response.status_code == 413 and "MEDSAM2_SAMAPI_MAX_UPLOAD_MB" in response.json()["error"]
    assert requests.get(url + "version/", timeout=30).status_code == 200  # the server goes on


# ----------------------------------------------------------------------------------------------- refused video folders


def png(width: int, height: int, *, noise: bool = False) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (height, width), dtype=np.uint8) if noise else np.zeros((height, width), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_refused_video_request_removes_its_folder_at_once(small):
    url, app = small
    uploads = app.state.samapi.uploads
    for i in range(2):
        response = requests.post(url + "upload/", data={"dirname": "refused-1"}, files={"file": (f"{i}.png", png(16, 16), "image/png")},
                                 timeout=60)
        assert response.status_code == 200, response.text
    assert uploads.folder("refused-1").is_dir() and uploads.used_files == 2
    refused = post(url + "video/", type="vit_t", dirname="refused-1", axes="XYZW", objs={"0": [{"obj_id": 1, "bbox": [1, 1, 9, 9]}]})
    assert refused.status_code == 400 and "axes" in refused.json()["error"]
    assert not uploads.folder("refused-1").exists() and uploads.used_files == 0


# ----------------------------------------------------------------------------------------------- video frame headers


@pytest.fixture()
def no_full_decoding(monkeypatch):
    monkeypatch.setattr(images, "decode_base64", lambda *a, **k: pytest.fail("a frame's base64 was decoded whole"))
    monkeypatch.setattr(images, "read_rgb", lambda *a, **k: pytest.fail("a frame was decoded"))


def test_inline_frames_over_the_video_limit_are_refused_before_their_base64_is_decoded(no_full_decoding):
    frames = [Frame(f"b64imgs[{k}]", b64=base64.b64encode(png(200, 100)).decode()) for k in range(10)]
    with pytest.raises(PayloadTooLarge, match="10 frames of 200 x 100 are 200000 pixels.*MEDSAM2_MAX_VOXELS"):
        images.decode_frames(frames, policy=None, limits=Limits(max_voxels=150_000), max_frames=100)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["PNG", "JPEG"])
def test_an_inline_frame_over_the_slice_limit_is_refused_from_the_head_of_its_base64(kind, no_full_decoding):
    """A frame whose file is far longer than its head (noise): the size is read from the first decoded bytes."""
    pixels = np.random.default_rng(1).integers(0, 255, (600, 700), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=kind)
    assert len(buffer.getvalue()) > 200_000  # much more than the head read
    frames = [Frame("b64imgs[0]", b64=base64.b64encode(buffer.getvalue()).decode())]
    with pytest.raises(PayloadTooLarge, match=r"b64imgs\[0\].*700 x 600.*MEDSAM2_MAX_SLICE_PIXELS"):
        images.decode_frames(frames, policy=None, limits=Limits(max_slice_pixels=400_000), max_frames=100)  # type: ignore[arg-type]


def test_inline_frames_within_the_limits_are_still_decoded():
    frames = [Frame(f"b64imgs[{k}]", b64=base64.b64encode(png(20, 10)).decode()) for k in range(3)]
    assert [f.shape for f in images.decode_frames(frames, policy=None, limits=Limits(), max_frames=100)] == [(10, 20, 3)] * 3  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- URL items


class DrippingFile:
    """A loopback HTTP server sending `head`, then zeros up to `total` bytes in 64 KiB writes; it records how
    many bytes the client took before it closed the connection."""

    def __init__(self, head: bytes, total: int) -> None:
        self.sent, self.cut_off, self.done = 0, False, threading.Event()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                self.send_response(200)
                self.send_header("Content-Length", str(total))
                self.end_headers()
                try:
                    self.wfile.write(head)
                    owner.sent = len(head)
                    zeros = bytes(65536)
                    while owner.sent < total:
                        piece = zeros[: total - owner.sent]
                        self.wfile.write(piece)
                        owner.sent += len(piece)
                except OSError:  # BrokenPipe / ConnectionReset: the client closed
                    owner.cut_off = True
                finally:
                    owner.done.set()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/huge.nii"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def declared_header(shape_xyz: tuple[int, int, int], *, compressed: bool) -> bytes:
    header = nib.Nifti1Header()
    header.set_data_shape(shape_xyz)
    header.set_data_dtype(np.int16)
    buffer = io.BytesIO()
    header.write_to(buffer)
    raw = buffer.getvalue() + bytes(4)
    return gzip.compress(raw, mtime=0) if compressed else raw  # zeros after a gzip member are ignored, as gzip does


@pytest.mark.parametrize("compressed", [False, True])
def test_a_url_item_is_refused_from_its_header_and_the_download_cut(service, compressed):
    total = 64 * MB
    served = DrippingFile(declared_header((1024, 1024, 1000), compressed=compressed), total)  # 2 GB of voxels declared
    local = with_settings(service, fetch_allow_http=True, fetch_allow_networks="127.0.0.0/8")
    try:
        body = {"input_data": {"nii_image": [served.url], "bbox": [[4, 4, 20, 20]], "key_slice_idx": [1]}}
        with pytest.raises(PayloadTooLarge, match="MEDSAM2_MAX_VOXELS"):
            local.score_3d(parse_request(body, max_items=16))
        assert served.done.wait(30), "the server is still sending"
    finally:
        served.close()
    print(f"bytes sent before the client closed: {served.sent} of {total}")
    assert served.cut_off and served.sent < total // 4, served.sent
