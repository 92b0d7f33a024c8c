"""Request-wide limits checked from headers before any voxel is decoded, and the budget while decoding:
the 3D route's total voxels across items (NIfTI headers), a video's frames x pixels (image headers), the
request's base64, and the SIGALRM's TimeoutError passing through the readers."""

from __future__ import annotations

import base64
import gzip
import io

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medsam2_endpoint.api.errors import http_status
from medsam2_endpoint.base.budget import Budget
from medsam2_endpoint.base.errors import DeadlineExceeded, InvalidRequest, PayloadTooLarge
from medsam2_endpoint.contract.score3d import parse_request
from medsam2_endpoint.core import images, volumes
from medsam2_endpoint.core.images import Frame
from medsam2_endpoint.io import volume as volume_io
from medsam2_endpoint.io.limits import Limits
from medsam2_endpoint.io.volume import base64_head, peek_shape, read_nifti
from test_samapi import with_settings

LIMITS = Limits()


def header_only(shape_xyz: tuple[int, int, int], *, compressed: bool = True) -> bytes:
    """A NIfTI file that declares `shape_xyz` int16 voxels but carries only its header (a few hundred bytes)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape_xyz)
    header.set_data_dtype(np.int16)
    buffer = io.BytesIO()
    header.write_to(buffer)
    raw = buffer.getvalue() + b"\0" * 4
    return gzip.compress(raw, mtime=0) if compressed else raw


def small_volume(shape_zyx=(4, 24, 24)) -> bytes:
    array = np.zeros(shape_zyx, np.int16)
    array[:, 6:18, 6:18] = 300
    return gzip.compress(nib.Nifti1Image(array.transpose(2, 1, 0), np.eye(4)).to_bytes(), mtime=0)


def items_of(files: list[bytes]) -> list:
    body = {"input_data": {
        "nii_image": [base64.b64encode(f).decode() for f in files],
        "bbox": [[4, 4, 20, 20]] * len(files),
        "key_slice_idx": [1] * len(files),
    }}
    return parse_request(body, max_items=16)


@pytest.mark.parametrize("compressed", [True, False])
def test_the_shape_is_read_from_the_first_bytes(compressed):
    data = header_only((512, 512, 400), compressed=compressed)
    assert peek_shape(base64_head(base64.b64encode(data).decode()), field="f", limits=LIMITS) == (512, 512, 400)


def test_a_header_over_the_per_volume_limit_is_refused_from_its_head():
    with pytest.raises(PayloadTooLarge, match="MEDSAM2_MAX_VOXELS"):
        peek_shape(header_only((2048, 2048, 2000)), field="f", limits=LIMITS)


def test_sixteen_items_of_200_mb_are_refused_from_their_headers_before_any_is_decoded(service, monkeypatch):
    decoded = []
    monkeypatch.setattr(volumes, "read_nifti", lambda *a, **k: decoded.append(1))
    items = items_of([header_only((512, 512, 400))] * 16)  # 16 x 200 MB of int16 voxels declared
    with pytest.raises(PayloadTooLarge) as err:
        service.score_3d(items)
    assert http_status(err.value) == 413 and "MEDSAM2_MAX_REQUEST_VOXELS" in err.value.message
    assert "input_data.nii_image[6]" in err.value.message  # the first item past the limit
    assert err.value.detail["limit"] == service.settings.max_request_voxels and not decoded


def test_the_request_base64_cap_holds_across_items(service):
    small = with_settings(service, max_request_mb=1)
    half = np.random.default_rng(0).integers(0, 255, size=600_000, dtype=np.uint8).tobytes()  # 800 k base64 characters
    with pytest.raises(PayloadTooLarge, match="1600000 characters of base64 in all.*MEDSAM2_MAX_REQUEST_MB"):
        small.score_3d(items_of([half, half]))


def test_url_items_are_counted_once_fetched_before_their_voxels_are_decoded(service, monkeypatch):
    from conftest import serving_bytes

    decoded = []
    original = volumes.read_nifti
    monkeypatch.setattr(volumes, "read_nifti", lambda *a, **k: decoded.append(1) or original(*a, **k))
    tight = with_settings(service, max_request_voxels=24 * 24 * 4 + 10, fetch_allow_http=True,
                          fetch_allow_networks="127.0.0.0/8")
    with serving_bytes(small_volume()) as url:
        body = {"input_data": {"nii_image": [url + "/a.nii.gz", url + "/b.nii.gz"], "bbox": [[4, 4, 20, 20]] * 2,
                               "key_slice_idx": [1, 1]}}
        with pytest.raises(PayloadTooLarge, match=r"nii_image\[1\].*MEDSAM2_MAX_REQUEST_VOXELS"):
            tight.score_3d(parse_request(body, max_items=16))
    assert len(decoded) == 1  # the first item was read; the second was refused from its header


def test_a_spent_budget_while_decoding_answers_deadline_with_the_bytes_done():
    clock = iter(np.arange(0.0, 1000.0, 1.0))
    budget = Budget(1.5, clock=lambda: float(next(clock)))
    data = small_volume((64, 64, 64))
    chunks = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    with pytest.raises(DeadlineExceeded) as err:
        read_nifti(chunks, field="nii_image", limits=LIMITS, budget=budget)
    assert err.value.code == "deadline" and http_status(err.value) == 503 and err.value.detail["bytes_decoded"] > 0


def test_the_scoring_alarm_passes_through_the_nifti_reader(monkeypatch):
    """SIGALRM's TimeoutError inside header parsing is the server's time limit, not a malformed file (400)."""

    def alarm(*args, **kwargs):
        raise TimeoutError

    monkeypatch.setattr(volume_io.nib.Nifti1Header, "from_fileobj", alarm)
    with pytest.raises(TimeoutError):
        read_nifti(small_volume(), field="nii_image", limits=LIMITS)


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((height, width), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_video_over_the_pixel_limit_is_refused_from_the_frame_headers(monkeypatch):
    monkeypatch.setattr(images, "read_rgb", lambda *a, **k: pytest.fail("a frame was decoded"))
    frames = [Frame(f"dirname/{k:03d}.png", data=png(200, 100)) for k in range(10)]
    with pytest.raises(PayloadTooLarge, match="10 frames of 200 x 100 are 200000 pixels.*MEDSAM2_MAX_VOXELS"):
        images.decode_frames(frames, policy=None, limits=Limits(max_voxels=150_000), max_frames=100)  # type: ignore[arg-type]


def test_frames_of_different_sizes_are_refused_before_decoding(monkeypatch):
    monkeypatch.setattr(images, "read_rgb", lambda *a, **k: pytest.fail("a frame was decoded"))
    frames = [Frame("b64imgs[0]", data=png(20, 10)), Frame("b64imgs[1]", data=png(20, 12))]
    with pytest.raises(InvalidRequest, match=r"b64imgs\[1\]: frame of 20 x 12 pixels differs"):
        images.decode_frames(frames, policy=None, limits=LIMITS, max_frames=100)  # type: ignore[arg-type]


def test_frames_within_the_limits_are_decoded_and_the_budget_checked_per_frame():
    frames = [Frame(f"f{k}", data=png(20, 10)) for k in range(3)]
    assert [f.shape for f in images.decode_frames(frames, policy=None, limits=LIMITS, max_frames=100)] == [(10, 20, 3)] * 3  # type: ignore[arg-type]
    budget = Budget(None)
    budget.cancel()
    with pytest.raises(DeadlineExceeded, match="cancelled"):
        images.decode_frames(frames, policy=None, limits=LIMITS, max_frames=100, budget=budget)  # type: ignore[arg-type]
