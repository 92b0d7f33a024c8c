"""The 2D steps every 2D route shares (/score 2D, samapi prompt, automask, video frames):
decode a picture, turn the contract's plain prompt into the pipeline's typed one, check it, segment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medsam2_endpoint.base.budget import Budget
from medsam2_endpoint.base.errors import InvalidRequest, PayloadTooLarge
from medsam2_endpoint.contract.score2d import AutomaskOptions, ImagePrompt
from medsam2_endpoint.engines.base import ImageEngine
from medsam2_endpoint.io.fetch import FetchPolicy
from medsam2_endpoint.io.images import (
    IMAGE_FILE,
    Picture,
    check_pixels,
    image_size,
    read_picture,
    to_grey_u8,
    to_rgb_u8,
)
from medsam2_endpoint.io.limits import Limits
from medsam2_endpoint.io.sources import is_url, source_bytes
from medsam2_endpoint.io.volume import base64_head, decode_base64
from medsam2_endpoint.pipeline.automask import AutomaskParams
from medsam2_endpoint.pipeline.prompt2d import Prompt2D


def load_bytes(text: str, *, field: str, policy: FetchPolicy, limits: Limits, budget: Budget | None = None) -> bytes:
    """An image column's file bytes: base64 decoded, or an http(s) URL fetched SSRF-safely within the budget."""
    return source_bytes(text, field=field, policy=policy, budget=budget,
                        decode=lambda t: decode_base64(t, field=field, limits=limits, what=IMAGE_FILE))


def load_picture(text: str, *, field: str, policy: FetchPolicy, limits: Limits, budget: Budget | None = None) -> Picture:
    """An image column's value (base64, or an http(s) URL fetched SSRF-safely) decoded to a Picture."""
    return read_picture(load_bytes(text, field=field, policy=policy, limits=limits, budget=budget), field=field, limits=limits)


def load_rgb(text: str, *, field: str, policy: FetchPolicy, limits: Limits, window: tuple[float, float] | None = None,
             window_field: str | None = None, budget: Budget | None = None) -> tuple[Picture, np.ndarray]:
    """The picture and its uint8 RGB form (windowed when `window` is given; errors then name `window_field`)."""
    picture = load_picture(text, field=field, policy=policy, limits=limits, budget=budget)
    return picture, to_rgb_u8(picture, window, field=window_field or field)


def read_rgb(data: bytes, *, field: str, limits: Limits) -> np.ndarray:
    """Bytes of one image file (an uploaded frame) -> uint8 RGB."""
    return to_rgb_u8(read_picture(data, field=field, limits=limits), None, field=field)


def typed_prompt(prompt: ImagePrompt, *, mask_input: np.ndarray | None = None) -> Prompt2D:
    """The contract's plain lists as the pipeline's arrays (a mask image's logits may replace mask_input)."""
    if mask_input is None and prompt.mask_input is not None:
        mask_input = np.asarray(prompt.mask_input, dtype=np.float64).astype(np.float32)
    return Prompt2D(
        points=np.asarray(prompt.points, dtype=np.float64) if prompt.points else None,
        labels=np.asarray(prompt.labels, dtype=np.int64) if prompt.labels else None,
        box=np.asarray(prompt.box, dtype=np.float64) if prompt.box is not None else None,
        mask_input=mask_input,
        output_type=prompt.output_type,
    )


def automask_params(options: AutomaskOptions, output_type: str) -> AutomaskParams:
    return AutomaskParams(**options.model_dump(include=set(AutomaskOptions.model_fields)), output_type=output_type)


def mask_logits(engine: ImageEngine, mask_rgb: np.ndarray, image_rgb: np.ndarray, *, field: str) -> np.ndarray:
    """A mask image (non-zero = inside) as the model's low-resolution mask_input."""
    mask = to_grey_u8(mask_rgb) > 0
    if mask.shape != image_rgb.shape[:2]:
        raise InvalidRequest(
            f"{field}: the mask is {mask.shape[1]} x {mask.shape[0]} pixels, the image {image_rgb.shape[1]} x {image_rgb.shape[0]}"
        )
    return engine.low_res_from_mask(mask)


@dataclass(frozen=True)
class Frame:
    """One video frame as sent: base64 text, or the bytes of an uploaded file. `field` names it in errors."""

    field: str
    b64: str | None = None
    data: bytes | None = None


def decode_frames(frames: Sequence[Frame], *, policy: FetchPolicy, limits: Limits, max_frames: int,
                  budget: Budget | None = None) -> list[np.ndarray]:
    """The frames as uint8 RGB, after the whole video's limits were checked from the image headers: the frame
    count (MEDSAM2_SAMAPI_MAX_FRAMES), each frame's pixels (MEDSAM2_MAX_SLICE_PIXELS), one size for all, and
    frames x pixels (MEDSAM2_MAX_VOXELS), so a video too large is refused before any pixel is decoded. An
    inline frame's header is read from the first bytes of its base64 (`base64_head`), so its base64 is decoded
    only once the video passed, one frame at a time. The budget is checked before each frame."""
    if len(frames) > max_frames:
        raise PayloadTooLarge(f"b64imgs: {len(frames)} frames exceed {max_frames} (MEDSAM2_SAMAPI_MAX_FRAMES)")
    if not frames:
        raise InvalidRequest("b64imgs: no frames; upload the frames first or send b64imgs")
    files: list[bytes | None] = []  # the bytes at hand: uploaded or fetched; None for base64 not decoded yet
    sizes: list[tuple[int, int] | None] = []
    for f in frames:
        text = (f.b64 or "").strip()
        data = f.data if f.data is not None else (
            load_bytes(text, field=f.field, policy=policy, limits=limits, budget=budget) if is_url(text) else None)
        size = image_size(data if data is not None else base64_head(text) or b"")
        if size is not None:
            check_pixels(*size, field=f.field, limits=limits)
        files.append(data)
        sizes.append(size)
    first = next((s for s in sizes if s is not None), None)
    if first is not None:
        for frame, size in zip(frames, sizes, strict=True):
            if size is not None and size != first:
                raise InvalidRequest(
                    f"{frame.field}: frame of {size[0]} x {size[1]} pixels differs from the first ({first[0]} x {first[1]}); "
                    "all frames must have one size")
        pixels = len(frames) * first[0] * first[1]
        if pixels > limits.max_voxels:
            raise PayloadTooLarge(
                f"b64imgs: {len(frames)} frames of {first[0]} x {first[1]} are {pixels} pixels, over the limit of "
                f"{limits.max_voxels} (MEDSAM2_MAX_VOXELS); send fewer frames or a smaller field of view",
                detail={"video_pixels": pixels, "limit": limits.max_voxels})
    rgb = []
    for k, (frame, data) in enumerate(zip(frames, files, strict=True)):
        if budget is not None:
            budget.check(k, "frames_decoded")
        if data is None:
            data = load_bytes(frame.b64 or "", field=frame.field, policy=policy, limits=limits, budget=budget)
        rgb.append(read_rgb(data, field=frame.field, limits=limits))
        files[k] = None  # one decoded file at a time
    depth, height, width = len(rgb), *rgb[0].shape[:2]
    if depth * height * width > limits.max_voxels:  # headers that did not say (2D NIfTI frames)
        raise PayloadTooLarge(f"b64imgs: {depth} frames of {width} x {height} exceed {limits.max_voxels} voxels (MEDSAM2_MAX_VOXELS)")
    return rgb
