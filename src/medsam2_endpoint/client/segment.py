"""The client library: `segment()` sends a volume (NIfTI/NRRD/MHA file, DICOM series folder, SimpleITK image,
or a DICOMweb series the endpoint reads itself) with a box on a key slice (or several objects), waits with a
progress bar, retries on 429/503, and returns the mask as a SimpleITK label map with the source's exact geometry.

Conventions (as the service): a box is [x_min, y_min, x_max, y_max] in pixel indices of the key slice,
x the column; the key slice is the z index of the volume as read (for DICOM: GDCM's sorted order; for a
DICOMweb series: the server's order, by position). The endpoint key comes from MEDSAM2_ENDPOINT_KEY (or
`key=`) and is sent as `Authorization: Bearer`; it is never printed, logged or put in an error.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from medsam2_endpoint import __version__
from medsam2_endpoint.base.errors import ServiceError
from medsam2_endpoint.base.log import log
from medsam2_endpoint.client.files import scalar_image
from medsam2_endpoint.client.presets import resolve_window
from medsam2_endpoint.client.prompts import (
    ObjectPrompt,
    check_objects,
    first_box,
    first_slice,
    previous_column,
)
from medsam2_endpoint.client.transport import KEY_ENV, ClientError, EndpointError, post_request
from medsam2_endpoint.io.dicom_seg import SEG_SUFFIX, Algorithm, Segment, write_dicom_seg
from medsam2_endpoint.io.encode import decode_mask, decode_nifti_mask
from medsam2_endpoint.io.limits import Limits
from medsam2_endpoint.io.volume import read_nifti, write_nifti

__all__ = ["DEFAULT_ENDPOINT", "DicomWebSeries", "ObjectPrompt", "SegmentationResult", "segment"]
DEFAULT_ENDPOINT = "http://127.0.0.1:5001/score"
# The client's own upload and the endpoint's answer on it: the server applied its limits already.
_UNLIMITED = Limits(max_file_bytes=1 << 62, max_voxels=1 << 62, max_slice_pixels=1 << 62)


@dataclass(frozen=True)
class DicomWebSeries:
    """A series in a DICOMweb server (a PACS) that the endpoint reads itself: base URL, Study and Series UIDs."""

    url: str
    study: str
    series: str

    def column(self) -> dict[str, str]:
        return {"url": self.url, "study": self.study, "series": self.series}


@dataclass(frozen=True)
class SegmentationResult:
    """The label map (uint8, or uint16 for ids above 255) with the source geometry, and per-object metadata.
    `image` is the volume sent (None for a DICOMweb series, which the client never read)."""

    mask: sitk.Image
    metadata: list[dict[str, Any]]
    objects: list[ObjectPrompt]
    image: sitk.Image | None
    window: tuple[float, float] | None
    source_files: tuple[Path, ...] = ()  # the DICOM series' files in z order, when the volume was one

    def array(self) -> np.ndarray:
        """The label map as a (z, y, x) array."""
        return sitk.GetArrayFromImage(self.mask)

    def save(self, path: str | Path) -> Path:
        """Write the label map: a DICOM Segmentation referencing the source series when the name ends in .dcm
        (DICOM input only), NIfTI for .nii/.nii.gz, any SimpleITK format otherwise."""
        path = Path(path)
        if path.name.lower().endswith(SEG_SUFFIX):
            path.write_bytes(self.dicom_seg())
            return path
        sitk.WriteImage(self.mask, str(path), useCompression=True)
        return path

    def dicom_seg(self) -> bytes:
        """The masks as a DICOM SEG over the source series: one segment per object, the model named."""
        if not self.source_files:
            hint = "; for a DICOMweb series, store_seg (--store-seg) has the endpoint store it" if self.image is None else ""
            raise ClientError("a DICOM SEG needs a DICOM series as input (it references its slices); write .nii.gz instead" + hint)
        model = self.metadata[0].get("model", {}) if self.metadata else {}
        segments = [Segment(o.object_id, o.label or f"object {o.object_id}") for o in self.objects]
        algorithm = Algorithm(str(model.get("name", "medsam2-endpoint")), __version__, model.get("sha256"))
        try:
            return write_dicom_seg(self.array(), self.source_files, segments, algorithm)
        except ServiceError as exc:
            raise ClientError(exc.message) from None

    def preview(self, path: str | Path, *, panels: int = 5) -> Path:
        """PNG of the first object's key slice and its neighbours with the mask outlined (see preview.py)."""
        if self.image is None:
            raise ClientError("a preview needs the volume's voxels, which stayed in the DICOMweb server; open the mask in a viewer")
        from medsam2_endpoint.client.preview import (
            render_preview,  # matplotlib loads only when a preview is asked for
        )

        model = self.metadata[0].get("model", {}).get("name", "?") if self.metadata else "?"
        voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(self.mask)))
        ml = voxels * float(np.prod(self.mask.GetSpacing())) / 1000.0
        title = f"{model}: {len(self.objects)} object{'s' if len(self.objects) > 1 else ''}, {voxels} voxels, {ml:.2f} ml"
        boxes = [(o.key_slice, o.bbox) for o in self.objects]
        return render_preview(self.image, self.mask, self.objects[0].key_slice, path, window=self.window, boxes=boxes,
                              panels=panels, title=title)


