"""MedSAM2's own 3D Slicer plugin (MedSAMSlicer, branch MedSAM2; REFERENCE.md G): its uploads checked, its two
steps run on the served model. No HTTP here (api/medsam2_plugin.py), no files: state is core/plugin_state.py.

Step 1 (`propagate=N`): each box of `img_data.npz` on the middle slice `z_range[2]` -> that slice's mask per
object (labels 1..N in box order, overlaps to the higher logit), nothing on other slices.
Step 2 (`propagate=Y`, `gts.npz` uploaded, the volume kept from step 1): each object of `segs` from its mask on
the middle slice (the user may have edited it), walked up and down within `z_range`: from the mask itself where
the model takes mask prompts (MedSAM2's `add_new_mask`), else from the mask's bounding box (LiteMedSAM); the
middle slice keeps the user's mask exactly. Walks use the 3D route's machinery (engine.start,
pipeline.propagate.segment_object, merge_objects) on the volume as the plugin sent it (uint8 after its own
"Preprocessing": no window here).

The plugin picks a checkpoint by `size` (tiny, small, base_plus, large): this server has one served model
(the registry's default) and runs it for every size; a checkpoint uploaded through `/upload_model` and
registered is run when the plugin names it. The `run_script` answer says which model ran.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, cast

import numpy as np

from medsam2_endpoint.base.budget import Budget
from medsam2_endpoint.base.errors import InvalidRequest, PayloadTooLarge, VolumeNotHeld
from medsam2_endpoint.core.plugin_state import ClientState, PluginVolume
from medsam2_endpoint.core.service import Service
from medsam2_endpoint.core.volumes import volume_key
from medsam2_endpoint.engines.base import VolumeEngine
from medsam2_endpoint.io.limits import Limits
from medsam2_endpoint.pipeline.propagate import (
    Direction,
    ObjectResult,
    PropagationOptions,
    keep_largest_component,
    merge_objects,
    segment_object,
)
from medsam2_endpoint.pipeline.window import window_to_uint8

SIZES = ("tiny", "small", "base_plus", "large")
MAX_OBJECTS = 255  # labels are uint8, as the plugin's own arrays
IMAGE_KEYS = ("imgs", "boxes", "z_range")
USER_LOGIT = np.float32(1e4)  # the user's own mask wins every overlap on its slice


# ------------------------------------------------------------------------------------------------ uploads


def _header(fh: IO[bytes], where: str) -> tuple[tuple[int, ...], np.dtype[np.generic]]:
    """An .npy member's shape and dtype from its header, before any of its data is read."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(fh)
        else:
            shape, _, dtype = fmt.read_array_header_2_0(fh)
    except (ValueError, OSError, SyntaxError) as exc:
        raise InvalidRequest(f"{where}: not a numpy array ({exc})") from None
    return tuple(int(v) for v in shape), dtype


