"""Model input frames: resize to the model size and ImageNet normalisation, bit-identical to MedSAM2's reference."""

from __future__ import annotations

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _normalisation_lut() -> np.ndarray:
    """(3, 256) float32: the reference's (v / 255 - mean) / std per channel for every uint8 value.

    The reference computes in float64 with float32 mean/std and casts the frame to float32;
    a table of those exact values gives bit-identical frames without a float64 volume.
    """
    values = np.arange(256, dtype=np.float64) / 255.0
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32).astype(np.float64)[:, None]
    std = np.asarray(IMAGENET_STD, dtype=np.float32).astype(np.float64)[:, None]
    return ((values[None, :] - mean) / std).astype(np.float32)


SAM2_LUT = _normalisation_lut()


def sam2_frame(slice_u8: np.ndarray, image_size: int) -> np.ndarray:
    """One uint8 (H, W) slice -> float32 (3, S, S) frame, as the reference: RGB, Pillow's default resize, ImageNet norm.

    The three RGB channels are equal, and Pillow resizes each 8-bit channel independently with the
    same bicubic kernel, so resizing the grey image once gives the same bytes (checked in tests).
    """
    resized = np.asarray(Image.fromarray(slice_u8, mode="L").resize((image_size, image_size), Image.Resampling.BICUBIC))
    return SAM2_LUT[:, resized]
