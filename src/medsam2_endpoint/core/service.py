"""Orchestration: request in, response out. Owns the model registry; knows nothing of HTTP."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsam2_endpoint.core.settings import Settings
from medsam2_endpoint.io.encode import encode_mask
from medsam2_endpoint.engines.base import VolumeEngine
from medsam2_endpoint.engines.medsam2 import CheckpointError, MedSAM2Engine, find_checkpoints
from medsam2_endpoint.base.errors import InvalidRequest, ModelUnavailable
from medsam2_endpoint.io.fetch import fetch_bytes
from medsam2_endpoint.base.heap import release_free_memory
from medsam2_endpoint.pipeline.window import parse_box, window_to_uint8
from medsam2_endpoint.pipeline.prompt2d import Prompter
from medsam2_endpoint.pipeline.propagate import PropagationOptions, merge_objects, segment_object
from medsam2_endpoint.contract.score3d import VolumeItem, parse_request
from medsam2_endpoint.io.volume import Volume, base64_chunks, read_nifti

log = logging.getLogger("azmlinfsrv.medsam2")
LITE_NAME = "lite-medsam"


@dataclass(frozen=True)
class PreparedObject:
    id: int
    key_index: int  # inside the volume (key_slice_idx - slice_offset)
    box: np.ndarray  # int64 [x_min, y_min, x_max, y_max]


@dataclass(frozen=True)
class PreparedItem:
    item: VolumeItem
    windowed: Volume  # uint8 windowed voxels with the source geometry (the raw voxels are let go)
    volume_key: str  # content hash of what the model sees: same volume + same window -> same features
    engine_name: str
    objects: tuple[PreparedObject, ...]
    decode_ms: float
    window_ms: float


def choose_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailable("MEDSAM2_DEVICE=cuda but no CUDA device is visible")
    return setting


def configure_threads(requested: int) -> int:
    """One worker per process: share the cores among WORKER_COUNT workers instead of oversubscribing."""
    workers = max(1, int(os.environ.get("WORKER_COUNT", "1") or 1))
    threads = requested or max(1, (os.cpu_count() or 1) // workers)
    torch.set_num_threads(threads)
    return threads


class Service:
    """Holds the loaded engines (registry) and runs validated requests through them."""

    def __init__(self, settings: Settings, engines: dict[str, VolumeEngine], default: str) -> None:
        if default not in engines:
            raise ValueError(f"default model {default!r} is not among {sorted(engines)}")
        self.settings = settings
        self.engines = engines
        self.default = default
        # 2D prompting (the /score 2D route and the samapi server): adapters and one embedding cache.
        self.image2d = Prompter.from_env(engines)

    @classmethod
    def from_settings(cls, settings: Settings) -> Service:
        device = choose_device(settings.device)
        threads = configure_threads(settings.num_threads)
        engines: dict[str, VolumeEngine] = {}
        for path in find_checkpoints(settings.model_dir):
            name = path.stem
            if name in engines:
                log.warning("model %s: skipped %s, a checkpoint of that name is already loaded", name, path.name)
                continue
            try:
                engines[name] = MedSAM2Engine(path, device=device, name=name, feature_cache_mb=settings.feature_cache_mb)
            except CheckpointError as exc:
                log.warning("model file skipped: %s", exc)
        medsam2_names = list(engines)
        if settings.enable_lite:
            from medsam2_endpoint.engines.lite import LiteMedSAMEngine

            engines[LITE_NAME] = LiteMedSAMEngine(device=device, feature_cache_mb=settings.feature_cache_mb)
        if not engines:
            raise ModelUnavailable(
                "no model available: no MedSAM2 checkpoint in the model folder and LiteMedSAM disabled (MEDSAM2_ENABLE_LITE=0)"
            )
        default = medsam2_names[0] if medsam2_names else LITE_NAME
        for name, engine in engines.items():
            log.info("model %s loaded (%s, sha256 %s)%s", name, engine.info.checkpoint, engine.info.sha256[:12], " [default]" if name == default else "")
        log.info("device %s, %d threads, model folder %s", device, threads, settings.model_dir)
        service = cls(settings, engines, default)
        if settings.warmup:
            service.warm_up()
        return service

    def available_models(self) -> list[str]:
        return list(self.engines)

    def warm_up(self) -> None:
        """One tiny propagation per engine so the first real request does not pay for lazy initialisation."""
        rng = np.random.default_rng(0)
        volume = rng.integers(0, 255, size=(2, 64, 64), dtype=np.uint8)
        volume[:, 20:44, 20:44] = 220
        for engine in self.engines.values():
            state = engine.start(volume)
            segment_object(engine, state, key_index=0, box=np.array([18, 18, 46, 46]), shape=volume.shape)

    def _engine_name(self, item: VolumeItem) -> str:
        name = item.model or self.default
        if name not in self.engines:
            raise InvalidRequest(f"{item.field('model')}: unknown model {name!r}; available models: {', '.join(self.engines)}")
        return name

    def _load(self, item: VolumeItem) -> Volume:
        field = item.field("nii_image")
        text = item.image.strip()
        if text[:8].lower() == "https://" or text[:7].lower() == "http://":
            data = fetch_bytes(text, self.settings.fetch, field=field)
        else:
            data = base64_chunks(text, field=field, limits=self.settings.limits)
        return read_nifti(data, field=field, limits=self.settings.limits)

    def _prepare(self, item: VolumeItem, volume: Volume | None = None) -> PreparedItem:
        """Decode, window and check the prompts: every error a request can cause is raised here, before any inference."""
        engine_name = self._engine_name(item)
        started = time.perf_counter()
        volume = volume if volume is not None else self._load(item)
        decoded = time.perf_counter()
        windowed = volume.with_array(window_to_uint8(volume.array, item.dicom_window, field=item.field("dicom_window")))
        del volume  # the raw voxels (often int16, twice the windowed bytes) are not needed past this point
        volume_key = hashlib.blake2b(windowed.array.data, digest_size=16).hexdigest() + str(windowed.array.shape)
        depth, height, width = windowed.array.shape
        objects = []
        for spec in item.objects:
            key_index = spec.key_slice_idx - item.slice_offset
            if not 0 <= key_index < depth:
                raise InvalidRequest(
                    f"{spec.key_field}: key slice {spec.key_slice_idx} minus slice_offset {item.slice_offset} "
                    f"is {key_index}, outside the volume's {depth} slices (0..{depth - 1})"
                )
            box = parse_box(spec.bbox, width=width, height=height, field=spec.bbox_field)
            objects.append(PreparedObject(spec.id, key_index, box))
        return PreparedItem(
            item, windowed, volume_key, engine_name, tuple(objects),
            decode_ms=(decoded - started) * 1000, window_ms=(time.perf_counter() - decoded) * 1000,
        )

    def score(self, body: Any) -> list[dict]:
        """Validate every item (decode, geometry, prompts) before running any; one result per item.

        The route is chosen by the columns: `image` -> the 2D prompt route (service2d), else 3D.
        """
        if isinstance(body, dict) and isinstance(body.get("input_data"), dict) and "image" in body["input_data"]:
            from medsam2_endpoint.core.score2d import score_2d

            return score_2d(self, body)
        deadline = time.monotonic() + self.settings.request_deadline_s
        items = parse_request(body, max_items=self.settings.limits.max_items)
        prepared = [self._prepare(item) for item in items]
        results = []
        for p in prepared:
            mask, metadata = self._run(p, deadline)
            t0 = time.perf_counter()
            encoded = encode_mask(mask, p.windowed, p.item.mask_format, label_map=p.item.multi_object)
            metadata["timing_ms"]["encode"] = round((time.perf_counter() - t0) * 1000, 1)
            metadata["timing_ms"]["total"] = round(metadata["timing_ms"]["total"] + metadata["timing_ms"]["encode"], 1)
            results.append({"mask": encoded, "metadata": metadata})
            del mask
            release_free_memory()  # labelling and encoding buffers: an idle worker should not keep them
        return results

    def score_file(self, path: Path, prompt: dict[str, Any]) -> tuple[np.ndarray, Volume, dict]:
        """One local NIfTI file with its prompt (the 3D columns' scalar values): mask, the windowed volume
        (the source geometry, for writing the mask) and metadata."""
        deadline = time.monotonic() + self.settings.request_deadline_s
        columns = {key: [value] for key, value in prompt.items()}
        (item,) = parse_request({"input_data": {**columns, "nii_image": [path.name]}}, max_items=1)
        prepared = self._prepare(item, read_nifti(path.read_bytes(), field=path.name, limits=self.settings.limits))
        mask, metadata = self._run(prepared, deadline)
        return mask, prepared.windowed, metadata

    def _run(self, p: PreparedItem, deadline: float) -> tuple[np.ndarray, dict]:
        """Encode each visited slice once (shared by all objects), propagate each object."""
        engine = self.engines[p.engine_name]
        item, volume = p.item, p.windowed
        windowed = volume.array
        t1 = time.perf_counter()
        options = PropagationOptions(
            direction=item.propagation, stop_after_empty=item.stop_after_empty, max_slices=item.max_slices, keep_logits=item.multi_object
        )
        results = []
        processed = 0
        state = engine.start(windowed, p.volume_key)  # one state for the item: its objects share the slices it caches
        for obj in p.objects:
            result = segment_object(engine, state, key_index=obj.key_index, box=obj.box, shape=windowed.shape, options=options, deadline=deadline)
            processed += result.slices_processed
            results.append((obj, result))
        mask = results[0][1].mask if not item.multi_object else merge_objects([(o.id, r) for o, r in results], windowed.shape)
        t2 = time.perf_counter()
        voxels = int(np.count_nonzero(mask))
        timing = {
            "decode": round(p.decode_ms, 1),
            "window": round(p.window_ms, 1),
            "inference": round((t2 - t1) * 1000, 1),
        }
        timing["total"] = round(sum(timing.values()), 1)
        log.info(
            "route=3d item=%d model=%s size=%s objects=%d slices_processed=%d voxels=%d ms=%.0f",
            item.index, p.engine_name, "x".join(map(str, volume.itk_size)), len(p.objects), processed, voxels, timing["total"],
        )
        info = engine.info
        metadata = {
            "shape": volume.itk_size,
            "mask_shape": list(mask.shape),
            "axis_order": "zyx",
            "mask_format": item.mask_format,
            "slice_offset": item.slice_offset,
            "dicom_window": list(item.dicom_window) if item.dicom_window else None,
            "spacing": list(volume.spacing),
            "origin": list(volume.origin),
            "direction": list(volume.direction),
            "model": {"name": info.name, "family": info.family, "checkpoint": info.checkpoint, "sha256": info.sha256},
            "propagation": item.propagation,
            "stop_after_empty": item.stop_after_empty or 0,
            "max_slices": item.max_slices,
            "slices_processed": processed,
            "voxel_count": voxels,
            "volume_ml": round(voxels * volume.voxel_ml, 4),
            "timing_ms": timing,
        }
        if item.multi_object:
            metadata["objects"] = [
                {
                    "id": obj.id,
                    "key_slice_index": obj.key_index + item.slice_offset,
                    "adjusted_key_slice_index": obj.key_index,
                    "bbox_used": obj.box.tolist(),
                    "slices_processed": result.slices_processed,
                    "voxel_count": int(np.count_nonzero(mask == obj.id)),
                    "volume_ml": round(int(np.count_nonzero(mask == obj.id)) * volume.voxel_ml, 4),
                }
                for obj, result in results
            ]
        else:
            obj, spec = p.objects[0], item.objects[0]
            metadata.update(
                key_slice_index=spec.key_slice_idx,
                adjusted_key_slice_index=obj.key_index,
                bbox=spec.bbox,
                bbox_used=obj.box.tolist(),
            )
        return mask, metadata
