"""Client for a running endpoint: `medsam2-endpoint predict` and the `segment()` Python API.

Reads a volume (NIfTI/NRRD/MHA file, or a DICOM series folder converted with SimpleITK), sends it as
base64 gzip NIfTI with a box on a key slice (or several objects), waits with a progress bar, retries
on 429/503, and returns the mask as a SimpleITK label map with the source image's exact geometry.

Conventions (as the service): a box is [x_min, y_min, x_max, y_max] in pixel indices of the key slice,
x the column; the key slice is the z index of the volume as read (for DICOM: GDCM's sorted order).
The endpoint key comes from MEDSAM2_ENDPOINT_KEY (or `key=`) and is sent as `Authorization: Bearer`;
it is never printed, logged or put in an error.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import SimpleITK as sitk

from medsam2_endpoint import __version__
from medsam2_endpoint.base.errors import ServiceError
from medsam2_endpoint.client.pacs import predict_dicomweb, prompt_columns
from medsam2_endpoint.client.prompts import first_box, first_slice, load_prompts, previous_column
from medsam2_endpoint.client.transport import KEY_ENV, ClientError, EndpointError, post_request
from medsam2_endpoint.io.dicom_seg import SEG_SUFFIX, Algorithm, Segment, write_dicom_seg
from medsam2_endpoint.io.encode import rle_decode
from medsam2_endpoint.io.limits import Limits
from medsam2_endpoint.io.volume import read_nifti, write_nifti

__all__ = ["PRESETS", "ClientError", "EndpointError", "ObjectPrompt", "SegmentationResult", "load_prompts", "predict_main", "segment"]
DEFAULT_ENDPOINT = "http://127.0.0.1:5001/score"
log = logging.getLogger("medsam2_endpoint.client")
#: CT windows [lower, upper] in HU, from the usual radiology (width, level) pairs.
PRESETS: dict[str, tuple[float, float]] = {
    "ct-soft-tissue": (-160.0, 240.0),  # W 400, L 40 (MedSAM2's abdominal default)
    "ct-lung": (-1350.0, 150.0),  # W 1500, L -600
    "ct-bone": (-500.0, 1300.0),  # W 1800, L 400
}
MRI_PERCENTILES = (0.5, 99.5)  # "mri": of the nonzero voxels, as MedSAM2's MRI script


@dataclass(frozen=True)
class ObjectPrompt:
    """One object: a box on a key slice; `object_id` is its value in the label map (1..65535)."""

    bbox: tuple[float, float, float, float]
    key_slice: int
    object_id: int = 1
    label: str | None = None  # the segment's label in a DICOM SEG (default "object <id>")


@dataclass(frozen=True)
class SegmentationResult:
    """The label map (uint8, or uint16 for ids above 255) with the source geometry, and per-object metadata."""

    mask: sitk.Image
    metadata: list[dict[str, Any]]
    objects: list[ObjectPrompt]
    image: sitk.Image
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
            raise ClientError("a DICOM SEG needs a DICOM series as input (it references its slices); write .nii.gz instead")
        model = self.metadata[0].get("model", {}) if self.metadata else {}
        segments = [Segment(o.object_id, o.label or f"object {o.object_id}") for o in self.objects]
        algorithm = Algorithm(str(model.get("name", "medsam2-endpoint")), __version__, model.get("sha256"))
        try:
            return write_dicom_seg(self.array(), self.source_files, segments, algorithm)
        except ServiceError as exc:
            raise ClientError(exc.message) from None

    def preview(self, path: str | Path, *, panels: int = 5) -> Path:
        """PNG of the first object's key slice and its neighbours with the mask outlined (see preview.py)."""
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


# ----------------------------------------------------------------------------------------- inputs


def read_volume(path: str | Path, *, series_uid: str | None = None) -> sitk.Image:
    """A volume file (anything SimpleITK reads: .nii[.gz], .nrrd, .mha, ...) or a DICOM series folder."""
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path, series_uid=series_uid)[0]
    if not path.is_file():
        raise ClientError(f"{path}: no such file or folder")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError:
        raise ClientError(f"{path}: SimpleITK cannot read it; give a NIfTI, NRRD or MHA file or a DICOM folder") from None


