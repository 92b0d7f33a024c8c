"""Automatic masks an interactive client can wait for: region box prompts for LiteMedSAM (pruned before
decoding where the answer cannot change), the QuPath extension's GUI defaults finding an obvious object,
and a spent budget answering with the masks found so far, flagged partial (both model families)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from medsam2_endpoint.api.samapi import PARTIAL_HEADER
from medsam2_endpoint.base.budget import Budget
from medsam2_endpoint.base.errors import DeadlineExceeded
from medsam2_endpoint.contract.score2d import AutomaskOptions
from medsam2_endpoint.pipeline import box_prompts
from medsam2_endpoint.pipeline.box_prompts import MARGINS, TOLERANCES, grid_points, region_boxes
from medsam2_endpoint.testing.phantoms import disk_image
from test_prompt2d import LITE, MEDSAM2, phantom_slice
from test_samapi import live, png_b64, post, rgb_png, with_settings

# What the QuPath SAM extension (v0.9.1) sends from its automask dialog with the GUI's defaults (REFERENCE.md C2).
GUI_DEFAULTS = {
    "points_per_side": 16, "points_per_batch": 64, "pred_iou_thresh": 0.88, "stability_score_thresh": 0.95,
    "stability_score_offset": 1.0, "box_nms_thresh": 0.2, "crop_n_layers": 0, "crop_nms_thresh": 0.7,
    "crop_overlap_ratio": 512 / 1500, "crop_n_points_downscale_factor": 1, "min_mask_region_area": 0,
    "output_type": "Multi-mask (smallest)", "include_image_edge": False,
}


def ticking(step_s: float = 1.0):
    """A clock for Budget: each look is `step_s` later, so a budget runs out after a known number of looks."""
    now = [0.0]

    def clock() -> float:
        now[0] += step_s
        return now[0]

    return clock


def rasterised(geometry: dict, height: int, width: int) -> np.ndarray:
    """A GeoJSON (Multi)Polygon with pixel-corner vertices as a bool mask of the pixels whose centres it holds."""
    polygons = geometry["coordinates"] if geometry["type"] == "MultiPolygon" else [geometry["coordinates"]]
    out = np.zeros((height, width), np.uint8)
    for rings in polygons:
        for k, ring in enumerate(rings):  # the exterior, then its holes
            points = np.round((np.asarray(ring, dtype=np.float64) - 0.5) * 16).astype(np.int32)
            cv2.fillPoly(out, [points], 0 if k else 1, shift=4)
    return out.astype(bool)


def test_every_grid_point_in_a_found_region_would_give_a_planned_box():
    grey = disk_image()[0][:, :, 0]
    points = grid_points(*grey.shape, 16)
    prompts = region_boxes(grey, points)
    assert prompts.seeds_total == len(points) * len(TOLERANCES)
    assert prompts.pruned > prompts.seeds_total // 2, "a flat background and one disk are a few regions"
    planned = {tuple(np.round(b, 3)) for b in prompts.boxes}
    # a pruned seed, prompted on its own, gives a box already planned: skipping it changes nothing
    for x, y in points[::7]:
        alone = region_boxes(grey, np.array([[x, y]]))
        assert {tuple(np.round(b, 3)) for b in alone.boxes} <= planned


def test_a_region_box_frames_its_object_with_the_margins():
    rgb, disk = disk_image()
    ys, xs = np.nonzero(disk)
    inside = np.array([[float(xs.mean()), float(ys.mean())]])
    boxes = region_boxes(rgb[:, :, 0], inside).boxes
    assert len(MARGINS) <= len(boxes) <= len(MARGINS) * len(TOLERANCES)
    side = xs.max() + 1 - xs.min()
    np.testing.assert_allclose((boxes[:, :2] + boxes[:, 2:]) / 2, [[xs.mean() + 0.5, ys.mean() + 0.5]] * len(boxes), atol=1.0)
    # the region stops where the (smoothed) edge begins, so a box is the disk's at most, grown by a margin
    assert (boxes[:, :2] <= [xs.min(), ys.min()]).all() and (boxes[:, 2:] >= [xs.max() + 1, ys.max() + 1]).all()
    assert (boxes[:, 2] - boxes[:, 0] <= side * (1 + 2 * max(MARGINS))).all()


def test_specks_and_flat_images_give_no_pointless_prompts(monkeypatch):
    flat = np.full((60, 80), 90, np.uint8)
    prompts = region_boxes(flat, grid_points(60, 80, 8))
    # one region, the whole image: every margin clips to the same box, decoded once
    np.testing.assert_array_equal(prompts.boxes, [[0, 0, 80, 60]])
    speck = flat.copy()
    speck[30, 40] = 255
    monkeypatch.setattr(box_prompts, "SMOOTH_SIGMA", 0.1)
    assert len(region_boxes(speck, np.array([[40.0, 30.0]])).boxes) == 0


def test_the_gui_defaults_find_the_obvious_disk(service, tmp_path):
    rgb, disk = disk_image()
    with live(create_app_for(service, tmp_path)) as url:
        response = post(url + "automask/", type="vit_t", b64img=png_b64(rgb), **GUI_DEFAULTS)
    assert response.status_code == 200, response.text
    assert PARTIAL_HEADER not in response.headers
    features = response.json()
    assert len(features) == 1, [f["properties"] for f in features]
    mask = rasterised(features[0]["geometry"], *disk.shape)
    assert (mask & disk).sum() / (mask | disk).sum() >= 0.9
    assert features[0]["properties"]["quality"] > 0.88


def create_app_for(service, tmp_path):
    from medsam2_endpoint.api.samapi import create_app

    return create_app(with_settings(service, samapi_weights_dir=tmp_path))


def test_a_spent_budget_answers_the_masks_found_so_far_flagged_partial(service):
    grey, _, _ = phantom_slice()
    options = AutomaskOptions(points_per_side=8, points_per_batch=2, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                              include_image_edge=True)
    full = service.automask_image(LITE, rgb_png(grey), options, "single", budget=Budget(None))
    assert full.coverage is not None and not full.coverage.partial and full.coverage.decoded == full.coverage.planned
    # two looks at the clock per batch: the budget lasts one batch, then the next cannot fit
    budget = Budget(2.5, clock=ticking())
    part = service.automask_image(LITE, rgb_png(grey), options, "single", budget=budget)
    assert part.coverage is not None and part.coverage.partial
    assert part.coverage.decoded == 2 and part.coverage.planned == full.coverage.planned > 2
    assert 0 < len(part.masks) < len(full.masks)


def test_a_budget_spent_before_anything_ran_is_a_deadline_error(service):
    grey, _, _ = phantom_slice()
    with pytest.raises(DeadlineExceeded) as caught:
        service.automask_image(LITE, rgb_png(grey), AutomaskOptions(points_per_side=4), "single", budget=Budget(0.5, clock=ticking()))
    assert caught.value.code == "deadline" and caught.value.detail == {"grid_boxes": 0}


def test_medsam2_automask_has_the_same_budget(service):
    grey, _, _ = phantom_slice()
    options = AutomaskOptions(points_per_side=4, points_per_batch=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                              include_image_edge=True)
    full = service.automask_image(MEDSAM2, rgb_png(grey), options, "all", budget=Budget(None))
    assert full.coverage is not None and (full.coverage.planned, full.coverage.decoded) == (16, 16)
    part = service.automask_image(MEDSAM2, rgb_png(grey), options, "all", budget=Budget(2.5, clock=ticking()))
    assert part.coverage is not None and part.coverage.partial and part.coverage.decoded == 4
    first_row = min(m.point[1] for m in full.masks)  # the grid runs row by row: one batch is the first row
    assert part.masks and all(m.point is not None and m.point[1] == first_row == 12 for m in part.masks)


def test_a_partial_samapi_answer_says_so_in_a_header(service, tmp_path, monkeypatch):
    grey, _, _ = phantom_slice()
    app_service = with_settings(service, samapi_weights_dir=tmp_path)
    monkeypatch.setattr(app_service, "budget", lambda: Budget(2.5, clock=ticking()))
    from medsam2_endpoint.api.samapi import create_app

    with live(create_app(app_service)) as url:
        response = post(url + "automask/", type="vit_t", b64img=rgb_png(grey), points_per_side=8, points_per_batch=2,
                        pred_iou_thresh=0.0, stability_score_thresh=0.0, include_image_edge=True)
    assert response.status_code == 200, response.text
    decoded, planned = map(int, response.headers[PARTIAL_HEADER].split("/"))
    assert decoded == 2 < planned
    assert isinstance(response.json(), list)


def test_score_2d_automask_reports_its_coverage(service):
    from test_prompt2d import score

    rgb, _ = disk_image(120, 160, centre_xy=(90, 55), radius=22)
    (result,) = score(service, image=png_b64(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)), model=LITE, task="automask",
                      automask={"points_per_side": 4})
    coverage = result["metadata"]["automask"]
    assert coverage["partial"] is False and coverage["prompts_decoded"] == coverage["prompts_planned"] > 0
    assert coverage["prompts_pruned"] > 0