def segment(
    volume: str | Path | sitk.Image | DicomWebSeries, *, bbox: Sequence[float] | None = None, key_slice: int | None = None,
    objects: Sequence[ObjectPrompt] | None = None, window: Sequence[float] | None = None, preset: str | None = None,
    model: str | None = None, endpoint: str = DEFAULT_ENDPOINT, key: str | None = None, deployment: str | None = None,
    mask_format: str = "nifti", series_uid: str | None = None, timeout: float = 600.0, retries: int = 4,
    backoff_s: float = 2.0, progress: bool = False, propagation: str | None = None, stop_after_empty: int | None = None,
    max_slices: int | None = None, modality: str | None = None, prompts: Sequence[dict[str, Any]] | None = None,
    previous: str | Path | sitk.Image | None = None, reuse_volume: bool | None = None, store_seg: bool = False,
) -> SegmentationResult:
    """Segment one object (`bbox` + `key_slice`) or several (`objects`) in a volume through the endpoint.

    `volume`: a file path, a DICOM folder, a SimpleITK image, or a `DicomWebSeries` (the endpoint fetches it;
    `store_seg=True` has it store the DICOM SEG back into the study). `window` [lower, upper] or `preset`
    (see PRESETS, or "mri"). `key`: defaults to $MEDSAM2_ENDPOINT_KEY. `mask_format`: "nifti" or "rle".
    Several objects go as one item with the `objects` column: the volume is uploaded once, every slice
    is encoded once for all objects, and the server returns a label map (overlaps to the highest logit).
    `propagation` ("both", "up", "down"), `stop_after_empty`, `max_slices` and `modality` ("CT", "MR") are
    the 3D route's columns of those names (None: the server's default).

    `prompts`: objects in the request's own form (instead of bbox/objects), e.g. `[{"id": 1, "prompts":
    [{"slice": 41, "box": [...]}, {"slice": 47, "points": [[x, y]], "labels": [1]}]}]` or with `recist`;
    slices are z indices of the volume as read. `previous`: the earlier answer's mask (file or image) to
    refine: slices the new prompts do not reach keep it. `reuse_volume` (default: when `previous` is
    given): send the volume's `volume_id` instead of the volume, and upload it only when the server
    answers 409 `volume_not_held`.
    """
    route_options = {"propagation": propagation, "stop_after_empty": stop_after_empty, "max_slices": max_slices,
                     "modality": modality}
    if prompts is not None:
        if objects is not None or bbox is not None or key_slice is not None:
            raise ClientError("give prompts, or bbox and key_slice, or objects; not several")
        if not prompts or not all(isinstance(o, dict) for o in prompts):
            raise ClientError('prompts: expected a non-empty list of objects such as {"id": 1, "prompts": [{"slice": 3, "box": [...]}]}')
        entries = [{"id": i + 1, **o} for i, o in enumerate(prompts)]
        ids = [e["id"] for e in entries]
        if len(set(ids)) != len(ids) or not all(isinstance(i, int) and 1 <= i <= 65535 for i in ids):
            raise ClientError(f"prompts: object ids must be unique integers within 1..65535, got {ids}")
        # the preview outlines each object's first box (or its first prompt's slice)
        objects = [ObjectPrompt(first_box(e), first_slice(e), e["id"]) for e in entries]
        prompt_columns: dict[str, list[Any]] = {"objects": [entries]}
        max_id = max(ids)
    else:
        if objects is None:
            if bbox is None or key_slice is None:
                raise ClientError("give bbox and key_slice, or objects")
            objects = [ObjectPrompt(tuple(float(v) for v in bbox), int(key_slice), 1)]  # type: ignore[arg-type]
        elif bbox is not None or key_slice is not None:
            raise ClientError("give either bbox and key_slice, or objects, not both")
        objects = list(objects)
        check_objects(objects)
        if len(objects) == 1 and objects[0].object_id == 1:
            prompt_columns = {"bbox": [list(objects[0].bbox)], "key_slice_idx": [objects[0].key_slice]}
        else:
            prompt_columns = {"objects": [[{"id": o.object_id, "bbox": list(o.bbox), "key_slice_idx": o.key_slice} for o in objects]]}
        max_id = max(o.object_id for o in objects)
    if mask_format not in ("nifti", "rle"):
        raise ClientError(f"mask_format must be nifti or rle, got {mask_format!r}")
    source = _Source.of(volume, series_uid, store_seg=store_seg, mask_format=mask_format, previous=previous)
    if source.image is not None and prompts is None:
        _check_inside(objects, source.image.GetSize())
    send = _Send(endpoint, key, deployment, timeout, retries, backoff_s, progress)
    return _run(source, prompt_columns, objects, send, window=window, preset=preset, model=model, mask_format=mask_format,
                previous=previous, reuse_volume=reuse_volume, route_options=route_options, max_id=max_id)


