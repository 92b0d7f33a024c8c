"""MedSAM2's image encoder and mask decoder for 2D prompts, through sam2's `SAM2ImagePredictor` at 512 px.

The 2D engine wraps the `nn.Module` a loaded `MedSAM2Engine` already holds (`engine.predictor`, a
SAM2Base), so no second copy of the weights exists. Upstream's image predictor hard-codes the backbone
feature sizes of a 1024-px model; MedSAM2 runs at 512, so they are derived from `image_size`
(S/4, S/8, S/16: 128, 64 and 32 at 512).

Conventions: images are uint8 RGB (H, W, 3); points (N, 2) as (x, y) pixels of that image, x the
column; labels (N,) 1 foreground / 0 background; a box [x_min, y_min, x_max, y_max] in pixels;
`mask_input` low-resolution logits (1, S/4, S/4) from an earlier prediction. Masks come back at
(H, W) with the decoder's predicted IoU per mask.

The expensive step (`embed_image`) is separate from the cheap one (`predict_2d`), so the caller can
cache embeddings. Predictor objects are made per call (a few ms): they hold per-image state, and the
shared module is only read, so concurrent requests need no lock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import cv2
import numpy as np
import torch
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
from sam2.modeling.sam2_base import SAM2Base
from sam2.sam2_image_predictor import SAM2ImagePredictor
from sam2.utils.amg import MaskData, area_from_rle, generate_crop_boxes

from medsam2_endpoint.base.budget import Pace
from medsam2_endpoint.engines.base import ModelInfo, bf16_autocast

SELECT_RULES = ("all", "largest", "smallest", "best_quality")


@dataclass(frozen=True)
class SAM2Embedding:
    """Backbone features of one image: image_embed (1, 256, S/16, S/16) and two high-res levels."""

    features: dict[str, Any]
    orig_hw: tuple[int, int]
    nbytes: int


class MedSAM2ImagePredictor(SAM2ImagePredictor):  # type: ignore[misc]  # sam2 is untyped
    """`SAM2ImagePredictor` for any `image_size`, able to take precomputed features.

    `embed_fn`, when given, replaces the encoder in `set_image` (the automatic mask generator calls
    `set_image` itself; this routes it through the caller's embedding cache).
    """

    def __init__(self, sam_model: SAM2Base, embed_fn: Callable[[np.ndarray], SAM2Embedding] | None = None, **kwargs: Any) -> None:
        super().__init__(sam_model, **kwargs)
        size = int(sam_model.image_size)
        self._bb_feat_sizes = [(size // 4, size // 4), (size // 8, size // 8), (size // 16, size // 16)]
        self.embed_fn = embed_fn

    def use_features(self, embedding: SAM2Embedding) -> None:
        self.reset_predictor()
        self._features = embedding.features
        self._orig_hw = [embedding.orig_hw]
        self._is_image_set = True

    def set_image(self, image: np.ndarray) -> None:
        if self.embed_fn is None:
            super().set_image(image)
        else:
            self.use_features(self.embed_fn(np.ascontiguousarray(image)))


def keep_one_per_prompt(groups: np.ndarray, areas: np.ndarray, scores: np.ndarray, rule: str) -> np.ndarray:
    """Bool keep-mask choosing, among candidate masks of the same prompt (equal `groups` rows), one by `rule`.

    rule: "all" keeps every candidate; "largest" / "smallest" by area; "best_quality" by score.
    """
    if rule == "all" or len(areas) == 0:
        return np.ones(len(areas), dtype=bool)
    key = {"largest": -areas.astype(np.float64), "smallest": areas.astype(np.float64), "best_quality": -scores.astype(np.float64)}[rule]
    _, group_ids = np.unique(groups, axis=0, return_inverse=True)
    group_ids = group_ids.reshape(-1)
    order = np.lexsort((key, group_ids))  # by group, best first within a group
    first = np.ones(len(order), dtype=bool)
    first[1:] = group_ids[order][1:] != group_ids[order][:-1]
    keep = np.zeros(len(areas), dtype=bool)
    keep[order[first]] = True
    return keep


class MedSAM2MaskGenerator(SAM2AutomaticMaskGenerator):  # type: ignore[misc]  # sam2 is untyped
    """sam2's automatic mask generator on a MedSAM2 predictor, with two additions.

    - `select`: with multimask output, which of each grid point's masks to keep ("all", "largest",
      "smallest", "best_quality"), applied after the quality filters and before NMS.
    - `min_mask_region_area`: sam2 1.1.0 implements it only through the CUDA extension `sam2._C` (and
      silently skips it without); here it is SAM 1's OpenCV post-processing (holes and islands
      smaller than the area removed, then NMS again).
    """

    def __init__(self, predictor: MedSAM2ImagePredictor, *, select: str, min_mask_region_area: int,
                 pace: Pace | None = None, **params: Any) -> None:
        super().__init__(predictor.model, min_mask_region_area=0, **params)
        self.pace = pace  # asked before each batch; a refused batch (budget running low) is skipped
        self._empty: MaskData | None = None  # a batch's fields with no rows: what a skipped batch returns
        self.predictor = predictor  # replaces the base class's predictor, which assumes a 1024-px model
        self.select = select
        self.min_region = min_mask_region_area

    def planned_points(self, image_hw: tuple[int, int]) -> int:
        """Grid points over every crop: what a full answer decodes."""
        _, layer_idxs = generate_crop_boxes(image_hw, self.crop_n_layers, self.crop_overlap_ratio)
        return sum(len(self.point_grids[layer]) for layer in layer_idxs)

    def _process_crop(self, image: np.ndarray, crop_box: list[int], crop_layer_idx: int, orig_size: tuple[int, ...]) -> MaskData:
        if self.pace is not None and self.pace.stopped:
            return MaskData()  # out of time: not even this crop's embedding
        return super()._process_crop(image, crop_box, crop_layer_idx, orig_size)

    def _process_batch(
        self, points: np.ndarray, im_size: tuple[int, ...], crop_box: list[int], orig_size: tuple[int, ...],
        normalize: bool = False,
    ) -> MaskData:
        pace = self.pace
        if pace is not None and not pace.fits(len(points)) and self._empty is not None:
            return MaskData(**{k: v for k, v in self._empty.items()})
        if pace is not None:
            pace.start()
        data = super()._process_batch(points, im_size, crop_box, orig_size, normalize=normalize)
        if pace is not None:
            pace.finish(len(points))
        if self.select != "all" and len(data["rles"]) > 0:
            areas = np.array([area_from_rle(rle) for rle in data["rles"]])
            keep = keep_one_per_prompt(data["points"].cpu().numpy(), areas, data["iou_preds"].float().cpu().numpy(), self.select)
            data.filter(torch.as_tensor(keep))
        if self._empty is None:
            self._empty = MaskData(**{k: v for k, v in data.items()})
            self._empty.filter(torch.zeros(len(data["rles"]), dtype=torch.bool))
        return data

    def _generate_masks(self, image: np.ndarray) -> MaskData:
        data = super()._generate_masks(image)
        if self.min_region > 0:
            data = self.postprocess_small_regions(data, self.min_region, max(self.box_nms_thresh, self.crop_nms_thresh))
        return data


class SAM2ImageEngine:
    """2D prompts on a MedSAM2 (SAM 2.1) model: `embed_image` once per image, `predict_2d` per prompt."""

    multimask_outputs = True

    def __init__(self, model: SAM2Base, info: ModelInfo) -> None:
        self.model = model
        self.info = info
        self.device = model.device
        self.cpu_bf16 = self.device.type == "cpu" and info.capabilities.precision == "bf16"
        self.low_res_size = int(model.image_size) // 4


    def embed_image(self, rgb_u8: np.ndarray) -> SAM2Embedding:
        """Run the image encoder on a uint8 (H, W, 3) RGB image."""
        predictor = MedSAM2ImagePredictor(self.model)
        with torch.inference_mode(), bf16_autocast(self.device, self.cpu_bf16):
            predictor.set_image(rgb_u8)
        features = predictor._features
        tensors = [features["image_embed"], *features["high_res_feats"]]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        return SAM2Embedding(features=features, orig_hw=(int(rgb_u8.shape[0]), int(rgb_u8.shape[1])), nbytes=nbytes)

    def low_res_from_mask(self, mask: np.ndarray) -> np.ndarray:
        """A bool (H, W) mask as (S/4, S/4) mask_input logits (+10 inside, -10 outside): the image is stretched to S x S."""
        values = np.where(mask, 10.0, -10.0).astype(np.float32)
        return cv2.resize(values, (self.low_res_size, self.low_res_size), interpolation=cv2.INTER_LINEAR)

    def predict_2d(
        self,
        embedding: SAM2Embedding,
        *,
        points: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(masks bool (N, H, W), predicted IoU (N,), low-res logits (N, S/4, S/4)); N = 3 with multimask else 1."""
        predictor = MedSAM2ImagePredictor(self.model)
        predictor.use_features(embedding)
        with torch.inference_mode(), bf16_autocast(self.device, self.cpu_bf16):
            masks, ious, low_res = predictor.predict(
                point_coords=points,
                point_labels=labels,
                box=box,
                mask_input=None if mask_input is None else mask_input.reshape(1, self.low_res_size, self.low_res_size),
                multimask_output=multimask,
            )
        return masks.astype(bool), ious.astype(np.float64), low_res.astype(np.float32)

    def automask_2d(
        self, rgb_u8: np.ndarray, *, embed: Callable[[np.ndarray], SAM2Embedding], select: str, multimask: bool,
        min_mask_region_area: int, params: dict[str, Any], pace: Pace | None = None,
    ) -> tuple[list[dict[str, Any]], int]:
        """sam2's automatic masks; `params` are the generator's own keyword arguments (points_per_side, ...).

        `embed` computes (or fetches) the embedding of the image or of a crop of it. `pace` (base/budget.py)
        decides before each batch of grid points whether it still fits the budget; skipped batches leave
        the answer partial (pace.done < the planned points). Returns the generator's records (segmentation
        bool (H, W), area, predicted_iou, stability_score, point_coords) and the planned grid points.
        """
        predictor = MedSAM2ImagePredictor(self.model, embed_fn=embed)
        generator = MedSAM2MaskGenerator(
            predictor, select=select, min_mask_region_area=min_mask_region_area, multimask_output=multimask,
            pace=pace, **params,
        )
        planned = generator.planned_points((int(rgb_u8.shape[0]), int(rgb_u8.shape[1])))
        with torch.inference_mode(), bf16_autocast(self.device, self.cpu_bf16):
            return cast("list[dict[str, Any]]", generator.generate(rgb_u8)), planned
