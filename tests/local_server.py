"""Start the real scoring server (azmlinfsrv + score.py) on a free loopback port, for the hardening tests.

Not a test module: the server tests (smoke, client, fuzz, limits, soak) import it and start one server
per module. With an empty model folder LiteMedSAM (bundled real weights) serves.
"""

from __future__ import annotations

import base64
import gzip
import io
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import requests

from medsam2_endpoint.api.errors import STATUS_OF_CODE
from medsam2_endpoint.testing.processes import answers, stop_group, wait_ready

REPO = Path(__file__).resolve().parents[1]
#: An allowlist no host name can match ('!' is not a host character): the fuzzers can never make the
#: server resolve or fetch a generated URL, whatever string they produce.
NO_FETCH = {"MEDSAM2_FETCH_HOST_ALLOWLIST": "!no-fetching-in-tests"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    log: Path
    proc: subprocess.Popen

    @property
    def score(self) -> str:
        return self.url + "/score"

    def alive(self) -> bool:
        return self.proc.poll() is None and requests.get(self.url + "/", timeout=10).status_code == 200

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def running_server(folder: Path, env: dict[str, str], *, workers: int = 1, ready_timeout: float = 300) -> Iterator[Server]:
    """azmlinfsrv with score.py and `workers` gunicorn workers on CPU, serving `folder`/model (LiteMedSAM only
    when it holds no checkpoint); waits until every worker ran init()."""
    model_dir = folder / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = folder / "server.log"
    full_env = {
        **{k: v for k, v in os.environ.items() if k != "MEDSAM2_MODEL_DIR"},  # serve `folder`'s models only
        "WORKER_COUNT": str(workers),
        "MEDSAM2_NUM_THREADS": "1",
        "MEDSAM2_WARMUP": "0",
        "MEDSAM2_DEVICE": "cpu",  # the same timings everywhere: the time-limit tests need slow enough slices
        "AZUREML_MODEL_DIR": str(model_dir),
        **env,
    }
    azmlinfsrv = str(Path(sys.executable).with_name("azmlinfsrv"))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [azmlinfsrv, "--entry_script", str(REPO / "score.py"), "--model_dir", str(model_dir), "--port", str(port)],
            cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    server = Server(f"http://127.0.0.1:{port}", log_path, proc)
    try:
        wait_ready(proc, lambda: server.log_text().count("ready: models") >= workers and answers(server.url + "/"),
                   what="azmlinfsrv", log=server.log_text, timeout_s=ready_timeout)
        yield server
    finally:
        stop_group(proc)  # a test may have stopped it itself (the shutdown drill)
        proc.wait(timeout=30)


# ----------------------------------------------------------------------------------------------- request data


def tiny_volume(depth: int = 3, size: int = 32, *, seed: int = 0, dtype: type = np.int16) -> np.ndarray:
    """(Z, Y, X) phantom: noisy background and a bright square through the middle slices."""
    rng = np.random.default_rng(seed)
    array = rng.integers(-50, 50, size=(depth, size, size)).astype(dtype)
    lo, hi = size // 4, size - size // 4
    array[:, lo:hi, lo:hi] += 200
    return array


def nifti_bytes(array_zyx: np.ndarray, *, compressed: bool = True) -> bytes:
    """A .nii(.gz) of a (Z, Y, X) array (NIfTI stores x first); gzip without a timestamp, so bytes are reproducible."""
    raw = nib.Nifti1Image(np.ascontiguousarray(array_zyx.transpose(2, 1, 0)), np.eye(4), dtype=array_zyx.dtype).to_bytes()
    return gzip.compress(raw, mtime=0) if compressed else raw


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def volume_request(array_zyx: np.ndarray, **columns) -> dict:
    """One-item 3D body for a tiny volume: the box covers the bright square on the middle slice."""
    depth, size = array_zyx.shape[0], array_zyx.shape[1]
    cols = {
        "nii_image": [b64(nifti_bytes(array_zyx))],
        "bbox": [[size // 4 - 2, size // 4 - 2, size - size // 4 + 2, size - size // 4 + 2]],
        "key_slice_idx": [depth // 2],
    }
    cols.update(columns)
    return {"input_data": cols}


def png_b64(size: int = 32) -> str:
    from PIL import Image

    array = np.zeros((size, size), np.uint8)
    array[size // 4 : size - size // 4, size // 4 : size - size // 4] = 200
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return b64(buffer.getvalue())


def image_request(size: int = 32, **columns) -> dict:
    """One-item 2D body: a PNG with a bright square and a box around it."""
    cols = {"image": [png_b64(size)], "bbox": [[size // 4 - 2, size // 4 - 2, size - size // 4 + 2, size - size // 4 + 2]]}
    cols.update(columns)
    return {"input_data": cols}


def assert_error_body(response) -> dict:
    """A run() error: JSON {"error": str, "status": <the HTTP status>, "code": <its kind>} (a requests or schemathesis response)."""
    headers = {k.lower(): v[0] if isinstance(v, list) else v for k, v in response.headers.items()}
    assert headers.get("content-type", "").startswith("application/json"), headers
    body = response.json()
    assert set(body) - {"detail"} == {"error", "status", "code"} and isinstance(body["error"], str), body
    assert body["status"] == response.status_code, (body, response.status_code)
    assert STATUS_OF_CODE.get(body["code"]) == response.status_code, (body, response.status_code)
    return body
