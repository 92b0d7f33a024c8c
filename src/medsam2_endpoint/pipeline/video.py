"""Several objects tracked through a stack of 2D frames (a z-stack or a time series) with the 3D engines.

The frames become one uint8 (Z, H, W) volume (RGB frames as luma, ITU-R 601). Every prompt (an
object on one frame) is propagated forward and backward from its frame by `propagate.segment_object`,
the 3D route's algorithm (largest 3D connected component kept); an object prompted on several frames
gets the union of those propagations. A box drives the propagation directly; points (MedSAM2 only)
are first turned into a mask on their frame by the 2D route, whose bounding box then drives it.

No HTTP here: the samapi adapter builds the prompts and turns the masks into GeoJSON features.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import cast

import numpy as np

from medsam2_endpoint.base.budget import Budget
from medsam2_endpoint.base.errors import InvalidRequest
from medsam2_endpoint.base.log import log
from medsam2_endpoint.engines.base import VolumeEngine
from medsam2_endpoint.io.images import to_grey_u8
from medsam2_endpoint.pipeline.prompt2d import Prompt2D, Prompter, check_prompt
from medsam2_endpoint.pipeline.propagate import PropagationOptions, segment_object


@dataclass(frozen=True)
class VideoObject:
    """One object on one frame: box float (4,) and/or points float (N, 2) with labels (N,); `where` names its fields."""

    obj_id: int
    frame: int
    box: np.ndarray | None
    points: np.ndarray | None
    labels: np.ndarray | None
    where: str


def frames_to_volume(frames: list[np.ndarray], *, field: str) -> np.ndarray:
    """uint8 RGB frames (H, W, 3), all of one size -> uint8 grey volume (Z, H, W)."""
    if not frames:
        raise InvalidRequest(f"{field}: no frames; upload the frames first or send b64imgs")
    shape = frames[0].shape
    for k, frame in enumerate(frames):
        if frame.shape != shape:
            raise InvalidRequest(
                f"{field}[{k}]: frame of {frame.shape[1]} x {frame.shape[0]} pixels differs from frame 0 "
                f"({shape[1]} x {shape[0]}); all frames must have one size"
            )
    return np.stack([to_grey_u8(f) for f in frames])


def _key_box(prompter: Prompter, model: str, volume: np.ndarray, prompt: VideoObject) -> np.ndarray:
    """The box that starts the propagation: the prompt's own box, or the 2D mask's box when points are given."""
    if prompt.points is None:
        return cast(np.ndarray, prompt.box)  # check_prompt refused prompts with neither points nor box
    rgb = np.repeat(volume[prompt.frame][:, :, None], 3, axis=2)
    result = prompter.segment(model, rgb, Prompt2D(prompt.points, prompt.labels, prompt.box, None, "single"))
    bbox = result.masks[0].bbox() if result.masks else None
    if bbox is None:
        raise InvalidRequest(f"{prompt.where}: the points give an empty mask on frame {prompt.frame}; add a bbox for this object")
    return np.asarray(bbox, dtype=np.float64)


def track_objects(
    prompter: Prompter,
    model: str,
    engine: VolumeEngine,
    volume: np.ndarray,
    prompts: list[VideoObject],
    *,
    max_frames_per_direction: int | None = None,
    budget: Budget | None = None,
) -> dict[int, np.ndarray]:
    """obj_id -> bool (Z, H, W) mask. Prompts are checked (frame range, geometry, model) before anything runs.

    max_frames_per_direction: at most this many frames after (and before) each prompted frame.
    """
    depth, height, width = volume.shape
    engine2d = prompter.image_engine(model)
    for p in prompts:
        if not 0 <= p.frame < depth:
            raise InvalidRequest(f"{p.where}: frame {p.frame} is outside the {depth} frames (0..{depth - 1})")

        def where(column: str, p: VideoObject = p) -> str:
            return f"{p.where}.{column}"

        check_prompt(
            Prompt2D(p.points, p.labels, p.box), width=width, height=height, engine=engine2d,
            where=where, models_with_points=prompter.models_with_points(),
        )
    started = time.perf_counter()
    state = engine.start(volume)
    options = PropagationOptions(max_slices=None if max_frames_per_direction is None else max_frames_per_direction + 1)
    masks: dict[int, np.ndarray] = {}
    steps = 0
    for p in prompts:
        box = _key_box(prompter, model, volume, p)
        # The 3D route's box convention: truncated to whole pixels, as MedSAM2's reference does.
        box = np.array([int(float(v)) for v in box], dtype=np.int64)
        result = segment_object(engine, state, key_index=p.frame, box=box, shape=volume.shape, options=options, budget=budget)
        steps += result.slices_processed
        masks[p.obj_id] = masks.get(p.obj_id, np.zeros(volume.shape, dtype=bool)) | result.mask.astype(bool)
    log.info(
        "route=video model=%s frames=%d size=%dx%d objects=%d prompts=%d slices_processed=%d ms=%.0f",
        model, depth, width, height, len(masks), len(prompts), steps, (time.perf_counter() - started) * 1000,
    )
    return masks
