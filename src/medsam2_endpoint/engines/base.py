"""The small interface every 3D engine implements, so `propagate` stays engine-independent."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

LITE_NAME = "lite-medsam"  # the embedded default's registry name and family


def sha256_file(path: str | Path) -> str:
    """Checksum of a checkpoint file, reported in every response's metadata."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Capabilities:
    """What a model can take: every adapter advertises and validates from this, never from a model's name.

    points: positive point prompts (in 3D and 2D); negative_points: label-0 points; mask_prompts: a mask as a
    prompt (MedSAM2's `add_new_mask`, LiteMedSAM's low-res mask input in 2D); multi_slice: prompts on several
    slices conditioned at once (otherwise each prompted slice is walked on its own); video: samapi video/;
    automask: samapi automask/; precision: the arithmetic the model runs in ("fp32", "bf16").
    """

    points: bool = False
    negative_points: bool = False
    mask_prompts: bool = False
    multi_slice: bool = False
    video: bool = True
    automask: bool = True
    precision: str = "fp32"

    def as_metadata(self) -> dict[str, bool | str]:
        return {"points": self.points, "negative_points": self.negative_points, "mask_prompts": self.mask_prompts,
                "multi_slice": self.multi_slice, "video": self.video, "automask": self.automask,
                "precision": self.precision}


@dataclass(frozen=True)
class ModelInfo:
    """What a response reports about the model that produced it, and what the model can take."""

    name: str  # registry name, e.g. "MedSAM2_latest" or "lite-medsam"
    family: str  # "medsam2" or "lite-medsam"
    checkpoint: str  # file name of the checkpoint
    sha256: str  # checksum of the checkpoint file
    capabilities: Capabilities = Capabilities()

    def as_metadata(self) -> dict[str, str]:
        """The `metadata.model` of every response."""
        return {"name": self.name, "family": self.family, "checkpoint": self.checkpoint, "sha256": self.sha256,
                "precision": self.capabilities.precision}


class VolumeEngine(Protocol):
    """A promptable 3D segmenter driven slice by slice: a `TrackingEngine` (walks with its own memory) or a
    `SliceEngine` (a 2D box model the pipeline walks, pipeline/tracking.py).

    `start` takes the windowed volume, uint8 (Z, Y, X), and returns an opaque per-volume state
    (frames are prepared lazily: only visited slices are resized and normalised).
    """

    info: ModelInfo

    def start(self, volume_u8: np.ndarray, volume_key: str | None = None) -> Any: ...

    def image_engine(self) -> ImageEngine | None:
        """This model's 2D prompt interface (sharing its weights), or None when it has none."""
        ...


@runtime_checkable
class TrackingEngine(VolumeEngine, Protocol):
    """An engine that walks a volume itself (MedSAM2's memory attention).

    `track` segments the key slice from a box [x_min, y_min, x_max, y_max] (original pixel indices) and
    walks away from it, one slice per step: towards higher z (reverse=False) or lower z (reverse=True). It
    yields (z, logits) with logits a float32 (Y, X) array (mask = logits > 0), the key slice first, and has
    no stop rule of its own: the caller (pipeline/propagate.py) may stop iterating at any time (stop rules,
    deadlines); the engine must leave the state reusable for the next `track` call.
    """

    def track(self, state: Any, *, key_index: int, box: np.ndarray, reverse: bool) -> Iterator[tuple[int, np.ndarray]]: ...


@runtime_checkable
class SliceEngine(VolumeEngine, Protocol):
    """A 2D box model that answers one slice at a time (LiteMedSAM); the pipeline walks it
    (pipeline/tracking.walk_slices) and judges each slice with its stop rules."""

    def slice_logits(self, state: Any, z: int, box: Any) -> tuple[np.ndarray, float]:
        """float32 (Y, X) logits of slice z from a box [x_min, y_min, x_max, y_max] (original pixels; mask =
        logits > 0), and the model's predicted IoU."""
        ...

    def slice_pixels(self, state: Any, z: int) -> np.ndarray:
        """Slice z of the windowed uint8 volume (what the walk's intensity tests measure)."""
        ...

    def volume_shape(self, state: Any) -> tuple[int, int, int]: ...

    def walk_margin(self, height: int, width: int) -> int:
        """Pixels the walk grows each accepted mask's bounding box by for the next slice's prompt."""
        ...


@runtime_checkable
class SliceCachingEngine(VolumeEngine, Protocol):
    """A 3D engine whose per-slice image features are computed on their own and kept in its shared cache under
    (volume_key, z) (LiteMedSAM): slices can be encoded ahead of a walk (core/background.py)."""

    def cache_slice(self, state: Any, z: int) -> bool:
        """Encode slice z into the cache unless it is there already. True when it is cached afterwards; False
        when storing it would have evicted a slice this state cached before (the cache is full of them)."""
        ...


class ImageEngine(Protocol):
    """What the 2D route needs from a model (sam2_image.SAM2ImageEngine, lite.LiteMedSAMEngine)."""

    info: ModelInfo
    multimask_outputs: bool  # False: the model has one trained output; multimask requests get that one mask
    low_res_size: int

    def embed_image(self, rgb_u8: np.ndarray) -> Any: ...

    def predict_2d(self, embedding: Any, *, points: np.ndarray | None = None, labels: np.ndarray | None = None,
                   box: np.ndarray | None = None, mask_input: np.ndarray | None = None,
                   multimask: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def low_res_from_mask(self, mask: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class GridAutomaskEngine(ImageEngine, Protocol):
    """A 2D engine with SAM's own automatic mask generator (a grid of points); box-only engines have none and
    get region boxes instead (pipeline/automask.py)."""

    def automask_2d(self, rgb_u8: np.ndarray, *, embed: Callable[[np.ndarray], Any], select: str, multimask: bool,
                    min_mask_region_area: int, params: dict[str, Any], pace: Any = None) -> tuple[list[dict[str, Any]], int]: ...


def bf16_autocast(device: torch.device, cpu: bool = False) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast on CUDA (as the reference runs there), and on the CPU when `cpu` (MEDSAM2_PRECISION=bf16);
    plain float32 otherwise."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if cpu:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class SlicePrompt:
    """One prompt on slice z of the volume: box float (4,) [x_min, y_min, x_max, y_max] and/or points
    float (N, 2) [x, y] with labels int (N,) (1 inside, 0 outside), original pixel indices."""

    z: int
    box: np.ndarray | None = None
    points: np.ndarray | None = None
    labels: np.ndarray | None = None


@runtime_checkable
class PromptedVolumeEngine(TrackingEngine, Protocol):
    """A 3D engine conditioned on several prompted slices at once (MedSAM2's video predictor).

    `track_prompts` conditions every prompted slice (boxes and points), then walks from the lowest
    prompted slice up (reverse=False) or from the highest down (reverse=True), yielding (z, logits)
    for every slice it passes, the prompted ones included. `mask_prompt`: the prompted slice's mask
    from its prompt is added back as a mask prompt before the walk (MedSAM2's RECIST inference);
    only with one prompted slice.
    """

    def track_prompts(self, state: Any, *, prompts: Sequence[SlicePrompt], reverse: bool,
                      mask_prompt: bool = False) -> Iterator[tuple[int, np.ndarray]]: ...
