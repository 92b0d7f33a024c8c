"""The Service: the one API every adapter calls. Typed requests (contract/) in, results out; no HTTP.

    segment_3d(items)                the one 3D path: prepare -> segment, label maps with their geometry
    score_3d(items)                  the 3D route of /score: segment_3d, then each mask encoded as asked
    score_3d_file(item, path)        one local NIfTI file or DICOM series (batch): NIfTI (+ DICOM SEG) bytes
    score_2d(items)                  the 2D route of /score
    segment_image(...)               one 2D prompt (samapi POST /sam/)
    automask_image(...)              automatic masks of one image (samapi automask/)
    track_video(...)                 objects through a stack of frames (samapi video/)
    register_weights / registration_progress / cancel_registration / weight_url   (samapi weights/)

Each call gets one Budget (deadline from settings, capped by the platform's limit); every error is a
typed `ServiceError` with a `code`, raised before inference where the request can cause it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsam2_endpoint import __version__
from medsam2_endpoint.base.budget import Budget, RunningBudgets
from medsam2_endpoint.base.errors import InvalidRequest
from medsam2_endpoint.base.heap import release_free_memory
from medsam2_endpoint.base.log import log
from medsam2_endpoint.contract.samapi import VideoPrompt
from medsam2_endpoint.contract.score2d import AutomaskOptions, ImageItem, ImagePrompt
from medsam2_endpoint.contract.score3d import VolumeItem
from medsam2_endpoint.core import pacs, score2d, volumes
from medsam2_endpoint.core.images import (
    Frame,
    automask_params,
    decode_frames,
    load_rgb,
    mask_logits,
    typed_prompt,
)
from medsam2_endpoint.core.interactive3d import SegmentSession
from medsam2_endpoint.core.registration import WeightRecords, WeightRegistrar
from medsam2_endpoint.core.registry import (
    ModelRegistry,
    choose_device,
    choose_runtime_precision,
    configure_threads,
)
from medsam2_endpoint.core.sessions import SessionLimits, SessionStore
from medsam2_endpoint.core.settings import Settings
from medsam2_endpoint.core.slots import InferenceSlots
from medsam2_endpoint.engines.base import ModelInfo
from medsam2_endpoint.io.dicom_seg import Algorithm, Segment, write_dicom_seg
from medsam2_endpoint.io.encode import encode_mask
from medsam2_endpoint.io.limits import VoxelTally
from medsam2_endpoint.io.volume import LabelMap, Volume
from medsam2_endpoint.pipeline.embedding_cache import EmbeddingCache
from medsam2_endpoint.pipeline.interactive import WalkMemo
from medsam2_endpoint.pipeline.prompt2d import Prompter, Result2D, clip_box
from medsam2_endpoint.pipeline.propagate import segment_object
from medsam2_endpoint.pipeline.video import VideoObject, frames_to_volume, track_objects

__all__ = ["FileResult", "Frame", "ModelInfo", "Result2D", "Service"]
# Per worker: a correction round's replayed walks (float32 logits, 1 MiB a 512 x 512 slice: about 20 rounds
# of a 20-slice CT structure). Only correction rounds use it, so it is off when no volumes are held.
WALK_MEMO_MB = 128


@dataclass(frozen=True)
class FileResult:
    """A batch file's outputs, encoded: the adapter only writes them."""

    mask_nifti: bytes  # the label map in the source's geometry, gzip-compressed NIfTI
    metadata: dict[str, Any]
    dicom_seg: bytes | None = None  # a DICOM SEG over the source series, when the input was one


def _samapi_field(column: str) -> str:
    """samapi's bodies are flat: an error names the column itself (bbox, point_coords, points_per_side)."""
    return column


def _add_encode_time(metadata: dict[str, Any], started: float) -> None:
    timing = metadata["timing_ms"]
    timing["encode"] = round((time.perf_counter() - started) * 1000, 1)
    timing["total"] = round(timing["total"] + timing["encode"], 1)


