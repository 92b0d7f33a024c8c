import base64
import json
from unittest import mock

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from medsam2_endpoint.io import encode
from medsam2_endpoint.io.encode import (
    RawJSON,
    dumps,
    encode_mask,
    list_json,
    rle_counts,
    rle_decode,
    value_rle,
)
from medsam2_endpoint.io.limits import Limits
from medsam2_endpoint.io.volume import Volume, read_nifti


@settings(max_examples=60, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 5), st.integers(1, 6), st.integers(1, 7)), elements=st.integers(0, 1)))
def test_rle_round_trip_and_list_json(mask):
    counts = rle_counts(mask)
    assert sum(counts) == mask.size
    np.testing.assert_array_equal(rle_decode(counts, mask.shape), mask)
    assert json.loads(list_json(mask)) == json.loads(list_json(mask.astype(bool))) == mask.tolist()


def dense_runs(array):
    """Runs of equal values over the Fortran-order flattening, the obvious way (independent of encode.py)."""
    values, counts = [], []
    for v in array.ravel(order="F").tolist():
        if values and values[-1] == v:
            counts[-1] += 1
        else:
            values.append(v)
            counts.append(1)
    return values, counts


@settings(max_examples=200, deadline=None)
@given(arrays(np.uint8, st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple), elements=st.integers(0, 3)))
def test_runs_equal_the_dense_definition(labels):
    """3D volumes and 2D masks (the 2D route's RLE) alike."""
    values, counts = dense_runs(labels)
    fg_values, fg_counts = dense_runs((labels > 0).astype(np.uint8))
    # both strategies: from foreground positions, from column-major copies (whole, one row, rows of up to 7 voxels)
    for sparse_fraction, chunk in ((0, encode._CHUNK_VOXELS), (10**9, encode._CHUNK_VOXELS), (10**9, 1), (10**9, 7)):
        with mock.patch.object(encode, "_SPARSE_FRACTION", sparse_fraction), mock.patch.object(encode, "_CHUNK_VOXELS", chunk):
            assert value_rle(labels) == {"values": values, "counts": counts}
            assert rle_counts(labels) == rle_counts(labels > 0) == ([0] if fg_values[0] == 1 else []) + fg_counts


def test_rle_is_column_major_and_starts_with_background():
    mask = np.zeros((2, 2, 2), np.uint8)
    mask[1, 0, 0] = 1  # second element in Fortran order
    assert rle_counts(mask) == [1, 1, 6]
    assert rle_counts(np.ones((1, 1, 2), np.uint8)) == [0, 2]


def test_dumps_splices_raw_fragments():
    text = dumps([{"mask": RawJSON("[[1,0]]"), "n": np.int64(3), "x": np.float32(0.5)}])
    assert json.loads(text) == [{"mask": [[1, 0]], "n": 3, "x": 0.5}]


def test_nifti_mask_keeps_geometry():
    volume = Volume(np.zeros((3, 4, 5), np.int16), (0.7, 0.8, 3.0), (1.0, -2.0, 30.0), (0, 1, 0, 1, 0, 0, 0, 0, -1.0))
    mask = np.zeros((3, 4, 5), np.uint8)
    mask[1, 2, 3] = 1
    data = base64.b64decode(encode_mask(volume.label_map(mask), "nifti"))
    back = read_nifti(data, field="mask", limits=Limits())
    np.testing.assert_array_equal(back.array, mask)
    assert np.allclose(back.spacing, volume.spacing) and np.allclose(back.origin, volume.origin)
    assert np.allclose(back.direction, volume.direction)


def test_label_maps_keep_their_values():
    labels = np.zeros((2, 3, 4), np.uint8)
    labels[0, 1, 1:3] = 7
    labels[1, 2, 3] = 200
    assert json.loads(list_json(labels)) == labels.tolist()
    runs = value_rle(labels)
    np.testing.assert_array_equal(np.repeat(runs["values"], runs["counts"]).reshape(labels.shape, order="F"), labels)


def test_multi_object_label_map_keeps_ids_and_geometry():
    volume = Volume(np.zeros((2, 3, 4), np.int16), (0.5, 0.5, 2.0), (3.0, 4.0, 5.0), (1, 0, 0, 0, -1, 0, 0, 0, 1.0))
    ids = np.zeros((2, 3, 4), np.uint16)
    ids[0, 1, 1], ids[1, 2, 3] = 7, 300
    labels = volume.label_map(ids, multi_object=True)
    back = read_nifti(base64.b64decode(encode_mask(labels, "nifti")), field="mask", limits=Limits())
    np.testing.assert_array_equal(back.array, ids)
    assert np.allclose(back.direction, volume.direction) and np.allclose(back.origin, volume.origin)
    assert encode_mask(labels, "rle") == {**value_rle(ids), "size": [2, 3, 4], "order": "F"}
