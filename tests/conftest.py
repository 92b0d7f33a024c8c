"""Shared fixtures: a random-weight MedSAM2 checkpoint (released layout), a model folder, a Service."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import pytest

from medsam2_endpoint.config import Settings
from medsam2_endpoint.phantoms import Phantom
from medsam2_endpoint.service import Service
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
