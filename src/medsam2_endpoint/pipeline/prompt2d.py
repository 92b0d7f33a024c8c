"""2D prompts on one image (points, box, low-res mask) and multimask selection.

No JSON, no HTTP: core builds typed prompts and calls a `Prompter`, which reaches the registry's 2D
models and holds one embedding cache.

Conventions: images are uint8 RGB (H, W, 3); points (N, 2) as (x, y) pixels, x the column; labels 1
foreground / 0 background; boxes [x_min, y_min, x_max, y_max] with 0 <= x_min < x_max <= W (the
max may sit on the image's right/bottom edge); masks bool (H, W).

Output types (`OUTPUT_TYPES`): "single" asks the model for one mask; the others ask for its three
candidate masks and keep "all", the "largest", the "smallest" or the "best_quality" (highest
predicted IoU). A model trained with one output only (LiteMedSAM) gives that one mask for every output
type. Each mask carries its own predicted IoU ("quality") and its index among the model's
outputs (samapi reported mask i's quality under mask i-1: not here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from medsam2_endpoint.base.errors import InvalidRequest
from medsam2_endpoint.engines.base import ImageEngine, ModelInfo
from medsam2_endpoint.pipeline.embedding_cache import EmbeddingCache, content_key

OUTPUT_TYPES = ("single", "all", "largest", "smallest", "best_quality")


@dataclass(frozen=True)
class Prompt2D:
    """A validated prompt. points float (N, 2), labels int (N,), box float (4,), mask_input float32 (S, S)."""

    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    box: np.ndarray | None = None
    mask_input: np.ndarray | None = None
    output_type: str = "single"


@dataclass
class Mask2D:
    """One output mask: bool (H, W), predicted IoU, index among the model's outputs (or running number)."""

    mask: np.ndarray
    quality: float
    index: int
    stability: float | None = None
    point: list[float] | None = None  # automask: the grid point (or box centre) that produced it
    low_res: np.ndarray | None = None  # prompt route: low-res logits (S, S), usable as a later mask_input

    @property
    def area(self) -> int:
        return int(np.count_nonzero(self.mask))

    def bbox(self) -> list[int] | None:
        """[x_min, y_min, x_max, y_max] pixel indices (inclusive) of the mask, None when empty."""
        ys, xs = np.nonzero(self.mask)
        if ys.size == 0:
            return None
        return [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]


@dataclass(frozen=True)
class Coverage:
    """How much of an automatic-mask request's prompt grid was decoded.

    planned: prompts that would be decoded with time enough; decoded: those that were; pruned: grid prompts
    skipped before decoding because their answer could not differ from one already planned. partial: the
    budget ran out first, so the masks come from the `decoded` prompts only.
    """

    planned: int
    decoded: int
    pruned: int = 0

    @property
    def partial(self) -> bool:
        return self.decoded < self.planned

    def as_metadata(self) -> dict[str, int | bool]:
        return {"partial": self.partial, "prompts_planned": self.planned, "prompts_decoded": self.decoded,
                "prompts_pruned": self.pruned}


@dataclass
class Result2D:
    masks: list[Mask2D]
    model: ModelInfo
    embedding_cached: bool
    timing_ms: dict[str, float] = field(default_factory=dict)
    box_clipped_to: list[float] | None = None  # the box used when the one sent reached past the image
    coverage: Coverage | None = None  # automatic masks only


def clip_box(prompt: Prompt2D, *, width: int, height: int) -> tuple[Prompt2D, list[float] | None]:
    """The prompt with its box clipped to the image, and the clipped box (None when it already fit).

    A viewer's rectangle may reach past the field of view it sends (drawn, then panned or zoomed): SAM
    embeds such a box as given and, in effect, segments the visible part. Clipping first gives each
    engine the same visible part. A box left empty by clipping is not clipped (check_prompt refuses it).
    """
    if prompt.box is None:
        return prompt, None
    x0, y0, x1, y1 = prompt.box.tolist()
    clipped = [min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width), min(max(y1, 0.0), height)]
    if clipped == [x0, y0, x1, y1] or not (clipped[0] < clipped[2] and clipped[1] < clipped[3]):
        return prompt, None
    return replace(prompt, box=np.array(clipped, dtype=prompt.box.dtype)), clipped