def _check_inside(objects: Sequence[ObjectPrompt], size: Sequence[int]) -> None:
    """Cheap checks before uploading a large volume; the server checks everything again."""
    width, height, depth = size
    for o in objects:
        if not 0 <= o.key_slice < depth:
            raise ClientError(f"object {o.object_id}: key slice {o.key_slice} is outside the volume's {depth} slices (0..{depth - 1})")
        x0, y0, x1, y1 = o.bbox
        if not (0 <= x0 < x1 < width and 0 <= y0 < y1 < height):
            raise ClientError(f"object {o.object_id}: box {list(o.bbox)} must satisfy 0 <= x_min < x_max < {width}, 0 <= y_min < y_max < {height}")


@dataclass(frozen=True)
class _Source:
    """Where the voxels come from: a local image (uploaded), or a DICOMweb series (named in the request)."""

    image: sitk.Image | None
    source_files: tuple[Path, ...] = ()
    dicomweb: DicomWebSeries | None = None
    store_seg: bool = False

    @classmethod
    def of(cls, volume: str | Path | sitk.Image | DicomWebSeries, series_uid: str | None, *, store_seg: bool,
           mask_format: str, previous: object) -> _Source:
        if isinstance(volume, DicomWebSeries):
            if mask_format != "nifti":
                raise ClientError("a DICOMweb series' mask comes back as nifti (it carries the series' geometry); drop mask_format rle")
            if previous is not None:
                raise ClientError("a correction (previous mask) needs the volume as a local file or DICOM folder")
            return cls(None, dicomweb=volume, store_seg=store_seg)
        if store_seg:
            raise ClientError("store_seg (--store-seg) stores the SEG into a DICOMweb series' study; give --dicomweb/--study/--series")
        image, files = scalar_image(volume, series_uid)
        return cls(image, files)

    def columns(self) -> dict[str, list[Any]]:
        """The item's volume columns, when the volume is not uploaded."""
        if self.dicomweb is None:
            return {}
        return {"dicomweb": [self.dicomweb.column()], **({"store_seg": [True]} if self.store_seg else {})}


