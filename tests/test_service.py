"""Service orchestration with a fast scripted engine, plus the registry built from a model folder."""

from __future__ import annotations

import base64
import json
import pickle

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import request_for, serving_bytes
from medsam2_endpoint.api.azure import score as score_body
from medsam2_endpoint.api.errors import http_status
from medsam2_endpoint.base.errors import InvalidRequest
from medsam2_endpoint.core.registry import ModelRegistry
from medsam2_endpoint.core.service import Service
from medsam2_endpoint.core.settings import Settings
from medsam2_endpoint.engines.base import ModelInfo
from medsam2_endpoint.engines.medsam2 import CheckpointError, MedSAM2Engine, find_checkpoints
from medsam2_endpoint.io.encode import dumps
from medsam2_endpoint.pipeline.window import window_to_uint8
from medsam2_endpoint.testing.phantoms import ct_phantom, mri_phantom


class BoxEngine:
    """Marks the box on every slice of the lesion's ground-truth z-range; counts starts."""

    def __init__(self, name="box", z_range=(0, 10**6)):
        self.info = ModelInfo(name, "test", "none.pt", "ab" * 32)
        self.z_range = z_range
        self.starts = 0

    def start(self, volume, volume_key=None):
        self.starts += 1
        return volume.shape

    def track(self, shape, *, key_index, box, reverse):
        z = key_index
        while 0 <= z < shape[0]:
            mask = np.zeros(shape[1:], bool)
            if self.z_range[0] <= z <= self.z_range[1]:
                mask[box[1] : box[3] + 1, box[0] : box[2] + 1] = True
            yield z, mask
            z += -1 if reverse else 1


def make_service(engines, **env):
    settings = Settings.from_env({"MEDSAM2_WARMUP": "0", **env})
    return Service(settings, ModelRegistry(engines, next(iter(engines))))


@pytest.fixture(scope="module")
def phantom():
    return ct_phantom((16, 48, 64), spacing=(0.8, 0.9, 2.5), lesions=("ellipsoid",), seed=3)


def test_response_metadata_and_geometry(phantom):
    lesion = phantom.lesions[0]
    service = make_service({"box": BoxEngine(z_range=lesion.z_range)})
    (result,) = json.loads(dumps(score_body(service, request_for(phantom, slice_offset=30, stop_after_empty=[0]))))
    meta = result["metadata"]
    assert meta["shape"] == [64, 48, 16] and meta["mask_shape"] == [16, 48, 64] and meta["axis_order"] == "zyx"
    assert meta["key_slice_index"] == lesion.key_slice + 30 and meta["adjusted_key_slice_index"] == lesion.key_slice
    assert meta["spacing"] == pytest.approx([0.8, 0.9, 2.5])
    assert meta["origin"] == pytest.approx(list(phantom.image.GetOrigin()))
    assert meta["direction"] == pytest.approx(list(phantom.image.GetDirection()))
    mask = np.asarray(result["mask"])
    x0, y0, x1, y1 = lesion.bbox
    per_slice = (x1 - x0 + 1) * (y1 - y0 + 1)
    depth = lesion.z_range[1] - lesion.z_range[0] + 1
    assert meta["voxel_count"] == int(mask.sum()) == per_slice * depth
    assert meta["volume_ml"] == pytest.approx(per_slice * depth * 0.8 * 0.9 * 2.5 / 1000, rel=1e-3)
    assert meta["model"] == {"name": "box", "family": "test", "checkpoint": "none.pt", "sha256": "ab" * 32,
                             "precision": "fp32"}
    assert meta["slices_processed"] == 16 + 1  # stop rules off: both directions to the volume's ends, key slice twice
    (stopped,) = score_body(service, request_for(phantom, slice_offset=30))  # default: stop after 2 empty slices
    low, high = lesion.z_range
    expected = min(high + 2, 15) - lesion.key_slice + 1 + lesion.key_slice - max(low - 2, 0) + 1
    assert stopped["metadata"]["slices_processed"] == expected
    assert stopped["metadata"]["voxel_count"] == meta["voxel_count"]
    assert set(meta["timing_ms"]) == {"decode", "window", "inference", "encode", "total"}


def test_every_item_is_validated_before_any_runs(phantom):
    engine = BoxEngine()
    service = make_service({"box": engine})
    good = request_for(phantom)["input_data"]
    body = {"input_data": {k: v * 2 for k, v in good.items()}}
    body["input_data"]["key_slice_idx"] = [good["key_slice_idx"][0], 99]
    with pytest.raises(InvalidRequest, match=r"input_data.key_slice_idx\[1\]: slice 99 minus slice_offset 0 is 99, outside the volume's 16 slices"):
        score_body(service, body)
    assert engine.starts == 0
    # a window that leaves the second volume constant is also refused before the first item runs
    body["input_data"]["key_slice_idx"] = good["key_slice_idx"] * 2
    body["input_data"]["dicom_window"] = [good["dicom_window"][0], [5000.0, 6000.0]]
    with pytest.raises(InvalidRequest, match=r"input_data.dicom_window\[1\]: the volume is constant inside the window"):
        score_body(service, body)
    assert engine.starts == 0


def test_unknown_model_lists_available(phantom):
    service = make_service({"a": BoxEngine("a"), "b": BoxEngine("b")})
    with pytest.raises(InvalidRequest, match=r"input_data.model\[0\]: unknown model 'c'; available models: a, b"):
        score_body(service, request_for(phantom, model=["c"]))