def read_dicom_series(folder: Path, *, series_uid: str | None = None) -> tuple[sitk.Image, tuple[Path, ...]]:
    """One DICOM series of `folder`, slices sorted by GDCM along the slice normal, rescale applied; and
    its files in that (z) order."""
    uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not uids:
        raise ClientError(f"{folder}: no DICOM series found in this folder")
    if series_uid is None and len(uids) > 1:
        listed = ", ".join(f"{uid} ({len(_series_file_names(folder, uid))} files)" for uid in uids)
        raise ClientError(f"{folder}: {len(uids)} DICOM series; choose one with --series: {listed}")
    uid = series_uid or uids[0]
    if uid not in uids:
        raise ClientError(f"{folder}: no series {uid}; found {', '.join(uids)}")
    names = _series_file_names(folder, uid)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    try:
        return cast(sitk.Image, reader.Execute()), tuple(Path(n) for n in names)
    except RuntimeError as exc:
        raise ClientError(f"{folder}: cannot read DICOM series {uid}: {str(exc).strip().splitlines()[-1]}") from None


def _series_file_names(folder: Path, uid: str) -> tuple[str, ...]:
    """The files of DICOM series `uid` in `folder`, in GDCM's slice order."""
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
    return cast("tuple[str, ...]", names)


def resolve_window(image: sitk.Image, window: Sequence[float] | None, preset: str | None) -> tuple[float, float] | None:
    """The [lower, upper] window to send: explicit, a CT preset, or the "mri" percentiles of nonzero voxels."""
    if window is not None and preset is not None:
        raise ClientError("give either a window or a preset, not both")
    if preset is not None:
        if preset == "mri":
            values = sitk.GetArrayViewFromImage(image)
            values = values[values != 0]
            if values.size == 0:
                raise ClientError("preset mri: the volume has no nonzero voxels")
            lo, hi = (float(v) for v in np.percentile(values, MRI_PERCENTILES))
            window = (lo, hi)
        elif preset in PRESETS:
            window = PRESETS[preset]
        else:
            raise ClientError(f"unknown preset {preset!r}; choose from {', '.join([*PRESETS, 'mri'])}")
    if window is None:
        return None
    lo, hi = (float(v) for v in window)
    if not lo < hi:
        raise ClientError(f"window lower bound {lo} must be below upper bound {hi}")
    return lo, hi


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


# ----------------------------------------------------------------------------------------- segment


def _decode_mask(entry: dict[str, Any], shape: tuple[int, ...]) -> np.ndarray:
    """The mask as the server sent it: 0/1, or object ids for several objects."""
    mask: Any  # JSON: a dict (rle), a base64 string (nifti) or nested lists
    mask, fmt = entry.get("mask"), entry.get("metadata", {}).get("mask_format", "list")
    array: np.ndarray
    if fmt == "rle" and "values" in mask:  # label map: runs of values
        array = np.repeat(np.asarray(mask["values"]), mask["counts"]).reshape(tuple(mask["size"]), order="F")
    elif fmt == "rle":
        array = rle_decode(mask["counts"], tuple(mask["size"]))
    elif fmt == "nifti":
        array = read_nifti(base64.b64decode(mask), field="mask", limits=Limits()).array
    else:
        array = np.asarray(mask, dtype=np.uint8)
    if array.shape != shape:
        raise EndpointError(200, f"the mask has shape {array.shape}, the volume {shape}", http_status=200)
    return array


