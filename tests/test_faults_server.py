"""Fault drills on one real azmlinfsrv server (score.py, LiteMedSAM, one worker) on loopback: a request of
16 items of 200 MB is refused from its headers with a 413 naming the limit while the worker's memory stays put;
a worker killed (SIGKILL) in the middle of a 3D request costs that request only; one SIGTERM stops the server
within seconds, cancelling the running request. The tests share the server, in this order (the last stops it)."""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import signal
import socket
import threading
import time

import nibabel as nib
import numpy as np
import pytest
import requests

from local_server import running_server, tiny_volume, volume_request
from medsam2_endpoint.testing.faults import children, rss_mb

MB = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("faults-server"), {"MEDSAM2_REQUEST_DEADLINE_S": "120"}) as srv:
        yield srv


def worker_of(server) -> int:
    (pid,) = children(server.proc.pid)
    return pid


def declared_200_mb() -> str:
    """base64 of a .nii.gz whose header declares 512 x 512 x 400 int16 voxels (200 MB) and that holds only zeros:
    what a request of big volumes looks like to a server that reads headers first, in 270 kB."""
    header = nib.Nifti1Header()
    header.set_data_shape((512, 512, 400))
    header.set_data_dtype(np.int16)
    buffer = io.BytesIO()
    header.write_to(buffer)
    raw = gzip.compress(buffer.getvalue() + bytes(200 * MB), compresslevel=1, mtime=0)
    return base64.b64encode(raw).decode()


def test_sixteen_items_of_200_mb_are_refused_from_their_headers_and_memory_stays(server):
    pid = worker_of(server)
    item = declared_200_mb()
    body = {"input_data": {"nii_image": [item] * 16, "bbox": [[10, 10, 50, 50]] * 16, "key_slice_idx": [200] * 16}}
    before = rss_mb(pid)
    response = requests.post(server.score, json=body, timeout=120)
    grown = rss_mb(pid) - before
    assert response.status_code == 413, response.text
    assert "MEDSAM2_MAX_REQUEST_VOXELS" in response.json()["error"]
    # The same request with real 200 MB files is a 3.2 GB body: refused from Content-Length, unread.
    sock = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
    sock.sendall(f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {16 * 200 * MB}\r\n\r\n".encode()
                 + b'{"input_data": {"nii_image": ["')
    sock.settimeout(60)
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        answer += chunk
    sock.close()
    grown = max(grown, rss_mb(pid) - before)
    print(f"worker RSS growth: {grown:.1f} MB")
    assert answer.startswith(b"HTTP/1.1 413") and b"MEDSAM2_MAX_REQUEST_MB" in answer, answer[:400]
    assert grown < 100, f"the worker grew by {grown:.0f} MB"


def long_request() -> dict:
    return volume_request(tiny_volume(depth=60, size=128))


def test_a_worker_killed_mid_3d_request_costs_only_that_request(server):
    pid = worker_of(server)
    answers: list[object] = []

    def send() -> None:
        try:
            answers.append(requests.post(server.score, json=long_request(), timeout=120))
        except requests.RequestException as exc:
            answers.append(exc)

    client = threading.Thread(target=send)
    client.start()
    time.sleep(4.0)  # decoded and walking the slices (60 slices take longer than this)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    client.join(120)
    answer = answers[0]
    assert isinstance(answer, requests.RequestException) or answer.status_code >= 500, answer  # type: ignore[union-attr]
    recovered = None
    deadline = time.monotonic() + 240
    while recovered is None and time.monotonic() < deadline:  # gunicorn starts a new worker, which runs init()
        try:
            if requests.post(server.score, json=volume_request(tiny_volume()), timeout=60).status_code == 200:
                recovered = time.monotonic() - killed
        except requests.RequestException:
            pass
        if recovered is None:
            time.sleep(1.0)
    print(f"first 200 after the kill: {recovered} s")
    assert recovered is not None, "no successful request within 240 s of the kill"
    assert worker_of(server) != pid
    for seed in range(3):
        assert requests.post(server.score, json=volume_request(tiny_volume(seed=seed)), timeout=60).status_code == 200


def test_one_sigterm_stops_the_server_within_seconds_cancelling_the_running_request(server):
    """Last in this module: it stops the shared server."""
    answers: list[requests.Response] = []
    client = threading.Thread(target=lambda: answers.append(requests.post(server.score, json=long_request(), timeout=120)))
    client.start()
    time.sleep(4.0)
    sent = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(timeout=60)  # gunicorn's graceful stop would wait 30 s for a request it cannot cancel
    took = time.monotonic() - sent
    client.join(60)
    print(f"azmlinfsrv exited {took:.1f} s after SIGTERM")
    assert answers and answers[0].status_code == 503, answers
    body = answers[0].json()
    assert body["code"] == "cancelled" and "the server is stopping" in body["error"]
    assert json.loads(answers[0].text)["status"] == 503
