"""Shared fixtures: a random-weight MedSAM2 checkpoint (released layout), a model folder, a Service."""

from __future__ import annotations

import base64
import http.server
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from medsam2_endpoint.core.service import Service
from medsam2_endpoint.core.settings import Settings
from medsam2_endpoint.testing.phantoms import Phantom
from reference_pipeline import make_random_checkpoint


@pytest.fixture(scope="session")
def medsam2_checkpoint(tmp_path_factory) -> Path:
    """A MedSAM2-architecture checkpoint with random weights: {"model": state_dict}, as MedSAM2_latest.pt."""
    path = tmp_path_factory.mktemp("weights") / "MedSAM2_latest.pt"
    make_random_checkpoint(path, seed=0)
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, medsam2_checkpoint) -> Path:
    """A model folder laid out as on Azure: the checkpoint one level down."""
    folder = tmp_path_factory.mktemp("azureml-models")
    (folder / "medsam2").mkdir()
    shutil.copy(medsam2_checkpoint, folder / "medsam2" / "MedSAM2_latest.pt")
    return folder


@pytest.fixture(scope="session")
def service(model_dir) -> Service:
    return Service.from_settings(Settings.from_env({"MEDSAM2_WARMUP": "0"}, model_dir=str(model_dir)))


def request_for(phantom: Phantom, *, lesion: int = 0, slice_offset: int = 0, **columns) -> dict:
    """A one-item 3D request body for a phantom's lesion."""
    les = phantom.lesions[lesion]
    cols = {
        "nii_image": [base64.b64encode(phantom.nifti_bytes()).decode()],
        "bbox": [list(les.bbox)],
        "key_slice_idx": [les.key_slice + slice_offset],
        "slice_offset": [slice_offset],
    }
    if phantom.window:
        cols["dicom_window"] = [list(phantom.window)]
    cols.update(columns)
    return {"input_data": cols}


@contextmanager
def serving_bytes(data: bytes) -> Iterator[str]:
    """A loopback HTTP server answering every GET with `data`; yields its base URL (http://127.0.0.1:PORT)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
