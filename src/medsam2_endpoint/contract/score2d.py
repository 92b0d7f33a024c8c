"""The 2D request contracts (pydantic v2): the /score 2D columns, and samapi's bodies for the QuPath extension.

/score 2D route, chosen by the `image` column (one entry per item in every column, as the 3D route):
`{"input_data": {"image": [...], "bbox": [...], "point_coords": [...], ...}}`. Validation failures become
field-named messages (`input_data.point_coords[0][1]: ...`), as schemas.py does for the 3D route.

samapi bodies keep samapi's field names and defaults (ksugar/samapi 0.7); unknown fields are ignored
there, as samapi does, because client versions differ (one sends `checkpointUrl`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StrictStr, ValidationError

from medsam2_endpoint.base.errors import InvalidRequest
from medsam2_endpoint.pipeline.prompt2d import OUTPUT_TYPES, AutomaskParams, Prompt2D

Number = float
MAX_MASK_LOGIT = 1e4  # SAM's logits live within a few tens; anything far beyond is a mistake (and overflows float32)
MAX_SIMPLIFY_TOLERANCE = 1e4  # pixels; OpenCV refuses absurd epsilons
Point = Annotated[list[Number], Field(min_length=2, max_length=2)]
Box = Annotated[list[Number], Field(min_length=4, max_length=4)]
Window = Annotated[list[Number], Field(min_length=2, max_length=2)]
OutputType = Literal["single", "all", "largest", "smallest", "best_quality"]
MaskFormat2D = Literal["rle", "polygons", "list"]
SamType = Literal["vit_h", "vit_l", "vit_b", "vit_t", "sam2_l", "sam2_bp", "sam2_s", "sam2_t"]


class AutomaskOptions(BaseModel):
    """SAM automatic-mask-generator parameters: samapi's names, defaults and sensible bounds."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    points_per_side: int = Field(32, ge=1, le=128)
    points_per_batch: int = Field(64, ge=1, le=1024)
    pred_iou_thresh: float = Field(0.88, ge=0.0, le=1.0)
    stability_score_thresh: float = Field(0.95, ge=0.0, le=1.0)
    stability_score_offset: float = Field(1.0, ge=0.0)
    box_nms_thresh: float = Field(0.7, ge=0.0, le=1.0)
    crop_n_layers: int = Field(0, ge=0, le=3)
    crop_nms_thresh: float = Field(0.7, ge=0.0, le=1.0)
    crop_overlap_ratio: float = Field(512 / 1500, ge=0.0, lt=1.0)
    crop_n_points_downscale_factor: int = Field(1, ge=1)
    min_mask_region_area: int = Field(0, ge=0)
    include_image_edge: bool = False

    def params(self, output_type: str) -> AutomaskParams:
        return AutomaskParams(**self.model_dump(include=set(AutomaskOptions.model_fields)), output_type=output_type)


