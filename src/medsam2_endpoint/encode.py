"""Mask encodings for responses: nested lists, run-length counts, base64 NIfTI."""

from __future__ import annotations

import base64
import json

import numpy as np

from .volume import Volume, write_nifti


def rle_counts(mask: np.ndarray) -> list[int]:
    """COCO-style uncompressed RLE over the array in column-major (Fortran) order.

    Counts alternate background/foreground runs and always start with a background run (possibly 0).
    For a (Z, Y, X) mask, column-major means z varies fastest: decode with
    `np.repeat([0, 1] * ..., counts).reshape(shape, order="F")`.
    """
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return []
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate(([0], changes, [flat.size]))
    counts = np.diff(edges).tolist()
    if flat[0]:
        counts.insert(0, 0)
    return counts


def rle_decode(counts: list[int], shape: tuple[int, ...]) -> np.ndarray:
    values = np.zeros(len(counts), dtype=np.uint8)
    values[1::2] = 1
    return np.repeat(values, counts).reshape(shape, order="F")


def value_rle(labels: np.ndarray) -> dict:
    """Runs of equal values over the array in column-major order: {"values": [...], "counts": [...]}.

    For label maps (several objects); decode with `np.repeat(values, counts).reshape(size, order="F")`.
    """
    flat = np.asarray(labels).ravel(order="F")
    if flat.size == 0:
        return {"values": [], "counts": []}
    starts = np.concatenate(([0], np.flatnonzero(flat[1:] != flat[:-1]) + 1))
    counts = np.diff(np.concatenate((starts, [flat.size])))
    return {"values": flat[starts].tolist(), "counts": counts.tolist()}


def list_json(mask: np.ndarray) -> str:
    """The nested-list form as a JSON fragment, built without creating millions of Python ints."""
    z, y, _ = mask.shape
    flat = mask.reshape(z * y, -1)
    digits = np.where(flat > 0, "1", "0") if flat.max(initial=0) <= 1 else flat.astype(str)
    rows = ["[" + ",".join(row) + "]" for row in digits]
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
