"""The 2D steps every 2D route shares (/score 2D, samapi prompt, automask, video frames):
decode a picture, turn the contract's plain prompt into the pipeline's typed one, check it, segment.
"""

from __future__ import annotations

import numpy as np

from medsam2_endpoint.base.errors import InvalidRequest
from medsam2_endpoint.contract.score2d import AutomaskOptions, ImagePrompt
from medsam2_endpoint.engines.base import ImageEngine
from medsam2_endpoint.io.fetch import FetchPolicy
from medsam2_endpoint.io.images import Picture, decode_base64, read_picture, to_grey_u8, to_rgb_u8
from medsam2_endpoint.io.limits import Limits
from medsam2_endpoint.io.sources import source_bytes
from medsam2_endpoint.pipeline.automask import AutomaskParams
from medsam2_endpoint.pipeline.prompt2d import Prompt2D


def load_picture(text: str, *, field: str, policy: FetchPolicy, limits: Limits) -> Picture:
    """An image column's value (base64, or an http(s) URL fetched SSRF-safely) decoded to a Picture."""
    data = source_bytes(text, field=field, policy=policy, decode=lambda t: decode_base64(t, field=field, limits=limits))
    return read_picture(data, field=field, limits=limits)


def load_rgb(text: str, *, field: str, policy: FetchPolicy, limits: Limits, window: tuple[float, float] | None = None,
             window_field: str | None = None) -> tuple[Picture, np.ndarray]:
    """The picture and its uint8 RGB form (windowed when `window` is given; errors then name `window_field`)."""
    picture = load_picture(text, field=field, policy=policy, limits=limits)
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
