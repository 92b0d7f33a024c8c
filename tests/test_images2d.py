"""2D image decoding: PNG/JPEG/TIFF/2D NIfTI, channel and bit-depth conversion, limits, clear errors."""

from __future__ import annotations

import base64
import io
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from medsam2_endpoint.base.errors import InvalidRequest, PayloadTooLarge, UnsupportedMedia
from medsam2_endpoint.io.images import IMAGE_FILE, read_picture, to_grey_u8, to_rgb_u8
from medsam2_endpoint.io.limits import Limits
from medsam2_endpoint.io.volume import decode_base64

LIMITS = Limits()
RNG = np.random.default_rng(7)


def png(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, **kwargs).save(buffer, "PNG")
    return buffer.getvalue()


def via_sitk(array: np.ndarray, suffix: str, *, vector: bool = False) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"image{suffix}"
        sitk.WriteImage(sitk.GetImageFromArray(array, isVector=vector), str(path))
        return path.read_bytes()


def rgb_of(data: bytes, window=None) -> np.ndarray:
    return to_rgb_u8(read_picture(data, field="image", limits=LIMITS), window)


def test_grey_png_is_copied_to_three_channels():
    grey = RNG.integers(0, 256, (9, 13), dtype=np.uint8)
    rgb = rgb_of(png(grey))
    assert rgb.shape == (9, 13, 3) and rgb.dtype == np.uint8 and rgb.flags.writeable
    for c in range(3):
        np.testing.assert_array_equal(rgb[:, :, c], grey)
    np.testing.assert_array_equal(to_grey_u8(rgb), grey)


@pytest.mark.parametrize("channels", [2, 3, 4])
def test_alpha_is_dropped_and_colours_kept(channels):
    pixels = RNG.integers(0, 256, (6, 7, channels), dtype=np.uint8)
    rgb = rgb_of(png(pixels))
    expected = np.repeat(pixels[:, :, :1], 3, axis=2) if channels == 2 else pixels[:, :, :3]
    np.testing.assert_array_equal(rgb, expected)


def test_palette_and_jpeg_decode():
    grey = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (4, 1))
    palette = Image.fromarray(grey).convert("P")
    buffer = io.BytesIO()
    palette.save(buffer, "PNG")
    np.testing.assert_array_equal(rgb_of(buffer.getvalue())[:, :, 0], grey)
    ok, jpeg = cv2.imencode(".jpg", np.full((8, 8, 3), 120, np.uint8))
    picture = read_picture(jpeg.tobytes(), field="image", limits=LIMITS)
    assert picture.format == "jpeg" and to_rgb_u8(picture).shape == (8, 8, 3)


def test_16_bit_png_min_max_or_window():
    values = np.array([[1000, 2000], [3000, 5000]], dtype=np.uint16)
    rgb = rgb_of(png(values))
    np.testing.assert_array_equal(rgb[:, :, 0], np.uint8((values - 1000.0) / 4000.0 * 255.0))
    windowed = rgb_of(png(values), window=(2000.0, 3000.0))
    np.testing.assert_array_equal(windowed[:, :, 0], [[0, 0], [255, 255]])


def test_16_bit_rgb_png_keeps_its_precision():
    pixels = RNG.integers(0, 65536, (5, 6, 3), dtype=np.uint16)
    ok, data = cv2.imencode(".png", pixels[:, :, ::-1])  # OpenCV writes BGR
    picture = read_picture(data.tobytes(), field="image", limits=LIMITS)
    assert picture.pixels.dtype == np.uint16
    np.testing.assert_array_equal(picture.pixels, pixels)


def test_tiff_float_16_bit_and_many_channels():
    floats = RNG.random((5, 8)).astype(np.float32) * 10 - 3
    picture = read_picture(via_sitk(floats, ".tif"), field="image", limits=LIMITS)
    assert picture.format == "tiff"
    np.testing.assert_allclose(picture.pixels, floats)
    five = RNG.integers(0, 256, (4, 6, 5), dtype=np.uint8)
    picture = read_picture(via_sitk(five, ".tif", vector=True), field="image", limits=LIMITS)
    assert picture.channels == 5
    np.testing.assert_array_equal(to_rgb_u8(picture), five[:, :, :3])
    sixteen = RNG.integers(0, 65536, (4, 6), dtype=np.uint16)
    assert read_picture(via_sitk(sixteen, ".tif"), field="image", limits=LIMITS).pixels.dtype == np.uint16


def test_2d_nifti_keeps_the_3d_route_orientation():
    slice_ = RNG.integers(-100, 300, (7, 11)).astype(np.int16)  # (y, x)
    for volume in (slice_, slice_[None]):  # a 2D file, and a 3D file with one slice
        picture = read_picture(via_sitk(volume, ".nii.gz"), field="image", limits=LIMITS)
        assert picture.format == "nifti"
        np.testing.assert_array_equal(picture.pixels, slice_)


def test_nifti_volume_and_nan_are_refused():
    with pytest.raises(InvalidRequest, match=r"image: the NIfTI image \[11, 7, 3\] is not 2D"):
        read_picture(via_sitk(RNG.random((3, 7, 11)).astype(np.float32), ".nii"), field="image", limits=LIMITS)
    bad = np.ones((4, 4), np.float32)
    bad[1, 1] = np.nan
    with pytest.raises(InvalidRequest, match="NaN or infinite"):
        read_picture(via_sitk(bad, ".nii"), field="image", limits=LIMITS)


def test_pixel_limit_is_checked_before_decoding():
    """A tiny file declaring many pixels (a decompression bomb) stops at the header."""
    bomb = png(np.zeros((400, 500), np.uint8))
    assert len(bomb) < 2000
    with pytest.raises(PayloadTooLarge, match=r"image: the image of 500 x 400 pixels exceeds the limit of 100000 pixels \(MEDSAM2_MAX_SLICE_PIXELS\)"):
        read_picture(bomb, field="image", limits=Limits(max_slice_pixels=100_000))
    with pytest.raises(PayloadTooLarge):
        read_picture(via_sitk(np.zeros((400, 500), np.uint8), ".tif"), field="image", limits=Limits(max_slice_pixels=100_000))


def test_clear_errors_for_bad_input():
    with pytest.raises(UnsupportedMedia, match="not a PNG, JPEG, TIFF or 2D NIfTI image"):
        read_picture(b"GIF89a" + bytes(100), field="input_data.image[0]", limits=LIMITS)
    with pytest.raises(InvalidRequest, match="could not be decoded"):
        noisy = png(RNG.integers(0, 256, (30, 30), dtype=np.uint8))
        read_picture(noisy[: len(noisy) // 2], field="image", limits=LIMITS)
    with pytest.raises(InvalidRequest, match=r"input_data.image\[0\]: not valid base64"):
        decode_base64("***", field="input_data.image[0]", limits=LIMITS, what=IMAGE_FILE)
    with pytest.raises(InvalidRequest, match="the image is constant"):
        rgb_of(png(np.full((4, 4), 1234, np.uint16)))
    data = png(np.zeros((2, 2), np.uint8))
    assert decode_base64("data:image/png;base64," + base64.b64encode(data).decode(), field="f", limits=LIMITS) == data
