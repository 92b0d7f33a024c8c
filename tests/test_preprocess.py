import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from medsam2_endpoint.base.errors import InvalidRequest
from medsam2_endpoint.engines.frames import IMAGENET_MEAN, IMAGENET_STD, sam2_frame
from medsam2_endpoint.pipeline.window import parse_box, window_to_uint8


def reference_window(volume, window):
    """The reference's expression, literally (REFERENCE.md B step 2)."""
    lo, hi = window
    v = np.clip(volume, lo, hi)
    v = (v - np.min(v)) / (np.max(v) - np.min(v)) * 255.0
    return np.uint8(v)


@pytest.mark.parametrize("dtype", ["int16", "uint8", "float32", "float64", "int32"])
def test_window_matches_reference_arithmetic(dtype):
    rng = np.random.default_rng(1)
    volume = rng.normal(20, 300, size=(40, 17, 19)).astype(dtype) if dtype != "uint8" else rng.integers(0, 255, (40, 17, 19)).astype(dtype)
    window = (-160.0, 240.0) if dtype != "uint8" else (10.0, 200.0)
    np.testing.assert_array_equal(window_to_uint8(volume, window), reference_window(volume, window))


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "uint16"])
@pytest.mark.parametrize("window", [(-160.0, 240.0), (0.5, 3.25), None])
def test_window_table_path_matches_reference_over_the_whole_value_range(dtype, window):
    """8/16-bit volumes go through a table of every value: identical to the reference, extremes included."""
    info = np.iinfo(dtype)
    rng = np.random.default_rng(2)
    volume = rng.integers(info.min, info.max, size=(5, 13, 11), endpoint=True).astype(dtype)
    volume[0, 0, :2] = (info.min, info.max)
    expected = reference_window(volume, window) if window else np.uint8((volume - volume.min().astype(np.float64)) / (float(volume.max()) - float(volume.min())) * 255.0)
    np.testing.assert_array_equal(window_to_uint8(volume, window), expected)


def test_window_uses_clipped_min_max_not_window_bounds():
    volume = np.array([[[0, 50], [100, 100]]], dtype=np.int16)
    # window wider than the data: scaled by the data's own min/max (0..100), not by -1000..1000
    np.testing.assert_array_equal(window_to_uint8(volume, (-1000.0, 1000.0)), np.array([[[0, 127], [255, 255]]], dtype=np.uint8))


def test_window_truncates_instead_of_rounding():
    volume = np.array([[[0.0, 0.999, 1.0, 3.0]]], dtype=np.float64)
    # 0.999 / 3 * 255 = 84.915 -> 84 (truncation)
    assert window_to_uint8(volume, None).tolist() == [[[0, 84, 85, 255]]]


def test_no_window_does_not_overflow_int16():
    volume = np.array([[[-32000, 0, 32000]]], dtype=np.int16)
    assert window_to_uint8(volume, None).tolist() == [[[0, 127, 255]]]


def test_constant_volume_inside_window_is_a_clear_400():
    volume = np.full((3, 4, 4), -1000, dtype=np.int16)
    with pytest.raises(InvalidRequest, match=r"input_data.dicom_window\[0\].*constant"):
        window_to_uint8(volume, (-160.0, 240.0), field="input_data.dicom_window[0]")


@settings(max_examples=25, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 40))), st.sampled_from([64, 512]))
def test_grey_resize_equals_reference_rgb_path(slice_u8, size):
    rgb = np.asarray(Image.fromarray(slice_u8).convert("RGB").resize((size, size))).transpose(2, 0, 1) / 255.0
    frame = (rgb - np.asarray(IMAGENET_MEAN, np.float32)[:, None, None].astype(np.float64)) / np.asarray(IMAGENET_STD, np.float32)[:, None, None].astype(np.float64)
    np.testing.assert_array_equal(sam2_frame(slice_u8, size), frame.astype(np.float32))


def test_frame_shape_and_dtype():
    frame = sam2_frame(np.zeros((30, 50), np.uint8), 512)
    assert frame.shape == (3, 512, 512) and frame.dtype == np.float32


def test_box_truncates_like_reference():
    assert parse_box([10.9, 20.2, 30.99, 40.5], width=64, height=64, field="f").tolist() == [10, 20, 30, 40]


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ([10, 10, 600, 40], r"f: x 600 is outside the slice width 64"),
        ([10, 10, 40, 70], r"f: y 70 is outside the slice height 64"),
        ([-1, 10, 40, 40], r"non-negative"),
        ([40, 10, 10, 40], r"x_min < x_max"),
        ([10, 30, 40, 30], r"y_min < y_max"),
    ],
)
def test_box_errors_name_the_field_and_numbers(box, message):
    with pytest.raises(InvalidRequest, match=message):
        parse_box(box, width=64, height=64, field="f")


def test_intensity_range_too_wide_is_a_400():
    volume = np.array([[[-1.7e308, 0.0, 1.7e308]]], dtype=np.float64)
    with pytest.raises(InvalidRequest, match="too wide to scale; give a dicom_window"):
        window_to_uint8(volume, None, field="input_data.dicom_window[0]")