def segment(
    volume: str | Path | sitk.Image, *, bbox: Sequence[float] | None = None, key_slice: int | None = None,
    objects: Sequence[ObjectPrompt] | None = None, window: Sequence[float] | None = None, preset: str | None = None,
    model: str | None = None, endpoint: str = DEFAULT_ENDPOINT, key: str | None = None, deployment: str | None = None,
    mask_format: str = "nifti", series_uid: str | None = None, timeout: float = 600.0, retries: int = 4,
    backoff_s: float = 2.0, progress: bool = False, propagation: str | None = None, stop_after_empty: int | None = None,
    max_slices: int | None = None, modality: str | None = None, prompts: Sequence[dict[str, Any]] | None = None,
    previous: str | Path | sitk.Image | None = None, reuse_volume: bool | None = None,
) -> SegmentationResult:
    """Segment one object (`bbox` + `key_slice`) or several (`objects`) in a volume through the endpoint.

    `volume`: a file path, a DICOM folder, or a SimpleITK image. `window` [lower, upper] or `preset`
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
        return _segment_prompts(volume, list(prompts), window=window, preset=preset, model=model, endpoint=endpoint, key=key,
                                deployment=deployment, mask_format=mask_format, series_uid=series_uid, timeout=timeout,
                                retries=retries, backoff_s=backoff_s, progress=progress, previous=previous,
                                reuse_volume=reuse_volume, route_options=route_options)
    if objects is None:
        if bbox is None or key_slice is None:
            raise ClientError("give bbox and key_slice, or objects")
        objects = [ObjectPrompt(tuple(float(v) for v in bbox), int(key_slice), 1)]  # type: ignore[arg-type]
    elif bbox is not None or key_slice is not None:
        raise ClientError("give either bbox and key_slice, or objects, not both")
    objects = list(objects)
    check_objects(objects)
    if mask_format not in ("nifti", "rle"):
        raise ClientError(f"mask_format must be nifti or rle, got {mask_format!r}")
    image, source_files = _scalar_image(volume, series_uid)
    width, height, depth = image.GetSize()
    for o in objects:  # cheap checks before uploading a large volume; the server checks everything again
        if not 0 <= o.key_slice < depth:
            raise ClientError(f"object {o.object_id}: key slice {o.key_slice} is outside the volume's {depth} slices (0..{depth - 1})")
        x0, y0, x1, y1 = o.bbox
        if not (0 <= x0 < x1 < width and 0 <= y0 < y1 < height):
            raise ClientError(f"object {o.object_id}: box {list(o.bbox)} must satisfy 0 <= x_min < x_max < {width}, 0 <= y_min < y_max < {height}")
    single = len(objects) == 1 and objects[0].object_id == 1
    if single:
        prompt_columns: dict[str, list[Any]] = {"bbox": [list(objects[0].bbox)], "key_slice_idx": [objects[0].key_slice]}
    else:
        prompt_columns = {"objects": [[{"id": o.object_id, "bbox": list(o.bbox), "key_slice_idx": o.key_slice} for o in objects]]}
    send = _Send(endpoint, key, deployment, timeout, retries, backoff_s, progress)
    return _run(image, prompt_columns, objects, send, window=window, preset=preset, model=model, mask_format=mask_format,
                previous=previous, reuse_volume=reuse_volume, route_options=route_options, source_files=source_files)


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


def _scalar_image(volume: str | Path | sitk.Image, series_uid: str | None) -> tuple[sitk.Image, tuple[Path, ...]]:
    """The 3D scalar image, and the DICOM series' files in z order when the volume was one."""
    source_files: tuple[Path, ...] = ()
    if isinstance(volume, sitk.Image):
        image = volume
    elif Path(volume).is_dir():
        image, source_files = read_dicom_series(Path(volume), series_uid=series_uid)
    else:
        image = read_volume(volume, series_uid=series_uid)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ClientError(
            f"expected a 3D scalar volume, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} components"
        )
    return image, source_files


def _run(image: sitk.Image, prompt_columns: dict[str, list[Any]], objects: list[ObjectPrompt], send: _Send, *,
         window: Sequence[float] | None, preset: str | None, model: str | None, mask_format: str,
         previous: str | Path | sitk.Image | None, reuse_volume: bool | None, route_options: dict[str, Any],
         source_files: tuple[Path, ...] = (), max_id: int | None = None) -> SegmentationResult:
    """Send the prompts (with volume_id first when reusing, the upload on 409 volume_not_held) and read the answer."""
    width, height, depth = image.GetSize()
    win = resolve_window(image, window, preset)
    data = write_nifti(image, compressed=True)
    columns: dict[str, list[Any]] = {**prompt_columns, "mask_format": [mask_format]}
    if win is not None:
        columns["dicom_window"] = [list(win)]
    if model:
        columns["model"] = [model]
    columns.update({name: [value] for name, value in route_options.items() if value is not None})
    if previous is not None:
        columns["previous_mask"] = [previous_column(previous, image)]
    answer = None
    if reuse_volume if reuse_volume is not None else previous is not None:
        # the server's id of this upload: the same hash over the volume as the server decodes it
        volume_id = read_nifti(data, field="volume", limits=Limits(max_file_bytes=1 << 62, max_voxels=1 << 62,
                                                                    max_slice_pixels=1 << 62)).content_id()
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
    labels = _decode_mask(entry, (depth, height, width))
    top = max_id if max_id is not None else max(o.object_id for o in objects)
    labels = labels.astype(np.uint8 if top <= 255 else np.uint16)
    mask = sitk.GetImageFromArray(labels)
    # exact source geometry, not the NIfTI round trip's float32 copy
    mask.CopyInformation(image)
    metadata = entry.get("metadata", {})
    return SegmentationResult(mask, metadata.get("objects") or [metadata], objects, image, win, source_files)


