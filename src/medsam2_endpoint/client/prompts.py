"""What the client asks for: objects (a box on a key slice each) and their file, a prompts file in the request's
own form, and an earlier mask to send back for a correction."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import SimpleITK as sitk

from medsam2_endpoint.client.transport import ClientError
from medsam2_endpoint.io.volume import write_nifti


@dataclass(frozen=True)
class ObjectPrompt:
    """One object: a box on a key slice; `object_id` is its value in the label map (1..65535)."""

    bbox: tuple[float, float, float, float]
    key_slice: int
    object_id: int = 1
    label: str | None = None  # the segment's label in a DICOM SEG (default "object <id>")


def load_objects(path: str | Path) -> list[ObjectPrompt]:
    """Objects file: `[{"id": 1, "bbox": [x0, y0, x1, y1], "key_slice": 12}, ...]` or `{"objects": [...]}`.

    `id` defaults to the object's position (1, 2, ...); ids must be unique, 1..65535.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ClientError(f"{path}: cannot read the objects file as JSON ({exc})") from None
    entries = data.get("objects") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise ClientError(f'{path}: expected a non-empty list of objects, or {{"objects": [...]}}')
    objects = []
    for i, entry in enumerate(entries):
        try:
            key = entry["key_slice"] if "key_slice" in entry else entry["key_slice_idx"]
            bbox = tuple(float(v) for v in entry["bbox"])
            label = entry.get("label")
            obj = ObjectPrompt(bbox, int(key), int(entry.get("id", i + 1)), None if label is None else str(label))  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError):
            raise ClientError(f'{path}: object {i} needs "bbox" [x0, y0, x1, y1] and "key_slice" (and optionally "id", "label")') from None
        objects.append(obj)
    check_objects(objects)
    return objects


def check_objects(objects: Sequence[ObjectPrompt]) -> None:
    ids = [o.object_id for o in objects]
    if len(set(ids)) != len(ids) or not all(1 <= i <= 65535 for i in ids):
        raise ClientError(f"object ids must be unique and within 1..65535, got {ids}")
    for o in objects:
        if len(o.bbox) != 4:
            raise ClientError(f"object {o.object_id}: bbox needs 4 numbers [x_min, y_min, x_max, y_max]")


def load_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Prompts file: the request's objects, `[{"id": 1, "prompts": [...]}, ...]` or `{"objects": [...]}` (checked by the server)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ClientError(f"{path}: cannot read the prompts file as JSON ({exc})") from None
    entries = data.get("objects") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ClientError(f'{path}: expected a non-empty list of objects such as {{"id": 1, "prompts": [{{"slice": 3, "box": [...]}}]}}')
    return cast("list[dict[str, Any]]", entries)


def previous_column(previous: str | Path | sitk.Image, image: sitk.Image) -> str:
    """The earlier mask as base64 NIfTI on the volume's grid (the server checks its shape)."""
    mask = previous if isinstance(previous, sitk.Image) else _read_mask(previous)
    if mask.GetSize() != image.GetSize():
        raise ClientError(f"previous mask: size {list(mask.GetSize())} differs from the volume's {list(image.GetSize())}")
    labels = sitk.GetArrayFromImage(mask)
    labels = labels.astype(np.uint8 if labels.max(initial=0) <= 255 else np.uint16)
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(image)
    return base64.b64encode(write_nifti(out, compressed=True)).decode("ascii")


def first_slice(entry: dict[str, Any]) -> int:
    first = (entry.get("prompts") or [{}])[0]
    return int(first.get("slice", entry.get("key_slice_idx", 0)))


def first_box(entry: dict[str, Any]) -> tuple[float, float, float, float]:
    for source in [entry, *(entry.get("prompts") or [])]:
        box = source.get("bbox") or source.get("box")
        if isinstance(box, list) and len(box) == 4:
            return cast("tuple[float, float, float, float]", tuple(float(v) for v in box))
    return (0.0, 0.0, 0.0, 0.0)


def _read_mask(path: str | Path) -> sitk.Image:
    if not Path(path).is_file():
        raise ClientError(f"{path}: no such mask file")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError:
        raise ClientError(f"{path}: SimpleITK cannot read it; give the earlier answer's mask file (e.g. .nii.gz)") from None
