"""The 3D route's steps: decode -> window -> check prompts (every error before any inference) -> propagate -> metadata."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from medsam2_endpoint.base.budget import Budget
from medsam2_endpoint.base.errors import PayloadTooLarge
from medsam2_endpoint.base.log import log
from medsam2_endpoint.contract.score3d import VolumeItem
from medsam2_endpoint.core.prompts import PreparedObject, prepare_object
from medsam2_endpoint.engines.base import PromptedVolumeEngine, VolumeEngine
from medsam2_endpoint.io.dicom_seg import read_series, series_files
from medsam2_endpoint.io.dicomweb import DicomwebSeries
from medsam2_endpoint.io.encode import decode_mask
from medsam2_endpoint.io.fetch import FetchPolicy
from medsam2_endpoint.io.limits import Limits, VoxelTally
from medsam2_endpoint.io.sources import is_url, source_bytes
from medsam2_endpoint.io.volume import (
    LabelMap,
    Volume,
    base64_chunks,
    base64_head,
    peek_shape,
    read_nifti,
    write_nifti,
)
from medsam2_endpoint.pipeline.interactive import WalkMemo, segment_prompts
from medsam2_endpoint.pipeline.propagate import (
    ObjectResult,
    PropagationOptions,
    merge_objects,
    segment_object,
)
from medsam2_endpoint.pipeline.window import percentile_window, window_to_uint8


@dataclass(frozen=True)
class PreparedItem:
    item: VolumeItem
    windowed: Volume  # uint8 windowed voxels with the source geometry (the raw voxels are let go)
    volume_key: str  # content hash of what the model sees: same volume + same window -> same features
    volume_id: str  # content hash of the decoded volume (metadata.volume_id: later requests may send it instead)
    previous: np.ndarray | None  # the earlier answer's mask (0/1 or object ids), (Z, Y, X)
    engine_name: str
    objects: tuple[PreparedObject, ...]
    window: tuple[float, float] | None  # the window applied: the request's, the MR percentiles, or None (min-max)
    decode_ms: float
    window_ms: float
    dicomweb: DicomwebSeries | None = None  # the item's PACS series, while a SEG is to be stored into it (core/pacs.py)


def volume_key(windowed: np.ndarray) -> str:
    """The content key of what a model sees, a uint8 (Z, Y, X) windowed volume: the same voxels (and window) give
    the same key, under which an engine's per-slice features are cached and shared by every route that sends them."""
    return hashlib.blake2b(np.ascontiguousarray(windowed).data, digest_size=16).hexdigest() + str(windowed.shape)


def request_tally(items: Sequence[VolumeItem], limits: Limits) -> VoxelTally:
    """The request-wide limits, checked before any item is decoded: the base64 of all items together, and the
    voxels every base64 item's NIfTI header declares (URL items are added once fetched, before their decoding)."""
    sent = sum(len(item.image) for item in items if item.image is not None and not is_url(item.image.strip()))
    if sent > limits.max_request_base64_bytes:
        raise PayloadTooLarge(
            f"nii_image: the request's {len(items)} items hold {sent} characters of base64 in all, over the limit of "
            f"{limits.max_request_base64_bytes} per request (MEDSAM2_MAX_REQUEST_MB); send fewer items per request, or URLs",
            detail={"request_base64_bytes": sent, "limit": limits.max_request_base64_bytes},
        )
    tally = VoxelTally(limits.max_request_voxels)
    for item in items:
        if item.image is None:  # a volume_id: the worker holds it already
            continue
        text = item.image.strip()
        head = None if is_url(text) else base64_head(text)
        shape = None if head is None else peek_shape(head, field=item.field("nii_image"), limits=limits)
        if shape is not None:
            tally.add(item.field("nii_image"), shape)
    return tally


