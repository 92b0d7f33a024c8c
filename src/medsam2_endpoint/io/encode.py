"""Mask encodings for responses: nested lists, run-length counts, base64 NIfTI."""

from __future__ import annotations

import base64
import json
from typing import cast

import numpy as np

from medsam2_endpoint.base.errors import InvalidRequest
from medsam2_endpoint.io.limits import Limits
from medsam2_endpoint.io.polygons import mask_to_geometry
from medsam2_endpoint.io.volume import LabelMap, read_nifti

_SPARSE_FRACTION = 64  # at most 1 voxel in 64 in the foreground: encode from the foreground's positions
_CHUNK_VOXELS = 8 * 1024 * 1024  # a dense mask is put in column-major order this many voxels at a time


def _runs(labels: np.ndarray, *, by_value: bool) -> tuple[np.ndarray, np.ndarray]:
    """Maximal runs over the array in column-major (Fortran) order: (values, lengths), no empty runs.

    by_value=False: a mask, every non-zero value is foreground (value 1). A small lesion in a whole CT
    is encoded from its voxels' positions (no transposed copy of the volume); a dense mask (speckle)
    from the column-major copy, whose cost does not grow with the number of runs.
    """
    occupied = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))  # first-axis range with foreground
    if occupied.size == 0:
        return np.zeros(1, dtype=np.int64), np.array([labels.size], dtype=np.int64)
    first, last = int(occupied[0]), int(occupied[-1]) + 1
    block = labels[first:last]
    count = int(np.count_nonzero(block))
    if count * _SPARSE_FRACTION > labels.size:
        return _dense_runs(labels, by_value=by_value)
    flat_c = np.flatnonzero(block)
    index = list(np.unravel_index(flat_c, block.shape))
    index[0] = index[0] + first
    positions = np.ravel_multi_index(index, labels.shape, order="F")
    order = np.argsort(positions, kind="stable")
    positions = positions[order]
    values = block.reshape(-1)[flat_c[order]].astype(np.int64) if by_value else np.ones(count, dtype=np.int64)
    breaks = np.flatnonzero((np.diff(positions) != 1) | (values[1:] != values[:-1])) + 1
    starts = positions[np.concatenate(([0], breaks))]
    ends = positions[np.concatenate((breaks - 1, [count - 1]))] + 1
    # interleave background gaps and foreground runs, then drop the empty gaps (touching objects, edges)
    lengths = np.empty(2 * starts.size + 1, dtype=np.int64)
    lengths[0:-1:2] = starts - np.concatenate(([0], ends[:-1]))
    lengths[1::2] = ends - starts
    lengths[-1] = labels.size - ends[-1]
    run_values = np.zeros(lengths.size, dtype=np.int64)
    run_values[1::2] = values[np.concatenate(([0], breaks))]
    keep = lengths > 0
    return run_values[keep], lengths[keep]


