"""Orchestration of the 2D route of /score: request in, response out (service.py dispatches here on `image`).

Every item is validated (columns, decoding, prompt geometry against the image, model capabilities)
before any item runs, as in the 3D route. The 2D state of a Service (its `Prompter`: 2D adapters and
the embedding cache) is shared by /score and the samapi server (`prompter_for`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from medsam2_endpoint.io.encode import RawJSON, list_json, rle_counts
from medsam2_endpoint.base.errors import InvalidRequest
from medsam2_endpoint.io.fetch import fetch_bytes
from medsam2_endpoint.io.images import Picture, decode_base64, read_picture, to_rgb_u8
from medsam2_endpoint.io.polygons import mask_to_geometry
from medsam2_endpoint.pipeline.prompt2d import Mask2D, Prompter, Result2D, check_automask, check_prompt
from medsam2_endpoint.contract.score2d import ImageItem, parse_image_request

log = logging.getLogger("azmlinfsrv.medsam2")


def prompter_for(service: Any) -> Prompter:
    """The one Prompter of this Service (built with the Service, from MEDSAM2_EMBEDDING_CACHE_MB)."""
    return service.image2d


def load_picture(text: str, *, settings: Any, field: str) -> Picture:
    """An image column's value (base64 or an http(s) URL, fetched SSRF-safely) decoded to a Picture."""
    stripped = text.strip()
    if stripped[:8].lower() == "https://" or stripped[:7].lower() == "http://":
        data = fetch_bytes(stripped, settings.fetch, field=field)
    else:
        data = decode_base64(stripped, field=field, limits=settings.limits)
    return read_picture(data, field=field, limits=settings.limits)


def model_name(service: Any, requested: str | None, *, field: str) -> str:
    name = requested or service.default
    if name not in service.engines:
        raise InvalidRequest(f"{field}: unknown model {name!r}; available models: {', '.join(service.engines)}")
    return name


def encode_mask_2d(mask: np.ndarray, mask_format: str, simplify_tolerance: float = 0.0) -> object:
    """A bool (H, W) mask as RLE (column-major, as the 3D route), GeoJSON polygons, or nested lists."""
    if mask_format == "polygons":
        return mask_to_geometry(mask, simplify_tolerance=simplify_tolerance)
    if mask_format == "list":
        return RawJSON(list_json(mask[None])[1:-1])
    return {"counts": rle_counts(mask), "size": list(mask.shape), "order": "F"}


def mask_entry(m: Mask2D, mask_format: str, simplify_tolerance: float, *, low_res: bool) -> dict:
    entry: dict[str, Any] = {"index": m.index, "quality": round(m.quality, 6), "area": m.area, "bbox": m.bbox()}
    if m.stability is not None:
        entry["stability_score"] = round(m.stability, 6)
    if m.point is not None:
        entry["point_coords"] = [round(v, 3) for v in m.point]
    entry["mask"] = encode_mask_2d(m.mask, mask_format, simplify_tolerance)
    if low_res and m.low_res is not None:
        entry["low_res_logits"] = np.round(m.low_res.astype(np.float64), 4).tolist()
    return entry


@dataclass(frozen=True)
class Prepared2D:
    item: ImageItem
    picture: Picture
    rgb: np.ndarray
    model: str
    decode_ms: float


def _prepare(service: Any, prompter: Prompter, item: ImageItem) -> Prepared2D:
    started = time.perf_counter()
    name = model_name(service, item.model, field=item.field("model"))
    picture = load_picture(item.image, settings=service.settings, field=item.field("image"))
    rgb = to_rgb_u8(picture, item.dicom_window, field=item.field("dicom_window") if item.dicom_window else item.field("image"))
    if item.task == "automask":
        check_automask(item.automask, engine=prompter.image_engine(name), where=lambda col: f"{item.field('automask')}.{col}")
    else:
        check_prompt(
            item.prompt, width=picture.width, height=picture.height, engine=prompter.image_engine(name),
            where=item.field, models_with_points=prompter.models_with_points(),
        )
    return Prepared2D(item, picture, rgb, name, (time.perf_counter() - started) * 1000)


def _run(prompter: Prompter, p: Prepared2D) -> dict:
    item = p.item
    t0 = time.perf_counter()
    if item.task == "automask":
        result: Result2D = prompter.automask(p.model, p.rgb, item.automask, where=lambda col: f"{item.field('automask')}.{col}")
    else:
        result = prompter.segment(p.model, p.rgb, item.prompt)
    t1 = time.perf_counter()
    masks = [mask_entry(m, item.mask_format, item.simplify_tolerance, low_res=item.return_low_res) for m in result.masks]
    t2 = time.perf_counter()
    timing = {"decode": round(p.decode_ms, 1), "inference": round((t1 - t0) * 1000, 1), "encode": round((t2 - t1) * 1000, 1)}
    timing["total"] = round(sum(timing.values()), 1)
    info = result.model
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
            "multimask_output": item.multimask_output and prompter.image_engine(p.model).multimask_outputs,
            "mask_format": item.mask_format,
            "model": {"name": info.name, "family": info.family, "checkpoint": info.checkpoint, "sha256": info.sha256},
            "low_res_size": prompter.image_engine(p.model).low_res_size,
            "embedding_cached": result.embedding_cached,
            "timing_ms": timing,
        },
    }


def score_2d(service: Any, body: Any) -> list[dict]:
    """The 2D route of `Service.score`: one result per item, `{"masks": [...], "metadata": {...}}`."""
    items = parse_image_request(body, max_items=service.settings.limits.max_items)
    prompter = prompter_for(service)
    prepared = [_prepare(service, prompter, item) for item in items]
    return [_run(prompter, p) for p in prepared]