def read_npz(data: bytes, *, limits: Limits, field: str = "file") -> dict[str, np.ndarray]:
    """The arrays the plugin's files hold (imgs, boxes, z_range, segs), each checked from its header first
    (voxels, decompressed bytes, no Python objects) and read without pickle."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise InvalidRequest(f"{field}: not an .npz file (numpy.savez's zip of .npy arrays); send img_data.npz or gts.npz "
                             "as the plugin writes them") from None
    arrays: dict[str, np.ndarray] = {}
    with archive:
        for info in archive.infolist():
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if key not in (*IMAGE_KEYS, "segs"):
                continue
            where = f"{field}.{key}"
            if info.file_size > limits.max_file_bytes:
                raise PayloadTooLarge(f"{where}: {info.file_size} bytes once decompressed, over the limit of {limits.max_file_bytes} "
                                      "(MEDSAM2_MAX_FILE_MB)", detail={"bytes": info.file_size, "limit": limits.max_file_bytes})
            try:
                with archive.open(info) as fh:
                    shape, dtype = _header(fh, where)
                    if dtype.hasobject or dtype.kind not in "biuf":
                        raise InvalidRequest(f"{where}: dtype {dtype} is not a number type; send numeric arrays (uint8 voxels)")
                    voxels = int(np.prod(shape, dtype=np.int64))
                    if voxels > limits.max_voxels:
                        raise PayloadTooLarge(f"{where}: {voxels} voxels {list(shape)}, over the limit of {limits.max_voxels} "
                                              "(MEDSAM2_MAX_VOXELS)", detail={"voxels": voxels, "limit": limits.max_voxels})
                with archive.open(info) as fh:
                    arrays[key] = np.lib.format.read_array(fh, allow_pickle=False)
            except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
                raise InvalidRequest(f"{where}: unreadable ({exc})") from None
    return arrays


def _ints(array: np.ndarray, where: str) -> np.ndarray:
    values = np.asarray(array, dtype=np.float64)
    if not np.isfinite(values).all():
        raise InvalidRequest(f"{where}: holds NaN or infinity; send pixel and slice indices")
    return np.rint(values).astype(np.int64)


def parse_image(arrays: dict[str, np.ndarray], *, limits: Limits, field: str = "file") -> PluginVolume:
    """`img_data.npz`: imgs (D, H, W), boxes (N, 4) [x_min, y_min, x_max, y_max] (either corner order: y_min may
    exceed y_max), z_range [k_start, k_end, mid] (ends in either order). Boxes are clipped to the slice."""
    missing = [k for k in IMAGE_KEYS if k not in arrays]
    if missing:
        raise InvalidRequest(f"{field}: img_data.npz needs {', '.join(IMAGE_KEYS)}; {', '.join(missing)} missing")
    imgs = arrays["imgs"]
    if imgs.ndim != 3 or min(imgs.shape) < 1:
        raise InvalidRequest(f"{field}.imgs: shape {list(imgs.shape)}; send the volume as (slices, rows, columns)")
    depth, height, width = (int(v) for v in imgs.shape)
    if height * width > limits.max_slice_pixels:
        raise PayloadTooLarge(f"{field}.imgs: slices of {height} x {width} pixels, over the limit of {limits.max_slice_pixels} "
                              "(MEDSAM2_MAX_SLICE_PIXELS)")
    scaled_from = None
    if imgs.dtype != np.uint8:
        if imgs.dtype.kind == "f" and not np.isfinite(imgs).all():
            raise InvalidRequest(f"{field}.imgs: holds NaN or infinity")
        # not the plugin's "Preprocessing" output: scaled by its own min and max, as the plugin's preprocessing ends
        scaled_from = str(imgs.dtype)
        imgs = window_to_uint8(imgs, None, field=f"{field}.imgs")
    imgs = np.ascontiguousarray(imgs)
    raw_boxes = _ints(arrays["boxes"], f"{field}.boxes")
    if raw_boxes.ndim == 1 and raw_boxes.size == 4:
        raw_boxes = raw_boxes.reshape(1, 4)
    if raw_boxes.ndim != 2 or raw_boxes.shape[1] != 4 or not 1 <= len(raw_boxes) <= MAX_OBJECTS:
        raise InvalidRequest(f"{field}.boxes: shape {list(raw_boxes.shape)}; send one [x_min, y_min, x_max, y_max] row per object "
                             f"(1 to {MAX_OBJECTS} objects)")
    boxes = np.empty_like(raw_boxes)
    for k, (xa, ya, xb, yb) in enumerate(raw_boxes.tolist()):
        x0, x1 = sorted((min(max(xa, 0), width - 1), min(max(xb, 0), width - 1)))
        y0, y1 = sorted((min(max(ya, 0), height - 1), min(max(yb, 0), height - 1)))
        if x0 >= x1 or y0 >= y1:
            raise InvalidRequest(f"{field}.boxes[{k}]: {[xa, ya, xb, yb]} covers no area inside the {width} x {height} slice; "
                                 "draw the box around the object on the middle slice")
        boxes[k] = (x0, y0, x1, y1)
    z = _ints(arrays["z_range"], f"{field}.z_range").ravel().tolist()
    if len(z) not in (2, 3):
        raise InvalidRequest(f"{field}.z_range: {z}; send [k_start, k_end, middle slice]")
    low, high = sorted(z[:2])
    mid = z[2] if len(z) == 3 else (low + high) // 2
    if not 0 <= mid < depth:
        raise InvalidRequest(f"{field}.z_range[2]: middle slice {mid} is outside the volume's {depth} slices (0..{depth - 1})")
    if high < 0 or low >= depth:
        raise InvalidRequest(f"{field}.z_range: slices {low}..{high} are outside the volume's {depth} slices (0..{depth - 1})")
    low, high = max(low, 0), min(high, depth - 1)
    return PluginVolume(imgs, boxes, (min(low, mid), max(high, mid), mid), volume_key(imgs), scaled_from)


def parse_gts(arrays: dict[str, np.ndarray], *, field: str = "file") -> np.ndarray:
    """`gts.npz`: segs (D, H, W), value n = object n (0 background)."""
    segs = arrays["segs"]
    if segs.ndim != 3:
        raise InvalidRequest(f"{field}.segs: shape {list(segs.shape)}; send the masks as (slices, rows, columns)")
    values = np.asarray(segs)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise InvalidRequest(f"{field}.segs: holds NaN or infinity; send object numbers 0..{MAX_OBJECTS}")
    if values.size and (values.min() < 0 or values.max() > MAX_OBJECTS or (values.dtype.kind == "f" and (values != np.rint(values)).any())):
        raise InvalidRequest(f"{field}.segs: values must be whole object numbers 0..{MAX_OBJECTS} (0 background)")
    return np.ascontiguousarray(values.astype(np.uint8))


def read_upload(data: bytes, *, limits: Limits, field: str = "file") -> PluginVolume | np.ndarray:
    """An uploaded file: the first step's volume (img_data.npz) or the second's masks (gts.npz), told by content."""
    arrays = read_npz(data, limits=limits, field=field)
    if "imgs" in arrays:
        return parse_image(arrays, limits=limits, field=field)
    if "segs" in arrays:
        return parse_gts(arrays, field=field)
    raise InvalidRequest(f"{field}: an .npz with imgs, boxes and z_range (img_data.npz) or segs (gts.npz); this one holds "
                         f"{', '.join(sorted(arrays)) or 'none of them'}")


# ------------------------------------------------------------------------------------------------ runs


@dataclass(frozen=True)
class PluginRun:
    """run_script's form, checked."""

    propagate: bool
    size: str
    checkpoint: str


