"""An object's prompts checked against the volume and turned into the engines' typed prompts.

Every error a prompt can cause is raised here, before inference, naming the field: slices outside the
volume, boxes and points outside the slice, points (or a RECIST point mode) for a box-only model,
a RECIST mark too short to make a box.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from medsam2_endpoint.base.errors import InvalidRequest
from medsam2_endpoint.contract.score3d import ObjectSpec, PromptSpec
from medsam2_endpoint.engines.base import SlicePrompt
from medsam2_endpoint.pipeline.recist import POINT_MODES, derive
from medsam2_endpoint.pipeline.window import parse_box


@dataclass(frozen=True)
class PreparedObject:
    id: int
    key_index: int  # inside the volume (key_slice_idx - slice_offset); the first prompt's slice
    box: np.ndarray | None  # int64 [x_min, y_min, x_max, y_max]: the plain form's (or the first prompt's) box
    prompts: tuple[SlicePrompt, ...] = ()  # every prompt in volume indices, RECIST marks already derived
    plain: bool = True  # one box on one slice and no earlier mask: the single-box route (the reference's path)
    mask_prompt: bool = False  # MedSAM2 from a RECIST mark: the key slice's mask is re-added as a mask prompt
    prompts_used: tuple[dict[str, Any], ...] = ()  # for metadata: each prompt as used (derived RECIST prompts too)


def _slice_index(prompt: PromptSpec, offset: int, depth: int) -> int:
    z = prompt.slice - offset
    if not 0 <= z < depth:
        raise InvalidRequest(
            f"{prompt.slice_field}: slice {prompt.slice} minus slice_offset {offset} is {z}, "
            f"outside the volume's {depth} slices (0..{depth - 1})"
        )
    return z


def _points(points: list[list[float]], *, width: int, height: int, field: str) -> np.ndarray:
    array = np.asarray(points, dtype=np.float64)
    for k, (x, y) in enumerate(array):
        if not (0 <= x < width and 0 <= y < height):
            raise InvalidRequest(f"{field}[{k}]: point [{x:g}, {y:g}] is outside the slice ({width} x {height}); x is the column")
    return array


def prepare_object(spec: ObjectSpec, offset: int, shape: tuple[int, ...], model: str, *, accepts_points: bool,
                   corrects: bool = False) -> PreparedObject:
    """`spec`'s prompts in volume indices. accepts_points: the model takes points (MedSAM2). corrects: an
    earlier mask is given, so even a single box goes through the interactive path (untouched slices kept)."""
    depth, height, width = (int(v) for v in shape)
    typed: list[SlicePrompt] = []
    used: list[dict[str, Any]] = []
    boxes_per_slice: dict[int, str] = {}
    recist_used = False
    for prompt in spec.prompts:
        z = _slice_index(prompt, offset, depth)
        box = points = labels = None
        origin = "request"
        if prompt.box is not None:
            box = parse_box(prompt.box, width=width, height=height, field=prompt.field if prompt.points is None else f"{prompt.where}.box")
        if prompt.points is not None and prompt.labels is not None:
            if not accepts_points:
                raise InvalidRequest(f"{prompt.where}.points: {model} takes boxes only; send a box on slice {prompt.slice}, "
                                     "or use a MedSAM2 model for point prompts")
            points = _points(prompt.points, width=width, height=height, field=f"{prompt.where}.points")
            labels = np.asarray(prompt.labels, dtype=np.int64)
        if prompt.recist is not None:
            mode = spec.recist_mode or ("points" if accepts_points else "box")
            if mode in POINT_MODES and not accepts_points:
                raise InvalidRequest(f"{prompt.where}.recist_mode: {mode!r} gives point prompts and {model} takes boxes only; "
                                     "use recist_mode 'box', or a MedSAM2 model")
            _points(prompt.recist + (prompt.recist_short or []), width=width, height=height, field=prompt.field)
            (x1, y1), (x2, y2) = prompt.recist
            if np.hypot(x2 - x1, y2 - y1) < 1:
                raise InvalidRequest(f"{prompt.field}: the long axis [[{x1:g}, {y1:g}], [{x2:g}, {y2:g}]] is shorter than a pixel; "
                                     "give the lesion's two long-axis endpoints")
            derived = derive(prompt.recist, prompt.recist_short, mode, width=width, height=height)
            if derived.box is not None:
                box = parse_box([float(v) for v in derived.box], width=width, height=height, field=prompt.field)
            else:
                points = derived.points
                labels = np.ones(len(derived.points if derived.points is not None else []), dtype=np.int64)
            origin, recist_used = "recist", True
        if box is not None:
            if z in boxes_per_slice:
                raise InvalidRequest(f"{prompt.field}: a second box on slice {prompt.slice} (first in {boxes_per_slice[z]}); "
                                     "give one box per slice and object")
            boxes_per_slice[z] = prompt.field
        typed.append(SlicePrompt(z, box, points, labels))
        used.append({"slice": prompt.slice, "adjusted_slice": z, "box": None if box is None else box.tolist(),
                     "points": None if points is None else points.tolist(),
                     "labels": None if labels is None else labels.tolist(), "from": origin,
                     **({"recist_mode": spec.recist_mode or ("points" if accepts_points else "box")} if origin == "recist" else {})})
    prompted = {p.z for p in typed}
    plain = spec.plain_box and not corrects
    first = typed[0]
    return PreparedObject(
        spec.id, first.z, first.box, tuple(typed), plain=plain,
        mask_prompt=recist_used and accepts_points and len(prompted) == 1,
        prompts_used=tuple(used),
    )