def _segment_prompts(volume: str | Path | sitk.Image, prompts: list[dict[str, Any]], *, series_uid: str | None,
                     endpoint: str, key: str | None, deployment: str | None, timeout: float, retries: int,
                     backoff_s: float, progress: bool, **options: Any) -> SegmentationResult:
    """`segment(prompts=...)`: the objects as the request's JSON, always as the objects column (a label map)."""
    if not prompts or not all(isinstance(o, dict) for o in prompts):
        raise ClientError('prompts: expected a non-empty list of objects such as {"id": 1, "prompts": [{"slice": 3, "box": [...]}]}')
    entries = [{"id": i + 1, **o} for i, o in enumerate(prompts)]
    ids = [e["id"] for e in entries]
    if len(set(ids)) != len(ids) or not all(isinstance(i, int) and 1 <= i <= 65535 for i in ids):
        raise ClientError(f"prompts: object ids must be unique integers within 1..65535, got {ids}")
    image, source_files = _scalar_image(volume, series_uid)
    # the preview outlines each object's first box (or its first prompt's slice)
    shown = [ObjectPrompt(first_box(e), first_slice(e), e["id"]) for e in entries]
    send = _Send(endpoint, key, deployment, timeout, retries, backoff_s, progress)
    return _run(image, {"objects": [entries]}, shown, send, max_id=max(ids), source_files=source_files, **options)


# ----------------------------------------------------------------------------------------- CLI