class Service:
    """Runs validated requests through the registry's models."""

    def __init__(self, settings: Settings, registry: ModelRegistry, records: WeightRecords | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.prompter = Prompter(registry, EmbeddingCache(settings.embedding_cache_mb * 1024 * 1024))
        # one store: 3D Slicer leases, and decoded volumes by volume_id (a correction round needs no upload)
        self.sessions: SessionStore[SegmentSession] = SessionStore(SessionLimits.of(settings), SegmentSession,
                                                                   what="nnInteractive session")
        # anchor walks of earlier rounds, replayed in a correction round instead of decoded again
        self.walks = WalkMemo(WALK_MEMO_MB * 1024 * 1024 if settings.held_volumes_mb else 0)
        samapi = settings.samapi
        self.records = records or WeightRecords(samapi.weights_dir)
        self.registrar = WeightRegistrar(registry, self.records, samapi, settings.fetch)
        threads = torch.get_num_threads()
        slots = settings.inference_slots or max(1, (os.cpu_count() or 1) // max(1, threads))
        self.slots = InferenceSlots(slots, settings.busy_wait_s, settings.retry_after_s)
        self.running = RunningBudgets()  # every request's budget, so a stopping server can cancel them all

    @classmethod
    def from_settings(cls, settings: Settings) -> Service:
        device = choose_device(settings.device)
        threads = configure_threads(settings.num_threads)
        runtime, precision = choose_runtime_precision(settings.runtime, settings.precision, device)
        records = WeightRecords(settings.samapi.weights_dir)
        registry = ModelRegistry.build(
            model_dir=settings.model_dir, device=device, feature_cache_mb=settings.feature_cache_mb,
            enable_lite=settings.enable_lite, extra_checkpoints=records.checkpoints(),
            lite_runtime=runtime, onnx_cache_dir=settings.onnx_cache_dir, lite_precision=precision,
            # MedSAM2 in bf16 on the CPU only when asked for by name: `auto` keeps the reference's fp32
            medsam2_precision="bf16" if settings.precision == "bf16" and device == "cpu" else "fp32",
        )
        log.info("device %s, %d threads, LiteMedSAM runtime %s (%s), model folder %s", device, threads, runtime, precision,
                 settings.model_dir)
        service = cls(settings, registry, records)
        if settings.warmup:
            service.warm_up()
        return service

    # ---------------------------------------------------------------- models

    @property
    def default(self) -> str:
        return self.registry.default

    def available_models(self) -> list[str]:
        return self.registry.names()

    def models(self) -> Mapping[str, ModelInfo]:
        """name -> ModelInfo, from one snapshot of the registry."""
        return {name: engine.info for name, engine in self.registry.snapshot().items()}

    def budget(self) -> Budget:
        """A new request's budget (the deadline from settings), tracked until it is let go."""
        return self.running.add(Budget(self.settings.deadline_s))

    def cancel_running(self) -> int:
        """Cancel every running request (the server is stopping): each stops at its next check. How many."""
        return self.running.cancel_all()

    def warm_up(self) -> None:
        """One tiny propagation per engine so the first real request does not pay for lazy initialisation."""
        rng = np.random.default_rng(0)
        volume = rng.integers(0, 255, size=(2, 64, 64), dtype=np.uint8)
        volume[:, 20:44, 20:44] = 220
        for engine in self.registry.snapshot().values():
            state = engine.start(volume)
            segment_object(engine, state, key_index=0, box=np.array([18, 18, 46, 46]), shape=volume.shape)

    # ---------------------------------------------------------------- 3D

    def _prepare_3d(self, item: VolumeItem, budget: Budget, tally: VoxelTally | None, *,
                    loaded: Volume | None = None) -> volumes.PreparedItem:
        """Decode (or take the held, PACS or `loaded` volume), window and check one item: every error it can cause."""
        name = self.registry.resolve(item.model, field=item.field("model"))
        started = time.perf_counter()
        series = None
        if loaded is not None:  # a local file (batch): not held, nobody can name it in a later request
            volume, volume_id = loaded, loaded.content_id()
        elif item.image is None and item.volume_id is not None:
            volume = self.sessions.held(item.volume_id, field=item.field("volume_id"))
            volume_id = item.volume_id
        elif item.dicomweb is not None:  # a series in a PACS (core/pacs.py)
            volume, series = pacs.load(item, self.settings, budget, tally)
            volume_id = self.sessions.hold(volume)
        else:
            volume = volumes.load_volume(item, policy=self.settings.fetch, limits=self.settings.limits, budget=budget,
                                         tally=tally)
            volume_id = self.sessions.hold(volume)
        prepared = volumes.prepare(item, volume, name, decode_ms=(time.perf_counter() - started) * 1000, volume_id=volume_id,
                                   accepts_points=self.registry.info(name).capabilities.points, limits=self.settings.limits)
        return prepared if series is None else replace(prepared, dicomweb=series)

    def segment_3d(self, items: Sequence[VolumeItem], budget: Budget | None = None, *,
                   loaded: Sequence[Volume] | None = None) -> Iterator[tuple[VolumeItem, LabelMap, dict[str, Any]]]:
        """The one 3D path: check the request-wide limits from the headers, prepare every item (decode, window,
        prompts) before running any, then segment each: (item, label map in its source geometry, metadata).

        loaded: the items' volumes already read (batch files), one per item; otherwise each item's nii_image
        (base64 or URL) is decoded, its volume_id's held volume used, or its dicomweb series read from the PACS
        (and, with store_seg, its SEG stored back)."""
        budget = budget or self.budget()
        if loaded is not None and len(loaded) != len(items):
            raise ValueError("segment_3d: one loaded volume per item")
        tally = volumes.request_tally(items, self.settings.limits) if loaded is None else None
        prepared = [self._prepare_3d(item, budget, tally, loaded=None if loaded is None else loaded[i])
                    for i, item in enumerate(items)]
        for p in prepared:
            with self.slots.hold(p.engine_name):
                labels, metadata = volumes.run(p, self.registry.get(p.engine_name), budget, self.walks)
            if p.dicomweb is not None:  # where the slices came from; with store_seg, the SEG stored back
                metadata.update(pacs.answer(p.dicomweb, p.item, labels.array, metadata["model"], self.settings.dicomweb, budget))
            yield p.item, labels, metadata

    def score_3d(self, items: Sequence[VolumeItem], budget: Budget | None = None) -> list[dict[str, Any]]:
        """The 3D route of /score: one `{"mask": <encoded>, "metadata": {...}}` per item."""
        results = []
        for item, labels, metadata in self.segment_3d(items, budget):
            t0 = time.perf_counter()
            encoded = encode_mask(labels, item.mask_format)
            _add_encode_time(metadata, t0)
            results.append({"mask": encoded, "metadata": metadata})
            del labels
            release_free_memory()  # labelling and encoding buffers: an idle worker should not keep them
        return results

    def score_3d_file(self, item: VolumeItem, path: Path, *, segment_labels: Mapping[int, str] | None = None,
                      budget: Budget | None = None) -> FileResult:
        """One local NIfTI file, DICOM series folder or PACS series (a prompt with dicomweb), with its validated
        prompt (the batch endpoint): the mask as NIfTI, and for a series folder a DICOM SEG over it (segments labelled from `segment_labels`, object id ->
        label, default "object <id>")."""
        budget = budget or self.budget()
        if item.dicomweb is not None:  # the prompt names a series in a PACS: read (and stored back) as /score does
            ((_, labels, metadata),) = list(self.segment_3d([item], budget))
            t0 = time.perf_counter()
            result = FileResult(labels.nifti(), metadata)
            _add_encode_time(metadata, t0)
            return result
        started = time.perf_counter()
        volume, files = volumes.read_local(path, limits=self.settings.limits, budget=budget)
        read_ms = (time.perf_counter() - started) * 1000
        ((_, labels, metadata),) = list(self.segment_3d([item], budget, loaded=[volume]))
        del volume
        metadata["timing_ms"]["decode"] = round(metadata["timing_ms"]["decode"] + read_ms, 1)
        t0 = time.perf_counter()
        seg = None
        if files:
            model = metadata["model"]
            names = segment_labels or {}
            segments = [Segment(o.id, names.get(o.id, f"object {o.id}")) for o in item.objects]
            seg = write_dicom_seg(labels, files, segments, Algorithm(model["name"], __version__, model.get("sha256")))
        result = FileResult(labels.nifti(), metadata, seg)
        _add_encode_time(metadata, t0)
        return result

    # ---------------------------------------------------------------- 2D

    def score_2d(self, items: Sequence[ImageItem], budget: Budget | None = None) -> list[dict[str, Any]]:
        """The 2D route of /score: one `{"masks": [...], "metadata": {...}}` per item."""
        budget = budget or self.budget()
        prepared = [
            score2d.prepare(self.prompter, item, self.registry.resolve(item.model, field=item.field("model")),
                            policy=self.settings.fetch, limits=self.settings.limits, budget=budget)
            for item in items
        ]
        results = []
        for p in prepared:
            with self.slots.hold(p.model):
                results.append(score2d.run(self.prompter, p, budget))
        return results

    def segment_image(self, model: str, image_b64: str, prompt: ImagePrompt, *, mask_b64: str | None = None,
                      budget: Budget | None = None) -> Result2D:
        """One prompt on one image (samapi), through the 2D path: errors name samapi's fields (b64img, bbox,
        point_coords, b64mask)."""
        limits, policy, budget = self.settings.limits, self.settings.fetch, budget or self.budget()
        _, rgb = load_rgb(image_b64, field="b64img", policy=policy, limits=limits, budget=budget)
        mask_input = None
        if mask_b64 is not None:
            _, mask_rgb = load_rgb(mask_b64, field="b64mask", policy=policy, limits=limits, budget=budget)
            mask_input = mask_logits(self.prompter.image_engine(model), mask_rgb, rgb, field="b64mask")
        # samapi's clients send the viewer's rectangle unclipped (REFERENCE.md C2): clip it, as SAM sees it
        typed, clipped = clip_box(typed_prompt(prompt, mask_input=mask_input), width=rgb.shape[1], height=rgb.shape[0])
        score2d.check(self.prompter, model, rgb, prompt=typed, params=None, where=_samapi_field)
        started = time.perf_counter()
        with self.slots.hold(model):
            result = score2d.infer(self.prompter, model, rgb, prompt=typed, params=None, budget=budget,
                                   automask_where=_samapi_field)
        result = replace(result, box_clipped_to=clipped)
        log.info("route=samapi model=%s size=%dx%d masks=%d embedding_cached=%s ms=%.0f", model, rgb.shape[1], rgb.shape[0],
                 len(result.masks), result.embedding_cached, (time.perf_counter() - started) * 1000)
        return result

    def automask_image(self, model: str, image_b64: str, options: AutomaskOptions, output_type: str,
                       budget: Budget | None = None) -> Result2D:
        """Automatic masks of one image (samapi automask/), through the 2D path."""
        budget = budget or self.budget()
        _, rgb = load_rgb(image_b64, field="b64img", policy=self.settings.fetch, limits=self.settings.limits, budget=budget)
        params = automask_params(options, output_type)
        score2d.check(self.prompter, model, rgb, prompt=None, params=params, where=_samapi_field)
        started = time.perf_counter()
        with self.slots.hold(model):
            result = score2d.infer(self.prompter, model, rgb, prompt=None, params=params, budget=budget,
                                   automask_where=_samapi_field)
        coverage = result.coverage
        log.info("route=samapi-automask model=%s size=%dx%d masks=%d prompts=%s partial=%s ms=%.0f", model, rgb.shape[1],
                 rgb.shape[0], len(result.masks), f"{coverage.decoded}/{coverage.planned}" if coverage else "-",
                 bool(coverage and coverage.partial), (time.perf_counter() - started) * 1000)
        return result

    def track_video(self, model: str, frames: Sequence[Frame], prompts: Sequence[VideoPrompt], *, start: int = 0,
                    max_frames_per_direction: int | None = None, budget: Budget | None = None) -> dict[int, np.ndarray]:
        """obj_id -> bool (Z, H, W) masks over frames[start:] (z counted from `start`)."""
        budget = budget or self.budget()
        rgb = decode_frames(frames, policy=self.settings.fetch, limits=self.settings.limits,
                            max_frames=self.settings.samapi_max_frames, budget=budget)
        depth = len(rgb)
        volume = frames_to_volume(rgb, field="b64imgs")
        del rgb
        if start >= depth:
            raise InvalidRequest(f"start_frame_idx: {start} is beyond the {depth} frames")
        typed = []
        for p in prompts:
            if p.frame < start:
                raise InvalidRequest(f"{p.where}: prompt on frame {p.frame}, before start_frame_idx {start}")
            typed.append(VideoObject(
                p.obj_id, p.frame - start,
                np.asarray(p.box, dtype=np.float64) if p.box else None,
                np.asarray(p.points, dtype=np.float64) if p.points else None,
                np.asarray(p.labels, dtype=np.int64) if p.labels else None,
                p.where,
            ))
        with self.slots.hold(model):
            return track_objects(self.prompter, model, self.registry.get(model), volume[start:], typed,
                                 max_frames_per_direction=max_frames_per_direction, budget=budget)

    # ---------------------------------------------------------------- registered weights

    def register_weights(self, sam_type: str, name: str, url: str) -> str:
        return self.registrar.register(sam_type, name, url)

    def registration_progress(self) -> dict[str, Any]:
        return self.registrar.progress()

    def cancel_registration(self) -> str:
        return self.registrar.cancel()

    def weight_url(self, name: str) -> str | None:
        """Where registered weights came from (scheme, host and path); None for built-in models."""
        return self.records.url_of(name)