@dataclass(frozen=True)
class _Send:
    endpoint: str
    key: str | None
    deployment: str | None
    timeout: float
    retries: int
    backoff_s: float
    progress: bool

    def __call__(self, columns: dict[str, list[Any]]) -> Any:
        return post_request(self.endpoint, {"input_data": columns}, key=self.key if self.key is not None else os.environ.get(KEY_ENV),
                            deployment=self.deployment, timeout=self.timeout, retries=self.retries, backoff_s=self.backoff_s,
                            progress=self.progress)


def _run(source: _Source, prompt_columns: dict[str, list[Any]], objects: list[ObjectPrompt], send: _Send, *,
         window: Sequence[float] | None, preset: str | None, model: str | None, mask_format: str,
         previous: str | Path | sitk.Image | None, reuse_volume: bool | None, route_options: dict[str, Any],
         max_id: int) -> SegmentationResult:
    """Send the prompts (with volume_id first when reusing, the upload on 409 volume_not_held) and read the answer."""
    image = source.image
    win = resolve_window(image, window, preset)
    columns: dict[str, list[Any]] = {**prompt_columns, "mask_format": [mask_format], **source.columns()}
    if win is not None:
        columns["dicom_window"] = [list(win)]
    if model:
        columns["model"] = [model]
    columns.update({name: [value] for name, value in route_options.items() if value is not None})
    answer = None
    if image is None:
        answer = send(columns)
    else:
        if previous is not None:
            columns["previous_mask"] = [previous_column(previous, image)]
        data = write_nifti(image, compressed=True)
        if reuse_volume if reuse_volume is not None else previous is not None:
            # the server's id of this upload: the same hash over the volume as the server decodes it
            volume_id = read_nifti(data, field="volume", limits=_UNLIMITED).content_id()
            try:
                answer = send({**columns, "nii_image": [None], "volume_id": [volume_id]})
            except EndpointError as exc:
                if exc.code != "volume_not_held":
                    raise
                log.info("the endpoint does not hold volume %s; uploading it", volume_id)
        if answer is None:
            answer = send({**columns, "nii_image": [base64.b64encode(data).decode("ascii")]})
    if not isinstance(answer, list) or len(answer) != 1:
        raise EndpointError(200, f"expected a list of 1 result, got {type(answer).__name__}", http_status=200)
    (entry,) = answer
    mask = _answer_mask(entry.get("mask"), image, np.uint8 if max_id <= 255 else np.uint16)
    metadata = entry.get("metadata", {})
    return SegmentationResult(mask, metadata.get("objects") or [metadata], objects, image, win, source.source_files)


def _answer_mask(value: Any, image: sitk.Image | None, dtype: type[np.unsignedinteger[Any]]) -> sitk.Image:
    """The answer's mask as a label map: on the sent image's exact geometry (not the NIfTI round trip's float32
    copy), or for a DICOMweb series on the geometry the answer's NIfTI carries."""
    try:
        if image is None:
            if not isinstance(value, str):
                raise EndpointError(200, "expected the mask as nifti base64 for a DICOMweb series", http_status=200)
            volume = decode_nifti_mask(value, field="mask", limits=_UNLIMITED)
            return volume.image_like(volume.array.astype(dtype))
        width, height, depth = image.GetSize()
        labels = decode_mask(value, (depth, height, width), field="mask", limits=_UNLIMITED)
    except ServiceError as exc:
        raise EndpointError(200, f"the answer's {exc.message}", http_status=200) from None
    mask = sitk.GetImageFromArray(labels.astype(dtype))
    mask.CopyInformation(image)
    return mask