def parse_run(*, checkpoint: str, propagate: str, size: str) -> PluginRun:
    if size not in SIZES:
        raise InvalidRequest(f"size: {size[:40]!r} is not one of {', '.join(SIZES)} (the plugin's checkpoint list)")
    flag = propagate.strip().upper()
    if flag not in ("N", "Y"):
        raise InvalidRequest(f"propagate: {propagate[:10]!r}; send N (the middle slice's masks) or Y (the whole objects)")
    return PluginRun(flag == "Y", size, checkpoint[:200])


def served_model(service: Service, run: PluginRun) -> str:
    """The model a run uses: a registered checkpoint the plugin names (`<name>/<name>.pt` after /upload_model),
    else the served default, whatever `size` says. Only compared with registry names: never a path."""
    name = re.split(r"[\\/]", run.checkpoint, maxsplit=1)[0] if re.search(r"[\\/]", run.checkpoint) else ""
    return name if name and name in service.registry and service.weight_url(name) is not None else service.default


def middle_masks(service: Service, name: str, volume: PluginVolume, budget: Budget) -> np.ndarray:
    """Step 1: each box's mask on the middle slice, labels 1..N in box order; (D, H, W) uint8."""
    engine = service.registry.get(name)
    shape = volume.imgs.shape
    mid = volume.z_range[2]
    key_only = PropagationOptions(direction="up", max_slices=1)
    with service.slots.hold(name):
        state = engine.start(volume.imgs, volume.key)
        results = [(k, segment_object(engine, state, key_index=mid, box=box, shape=shape, options=key_only, budget=budget))
                   for k, box in enumerate(volume.boxes, start=1)]
    return merge_objects(results, shape)


def _mask_box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    height, width = mask.shape
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
    # a one-pixel-wide mask still needs a box with area
    x1, y1 = min(max(x1, x0 + 1), width - 1), min(max(y1, y0 + 1), height - 1)
    return np.array([min(x0, x1 - 1), min(y0, y1 - 1), x1, y1], dtype=np.int64)


def _from_mask(engine: VolumeEngine, key_mask: np.ndarray) -> Callable[..., Iterator[tuple[int, np.ndarray]]] | None:
    """A walk from the user's mask itself where the model takes mask prompts and can start from one
    (MedSAM2's `add_new_mask`); None: from its bounding box (`propagate.walk_from_box`, LiteMedSAM)."""
    track_mask = getattr(engine, "track_mask", None)
    if not engine.info.capabilities.mask_prompts or track_mask is None:
        return None

    def track(state: object, *, key_index: int, box: np.ndarray, reverse: bool) -> Iterator[tuple[int, np.ndarray]]:
        return cast(Iterator[tuple[int, np.ndarray]], track_mask(state, key_index=key_index, mask=key_mask, reverse=reverse))

    return track