def load_volume(item: VolumeItem, *, policy: FetchPolicy, limits: Limits, budget: Budget | None = None,
                tally: VoxelTally | None = None) -> Volume:
    """The item's `nii_image`: base64 (decoded in chunks) or a URL (fetched), read as NIfTI, within the budget.

    A URL's NIfTI header is checked from its first bytes, and with the request's `tally` an item it has not
    counted yet (a URL) adds its voxels to the request's total, before the rest of the file is downloaded."""
    field = item.field("nii_image")
    if item.image is None:
        raise ValueError("load_volume needs nii_image; the Service resolves volume_id")  # parse_request ensures one of them

    def count_head(head: bytes) -> None:  # a URL's header: checked and counted before the rest is downloaded
        shape = peek_shape(head, field=field, limits=limits)
        if shape is not None and tally is not None and field not in tally.counted:
            tally.add(field, shape)

    data = source_bytes(item.image, field=field, policy=policy, budget=budget, check_head=count_head,
                        decode=lambda text: base64_chunks(text, field=field, limits=limits, budget=budget))
    volume = read_nifti(data, field=field, limits=limits, budget=budget)
    if tally is not None and field not in tally.counted:  # a header the first bytes did not hold: counted once read
        tally.add(field, tuple(volume.itk_size))
    return volume


def prepare(item: VolumeItem, volume: Volume, engine_name: str, *, decode_ms: float = 0.0, accepts_points: bool = False,
            volume_id: str = "", limits: Limits | None = None) -> PreparedItem:
    """Window and check the prompts: every error a request can cause is raised here, before any inference.

    accepts_points: the engine takes point prompts (MedSAM2); otherwise points are refused with a 400.
    """
    started = time.perf_counter()
    window = item.dicom_window
    if window is None and item.modality == "MR":
        window = percentile_window(volume.array)
    windowed = volume.with_array(window_to_uint8(volume.array, window, field=item.field("dicom_window")))
    del volume  # the raw voxels (often int16, twice the windowed bytes) are not needed past this point
    key = volume_key(windowed.array)
    shape = windowed.array.shape
    previous = None
    if item.previous_mask is not None:
        previous = decode_mask(item.previous_mask, shape, field=item.field("previous_mask"), limits=limits or Limits())
    objects = tuple(
        prepare_object(spec, item.slice_offset, shape, engine_name, accepts_points=accepts_points, corrects=previous is not None)
        for spec in item.objects
    )
    return PreparedItem(item, windowed, key, volume_id, previous, engine_name, objects, window, decode_ms=decode_ms,
                        window_ms=(time.perf_counter() - started) * 1000)