def test_masks_in_rle_and_nifti_formats_agree_with_list(phantom):
    lesion = phantom.lesions[0]
    service = make_service({"box": BoxEngine(z_range=lesion.z_range)})
    from medsam2_endpoint.testing.samples import decode_mask

    masks = {}
    for fmt in ("list", "rle", "nifti"):
        (result,) = json.loads(dumps(score_body(service, request_for(phantom, mask_format=[fmt]))))
        masks[fmt] = decode_mask(result["mask"], fmt, result["metadata"]["mask_shape"])
    np.testing.assert_array_equal(masks["list"], masks["rle"])
    np.testing.assert_array_equal(masks["list"], masks["nifti"])


def test_url_input_through_the_fetcher(phantom):
    """A loopback HTTP server (allowed only by test configuration); the default policy refuses it."""
    data = phantom.nifti_bytes()

    with serving_bytes(data) as base:
        url = f"{base}/ct.nii.gz?sig=SECRET"
        body = request_for(phantom)
        body["input_data"]["nii_image"] = [url]
        allowed = make_service({"box": BoxEngine()}, MEDSAM2_FETCH_ALLOW_HTTP="1", MEDSAM2_FETCH_ALLOW_NETWORKS="127.0.0.0/8")
        (result,) = score_body(allowed, body)
        assert result["metadata"]["mask_shape"] == [16, 48, 64]
        with pytest.raises(Exception) as refused:
            score_body(make_service({"box": BoxEngine()}), body)
        assert http_status(refused.value) == 400 and "SECRET" not in refused.value.message


def test_registry_from_model_folder(tmp_path, medsam2_checkpoint):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "MedSAM2_CTLesion.pt").symlink_to(medsam2_checkpoint)
    (tmp_path / "a" / "b" / "MedSAM2_latest.pt").symlink_to(medsam2_checkpoint)
    torch.save({"model": {"weight": torch.zeros(3)}}, tmp_path / "other.pt")
    found = find_checkpoints(tmp_path)
    assert [p.name for p in found] == ["MedSAM2_latest.pt", "MedSAM2_CTLesion.pt", "other.pt"]
    service = Service.from_settings(Settings.from_env({"MEDSAM2_WARMUP": "0"}, model_dir=str(tmp_path)))
    assert service.available_models() == ["MedSAM2_latest", "MedSAM2_CTLesion", "lite-medsam"]
    assert service.default == "MedSAM2_latest"
    import hashlib

    assert service.registry.get("MedSAM2_latest").info.sha256 == hashlib.sha256(medsam2_checkpoint.read_bytes()).hexdigest()


def test_checkpoints_with_code_or_wrong_keys_are_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pt", "wb") as handle:
        pickle.dump({"model": Payload()}, handle)
    with pytest.raises(CheckpointError, match="refused, not a plain-tensor checkpoint"):
        MedSAM2Engine(tmp_path / "evil.pt")
    torch.save({"model": {"weight": torch.zeros(3)}}, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match="does not fit the MedSAM2 architecture"):
        MedSAM2Engine(tmp_path / "wrong.pt")
    torch.save({"state": 1}, tmp_path / "nomodel.pt")
    with pytest.raises(CheckpointError, match="expected a dict with a 'model' state dict"):
        MedSAM2Engine(tmp_path / "nomodel.pt")


def test_lite_is_default_without_weights(tmp_path):
    service = Service.from_settings(Settings.from_env({"MEDSAM2_WARMUP": "0"}, model_dir=str(tmp_path)))
    assert service.default == "lite-medsam" and service.available_models() == ["lite-medsam"]


def test_base64_of_garbage_is_a_clear_error(phantom):
    service = make_service({"box": BoxEngine()})
    body = request_for(phantom)
    body["input_data"]["nii_image"] = [base64.b64encode(b"GIF89a" + b"\0" * 400).decode()]
    with pytest.raises(Exception, match=r"input_data.nii_image\[0\]: not a NIfTI file") as err:
        score_body(service, body)
    assert http_status(err.value) == 415


class RecordingEngine(BoxEngine):
    """A BoxEngine that keeps the windowed volume it was given."""

    def start(self, volume, volume_key=None):
        self.volume = volume
        return super().start(volume, volume_key)


def test_mr_without_a_window_gets_the_percentile_window():
    phantom = mri_phantom((12, 40, 48), lesions=("ellipsoid",), seed=5)
    engine = RecordingEngine()
    service = make_service({"box": engine})
    body = request_for(phantom)
    body["input_data"].pop("dicom_window", None)
    (plain,) = score_body(service, body)
    plain_volume = engine.volume
    body["input_data"]["modality"] = ["MR"]
    (mr,) = score_body(service, body)
    values = sitk.GetArrayFromImage(phantom.image)
    lo, hi = np.percentile(values[values != 0], (0.5, 99.5))
    assert mr["metadata"]["window_used"] == pytest.approx([lo, hi], abs=1e-3) and mr["metadata"]["modality"] == "MR"
    assert np.array_equal(engine.volume, window_to_uint8(values, (float(lo), float(hi))))
    assert plain["metadata"]["window_used"] is None and np.array_equal(plain_volume, window_to_uint8(values, None))
    body["input_data"]["dicom_window"] = [[0.0, 100.0]]  # an explicit window wins
    (given,) = score_body(service, body)
    assert given["metadata"]["window_used"] == [0.0, 100.0]
    body["input_data"]["modality"] = ["PET"]
    with pytest.raises(InvalidRequest, match=r"input_data.modality\[0\]"):
        score_body(service, body)