def check_prompt(prompt: Prompt2D, *, width: int, height: int, engine: ImageEngine, where: Callable[[str], str],
                 models_with_points: list[str]) -> None:
    """Raise InvalidRequest naming the field for any prompt that does not fit the image or the model.

    `where(column)` gives a column's location prefix, e.g. "input_data.point_coords[0]".
    """
    if prompt.points is None and prompt.box is None:
        raise InvalidRequest(f"{where('bbox')}: no prompt; give point_coords with point_labels, a bbox, or both")
    if prompt.points is not None and not engine.info.capabilities.points:
        choice = f"choose a MedSAM2 model ({', '.join(models_with_points)})" if models_with_points else "add MedSAM2 weights to the model folder"
        raise InvalidRequest(
            f"{where('point_coords')}: model {engine.info.name} takes box prompts only; send a bbox instead, or {choice}"
        )
    if prompt.points is not None:
        labels = prompt.labels
        if labels is None or len(labels) != len(prompt.points):
            got = "no labels" if labels is None else f"{len(labels)} labels"
            raise InvalidRequest(f"{where('point_labels')}: {got} for {len(prompt.points)} points; give one label per point (1 foreground, 0 background)")
        for k, label in enumerate(labels.tolist()):
            if label not in (0, 1):
                raise InvalidRequest(f"{where('point_labels')}[{k}]: must be 1 (foreground) or 0 (background), got {label}")
        for k, (x, y) in enumerate(prompt.points.tolist()):
            if not (0 <= x < width and 0 <= y < height):
                raise InvalidRequest(
                    f"{where('point_coords')}[{k}]: point ({x:g}, {y:g}) is outside the image of {width} x {height} pixels "
                    f"(x is the column, 0 <= x < {width}; y the row, 0 <= y < {height})"
                )
    elif prompt.labels is not None:
        raise InvalidRequest(f"{where('point_labels')}: labels without point_coords; give both or neither")
    if prompt.box is not None:
        x0, y0, x1, y1 = prompt.box.tolist()
        if min(x0, y0) < 0 or x1 > width or y1 > height:
            raise InvalidRequest(
                f"{where('bbox')}: box [{x0:g}, {y0:g}, {x1:g}, {y1:g}] is outside the image of {width} x {height} pixels "
                f"(0 <= x_min < x_max <= {width}, 0 <= y_min < y_max <= {height})"
            )
        if not (x0 < x1 and y0 < y1):
            raise InvalidRequest(
                f"{where('bbox')}: the box [{x0:g}, {y0:g}, {x1:g}, {y1:g}] is empty; the order is [x_min, y_min, x_max, y_max]"
            )
    if prompt.mask_input is not None:
        size = engine.low_res_size
        if prompt.mask_input.shape != (size, size):
            raise InvalidRequest(
                f"{where('mask_input')}: model {engine.info.name} takes {size} x {size} low-resolution logits, got "
                f"{' x '.join(map(str, prompt.mask_input.shape))} (send the low_res_logits of an earlier answer)"
            )


def select_masks(masks: list[Mask2D], output_type: str) -> list[Mask2D]:
    """Keep the masks `output_type` asks for ("single"/"all": every mask); ties go to the lower index."""
    if output_type in ("single", "all") or len(masks) <= 1:
        return masks
    if output_type == "largest":
        return [max(masks, key=lambda m: (m.area, -m.index))]
    if output_type == "smallest":
        return [min(masks, key=lambda m: (m.area, m.index))]
    return [max(masks, key=lambda m: (m.quality, -m.index))]


class ImageModels(Protocol):
    """Where the Prompter finds 2D models by name (core's ModelRegistry)."""

    def image_engine(self, name: str) -> ImageEngine: ...

    def models_with_points(self) -> list[str]: ...


class Prompter:
    """2D prompting over the models of a registry, with one embedding cache for all of them.

    The expensive step (embedding an image) is cached by content, model name and checksum; the cheap
    one (decoding a prompt) runs per request.
    """

    def __init__(self, models: ImageModels, cache: EmbeddingCache) -> None:
        self.models = models
        self.cache = cache

    def image_engine(self, name: str) -> ImageEngine:
        return self.models.image_engine(name)

    def models_with_points(self) -> list[str]:
        return self.models.models_with_points()

    def embedding(self, name: str, rgb_u8: np.ndarray) -> tuple[Any, bool]:
        """(embedding, came from the cache) of an RGB image for model `name`."""
        engine = self.image_engine(name)
        key = (content_key(rgb_u8), name, engine.info.sha256)
        return self.cache.get_or_compute(key, lambda: engine.embed_image(rgb_u8))

    def segment(self, name: str, rgb_u8: np.ndarray, prompt: Prompt2D) -> Result2D:
        """Masks for one validated prompt (see `check_prompt`), selected by its output type."""
        engine = self.image_engine(name)
        embedding, cached = self.embedding(name, rgb_u8)
        masks, ious, low_res = engine.predict_2d(
            embedding, points=prompt.points, labels=prompt.labels, box=prompt.box,
            mask_input=prompt.mask_input, multimask=prompt.output_type != "single" and engine.multimask_outputs,
        )
        found = [Mask2D(masks[i], float(ious[i]), i, low_res=low_res[i]) for i in range(len(masks))]
        return Result2D(select_masks(found, prompt.output_type), engine.info, cached)
