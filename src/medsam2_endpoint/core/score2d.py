"""The 2D route of /score: validated items in, encoded results out. Every item is decoded and checked
(prompt geometry against the image, model capabilities) before any item runs, as in the 3D route."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from medsam2_endpoint.base.budget import Budget
from medsam2_endpoint.base.log import log
from medsam2_endpoint.contract.score2d import ImageItem
from medsam2_endpoint.core.images import automask_params, load_rgb, typed_prompt
from medsam2_endpoint.io.encode import encode_mask_2d
from medsam2_endpoint.io.fetch import FetchPolicy
from medsam2_endpoint.io.images import Picture
from medsam2_endpoint.io.limits import Limits
from medsam2_endpoint.pipeline.automask import automask, check_automask
from medsam2_endpoint.pipeline.prompt2d import Mask2D, Prompt2D, Prompter, Result2D, check_prompt


@dataclass(frozen=True)
class Prepared2D:
    item: ImageItem
    picture: Picture
    rgb: np.ndarray
    model: str
    prompt: Prompt2D
    decode_ms: float


def mask_entry(m: Mask2D, mask_format: str, simplify_tolerance: float, *, low_res: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"index": m.index, "quality": round(m.quality, 6), "area": m.area, "bbox": m.bbox()}
    if m.stability is not None:
        entry["stability_score"] = round(m.stability, 6)
    if m.point is not None:
        entry["point_coords"] = [round(v, 3) for v in m.point]
    entry["mask"] = encode_mask_2d(m.mask, mask_format, simplify_tolerance)
    if low_res and m.low_res is not None:
        entry["low_res_logits"] = np.round(m.low_res.astype(np.float64), 4).tolist()
    return entry


def prepare(prompter: Prompter, item: ImageItem, model: str, *, policy: FetchPolicy, limits: Limits,
            budget: Budget | None = None) -> Prepared2D:
    started = time.perf_counter()
    picture, rgb = load_rgb(item.image, field=item.field("image"), policy=policy, limits=limits, window=item.dicom_window,
                            window_field=item.field("dicom_window") if item.dicom_window else None, budget=budget)
    engine = prompter.image_engine(model)
    prompt = typed_prompt(item.prompt)
    if item.task == "automask":
        assert item.automask is not None  # the contract sets it for every automask item
        check_automask(automask_params(item.automask, item.prompt.output_type), engine=engine,
                       where=lambda col: f"{item.field('automask')}.{col}")
    else:
        check_prompt(prompt, width=picture.width, height=picture.height, engine=engine, where=item.field,
                     models_with_points=prompter.models_with_points())
    return Prepared2D(item, picture, rgb, model, prompt, (time.perf_counter() - started) * 1000)


def run(prompter: Prompter, p: Prepared2D, budget: Budget) -> dict[str, Any]:
    item = p.item
    t0 = time.perf_counter()
    if item.task == "automask":
        assert item.automask is not None
        params = automask_params(item.automask, item.prompt.output_type)
        result: Result2D = automask(prompter, p.model, p.rgb, params, where=lambda col: f"{item.field('automask')}.{col}",
                                    budget=budget)
    else:
        result = prompter.segment(p.model, p.rgb, p.prompt)
    t1 = time.perf_counter()
    masks = [mask_entry(m, item.mask_format, item.simplify_tolerance, low_res=item.return_low_res) for m in result.masks]
    t2 = time.perf_counter()
    timing = {"decode": round(p.decode_ms, 1), "inference": round((t1 - t0) * 1000, 1), "encode": round((t2 - t1) * 1000, 1)}
    timing["total"] = round(sum(timing.values()), 1)
    info = result.model
    engine = prompter.image_engine(p.model)
    log.info(
        "route=2d item=%d task=%s model=%s size=%dx%d masks=%d embedding_cached=%s ms=%.0f",
        item.index, item.task, p.model, p.picture.width, p.picture.height, len(masks), result.embedding_cached, timing["total"],
    )
    return {
        "masks": masks,
        "metadata": {
            "route": "2d",
            "task": item.task,
            "image_size": [p.picture.width, p.picture.height],
            "mask_shape": [p.picture.height, p.picture.width],
            "axis_order": "yx",
            "image_format": p.picture.format,
            "channels": p.picture.channels,
            "dtype": str(p.picture.pixels.dtype),
            "dicom_window": list(item.dicom_window) if item.dicom_window else None,
            "output_type": item.prompt.output_type,
            "multimask_output": item.multimask_output and engine.multimask_outputs,
            "mask_format": item.mask_format,
            "model": info.as_metadata(),
            "low_res_size": engine.low_res_size,
            "embedding_cached": result.embedding_cached,
            **({"automask": result.coverage.as_metadata()} if result.coverage is not None else {}),
            "timing_ms": timing,
        },
    }