class ImageColumns(BaseModel):
    """Columns of the 2D route; optional columns may be omitted or hold null entries."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    image: list[StrictStr] = Field(min_length=1, description="base64 of a PNG/JPEG/TIFF/2D NIfTI file, or an https URL")
    task: list[Literal["prompt", "automask"] | None] | None = None
    point_coords: list[list[Point] | None] | None = None
    point_labels: list[list[Annotated[int, Field(ge=-(2**31), le=2**31)]] | None] | None = None  # bounded: np.int64 later
    bbox: list[Box | None] | None = None
    mask_input: list[list[list[Number]] | None] | None = None
    multimask_output: list[bool | None] | None = None
    output_type: list[OutputType | None] | None = None
    mask_format: list[MaskFormat2D | None] | None = None
    simplify_tolerance: list[Annotated[float, Field(ge=0.0, le=MAX_SIMPLIFY_TOLERANCE)] | None] | None = None
    return_low_res: list[bool | None] | None = None
    dicom_window: list[Window | None] | None = None
    model: list[StrictStr | None] | None = None
    automask: list[AutomaskOptions | None] | None = None


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_data: ImageColumns


@dataclass(frozen=True)
class ImageItem:
    """One validated 2D item, still undecoded (prompt geometry is checked once the image size is known)."""

    index: int
    image: str
    task: str
    prompt: Prompt2D
    automask: AutomaskParams | None
    multimask_output: bool
    dicom_window: tuple[float, float] | None
    model: str | None
    mask_format: str
    simplify_tolerance: float
    return_low_res: bool

    def field(self, column: str) -> str:
        return f"input_data.{column}[{self.index}]"


def location(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _message(error: dict[str, Any], allowed: Callable[[tuple[Any, ...]], str]) -> str:
    where = location(tuple(error["loc"])) or "body"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{where}: unknown field; allowed fields are {allowed(tuple(error['loc']))}"
    if kind == "missing":
        return f"{where}: required field is missing"
    loc = [p for p in error["loc"] if isinstance(p, str)]
    if kind in ("too_short", "too_long") and loc and loc[-1] in ("bbox", "point_coords", "dicom_window"):
        needed = {"bbox": "4 numbers [x_min, y_min, x_max, y_max]", "point_coords": "2 numbers [x, y] per point",
                  "dicom_window": "2 numbers [lower, upper]"}[loc[-1]]
        return f"{where}: expected {needed}"
    return f"{where}: {error['msg']}"


def validation_message(exc: ValidationError, allowed: Callable[[tuple[Any, ...]], str] = lambda loc: "") -> str:
    errors = exc.errors(include_url=False)
    shown = "; ".join(_message(e, allowed) for e in errors[:5])
    return shown + (f" (and {len(errors) - 5} more)" if len(errors) > 5 else "")


def _allowed(loc: tuple[Any, ...]) -> str:
    """The fields allowed where an unknown field was found."""
    if "automask" in loc:
        return ", ".join(AutomaskOptions.model_fields)
    return ", ".join(ImageColumns.model_fields) if len(loc) == 2 else "input_data"


def _output_type(i: int, output_type: str | None, multimask: bool | None) -> tuple[str, bool]:
    """The output type and the multimask flag it implies; a contradiction is the caller's mistake."""
    if output_type is None:
        return ("all", True) if multimask else ("single", False)
    implied = output_type != "single"
    if multimask is not None and multimask != implied:
        raise InvalidRequest(
            f"input_data.multimask_output[{i}]: {str(multimask).lower()} contradicts output_type {output_type!r} "
            f"(single needs false; all, largest, smallest and best_quality need true); omit one of them"
        )
    return output_type, implied


def parse_image_request(body: Any, *, max_items: int) -> list[ImageItem]:
    """Validate the whole 2D request (every item's columns) before anything is decoded or run."""
    if not isinstance(body, dict):
        raise InvalidRequest('body: expected a JSON object {"input_data": {...}}')
    try:
        request = ImageRequest.model_validate(body)
    except ValidationError as exc:
        raise InvalidRequest(validation_message(exc, _allowed)) from None
    cols = request.input_data
    count = len(cols.image)
    if count > max_items:
        raise InvalidRequest(f"input_data.image: {count} items exceed the limit of {max_items} per request (MEDSAM2_MAX_ITEMS); split the request")
    for name in ImageColumns.model_fields:
        column = getattr(cols, name)
        if column is not None and len(column) != count:
            raise InvalidRequest(f"input_data.{name}: has {len(column)} entries but image has {count}; give one entry per item in every column")

    def cell(name: str, i: int) -> Any:
        column = getattr(cols, name)
        return None if column is None else column[i]

    items = []
    for i in range(count):
        task = cell("task", i) or "prompt"
        output_type, multimask = _output_type(i, cell("output_type", i), cell("multimask_output", i))
        window = cell("dicom_window", i)
        if window is not None and not window[0] < window[1]:
            raise InvalidRequest(f"input_data.dicom_window[{i}]: lower bound {window[0]} must be below upper bound {window[1]}")
        points, labels, box, mask = cell("point_coords", i), cell("point_labels", i), cell("bbox", i), cell("mask_input", i)
        options = cell("automask", i)
        if task == "automask":
            given = [n for n, v in (("point_coords", points), ("point_labels", labels), ("bbox", box), ("mask_input", mask)) if v]
            if given:
                raise InvalidRequest(f"input_data.{given[0]}[{i}]: not used with task automask (it prompts a grid itself); omit it")
        elif options is not None:
            raise InvalidRequest(f'input_data.automask[{i}]: automask options need task "automask"')
        mask_array = None
        if mask:
            if any(len(row) != len(mask[0]) for row in mask):
                raise InvalidRequest(f"input_data.mask_input[{i}]: rows have different lengths; expected a square 2D array of low-resolution logits")
            mask_array = np.asarray(mask, dtype=np.float64)
            if mask_array.ndim != 2 or not np.isfinite(mask_array).all() or np.abs(mask_array).max() > MAX_MASK_LOGIT:
                raise InvalidRequest(
                    f"input_data.mask_input[{i}]: expected a square 2D array of finite low-resolution logits within +-{MAX_MASK_LOGIT:g} "
                    "(send back an earlier answer's low_res_logits)"
                )
            mask_array = mask_array.astype(np.float32)
        prompt = Prompt2D(
            points=np.asarray(points, dtype=np.float64) if points else None,
            labels=np.asarray(labels, dtype=np.int64) if labels else None,
            box=np.asarray(box, dtype=np.float64) if box is not None else None,
            mask_input=mask_array,
            output_type=output_type,
        )
        items.append(ImageItem(
            index=i, image=cols.image[i], task=task, prompt=prompt,
            automask=(options or AutomaskOptions()).params(output_type) if task == "automask" else None,
            multimask_output=multimask,
            dicom_window=(float(window[0]), float(window[1])) if window is not None else None,
            model=cell("model", i), mask_format=cell("mask_format", i) or "rle",
            simplify_tolerance=float(cell("simplify_tolerance", i) or 0.0),
            return_low_res=bool(cell("return_low_res", i)),
        ))
    return items


