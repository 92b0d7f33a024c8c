"""Client library for the 2D route: `segment_2d()` (the `predict-2d` command is in cli.py).

One image (PNG, JPEG, TIFF, or a single DICOM slice) and a prompt (a box, points, or both) go to the
endpoint's `/score` 2D route; the answer's masks come back as bool (H, W) arrays and can be written as
a mask PNG (0/255) or a GeoJSON FeatureCollection (pixel-corner polygons, as the samapi route's), with
a preview PNG. A DICOM slice is sent as a 2D NIfTI of its rescaled values (the route does not read
DICOM), with the window given or the preset's.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from medsam2_endpoint.base.errors import ServiceError
from medsam2_endpoint.client.presets import resolve_window
from medsam2_endpoint.client.segment import DEFAULT_ENDPOINT
from medsam2_endpoint.client.transport import KEY_ENV, ClientError, EndpointError, post_request
from medsam2_endpoint.io.encode import decode_mask
from medsam2_endpoint.io.limits import Limits
from medsam2_endpoint.io.polygons import mask_to_geometry
from medsam2_endpoint.io.volume import write_nifti

__all__ = ["OUTPUT_TYPES", "Segmentation2DResult", "segment_2d"]
OUTPUT_TYPES = ("single", "all", "largest", "smallest", "best_quality")
_DICM_OFFSET = 128  # DICOM Part 10 files carry "DICM" after a 128-byte preamble


@dataclass(frozen=True)
class Segmentation2DResult:
    """The masks (bool (H, W) each) with their predicted IoU, the image as read (grey, for previews), metadata."""

    masks: list[np.ndarray]
    qualities: list[float]
    image: np.ndarray
    metadata: dict[str, Any]
    box: tuple[float, float, float, float] | None
    points: list[tuple[float, float, int]]
    window: tuple[float, float] | None

    def save(self, path: str | Path) -> Path:
        """NAME.png: the first mask as 0/255 PNG (others as NAME_1.png, ...); NAME.geojson: every mask as a Feature."""
        path = Path(path)
        if path.suffix.lower() in (".geojson", ".json"):
            features = [{"type": "Feature", "geometry": mask_to_geometry(m),
                         "properties": {"object_idx": i, "quality": q, "model": self.metadata.get("model", {}).get("name")}}
                        for i, (m, q) in enumerate(zip(self.masks, self.qualities, strict=True)) if m.any()]
            path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
            return path
        if path.suffix.lower() != ".png":
            raise ClientError(f"{path}: write masks as .png or .geojson")
        for i, mask in enumerate(self.masks):
            target = path if i == 0 else path.with_name(f"{path.stem}_{i}{path.suffix}")
            sitk.WriteImage(sitk.GetImageFromArray(mask.astype(np.uint8) * 255), str(target))
        return path

    def preview(self, path: str | Path) -> Path:
        """PNG of the image with each mask outlined and the prompt drawn (see preview.py)."""
        from medsam2_endpoint.client.preview import render_preview_2d  # matplotlib loads only when asked

        model = self.metadata.get("model", {}).get("name", "?")
        title = f"{model}: " + ", ".join(f"mask {i} {int(m.sum())} px, quality {q:.2f}" for i, (m, q) in
                                         enumerate(zip(self.masks, self.qualities, strict=True)))
        return render_preview_2d(self.image, self.masks, path, window=self.window, box=self.box, points=self.points, title=title)


def is_dicom(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(_DICM_OFFSET)
        return handle.read(4) == b"DICM"


def read_image(path: Path) -> tuple[bytes, np.ndarray]:
    """(bytes to send, grey pixels (H, W) for previews) of a 2D image file."""
    if not path.is_file():
        raise ClientError(f"{path}: no such file")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        raise ClientError(f"{path}: cannot read it; give a PNG, JPEG, TIFF or DICOM slice") from None
    if image.GetDimension() == 3:
        if image.GetSize()[2] != 1:
            raise ClientError(f"{path}: {image.GetSize()[2]} slices; predict-2d takes one image (use predict for volumes)")
        image = image[:, :, 0]
    pixels = sitk.GetArrayFromImage(image)
    grey = pixels.mean(axis=-1) if image.GetNumberOfComponentsPerPixel() > 1 else pixels
    if is_dicom(path):
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise ClientError(f"{path}: a colour DICOM image; export it as PNG")
        return write_nifti(image, compressed=True), grey.astype(np.float64)
    return path.read_bytes(), grey.astype(np.float64)


def _decode(entry: dict[str, Any], shape: tuple[int, int]) -> np.ndarray:
    try:
        return decode_mask(entry.get("mask"), shape, field="mask", limits=Limits()).astype(bool)
    except ServiceError as exc:
        raise EndpointError(200, f"the answer's {exc.message}", http_status=200) from None


def segment_2d(
    image: str | Path, *, bbox: Sequence[float] | None = None, points: Sequence[Sequence[float]] = (),
    negative: Sequence[Sequence[float]] = (), window: Sequence[float] | None = None, preset: str | None = None,
    model: str | None = None, output_type: str = "single", endpoint: str = DEFAULT_ENDPOINT, key: str | None = None,
    deployment: str | None = None, timeout: float = 120.0, retries: int = 4, backoff_s: float = 2.0,
) -> Segmentation2DResult:
    """Segment one 2D image through the endpoint's 2D route: a box [x_min, y_min, x_max, y_max] and/or
    foreground `points` and background `negative` points (x, y), x the column. `window`/`preset` as predict's
    (mainly for DICOM slices). `output_type`: single, all, largest, smallest or best_quality."""
    if bbox is None and not points and not negative:
        raise ClientError("give a box (--bbox) or points (--point / --negative)")
    if output_type not in OUTPUT_TYPES:
        raise ClientError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    path = Path(image)
    data, grey = read_image(path)
    win = resolve_window(sitk.GetImageFromArray(grey[None]), window, preset) if (window is not None or preset) else None
    columns: dict[str, list[Any]] = {"image": [base64.b64encode(data).decode("ascii")], "output_type": [output_type],
                                     "mask_format": ["rle"]}
    box = None if bbox is None else tuple(float(v) for v in bbox)
    if box is not None:
        if len(box) != 4:
            raise ClientError("bbox needs 4 numbers [x_min, y_min, x_max, y_max]")
        columns["bbox"] = [list(box)]
    prompts = [(float(x), float(y), 0) for x, y in negative] + [(float(x), float(y), 1) for x, y in points]  # background first, as SAM's clients
    if prompts:
        columns["point_coords"] = [[[x, y] for x, y, _ in prompts]]
        columns["point_labels"] = [[label for _, _, label in prompts]]
    if win is not None:
        columns["dicom_window"] = [list(win)]
    if model:
        columns["model"] = [model]
    answer = post_request(endpoint, {"input_data": columns}, key=key if key is not None else os.environ.get(KEY_ENV),
                          deployment=deployment, timeout=timeout, retries=retries, backoff_s=backoff_s)
    if not isinstance(answer, list) or len(answer) != 1:
        raise EndpointError(200, f"expected a list of 1 result, got {type(answer).__name__}", http_status=200)
    (entry,) = answer
    shape = (int(grey.shape[0]), int(grey.shape[1]))
    masks = [_decode(m, shape) for m in entry.get("masks", [])]
    qualities = [float(m.get("quality", 0.0)) for m in entry.get("masks", [])]
    return Segmentation2DResult(masks, qualities, grey, entry.get("metadata", {}), box, prompts, win)
