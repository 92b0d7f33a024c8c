import base64
import gzip
import io
import math

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medsam2_endpoint.base.errors import InvalidRequest, PayloadTooLarge, UnsupportedMedia
from medsam2_endpoint.io.limits import Limits
from medsam2_endpoint.io.volume import Volume, decode_base64, read_nifti, write_nifti

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


def _sitk_read(data: bytes, tmp_path) -> sitk.Image:
    path = tmp_path / ("v.nii.gz" if data[:2] == b"\x1f\x8b" else "v.nii")
    path.write_bytes(data)
    return sitk.ReadImage(str(path))


def _affine(flip_z: bool) -> np.ndarray:
    """Oblique, anisotropic, off-origin; flip_z gives a negative determinant (NIfTI qfac = -1)."""
    a = math.radians(17)
    rotation = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, -1.0 if flip_z else 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation * np.array([0.8, 0.6, 3.0])
    affine[:3, 3] = [-120.5, 40.25, 310.0]
    return affine


def _nifti(array, affine, *, dtype=None, slope=None, big_endian=False, compressed=False) -> bytes:
    header = nib.Nifti1Header(endianness=">" if big_endian else "<")
    image = nib.Nifti1Image(array, affine, header=header, dtype=dtype)
    if slope is not None:
        image.header.set_slope_inter(*slope)
    raw = image.to_bytes()
    return gzip.compress(raw) if compressed else raw


@pytest.mark.parametrize(
    "case",
    [
        {"dtype": np.int16}, {"dtype": np.uint8}, {"dtype": np.int8}, {"dtype": np.uint16}, {"dtype": np.int32},
        {"dtype": np.uint32}, {"dtype": np.float32}, {"dtype": np.float64},
        {"dtype": np.int16, "flip_z": True}, {"dtype": np.int16, "compressed": True},
        {"dtype": np.int16, "big_endian": True}, {"dtype": np.int16, "slope": (2.0, -5.0)},
        {"dtype": np.int16, "t1": True},
    ],
    ids=lambda c: "-".join(f"{k}={getattr(v, '__name__', v)}" for k, v in c.items()),
)
def test_reader_agrees_with_simpleitk(case, tmp_path):
    """read_nifti reads plain volumes itself (one copy) and the rest through SimpleITK: same voxels and geometry as SimpleITK."""
    rng = np.random.default_rng(3)
    array = rng.integers(0, 120, size=(11, 9, 7)).astype(case["dtype"])  # (x, y, z) in NIfTI order
    if case.get("t1"):
        array = array[..., None]
    data = _nifti(
        array, _affine(case.get("flip_z", False)), slope=case.get("slope"), big_endian=case.get("big_endian", False),
        compressed=case.get("compressed", False),
    )
    volume = read_nifti(data, field="f", limits=LIMITS)
    expected = _sitk_read(data, tmp_path)
    if expected.GetDimension() == 4:
        expected = sitk.Extract(expected, [*expected.GetSize()[:3], 0], [0, 0, 0, 0])
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(expected))
    assert volume.array.dtype == sitk.GetArrayViewFromImage(expected).dtype
    assert volume.spacing == pytest.approx(expected.GetSpacing())
    assert volume.origin == pytest.approx(expected.GetOrigin())
    assert volume.direction == pytest.approx(expected.GetDirection(), abs=1e-9)
    through_simpleitk = any(case.get(k) for k in ("big_endian", "slope", "t1"))
    assert (volume.owner is not None) == through_simpleitk  # the plain ones are read by numpy, once


def test_base64_is_decoded_in_chunks(monkeypatch):
    import medsam2_endpoint.io.volume as volume_module

    monkeypatch.setattr(volume_module, "_B64_CHUNK_CHARS", 8)  # many chunks for a short payload
    data = bytes(range(256)) * 3
    text = base64.b64encode(data).decode()
    chunks = list(volume_module.base64_chunks(text, field="f", limits=LIMITS))
    assert len(chunks) > 10 and b"".join(chunks) == data
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))  # MIME line wrapping
    assert decode_base64("data:application/gzip;base64," + wrapped, field="f", limits=LIMITS) == data
    with pytest.raises(InvalidRequest, match=r"f: not valid base64"):
        decode_base64(text[:40] + "*" + text[41:], field="f", limits=LIMITS)  # bad character in a later chunk
    with pytest.raises(InvalidRequest, match=r"f: not valid base64"):
        decode_base64(text[:-1], field="f", limits=LIMITS)  # length not a multiple of 4


def test_nifti_read_from_base64_chunks_equals_bytes(monkeypatch):
    import medsam2_endpoint.io.volume as volume_module

    monkeypatch.setattr(volume_module, "_B64_CHUNK_CHARS", 4096)
    data = write_nifti(make_image(shape=(20, 30, 40)), compressed=True)
    streamed = read_nifti(volume_module.base64_chunks(base64.b64encode(data).decode(), field="f", limits=LIMITS), field="f", limits=LIMITS)
    np.testing.assert_array_equal(streamed.array, read_nifti(data, field="f", limits=LIMITS).array)
    with pytest.raises(InvalidRequest, match="truncated"):
        read_nifti(volume_module.base64_chunks(base64.b64encode(data[: len(data) // 2]).decode(), field="f", limits=LIMITS), field="f", limits=LIMITS)
    with pytest.raises(PayloadTooLarge, match="MEDSAM2_MAX_FILE_MB"):
        read_nifti(volume_module.base64_chunks(base64.b64encode(data).decode(), field="f", limits=LIMITS), field="f", limits=Limits(max_file_bytes=5000))


def test_with_array_keeps_geometry_and_refuses_other_shapes():
    volume = read_nifti(write_nifti(make_image()), field="f", limits=LIMITS)
    windowed = volume.with_array(np.zeros(volume.array.shape, np.uint8))
    assert (windowed.spacing, windowed.origin, windowed.direction) == (volume.spacing, volume.origin, volume.direction)
    assert windowed.owner is None
    with pytest.raises(ValueError):
        volume.with_array(np.zeros((1, 2, 3), np.uint8))