# ------------------------------------------------------------------------------------------ samapi bodies


class SamapiBody(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)


class SamPromptBody(SamapiBody):
    """POST /sam/: one prompt object on the field-of-view PNG. Coordinates are that PNG's pixels."""

    type: SamType | None = None  # samapi's default vit_h is never served here; None means the server's default model
    bbox: Box | None = None
    point_coords: list[Point] | None = None
    point_labels: list[Annotated[int, Field(ge=-(2**31), le=2**31)]] | None = None
    b64img: StrictStr
    b64mask: StrictStr | None = None
    multimask_output: bool = False
    checkpoint_url: StrictStr | None = None


class SamAutomaskBody(AutomaskOptions, SamapiBody):
    """POST /sam/automask/: samapi's SAMAutoMaskBody, same names and defaults (the generator's from AutomaskOptions)."""

    model_config = SamapiBody.model_config  # samapi's leniency (unknown fields ignored), not the /score route's

    type: SamType | None = None
    b64img: StrictStr
    output_type: StrictStr = "Single Mask"
    checkpoint_url: StrictStr | None = None


class SamVideoObject(SamapiBody):
    obj_id: int
    point_coords: list[Point] | None = None
    point_labels: list[Annotated[int, Field(ge=-(2**31), le=2**31)]] | None = None
    bbox: Box | None = None


class SamVideoBody(SamapiBody):
    """POST /sam/video/: frames (uploaded under `dirname`, or inline `b64imgs`) and prompts per frame index."""

    type: SamType | None = None
    dirname: StrictStr | None = None
    b64imgs: list[StrictStr] | None = None
    axes: Literal["XYT", "XYZ"] = "XYT"
    plane_position: int = 0
    start_frame_idx: int | None = Field(None, ge=0)
    max_frame_num_to_track: int | None = Field(None, ge=0)
    objs: dict[int, list[SamVideoObject]] = Field(default_factory=dict)
    checkpoint_url: StrictStr | None = Field(None, validation_alias=AliasChoices("checkpoint_url", "checkpointUrl"))


class SamWeightsBody(SamapiBody):
    """POST /sam/weights/: register a checkpoint from a URL under a name."""

    type: SamType
    name: StrictStr = Field(min_length=1, max_length=100)
    url: StrictStr = Field(min_length=1, max_length=4096)


SAMAPI_OUTPUT_TYPES = {
    "single mask": "single", "multi-mask": "all", "multi-mask (all)": "all", "multi-mask (largest)": "largest",
    "multi-mask (smallest)": "smallest", "multi-mask (best quality)": "best_quality",
}


def samapi_output_type(text: str) -> str:
    """samapi's output_type strings ("Single mask", "Multi-mask (largest)", ...) -> OUTPUT_TYPES (also accepted as is)."""
    value = " ".join(text.strip().lower().split())
    if value in OUTPUT_TYPES:
        return value
    if value in SAMAPI_OUTPUT_TYPES:
        return SAMAPI_OUTPUT_TYPES[value]
    choices = ", ".join(repr(k.capitalize()) for k in SAMAPI_OUTPUT_TYPES)
    raise InvalidRequest(f"output_type: {text!r} is not an output type; use one of {choices}")
