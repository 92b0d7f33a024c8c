"""Shared fixtures: a random-weight MedSAM2 checkpoint (released layout), a model folder, a Service (and
cold ones on its models), the scoring servers shared by configuration."""

from __future__ import annotations

import base64
import copy
import http.server
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from local_server import Server, running_server
from medsam2_endpoint.core.registry import ModelRegistry
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
    """One Service for the session: its caches warm up across tests (fast), so a test must not rely on them
    being empty nor resize them; such a test takes `cold_service`."""
    return Service.from_settings(Settings.from_env({"MEDSAM2_WARMUP": "0"}, model_dir=str(model_dir)))


@pytest.fixture(scope="session")
def cold_service(service: Service) -> Callable[[], Service]:
    """A factory of Services of their own, every cache empty (2D embeddings, 3D features, walks, held volumes),
    on the session Service's loaded models: each engine is a shallow copy sharing the weights with a new
    feature cache of the same size, so nothing is loaded again and the session Service's caches are untouched."""

    def make() -> Service:
        engines = {}
        for name, engine in service.registry.snapshot().items():
            clone = copy.copy(engine)
            clone.features = type(engine.features)(engine.features.max_bytes)
            engines[name] = clone
        registry = ModelRegistry(engines, service.registry.default, device=service.registry.device,
                                 feature_cache_mb=service.registry.feature_cache_mb)
        return Service(service.settings, registry)

    return make


# ------------------------------------------------------------------------------------------- shared servers
# A scoring server per configuration, started for the first test that needs it and stopped after the last one
# (pytest_runtest_teardown below), not at the session's end: sharing never keeps an idle server in memory.
# Servers a test stops or breaks (the shutdown drills) stay module fixtures of their own.
_SHARED_SERVERS: dict[str, ExitStack] = {}


@pytest.fixture(scope="session")
def lite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """azmlinfsrv on score.py with the default settings and an empty model folder (LiteMedSAM serves)."""
    with ExitStack() as stack:
        _SHARED_SERVERS["lite_server"] = stack
        yield stack.enter_context(running_server(tmp_path_factory.mktemp("lite-server"), {}))


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop a shared server once no test left in the run uses it."""
    if not _SHARED_SERVERS:
        return
    items = item.session.items
    later = items[items.index(item) + 1 :] if nextitem is not None else []
    for name in list(_SHARED_SERVERS):
        if name in getattr(item, "fixturenames", ()) and not any(name in getattr(i, "fixturenames", ()) for i in later):
            _SHARED_SERVERS.pop(name).close()


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
