import base64
import gzip
import io

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medsam2_endpoint.config import Limits
from medsam2_endpoint.errors import InvalidRequest, PayloadTooLarge, UnsupportedMedia
from medsam2_endpoint.volume import Volume, decode_base64, read_nifti, write_nifti

LIMITS = Limits()
OBLIQUE = (0.9659258, -0.2588190, 0.0, 0.2588190, 0.9659258, 0.0, 0.0, 0.0, 1.0)


def make_image(shape=(6, 10, 12), dtype=np.int16, spacing=(0.7, 0.9, 2.5), origin=(-30.0, 12.5, 100.0), direction=OBLIQUE):
    array = (np.arange(np.prod(shape)) % 97).reshape(shape).astype(dtype)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def nifti_bytes(array, affine=None, compressed=False):
    img = nib.Nifti1Image(array, np.eye(4) if affine is None else affine)
    raw = img.to_bytes()
    return gzip.compress(raw) if compressed else raw


@pytest.mark.parametrize("compressed", [True, False])
@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint8])
def test_geometry_round_trip(compressed, dtype):
    image = make_image(dtype=dtype)
    volume = read_nifti(write_nifti(image, compressed=compressed), field="f", limits=LIMITS)
    assert volume.array.dtype == dtype and volume.array.shape == (6, 10, 12)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image))
    assert volume.itk_size == [12, 10, 6]
    assert np.allclose(volume.spacing, image.GetSpacing()) and np.allclose(volume.origin, image.GetOrigin())
    assert np.allclose(volume.direction, image.GetDirection(), atol=1e-6)
    mask = (volume.array > 50).astype(np.uint8)
    back = read_nifti(write_nifti(volume.image_like(mask)), field="m", limits=LIMITS)
    np.testing.assert_array_equal(back.array, mask)
    assert np.allclose(back.spacing, volume.spacing) and np.allclose(back.origin, volume.origin)
    assert np.allclose(back.direction, volume.direction, atol=1e-6)
    assert back.voxel_ml == pytest.approx(0.7 * 0.9 * 2.5 / 1000)


def test_base64_errors_and_data_url_prefix():
    payload = base64.b64encode(b"hello").decode()
    assert decode_base64("data:application/gzip;base64," + payload, field="f", limits=LIMITS) == b"hello"
    assert decode_base64(payload[:4] + "\n" + payload[4:], field="f", limits=LIMITS) == b"hello"
    with pytest.raises(InvalidRequest, match=r"input_data.nii_image\[0\]: not valid base64"):
        decode_base64("@@not base64@@", field="input_data.nii_image[0]", limits=LIMITS)
    with pytest.raises(PayloadTooLarge, match="MEDSAM2_MAX_BASE64_MB"):
        decode_base64("A" * 100, field="f", limits=Limits(max_base64_bytes=10))


def test_not_nifti_and_jpeg_are_refused():
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="JPEG")
    for data in (buffer.getvalue(), b"plain text, long enough " * 30):
        with pytest.raises(UnsupportedMedia, match="not a NIfTI file"):
            read_nifti(data, field="f", limits=LIMITS)


def test_truncated_gzip_and_truncated_file():
    data = nifti_bytes(np.zeros((8, 8, 8), np.int16), compressed=True)
    with pytest.raises(InvalidRequest, match="truncated"):
        read_nifti(data[: len(data) // 2], field="f", limits=LIMITS)
    raw = nifti_bytes(np.zeros((8, 8, 8), np.int16))
    with pytest.raises(InvalidRequest, match="truncated"):
        read_nifti(raw[:-100], field="f", limits=LIMITS)


def test_gzip_bomb_refused_while_streaming():
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024))  # 64 MB of zeros in ~64 KB
    with pytest.raises(PayloadTooLarge, match="decompressed"):
        read_nifti(bomb, field="f", limits=Limits(max_file_bytes=1024 * 1024))


def test_header_limits_refuse_before_reading():
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 30000))
    header.set_data_dtype(np.int16)
    raw = header.binaryblock + b"\0" * 4  # no voxel data at all: refused from the header alone
    with pytest.raises(PayloadTooLarge, match="MEDSAM2_MAX_VOXELS"):
        read_nifti(raw, field="f", limits=LIMITS)


@pytest.mark.parametrize(
    ("shape", "message"),
    [((16, 16), "2D"), ((8, 8, 8, 3), "extra dimensions")],
)
def test_dimensionality_errors(shape, message):
    with pytest.raises(InvalidRequest, match=message):
        read_nifti(nifti_bytes(np.zeros(shape, np.int16)), field="f", limits=LIMITS)


def test_single_timepoint_4d_is_accepted():
    volume = read_nifti(nifti_bytes(np.ones((9, 8, 7, 1), np.int16)), field="f", limits=LIMITS)
    assert volume.array.shape == (7, 8, 9)


def test_nan_refused():
    array = np.zeros((4, 4, 4), np.float32)
    array[1, 1, 1] = np.nan  # written with SimpleITK: nibabel would turn NaN into 0
    with pytest.raises(InvalidRequest, match="NaN"):
        read_nifti(write_nifti(sitk.GetImageFromArray(array)), field="f", limits=LIMITS)


def test_image_like_refuses_other_shapes():
    volume = Volume(np.zeros((2, 3, 4)), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(ValueError):
        volume.image_like(np.zeros((2, 3, 5)))