def propagate(service: Service, name: str, volume: PluginVolume, gts: np.ndarray, budget: Budget) -> np.ndarray:
    """Step 2: every object of `gts` walked from its middle-slice mask within z_range; (D, H, W) uint8 labels."""
    shape = volume.imgs.shape
    if gts.shape != shape:
        raise InvalidRequest(f"gts: segs has shape {list(gts.shape)}, the uploaded volume {list(shape)}; send gts.npz for "
                             "the same volume (or upload img_data.npz again)")
    low, high, mid = volume.z_range
    ids = [int(v) for v in np.unique(gts) if v]
    if not ids:
        raise InvalidRequest("gts: segs holds no object (all 0); get the middle mask first (propagate=N) and send it back")
    engine = service.registry.get(name)
    results: list[tuple[int, ObjectResult]] = []
    keys: list[tuple[int, int, np.ndarray]] = []
    with service.slots.hold(name):
        state = engine.start(volume.imgs, volume.key)
        for n in ids:
            present = gts == n
            # the middle slice, or (the user drew the object elsewhere only) its largest slice
            key = mid if present[mid].any() else int(present.reshape(shape[0], -1).sum(axis=1).argmax())
            key_mask = present[key]
            box = _mask_box(key_mask)
            lo, hi = min(low, key), max(high, key)
            mask = np.zeros(shape, dtype=np.uint8)
            logits: dict[int, np.ndarray] = {}
            processed = 0
            walks: tuple[tuple[Direction, int], ...] = (("up", hi - key + 1), ("down", key - lo + 1))
            for direction, reach in walks:
                walked = segment_object(engine, state, key_index=key, box=box, shape=shape, budget=budget, track=_from_mask(engine, key_mask),
                                        options=PropagationOptions(direction=direction, max_slices=reach, largest_component=False))
                mask |= walked.mask
                processed += walked.slices_processed
                for z, lg in walked.logits.items():
                    logits[z] = np.maximum(logits[z], lg) if z in logits else lg
            mask[:lo] = 0
            mask[hi + 1:] = 0
            mask[key] = key_mask
            mask = keep_largest_component(mask)
            mask[key] = key_mask  # the user's mask as drawn, every part of it
            logits = {z: lg for z, lg in logits.items() if lo <= z <= hi}
            logits[key] = np.where(key_mask, USER_LOGIT, np.float32(-1.0))
            results.append((n, ObjectResult(mask, processed, logits)))
            keys.append((n, key, key_mask))
    labels = merge_objects(results, shape)
    for n, key, key_mask in keys:
        labels[key][key_mask] = n
    return labels


def result_npz(labels: np.ndarray) -> bytes:
    """The answer file the plugin downloads: `segs` (D, H, W) uint8."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, segs=labels.astype(np.uint8, copy=False))
    return buffer.getvalue()


def run(service: Service, state: ClientState, run: PluginRun, budget: Budget) -> tuple[bytes, str]:
    """One run_script: (the result .npz, the text answer naming the model that ran)."""
    volume = state.volume
    if volume is None:
        raise VolumeNotHeld("input: this server holds no img_data.npz from this address (never sent, or expired); "
                            "get the middle mask again (POST /upload img_data.npz, then run_script)")
    name = served_model(service, run)
    info = service.registry.info(name)
    if run.propagate:
        if state.gts is None:
            raise InvalidRequest("gts: no gts.npz uploaded since the image; POST /upload gts.npz, then run_script with propagate=Y")
        labels = propagate(service, name, volume, state.gts, budget)
        done = f"propagated {len(np.unique(labels)) - 1} object(s) over slices {volume.z_range[0]}..{volume.z_range[1]}"
    else:
        labels = middle_masks(service, name, volume, budget)
        done = f"middle-slice mask of {len(volume.boxes)} object(s) on slice {volume.z_range[2]}"
    scaled = f"; imgs were {volume.scaled_from}, min-max scaled to uint8" if volume.scaled_from else ""
    if name == service.default:
        model = f"size '{run.size}' runs this server's served model {info.name} (every size {', '.join(SIZES)} does)"
    else:
        model = f"checkpoint {run.checkpoint!r} is the uploaded model {info.name}"
    text = f"{done} with {info.name} ({info.family}): {model}{scaled}. GET /download_file for the result."
    return result_npz(labels), text
