"""The 2D route: prompts on one image (points, box, low-res mask), multimask selection, automatic masks.

No JSON, no HTTP: adapters (service2d for /score, samapi for QuPath) build typed prompts and call a
`Prompter`, which holds the 2D side of the Service's model registry and one embedding cache.

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

import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from sam2.utils.amg import batched_mask_to_box, calculate_stability_score, remove_small_regions
from torchvision.ops.boxes import batched_nms

from medsam2_endpoint.pipeline.embedding_cache import EmbeddingCache, content_key
from medsam2_endpoint.engines.base import ModelInfo
from medsam2_endpoint.engines.sam2_image import SAM2ImageEngine, keep_one_per_prompt
from medsam2_endpoint.base.errors import InvalidRequest, ModelUnavailable

OUTPUT_TYPES = ("single", "all", "largest", "smallest", "best_quality")
DEFAULT_CACHE_MB = 256
# Box-only models get a grid of boxes instead of points: at each grid point, squares of 2, 4 and 8
# grid cells (a point grid's analogue of SAM's three mask granularities).
BOX_GRID_CELLS = (2, 4, 8)


class ImageEngine(Protocol):
    """What the 2D route needs from a model (engines/sam2_image.SAM2ImageEngine, engines/lite.LiteMedSAMEngine)."""

    info: ModelInfo
    accepts_points: bool
    multimask_outputs: bool  # False: the model has one trained output; multimask requests get that one mask
    low_res_size: int

    def embed_image(self, rgb_u8: np.ndarray) -> Any: ...

    def predict_2d(self, embedding: Any, *, points: np.ndarray | None = None, labels: np.ndarray | None = None,
                   box: np.ndarray | None = None, mask_input: np.ndarray | None = None,
                   multimask: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def low_res_from_mask(self, mask: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Prompt2D:
    """A validated prompt. points float (N, 2), labels int (N,), box float (4,), mask_input float32 (S, S)."""

    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    box: np.ndarray | None = None
    mask_input: np.ndarray | None = None
    output_type: str = "single"


@dataclass(frozen=True)
class AutomaskParams:
    """SAM's automatic-mask-generator parameters, with samapi's names and defaults."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0
    include_image_edge: bool = False  # False: masks touching the image border are dropped (cut by the field of view)
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


@dataclass
class Result2D:
    masks: list[Mask2D]
    model: ModelInfo
    embedding_cached: bool
    timing_ms: dict[str, float] = field(default_factory=dict)


def check_prompt(prompt: Prompt2D, *, width: int, height: int, engine: ImageEngine, where: Callable[[str], str],
                 models_with_points: list[str]) -> None:
    """Raise InvalidRequest naming the field for any prompt that does not fit the image or the model.

    `where(column)` gives a column's location prefix, e.g. "input_data.point_coords[0]".
    """
    if prompt.points is None and prompt.box is None:
        raise InvalidRequest(f"{where('bbox')}: no prompt; give point_coords with point_labels, a bbox, or both")
    if prompt.points is not None and not engine.accepts_points:
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


