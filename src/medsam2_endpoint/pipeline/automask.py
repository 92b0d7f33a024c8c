"""Automatic masks: everything in one image, from a grid of prompts (SAM's generator, or boxes for box-only models)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from sam2.utils.amg import batched_mask_to_box, calculate_stability_score, remove_small_regions
from torchvision.ops.boxes import batched_nms

from medsam2_endpoint.base.budget import Budget
from medsam2_endpoint.base.errors import InvalidRequest
from medsam2_endpoint.engines.base import ImageEngine
from medsam2_endpoint.engines.sam2_image import SAM2ImageEngine, keep_one_per_prompt
from medsam2_endpoint.pipeline.prompt2d import Mask2D, Prompter, Result2D

# Box-only models get a grid of boxes instead of points: at each grid point, squares of 2, 4 and 8
# grid cells (a point grid's analogue of SAM's three mask granularities).
BOX_GRID_CELLS = (2, 4, 8)
# LiteMedSAM's decoder repeats the image embedding for every box: 0.18 s a box on one CPU thread in steps of 2,
# 0.34 s in batches of 64 (BENCHMARKS.md, "Box-grid decoding step"). The budget is checked every BOX_STEP boxes,
# so a request whose client left (or whose server is stopping) stops within a second, not after a 64-box batch.
BOX_STEP = 2


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


def check_automask(params: AutomaskParams, *, engine: ImageEngine, where: Callable[[str], str]) -> None:
    """Raise InvalidRequest for automatic-mask options the model cannot honour."""
    if params.crop_n_layers > 0 and not engine.accepts_points:
        raise InvalidRequest(
            f"{where('crop_n_layers')}: crops need a point-promptable model; model {engine.info.name} takes boxes only, use 0"
        )


def touches_border(mask: np.ndarray) -> bool:
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


ADVICE = "lower points_per_side or crop_n_layers, or raise MEDSAM2_REQUEST_DEADLINE_S"


def automask(prompter: Prompter, name: str, rgb_u8: np.ndarray, params: AutomaskParams, *, where: Callable[[str], str],
             budget: Budget | None = None) -> Result2D:
        """Masks of everything in the image (SAM's automatic mask generator, or a box grid for box-only models)."""
        engine = prompter.image_engine(name)
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
                value, hit = prompter.embedding(name, image)
                cached_flags.append(hit)
                return value

            records = cast(SAM2ImageEngine, engine).automask_2d(  # only SAM 2 engines accept points
                rgb_u8, embed=embed, select=select, multimask=multimask,
                min_mask_region_area=params.min_mask_region_area, params=generator_params,
                before_batch=None if budget is None else lambda done: budget.check(done, "grid_points", advice=ADVICE),
            )
            masks = [
                Mask2D(r["segmentation"].astype(bool), float(r["predicted_iou"]), i, float(r["stability_score"]),
                       [float(v) for v in r["point_coords"][0]])
                for i, r in enumerate(records)
            ]
            cached = bool(cached_flags) and all(cached_flags)
        else:
            check_automask(params, engine=engine, where=where)
            embedding, cached = prompter.embedding(name, rgb_u8)
            masks = box_grid_automask(engine, embedding, rgb_u8.shape[:2], params, select=select, multimask=multimask,
                                      budget=budget)
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
                      multimask: bool, budget: Budget | None = None) -> list[Mask2D]:
    """SAM's automatic-mask filtering (predicted IoU, stability, box NMS, small regions) on a box grid."""
    height, width = hw
    boxes, centres = _grid_boxes(height, width, params.points_per_side)
    kept_masks, kept_iou, kept_stab, kept_pts = [], [], [], []
    step = min(params.points_per_batch, BOX_STEP)  # boxes are decoded independently: the step changes no result
    for start in range(0, len(boxes), step):
        if budget is not None:
            budget.check(start, "grid_boxes", advice=ADVICE)
        batch = boxes[start : start + step]
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
    out: list[Mask2D] = []
    for i in order.tolist():
        mask = masks_t[i].numpy()
        if params.min_mask_region_area > 0:
            mask, _ = remove_small_regions(mask, params.min_mask_region_area, mode="holes")
            mask, _ = remove_small_regions(mask, params.min_mask_region_area, mode="islands")
        out.append(Mask2D(np.asarray(mask, dtype=bool), float(iou_t[i]), len(out), float(stab[i]), points[i].tolist()))
    return out