EXAMPLES = """examples:
  medsam2-endpoint predict ct.nii.gz --bbox 120 140 210 230 --key-slice 42 --preset ct-soft-tissue
  medsam2-endpoint predict dicom_folder/ --bbox 120 140 210 230 --key-slice 10 --label liver -o liver.dcm --preview p.png
  medsam2-endpoint predict mr.nii.gz --objects objects.json --preset mri --propagation up --max-slices 20
  medsam2-endpoint predict ct.nii.gz --bbox 50 50 150 150 --key-slice 5 --endpoint https://NAME.REGION.inference.ml.azure.com/score

"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medsam2-endpoint predict", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES + f"Presets: {', '.join(f'{k} {list(v)}' for k, v in PRESETS.items())}, mri = {MRI_PERCENTILES[0]}-"
        f"{MRI_PERCENTILES[1]} percentiles of nonzero voxels. The key is read from ${KEY_ENV}. -o NAME.dcm writes a DICOM "
        "Segmentation referencing the source series (DICOM input), -o NAME.nii.gz a NIfTI label map.",
    )
    p.add_argument("volume", nargs="?", help="NIfTI/NRRD/MHA file or DICOM series folder (none with --dicomweb)")
    p.add_argument("--dicomweb", metavar="URL", help="read the series from this DICOMweb server (one the endpoint lists in "
                   "MEDSAM2_DICOMWEB_URLS) instead of a local volume; with --study and --series")
    p.add_argument("--study", help="StudyInstanceUID of the --dicomweb series")
    p.add_argument("--store-seg", action="store_true", help="with --dicomweb: the endpoint stores the DICOM SEG into the study")
    p.add_argument("--bbox", nargs=4, type=float, metavar=("X0", "Y0", "X1", "Y1"), help="box on the key slice (x = column)")
    p.add_argument("--key-slice", type=int, help="z index of the key slice")
    p.add_argument("--objects", help='JSON file: [{"id": 1, "bbox": [...], "key_slice": 12, "label": "liver"}, ...] (instead of --bbox/--key-slice)')
    p.add_argument("--label", help="the object's label in a DICOM SEG (with --bbox; default 'object 1')")
    p.add_argument("--prompts", help='JSON file: the request\'s objects, [{"id": 1, "prompts": [{"slice": 12, "box": [...]}, '
                   '{"slice": 15, "points": [[x, y]], "labels": [1]}]}] (boxes, points, recist per slice)')
    p.add_argument("--previous", help="an earlier answer's mask file to refine (sends volume_id first, uploads on 409)")
    win = p.add_mutually_exclusive_group()
    win.add_argument("--window", nargs=2, type=float, metavar=("LO", "HI"), help="intensity window [lower, upper]")
    win.add_argument("--preset", choices=[*PRESETS, "mri"], help="a named window (see below)")
    p.add_argument("--model", help="model name (default: the endpoint's default)")
    p.add_argument("--modality", choices=["CT", "MR"], help="without a window, MR is windowed to its 0.5-99.5th percentiles")
    p.add_argument("--propagation", choices=["both", "up", "down"], help="walk both ways from the key slice (default), up (higher z) or down")
    p.add_argument("--stop-after-empty", type=int, metavar="N", help="stop a direction after N empty slices (server default 2; 0 = never)")
    p.add_argument("--max-slices", type=int, metavar="N", help="at most N slices per direction")
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help=f"scoring URL (default {DEFAULT_ENDPOINT})")
    p.add_argument("--deployment", help="Azure deployment to target (azureml-model-deployment header)")
    p.add_argument("-o", "--output", action="append", help="mask file: NAME.nii.gz (NIfTI) or NAME.dcm (DICOM SEG; DICOM input); "
                   "repeat for both (default: <volume name>_mask.nii.gz)")
    p.add_argument("--preview", help="PNG of the key slice and its neighbours, and three orthogonal planes, with the mask outlined")
    p.add_argument("--panels", type=int, default=5, help="slices in the preview (default 5)")
    p.add_argument("--metadata", help="write the endpoint's metadata (JSON list, one per object) here")
    p.add_argument("--mask-format", choices=["nifti", "rle"], default="nifti", help="mask encoding of the answer")
    p.add_argument("--series", help="DICOM SeriesInstanceUID when the folder holds several series; the --dicomweb series")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the answer (default 600)")
    p.add_argument("--retries", type=int, default=4, help="retries on 429/503 (default 4)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def _default_output(volume: str) -> Path:
    name = Path(volume.rstrip("/\\")).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return Path(f"{name}_mask.nii.gz")


def predict_main(argv: list[str]) -> int:
    """`medsam2-endpoint predict ...`: 0 on success, 1 when the endpoint answered an error, 2 for bad inputs."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        prompts = None
        if args.prompts:
            if args.objects or args.bbox or args.key_slice is not None or args.label:
                raise ClientError("give --prompts, --objects or --bbox/--key-slice (and --label), not several")
            prompts = load_prompts(args.prompts)
            objects = None
        elif args.objects:
            if args.bbox or args.key_slice is not None or args.label:
                raise ClientError("give --objects or --bbox/--key-slice (and --label), not both")
            objects = load_objects(args.objects)
        elif args.bbox is None or args.key_slice is None:
            raise ClientError("give --bbox X0 Y0 X1 Y1 and --key-slice K, or --objects FILE")
        else:
            objects = [ObjectPrompt(tuple(args.bbox), args.key_slice, 1, args.label)]
        if args.dicomweb:  # the endpoint reads the series from the PACS itself (client/pacs.py)
            if not (args.study and args.series) or args.volume or args.previous:
                raise ClientError("--dicomweb needs --study and --series, and no local volume or --previous")
            options = {"model": args.model, "modality": "MR" if args.preset == "mri" else args.modality,
                       "dicom_window": list(args.window) if args.window else PRESETS.get(args.preset or ""),
                       "propagation": args.propagation, "stop_after_empty": args.stop_after_empty, "max_slices": args.max_slices}
            return predict_dicomweb(args.dicomweb, args.study, args.series, prompt_columns(objects, prompts), store_seg=args.store_seg,
                                    outputs=args.output or [], endpoint=args.endpoint, deployment=args.deployment,
                                    timeout=args.timeout, retries=args.retries, options=options, metadata_path=args.metadata)
        if not args.volume:
            raise ClientError("give a volume (file or DICOM folder), or --dicomweb URL --study UID --series UID")
        result = segment(
            args.volume, objects=objects, window=args.window, preset=args.preset, model=args.model,
            endpoint=args.endpoint, deployment=args.deployment, mask_format=args.mask_format, series_uid=args.series,
            timeout=args.timeout, retries=args.retries, progress=not args.quiet and sys.stderr.isatty(),
            propagation=args.propagation, stop_after_empty=args.stop_after_empty, max_slices=args.max_slices, modality=args.modality,
            prompts=prompts, previous=args.previous,
        )
    except EndpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if exc.body is not None:  # the endpoint's own JSON error, as it came
            print(json.dumps(exc.body) if isinstance(exc.body, dict) else str(exc.body), file=sys.stderr)
        return 1
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    outputs = []
    for target in args.output or [_default_output(args.volume)]:
        try:
            outputs.append(result.save(target))
        except ClientError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except (RuntimeError, OSError):
            print(f"error: cannot write the mask to {target}", file=sys.stderr)
            return 2
    for obj, meta in zip(result.objects, result.metadata, strict=True):
        model = meta.get("model", {}).get("name", "?")
        print(f"object {obj.object_id}: {meta.get('voxel_count')} voxels, {meta.get('volume_ml')} ml, model {model}, "
              f"{meta.get('timing_ms', {}).get('total', 0) / 1000:.1f} s")
    for out in outputs:
        print(f"mask: {out}")
    if args.metadata:
        Path(args.metadata).write_text(json.dumps(result.metadata, indent=1))
    if args.preview:
        print(f"preview: {result.preview(args.preview, panels=args.panels)}")
    return 0