def run(p: PreparedItem, engine: VolumeEngine, budget: Budget, memo: WalkMemo | None = None) -> tuple[LabelMap, dict[str, Any]]:
    """Encode each visited slice once (shared by all objects), propagate each object; (label map in the source
    geometry, metadata)."""
    item, volume = p.item, p.windowed
    windowed = volume.array
    t1 = time.perf_counter()
    options = PropagationOptions(
        direction=item.propagation, stop_after_empty=item.stop_after_empty, max_slices=item.max_slices, keep_logits=item.multi_object
    )
    results: list[tuple[PreparedObject, ObjectResult]] = []
    processed = 0
    state = engine.start(windowed, p.volume_key)  # one state for the item: its objects share the slices it caches
    for obj in p.objects:
        result: ObjectResult
        if obj.plain and p.previous is None and obj.box is not None:
            # a box-only engine's walks are recorded for later correction rounds; MedSAM2's are not (its
            # corrections condition on every prompt at once, and its single-box path stays the reference's)
            record = memo is not None and not isinstance(engine, PromptedVolumeEngine)
            track = partial(memo.track, engine, volume_key=p.volume_key) if memo is not None and record else None
            result = segment_object(engine, state, key_index=obj.key_index, box=obj.box, shape=windowed.shape, options=options,
                                    budget=budget, track=track)
        else:
            earlier = None if p.previous is None else (p.previous == obj.id if item.multi_object else p.previous != 0)
            result = segment_prompts(engine, state, prompts=obj.prompts, shape=windowed.shape, options=options, budget=budget,
                                     previous=earlier, mask_prompt=obj.mask_prompt, memo=memo, volume_key=p.volume_key)
        processed += result.slices_processed
        results.append((obj, result))
    mask = results[0][1].mask if not item.multi_object else merge_objects([(o.id, r) for o, r in results], windowed.shape)
    if item.multi_object and p.previous is not None:
        mask = keep_other_labels(mask, p.previous, [o.id for o in p.objects], results)
    t2 = time.perf_counter()
    voxels = int(np.count_nonzero(mask))
    timing = {"decode": round(p.decode_ms, 1), "window": round(p.window_ms, 1), "inference": round((t2 - t1) * 1000, 1)}
    timing["total"] = round(sum(timing.values()), 1)
    log.info(
        "route=3d item=%d model=%s size=%s objects=%d slices_processed=%d voxels=%d ms=%.0f",
        item.index, p.engine_name, "x".join(map(str, volume.itk_size)), len(p.objects), processed, voxels, timing["total"],
    )
    info = engine.info
    metadata: dict[str, Any] = {
        "shape": volume.itk_size,
        "mask_shape": list(mask.shape),
        "axis_order": "zyx",
        "mask_format": item.mask_format,
        "slice_offset": item.slice_offset,
        "dicom_window": list(item.dicom_window) if item.dicom_window else None,
        "modality": item.modality,
        "window_used": [round(v, 4) for v in p.window] if p.window else None,
        "spacing": list(volume.spacing),
        "origin": list(volume.origin),
        "direction": list(volume.direction),
        "model": info.as_metadata(),
        "propagation": item.propagation,
        "stop_after_empty": item.stop_after_empty or 0,
        "max_slices": item.max_slices,
        "slices_processed": processed,
        "voxel_count": voxels,
        "volume_ml": round(voxels * volume.voxel_ml, 4),
        "timing_ms": timing,
        "volume_id": p.volume_id,
        "previous_mask_used": p.previous is not None,
        "changed_slices": changed_slices(mask, p.previous),
    }
    if item.multi_object:
        metadata["objects"] = [
            {
                "id": obj.id,
                "key_slice_index": obj.key_index + item.slice_offset,
                "adjusted_key_slice_index": obj.key_index,
                "bbox_used": None if obj.box is None else obj.box.tolist(),
                "slices_processed": result.slices_processed,
                **({} if obj.plain else {"prompts_used": list(obj.prompts_used)}),
                "voxel_count": int(np.count_nonzero(mask == obj.id)),
                "volume_ml": round(int(np.count_nonzero(mask == obj.id)) * volume.voxel_ml, 4),
            }
            for obj, result in results
        ]
    else:  # the seed endpoint's single-object fields
        obj, spec = p.objects[0], item.objects[0]
        metadata.update(
            key_slice_index=spec.key_slice_idx,
            adjusted_key_slice_index=obj.key_index,
            bbox=spec.bbox,
            bbox_used=None if obj.box is None else obj.box.tolist(),
        )
        if not obj.plain:
            metadata["prompts_used"] = list(obj.prompts_used)
    return volume.label_map(mask, multi_object=item.multi_object), metadata


def read_local(path: Path, *, limits: Limits, budget: Budget | None = None) -> tuple[Volume, tuple[Path, ...]]:
    """A local NIfTI file, or a DICOM series folder (the batch endpoint's items): the volume, and the series'
    files in z order (empty for a NIfTI file). A series goes through NIfTI bytes so that it meets the same checks
    (size, dtype, finite voxels) as a file."""
    if not path.is_dir():
        return read_nifti(path.read_bytes(), field=path.name, limits=limits, budget=budget), ()
    files = tuple(series_files(path))
    image = read_series(files, limits=limits)
    return read_nifti(write_nifti(image), field=path.name, limits=limits, budget=budget), files


def changed_slices(mask: np.ndarray, previous: np.ndarray | None) -> list[int]:
    """Volume slice indices (z of the mask) where the answer differs from `previous` (without one: from an empty mask)."""
    if previous is None:
        return [int(z) for z in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))]
    earlier = previous if previous.dtype == mask.dtype else previous.astype(mask.dtype)
    return [int(z) for z in np.flatnonzero((mask != earlier).reshape(mask.shape[0], -1).any(axis=1))]


def keep_other_labels(mask: np.ndarray, previous: np.ndarray, ids: list[int], results: list[tuple[PreparedObject, ObjectResult]]) -> np.ndarray:
    """Objects of the earlier label map this request does not prompt keep their voxels where no prompted object is."""
    others = (previous != 0) & ~np.isin(previous, ids) & (mask == 0)
    if not others.any():
        return mask
    if int(previous.max()) > np.iinfo(mask.dtype).max:
        mask = mask.astype(np.uint16)
    mask[others] = previous[others]
    return mask