def _dense_runs(labels: np.ndarray, *, by_value: bool) -> tuple[np.ndarray, np.ndarray]:
    """`_runs` from column-major copies of a few MB at a time (a whole copy of a 512 x 512 x 300 mask
    would be 78 MB, and its comparison with itself shifted another 78 MB)."""
    transposed = labels.T  # its C order is the labels' column-major order
    rows = max(1, _CHUNK_VOXELS // max(1, transposed[0].size))
    starts, values = [], []
    offset, previous = 0, None
    for row in range(0, transposed.shape[0], rows):
        chunk = transposed[row : row + rows]
        flat = (np.ascontiguousarray(chunk) if by_value else np.not_equal(chunk, 0, order="C")).ravel()
        changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        if previous is None or flat[0] != previous:  # a run starts at the chunk's first voxel
            changes = np.concatenate(([0], changes))
        starts.append(changes + offset)
        values.append(flat[changes].astype(np.int64))
        offset += flat.size
        previous = flat[-1]
    run_starts = np.concatenate(starts)
    return np.concatenate(values), np.diff(np.concatenate((run_starts, [offset])))


def rle_counts(mask: np.ndarray) -> list[int]:
    """COCO-style uncompressed RLE over the array in column-major (Fortran) order.

    Counts alternate background/foreground runs and always start with a background run (possibly 0).
    For a (Z, Y, X) mask, column-major means z varies fastest: decode with
    `np.repeat([0, 1] * ..., counts).reshape(shape, order="F")`.
    """
    mask = np.asarray(mask)
    if mask.size == 0:
        return []
    values, lengths = _runs(mask, by_value=False)
    return ([0] if values[0] else []) + cast("list[int]", lengths.tolist())


def rle_decode(counts: list[int], shape: tuple[int, ...]) -> np.ndarray:
    values = np.zeros(len(counts), dtype=np.uint8)
    values[1::2] = 1
    return np.repeat(values, counts).reshape(shape, order="F")


def value_rle(labels: np.ndarray) -> dict[str, list[int]]:
    """Runs of equal values over the array in column-major order: {"values": [...], "counts": [...]}.

    For label maps (several objects); decode with `np.repeat(values, counts).reshape(size, order="F")`.
    """
    labels = np.asarray(labels)
    if labels.size == 0:
        return {"values": [], "counts": []}
    values, lengths = _runs(labels, by_value=True)
    return {"values": values.tolist(), "counts": lengths.tolist()}


def list_json(mask: np.ndarray) -> str:
    """The nested-list form as a JSON fragment, built without creating millions of Python ints.

    Rows without foreground (almost all of a whole CT) share one pre-built string.
    """
    z, y, x = mask.shape
    flat = (mask.view(np.uint8) if mask.dtype == bool else mask).reshape(z * y, x)  # bool rows would print True/False
    rows = ["[" + ",".join(["0"] * x) + "]"] * (z * y)
    for r in np.flatnonzero(flat.any(axis=1)):
        rows[r] = "[" + ",".join(flat[r].astype(str)) + "]"
    slices = ["[" + ",".join(rows[k * y : (k + 1) * y]) + "]" for k in range(z)]
    return "[" + ",".join(slices) + "]"


def encode_mask(labels: LabelMap, mask_format: str) -> object:
    """The `mask` field's value; for "list" a `RawJSON` placeholder that the response writer splices in.

    A multi-object label map (object ids) is written in "rle" as value runs (`value_rle`).
    """
    mask = labels.array
    if mask_format == "rle":
        if labels.multi_object:
            return {**value_rle(mask), "size": list(mask.shape), "order": "F"}
        return {"counts": rle_counts(mask), "size": list(mask.shape), "order": "F"}
    if mask_format == "nifti":
        return base64.b64encode(labels.nifti()).decode("ascii")
    return RawJSON(list_json(mask))


class RawJSON:
    """A pre-serialised JSON fragment."""

    def __init__(self, text: str) -> None:
        self.text = text


def dumps(payload: object) -> str:
    """json.dumps that splices RawJSON fragments in place (the list mask can hold ~80 M numbers)."""
    fragments: list[str] = []

    def default(obj: object) -> object:
        if isinstance(obj, RawJSON):
            fragments.append(obj.text)
            return f"\x00RAW{len(fragments) - 1}\x00"
        if isinstance(obj, np.integer):
            return int(obj)
        if isinstance(obj, np.floating):
            return float(obj)
        raise TypeError(f"not JSON serialisable: {type(obj).__name__}")

    text = json.dumps(payload, default=default, separators=(",", ":"))
    for i, fragment in enumerate(fragments):
        text = text.replace(f'"\\u0000RAW{i}\\u0000"', fragment, 1)
    return text


def encode_mask_2d(mask: np.ndarray, mask_format: str, simplify_tolerance: float = 0.0) -> object:
    """A bool (H, W) mask as RLE (column-major, as the 3D route), GeoJSON polygons, or nested lists."""
    if mask_format == "polygons":
        return mask_to_geometry(mask, simplify_tolerance=simplify_tolerance)
    if mask_format == "list":
        return RawJSON(list_json(mask[None])[1:-1])
    return {"counts": rle_counts(mask), "size": list(mask.shape), "order": "F"}


def decode_mask(value: object, shape: tuple[int, int, int], *, field: str, limits: Limits) -> np.ndarray:
    """An earlier answer's `mask` sent back (`previous_mask`): its rle object (counts, or values + counts, for
    label maps) or its nifti base64. Returns the (Z, Y, X) array (0/1 or object ids); errors name `field`."""
    if isinstance(value, str):
        try:
            data = base64.b64decode(value, validate=True)
        except ValueError:
            raise InvalidRequest(f"{field}: not base64; send the earlier answer's nifti mask as it came, or its rle object") from None
        array = read_nifti(data, field=field, limits=limits).array
    elif isinstance(value, dict) and isinstance(value.get("counts"), list) and isinstance(value.get("size"), list):
        array = _decode_runs(value, field=field)
    else:
        raise InvalidRequest(f'{field}: expected the earlier answer\'s mask: an rle object {{"counts": [...], "size": [Z, Y, X]}} '
                             "or a nifti base64 string")
    if array.shape != tuple(shape):
        raise InvalidRequest(f"{field}: the mask has shape {list(array.shape)} (z, y, x), the volume {list(shape)}; "
                             "send the mask of an answer on this volume")
    return array


def _decode_runs(value: dict[str, object], *, field: str) -> np.ndarray:
    size, counts = cast("list[object]", value["size"]), cast("list[object]", value["counts"])
    if len(size) != 3 or not all(isinstance(v, int) and v > 0 for v in size):
        raise InvalidRequest(f"{field}.size: expected [Z, Y, X], three positive integers")
    if not all(isinstance(c, int) and c >= 0 for c in counts):
        raise InvalidRequest(f"{field}.counts: expected non-negative integers")
    shape = tuple(cast("list[int]", size))
    total = int(np.prod(shape))
    if sum(cast("list[int]", counts)) != total:
        raise InvalidRequest(f"{field}.counts: the runs cover {sum(cast('list[int]', counts))} voxels, size {list(shape)} has {total}")
    if "values" in value:
        values = value["values"]
        if not isinstance(values, list) or len(values) != len(counts) or not all(isinstance(v, int) and 0 <= v <= 65535 for v in values):
            raise InvalidRequest(f"{field}.values: expected one object id (0..65535) per run")
        return np.repeat(np.asarray(values, dtype=np.uint16), np.asarray(counts, dtype=np.int64)).reshape(shape, order="F")
    return rle_decode(cast("list[int]", counts), shape)