def check_automask(params: AutomaskParams, *, engine: ImageEngine, where: Callable[[str], str]) -> None:
    """Raise InvalidRequest for automatic-mask options the model cannot honour."""
    if params.crop_n_layers > 0 and not engine.accepts_points:
        raise InvalidRequest(
            f"{where('crop_n_layers')}: crops need a point-promptable model; model {engine.info.name} takes boxes only, use 0"
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


def touches_border(mask: np.ndarray) -> bool:
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


class Prompter:
    """2D prompting over a model registry (name -> 3D engine), with one embedding cache for all models.

    2D adapters are built on first use: MedSAM2 engines (family "medsam2") through
    `SAM2ImageEngine` around their already-loaded module, LiteMedSAM (family "lite-medsam") directly.
    The registry may grow while serving (samapi weight registration); adapters follow it.
    """

    def __init__(self, engines: Mapping[str, Any], cache: EmbeddingCache) -> None:
        self.engines = engines
        self.cache = cache
        self._adapters: dict[str, tuple[Any, ImageEngine]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, engines: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Prompter:
        env = os.environ if environ is None else environ
        raw = env.get("MEDSAM2_EMBEDDING_CACHE_MB", "") or str(DEFAULT_CACHE_MB)
        if not raw.isdigit():
            raise ValueError(f"MEDSAM2_EMBEDDING_CACHE_MB={raw!r} must be a whole number of MiB (0 disables the cache)")
        return cls(engines, EmbeddingCache(int(raw) * 1024 * 1024))

    def models_with_points(self) -> list[str]:
        return [name for name, engine in list(self.engines.items()) if getattr(engine.info, "family", "") == "medsam2"]

    def image_engine(self, name: str) -> ImageEngine:
        """The 2D adapter of registry model `name` (which must exist)."""
        engine = self.engines[name]
        with self._lock:
            known = self._adapters.get(name)
            if known is not None and known[0] is engine:
                return known[1]
            family = engine.info.family
            if family == "medsam2":
                adapter: ImageEngine = SAM2ImageEngine(engine.predictor, engine.info)
            elif hasattr(engine, "embed_image") and hasattr(engine, "predict_2d"):
                adapter = engine
            else:
                raise ModelUnavailable(f"model {name} ({family}) has no 2D mode; use a MedSAM2 model or lite-medsam")
            self._adapters[name] = (engine, adapter)
            return adapter

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

    def automask(self, name: str, rgb_u8: np.ndarray, params: AutomaskParams, *, where: Callable[[str], str]) -> Result2D:
        """Masks of everything in the image (SAM's automatic mask generator, or a box grid for box-only models)."""
        engine = self.image_engine(name)
        select = "all" if params.output_type == "single" else params.output_type
        multimask = params.output_type != "single" and engine.multimask_outputs
        if engine.accepts_points:
            generator_params = {
                k: getattr(params, k) for k in (
                    "points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
                    "stability_score_offset", "box_nms_thresh", "crop_n_layers", "crop_nms_thresh",
                    "crop_overlap_ratio", "crop_n_points_downscale_factor",
                )
            }
            cached_flags: list[bool] = []

            def embed(image: np.ndarray) -> Any:
                value, hit = self.embedding(name, image)
                cached_flags.append(hit)
                return value

            records = engine.automask_2d(
                rgb_u8, embed=embed, select=select, multimask=multimask,
                min_mask_region_area=params.min_mask_region_area, params=generator_params,
            )
            masks = [
                Mask2D(r["segmentation"].astype(bool), float(r["predicted_iou"]), i, float(r["stability_score"]),
                       [float(v) for v in r["point_coords"][0]])
                for i, r in enumerate(records)
            ]
            cached = bool(cached_flags) and all(cached_flags)
        else:
            check_automask(params, engine=engine, where=where)
            embedding, cached = self.embedding(name, rgb_u8)
            masks = box_grid_automask(engine, embedding, rgb_u8.shape[:2], params, select=select, multimask=multimask)
        masks = [m for m in masks if m.area > 0]  # an empty mask has no outline to report
        if not params.include_image_edge:
            masks = [m for m in masks if not touches_border(m.mask)]
        for i, m in enumerate(masks):
            m.index = i
        return Result2D(masks, engine.info, cached)


def _grid_boxes(height: int, width: int, per_side: int) -> tuple[np.ndarray, np.ndarray]:
    """Square boxes of BOX_GRID_CELLS grid cells centred on the points_per_side^2 grid; (boxes (B, 4), centres (B, 2))."""
    cell = max(height, width) / per_side
    xs = (np.arange(per_side) + 0.5) * width / per_side
    ys = (np.arange(per_side) + 0.5) * height / per_side
    centres = np.array([(x, y) for y in ys for x in xs])
    boxes, owners = [], []
    for cells in BOX_GRID_CELLS:
        half = cells * cell / 2
        b = np.stack([centres[:, 0] - half, centres[:, 1] - half, centres[:, 0] + half, centres[:, 1] + half], axis=1)
        boxes.append(np.clip(b, 0, [width, height, width, height]))
        owners.append(centres)
    all_boxes, all_centres = np.concatenate(boxes), np.concatenate(owners)
    _, first = np.unique(np.round(all_boxes, 3), axis=0, return_index=True)  # large boxes clip to the same square
    first = np.sort(first)
    return all_boxes[first], all_centres[first]


def box_grid_automask(engine: Any, embedding: Any, hw: tuple[int, int], params: AutomaskParams, *, select: str,
                      multimask: bool) -> list[Mask2D]:
    """SAM's automatic-mask filtering (predicted IoU, stability, box NMS, small regions) on a box grid."""
    height, width = hw
    boxes, centres = _grid_boxes(height, width, params.points_per_side)
    kept_masks, kept_iou, kept_stab, kept_pts = [], [], [], []
    for start in range(0, len(boxes), params.points_per_batch):
        batch = boxes[start : start + params.points_per_batch]
        logits, ious, _ = engine.predict_logits_2d(embedding, batch, multimask=multimask)  # (B, N, H, W), (B, N)
        n = logits.shape[1]
        logits = logits.flatten(0, 1)
        ious_t = torch.as_tensor(ious.reshape(-1))
        groups = np.repeat(np.arange(start, start + len(batch)), n)
        keep = ious_t > params.pred_iou_thresh
        stability = calculate_stability_score(logits, 0.0, params.stability_score_offset)
        if params.stability_score_thresh > 0:
            keep &= stability >= params.stability_score_thresh
        masks = logits > 0.0
        keep &= masks.flatten(1).any(1)
        idx = torch.nonzero(keep).flatten().numpy()
        if idx.size == 0:
            continue
        areas = masks[idx].flatten(1).sum(1).numpy()
        chosen = idx[keep_one_per_prompt(groups[idx][:, None], areas, ious_t[idx].numpy(), select)]
        kept_masks.append(masks[chosen])
        kept_iou.append(ious_t[chosen])
        kept_stab.append(stability[chosen])
        kept_pts.append(centres[groups[chosen]])
    if not kept_masks:
        return []
    masks_t, iou_t = torch.cat(kept_masks), torch.cat(kept_iou)
    order = batched_nms(batched_mask_to_box(masks_t).float(), iou_t.float(), torch.zeros(len(iou_t)), params.box_nms_thresh)
    stab, points = torch.cat(kept_stab), np.concatenate(kept_pts)
    out = []
    for i in order.tolist():
        mask = masks_t[i].numpy()
        if params.min_mask_region_area > 0:
            mask, _ = remove_small_regions(mask, params.min_mask_region_area, mode="holes")
            mask, _ = remove_small_regions(mask, params.min_mask_region_area, mode="islands")
        out.append(Mask2D(np.asarray(mask, dtype=bool), float(iou_t[i]), len(out), float(stab[i]), points[i].tolist()))
    return out
