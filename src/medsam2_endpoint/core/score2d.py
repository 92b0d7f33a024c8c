"""The one 2D path: load -> check -> infer, for the 2D route of /score and for samapi (QuPath).

`/score` items are all decoded and checked (prompt geometry against the image, model capabilities) before
any item runs, as in the 3D route, then encoded; samapi's prompt and automask calls use the same `check`
and `infer` with errors named by samapi's fields."""

from __future__ import annotations

import time
from collections.abc import Callable
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
from medsam2_endpoint.pipeline.automask import AutomaskParams, automask, check_automask
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
    prompt = typed_prompt(item.prompt)
    check(prompter, model, rgb, prompt=prompt, params=_params(item), where=item.field,
          automask_where=lambda col: f"{item.field('automask')}.{col}")
    return Prepared2D(item, picture, rgb, model, prompt, (time.perf_counter() - started) * 1000)


def _params(item: ImageItem) -> AutomaskParams | None:
    if item.task != "automask":
        return None
    if item.automask is None:
        raise ValueError("the contract sets automask options on every automask item")
    return automask_params(item.automask, item.prompt.output_type)


def check(prompter: Prompter, model: str, rgb: np.ndarray, *, prompt: Prompt2D | None, params: AutomaskParams | None,
          where: Callable[[str], str], automask_where: Callable[[str], str] | None = None) -> None:
    """Everything a 2D request can get wrong, before inference: a prompt's geometry against the image and the
    model's capabilities (points), or automask options the model cannot honour."""
    engine = prompter.image_engine(model)
    if params is not None:
        check_automask(params, engine=engine, where=automask_where or where)
    elif prompt is not None:
        check_prompt(prompt, width=rgb.shape[1], height=rgb.shape[0], engine=engine, where=where,
                     models_with_points=prompter.models_with_points())


def infer(prompter: Prompter, model: str, rgb: np.ndarray, *, prompt: Prompt2D | None, params: AutomaskParams | None,
          budget: Budget, automask_where: Callable[[str], str]) -> Result2D:
    """One checked 2D request's masks: automask with `params`, else the prompt's masks."""
    if params is not None:  # automask checks the budget itself, per batch of grid prompts
        return automask(prompter, model, rgb, params, where=automask_where, budget=budget)
    if prompt is None:
        raise ValueError("infer: give a prompt or automask params")
    budget.check(0, "prompts")  # a client gone before the model ran gets nothing computed
    return prompter.segment(model, rgb, prompt)


def run(prompter: Prompter, p: Prepared2D, budget: Budget) -> dict[str, Any]:
    item = p.item
    t0 = time.perf_counter()
    result = infer(prompter, p.model, p.rgb, prompt=p.prompt, params=_params(item), budget=budget,
                   automask_where=lambda col: f"{item.field('automask')}.{col}")
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
