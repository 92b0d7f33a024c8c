"""The 2D request contract (pydantic v2) of /score: columns in, validated items (plain values) out.

/score 2D route, chosen by the `image` column (one entry per item in every column, as the 3D route):
`{"input_data": {"image": [...], "bbox": [...], "point_coords": [...], ...}}`. Validation failures become
field-named messages (`input_data.point_coords[0][1]: ...`), as schemas.py does for the 3D route.

"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from medsam2_endpoint.base.errors import InvalidRequest
from medsam2_endpoint.contract.messages import validate_columns

Number = float
MAX_MASK_LOGIT = 1e4  # SAM's logits live within a few tens; anything far beyond is a mistake (and overflows float32)
MAX_SIMPLIFY_TOLERANCE = 1e4  # pixels; OpenCV refuses absurd epsilons
Point = Annotated[list[Number], Field(min_length=2, max_length=2)]
Box = Annotated[list[Number], Field(min_length=4, max_length=4)]
Window = Annotated[list[Number], Field(min_length=2, max_length=2)]
OutputType = Literal["single", "all", "largest", "smallest", "best_quality"]
OUTPUT_TYPES: tuple[str, ...] = OutputType.__args__  # type: ignore[attr-defined]
MaskFormat2D = Literal["rle", "polygons", "list"]


class AutomaskOptions(BaseModel):
    """SAM automatic-mask-generator parameters: samapi's names, defaults and sensible bounds."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    points_per_side: int = Field(default=32, ge=1, le=128)
    points_per_batch: int = Field(default=64, ge=1, le=1024)
    pred_iou_thresh: float = Field(default=0.88, ge=0.0, le=1.0)
    stability_score_thresh: float = Field(default=0.95, ge=0.0, le=1.0)
    stability_score_offset: float = Field(default=1.0, ge=0.0)
    box_nms_thresh: float = Field(default=0.7, ge=0.0, le=1.0)
    crop_n_layers: int = Field(default=0, ge=0, le=3)
    crop_nms_thresh: float = Field(default=0.7, ge=0.0, le=1.0)
    crop_overlap_ratio: float = Field(default=512 / 1500, ge=0.0, lt=1.0)
    crop_n_points_downscale_factor: int = Field(default=1, ge=1)
    min_mask_region_area: int = Field(default=0, ge=0)
    include_image_edge: bool = False



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
class ImagePrompt:
    """A prompt as the caller sent it (still plain lists): points (x, y) with labels 1/0, a box
    [x_min, y_min, x_max, y_max], low-resolution mask logits from an earlier answer, the output type."""

    points: list[list[float]] | None = None
    labels: list[int] | None = None
    box: list[float] | None = None
    mask_input: list[list[float]] | None = None
    output_type: str = "single"


@dataclass(frozen=True)
class ImageItem:
    """One validated 2D item, still undecoded (prompt geometry is checked once the image size is known)."""

    index: int
    image: str
    task: str
    prompt: ImagePrompt
    automask: AutomaskOptions | None
    multimask_output: bool
    dicom_window: tuple[float, float] | None
    model: str | None
    mask_format: str
    simplify_tolerance: float
    return_low_res: bool

    def field(self, column: str) -> str:
        return f"input_data.{column}[{self.index}]"


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
    request, count = validate_columns(body, ImageRequest, first="image", max_items=max_items, allowed=_allowed)
    cols = request.input_data

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
        if mask:
            if any(len(row) != len(mask[0]) for row in mask):
                raise InvalidRequest(f"input_data.mask_input[{i}]: rows have different lengths; expected a square 2D array of low-resolution logits")
            if not all(math.isfinite(v) and abs(v) <= MAX_MASK_LOGIT for row in mask for v in row):
                raise InvalidRequest(
                    f"input_data.mask_input[{i}]: expected a square 2D array of finite low-resolution logits within +-{MAX_MASK_LOGIT:g} "
                    "(send back an earlier answer's low_res_logits)"
                )
        prompt = ImagePrompt(points=points or None, labels=labels or None, box=box, mask_input=mask or None, output_type=output_type)
        items.append(ImageItem(
            index=i, image=cols.image[i], task=task, prompt=prompt,
            automask=(options or AutomaskOptions()) if task == "automask" else None,
            multimask_output=multimask,
            dicom_window=(float(window[0]), float(window[1])) if window is not None else None,
            model=cell("model", i), mask_format=cell("mask_format", i) or "rle",
            simplify_tolerance=float(cell("simplify_tolerance", i) or 0.0),
            return_low_res=bool(cell("return_low_res", i)),
        ))
    return items
