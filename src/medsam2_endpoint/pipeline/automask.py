"""Automatic masks: everything in one image, from a grid of prompts (SAM's generator, or region boxes for box-only models)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sam2.utils.amg import batched_mask_to_box, calculate_stability_score, remove_small_regions
from torchvision.ops.boxes import batched_nms

from medsam2_endpoint.base.budget import Budget, Pace
from medsam2_endpoint.base.errors import InvalidRequest
from medsam2_endpoint.engines.base import GridAutomaskEngine, ImageEngine
from medsam2_endpoint.engines.sam2_image import keep_one_per_prompt
from medsam2_endpoint.pipeline.box_prompts import grid_points, region_boxes
from medsam2_endpoint.pipeline.prompt2d import Coverage, Mask2D, Prompter, Result2D

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
    if params.crop_n_layers > 0 and not engine.info.capabilities.points:
        raise InvalidRequest(
            f"{where('crop_n_layers')}: crops need a point-promptable model; model {engine.info.name} takes boxes only, use 0"
        )


def touches_border(mask: np.ndarray) -> bool:
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


ADVICE = "lower points_per_side or crop_n_layers, or raise MEDSAM2_REQUEST_DEADLINE_S"


def automask(prompter: Prompter, name: str, rgb_u8: np.ndarray, params: AutomaskParams, *, where: Callable[[str], str],
             budget: Budget | None = None) -> Result2D:
        """Masks of everything in the image (SAM's automatic mask generator, or region boxes for box-only models).

        With a budget, the grid's prompts are decoded batch by batch while the next batch still fits before the
        deadline; when it does not, the masks found so far are the answer and `Result2D.coverage` says so.
        """
        engine = prompter.image_engine(name)
        select = "all" if params.output_type == "single" else params.output_type
        multimask = params.output_type != "single" and engine.multimask_outputs
        if isinstance(engine, GridAutomaskEngine):
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

            pace = Pace(budget, "grid_points", advice=ADVICE)
            records, planned = engine.automask_2d(
                rgb_u8, embed=embed, select=select, multimask=multimask,
                min_mask_region_area=params.min_mask_region_area, params=generator_params, pace=pace,
            )
            masks = [
                Mask2D(r["segmentation"].astype(bool), float(r["predicted_iou"]), i, float(r["stability_score"]),
                       [float(v) for v in r["point_coords"][0]])
                for i, r in enumerate(records)
            ]
            cached = bool(cached_flags) and all(cached_flags)
            coverage = Coverage(planned=planned, decoded=pace.done)
        else:
            check_automask(params, engine=engine, where=where)
            embedding, cached = prompter.embedding(name, rgb_u8)
            masks, coverage = box_prompt_automask(engine, embedding, rgb_u8, params, select=select, multimask=multimask,
                                                  budget=budget)
        masks = [m for m in masks if m.area > 0]  # an empty mask has no outline to report
        if not params.include_image_edge:
            masks = [m for m in masks if not touches_border(m.mask)]
        for i, m in enumerate(masks):
            m.index = i
        return Result2D(masks, engine.info, cached, coverage=coverage)


def box_prompt_automask(engine: Any, embedding: Any, rgb_u8: np.ndarray, params: AutomaskParams, *, select: str,
                        multimask: bool, budget: Budget | None = None) -> tuple[list[Mask2D], Coverage]:
    """SAM's automatic-mask filtering (predicted IoU, stability, box NMS, small regions) on the grid points'
    region boxes (pipeline/box_prompts.py), decoded in batches of points_per_batch while the budget lasts."""
    height, width = rgb_u8.shape[:2]
    grey = np.asarray(rgb_u8.mean(axis=2), dtype=np.uint8)
    prompts = region_boxes(grey, grid_points(height, width, params.points_per_side))
    boxes, seeds = prompts.boxes, prompts.seeds
    pace = Pace(budget, "grid_boxes", advice=ADVICE)
    kept_masks, kept_iou, kept_stab, kept_pts = [], [], [], []
    step = min(params.points_per_batch, BOX_STEP)  # boxes are decoded independently: the step changes no result
    for start in range(0, len(boxes), step):
        batch = boxes[start : start + step]
        if not pace.fits(len(batch)):
            break
        pace.start()
        logits, ious, _ = engine.predict_logits_2d(embedding, batch, multimask=multimask)  # (B, N, H, W), (B, N)
        pace.finish(len(batch))
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
        kept_pts.append(seeds[groups[chosen]])
    coverage = Coverage(planned=len(boxes), decoded=pace.done, pruned=prompts.pruned)
    if not kept_masks:
        return [], coverage
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
    return out, coverage
