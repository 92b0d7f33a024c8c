"""The request contract (pydantic v2) and the conversion of validation failures into field-named messages.

3D route, the seed endpoint's column format: `{"input_data": {"nii_image": [...], "bbox": [...], ...}}`,
one entry per item in every column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from .errors import InvalidRequest

Box = Annotated[list[float], Field(min_length=4, max_length=4)]
Window = Annotated[list[float], Field(min_length=2, max_length=2)]
MaskFormat = Literal["list", "rle", "nifti"]


class VolumeColumns(BaseModel):
    """Columns of the 3D route; optional columns may be omitted or hold null entries."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    nii_image: list[StrictStr] = Field(min_length=1, description="base64 of a .nii/.nii.gz file, or an https URL")
    bbox: list[Box] = Field(description="[x_min, y_min, x_max, y_max] on the key slice, original pixel indices")
    key_slice_idx: list[int] = Field(description="key slice index in the full series")
    dicom_window: list[Window | None] | None = Field(default=None, description="[lower, upper] intensity window")
    slice_offset: list[int | None] | None = Field(default=None, description="index of the volume's first slice in the series")
    model: list[StrictStr | None] | None = Field(default=None, description="registry name of the model")
    mask_format: list[MaskFormat | None] | None = Field(default=None, description="list (default), rle or nifti")


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_data: VolumeColumns


@dataclass(frozen=True)
class VolumeItem:
    """One validated 3D item, still undecoded."""

    index: int
    image: str
    bbox: list[float]
    key_slice_idx: int
    dicom_window: tuple[float, float] | None
    slice_offset: int
    model: str | None
    mask_format: str

    def field(self, column: str) -> str:
        return f"input_data.{column}[{self.index}]"


def _location(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _message(error: dict[str, Any]) -> str:
    where = _location(tuple(error["loc"])) or "body"
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = VolumeColumns if len(error["loc"]) == 2 else ScoreRequest
        allowed = ", ".join(parent.model_fields)
        return f"{where}: unknown field; allowed fields are {allowed}"
    if kind == "missing":
        return f"{where}: required field is missing"
    if kind in ("too_short", "too_long") and ("bbox" in error["loc"] or "dicom_window" in error["loc"]):
        needed = "4 numbers [x_min, y_min, x_max, y_max]" if "bbox" in error["loc"] else "2 numbers [lower, upper]"
        return f"{where}: expected {needed}"
    return f"{where}: {error['msg']}"


def parse_request(body: Any, *, max_items: int) -> list[VolumeItem]:
    """Validate the whole request (every item) before anything runs."""
    if not isinstance(body, dict):
        raise InvalidRequest('body: expected a JSON object {"input_data": {...}}')
    try:
        request = ScoreRequest.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        shown = "; ".join(_message(e) for e in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise InvalidRequest(shown + more) from None
    cols = request.input_data
    count = len(cols.nii_image)
    if count > max_items:
        raise InvalidRequest(f"input_data.nii_image: {count} items exceed the limit of {max_items} per request (MEDSAM2_MAX_ITEMS); split the request")
    for name in VolumeColumns.model_fields:
        column = getattr(cols, name)
        if column is not None and len(column) != count:
            raise InvalidRequest(
                f"input_data.{name}: has {len(column)} entries but nii_image has {count}; give one entry per item in every column"
            )
    items = []
    for i in range(count):
        window = cols.dicom_window[i] if cols.dicom_window else None
        if window is not None and not window[0] < window[1]:
            raise InvalidRequest(
                f"input_data.dicom_window[{i}]: lower bound {window[0]} must be below upper bound {window[1]}"
            )
        offset = cols.slice_offset[i] if cols.slice_offset and cols.slice_offset[i] is not None else 0
        if offset < 0:
            raise InvalidRequest(f"input_data.slice_offset[{i}]: must be 0 or more, got {offset}")
        items.append(
            VolumeItem(
                index=i,
                image=cols.nii_image[i],
                bbox=list(cols.bbox[i]),
                key_slice_idx=cols.key_slice_idx[i],
                dicom_window=(float(window[0]), float(window[1])) if window is not None else None,
                slice_offset=offset,
                model=cols.model[i] if cols.model else None,
                mask_format=(cols.mask_format[i] if cols.mask_format else None) or "list",
            )
        )
    return items
