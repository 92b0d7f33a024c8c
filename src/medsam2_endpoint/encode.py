"""Mask encodings for responses: nested lists, run-length counts, base64 NIfTI."""

from __future__ import annotations

import base64
import json

import numpy as np

from .volume import Volume, write_nifti


def _foreground_runs(labels: np.ndarray, *, by_value: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of equal non-zero values in column-major (Fortran) order: (starts, ends, values), sorted.
    by_value=False: runs of any non-zero values (a mask's foreground).

    Works from the non-zero voxels' positions only (no transposed copy of the volume), so a small
    lesion in a whole CT costs its own size, not the volume's.
    """
    occupied = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))  # first-axis range holding foreground
    if occupied.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=labels.dtype)
    first = int(occupied[0])
    nonzero = np.nonzero(labels[first : int(occupied[-1]) + 1])
    nonzero = (nonzero[0] + first, *nonzero[1:])
    positions = np.ravel_multi_index(nonzero, labels.shape, order="F")
    order = np.argsort(positions, kind="stable")
    positions = positions[order]
    values = labels[nonzero][order]
    step = np.diff(positions) != 1
    breaks = np.flatnonzero(step | (values[1:] != values[:-1]) if by_value else step) + 1
    starts = positions[np.concatenate(([0], breaks))]
    ends = positions[np.concatenate((breaks - 1, [positions.size - 1]))] + 1
    return starts, ends, values[np.concatenate(([0], breaks))]


def _interleave(starts: np.ndarray, ends: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Run lengths and which of them are foreground, background runs in between (zero-length ones dropped)."""
    gaps = starts - np.concatenate(([0], ends[:-1]))
    lengths = np.empty(2 * starts.size + 1, dtype=np.int64)
    lengths[0:-1:2] = gaps
    lengths[1::2] = ends - starts
    lengths[-1] = size - ends[-1]
    is_foreground = np.zeros(lengths.size, dtype=bool)
    is_foreground[1::2] = True
    return lengths, is_foreground


def rle_counts(mask: np.ndarray) -> list[int]:
    """COCO-style uncompressed RLE over the array in column-major (Fortran) order.

    Counts alternate background/foreground runs and always start with a background run (possibly 0).
    For a (Z, Y, X) mask, column-major means z varies fastest: decode with
    `np.repeat([0, 1] * ..., counts).reshape(shape, order="F")`.
    """
    mask = np.asarray(mask)
    if mask.size == 0:
        return []
    starts, ends, _ = _foreground_runs(mask, by_value=False)
    if starts.size == 0:
        return [int(mask.size)]
    lengths, _ = _interleave(starts, ends, mask.size)
    # Adjacent foreground runs cannot occur (runs of one value are maximal); drop only a zero-length tail.
    return (lengths if lengths[-1] else lengths[:-1]).tolist()


def rle_decode(counts: list[int], shape: tuple[int, ...]) -> np.ndarray:
    values = np.zeros(len(counts), dtype=np.uint8)
    values[1::2] = 1
    return np.repeat(values, counts).reshape(shape, order="F")


def value_rle(labels: np.ndarray) -> dict:
    """Runs of equal values over the array in column-major order: {"values": [...], "counts": [...]}.

    For label maps (several objects); decode with `np.repeat(values, counts).reshape(size, order="F")`.
    """
    labels = np.asarray(labels)
    if labels.size == 0:
        return {"values": [], "counts": []}
    starts, ends, values = _foreground_runs(labels)
    if starts.size == 0:
        return {"values": [0], "counts": [int(labels.size)]}
    lengths, is_foreground = _interleave(starts, ends, labels.size)
    run_values = np.zeros(lengths.size, dtype=np.int64)
    run_values[1::2] = values
    keep = lengths > 0  # touching objects leave zero-length background runs between them
    return {"values": run_values[keep].tolist(), "counts": lengths[keep].tolist()}


def list_json(mask: np.ndarray) -> str:
    """The nested-list form as a JSON fragment, built without creating millions of Python ints.

    Rows without foreground (almost all of a whole CT) share one pre-built string.
    """
    z, y, x = mask.shape
    flat = mask.reshape(z * y, x)
    rows = ["[" + ",".join(["0"] * x) + "]"] * (z * y)
    for r in np.flatnonzero(flat.any(axis=1)):
        rows[r] = "[" + ",".join(flat[r].astype(str)) + "]"
    slices = ["[" + ",".join(rows[k * y : (k + 1) * y]) + "]" for k in range(z)]
    return "[" + ",".join(slices) + "]"


def encode_mask(mask: np.ndarray, volume: Volume, mask_format: str, *, label_map: bool = False) -> object:
    """The `mask` field's value; for "list" a `RawJSON` placeholder that the response writer splices in.

    label_map: the mask holds object ids (several objects); "rle" then uses value runs (`value_rle`).
    """
    if mask_format == "rle":
        if label_map:
            return {**value_rle(mask), "size": list(mask.shape), "order": "F"}
        return {"counts": rle_counts(mask), "size": list(mask.shape), "order": "F"}
    if mask_format == "nifti":
        data = write_nifti(volume.image_like(mask if label_map else mask.astype(np.uint8)), compressed=True)
        return base64.b64encode(data).decode("ascii")
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
