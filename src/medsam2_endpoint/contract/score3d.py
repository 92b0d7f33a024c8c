"""The request contract (pydantic v2) and the conversion of validation failures into field-named messages.

3D route, the seed endpoint's column format: `{"input_data": {"nii_image": [...], "bbox": [...], ...}}`,
one entry per item in every column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from medsam2_endpoint.base.errors import InvalidRequest
from medsam2_endpoint.contract.messages import validate_columns

# Pixel coordinates beyond +-1e9 cannot fall inside any slice; bounding them keeps int64 conversion safe.
Coordinate = Annotated[float, Field(ge=-1e9, le=1e9)]
Box = Annotated[list[Coordinate], Field(min_length=4, max_length=4)]
Window = Annotated[list[float], Field(min_length=2, max_length=2)]
MaskFormat = Literal["list", "rle", "nifti"]
Direction = Literal["both", "up", "down"]
Modality = Literal["CT", "MR"]
DEFAULT_STOP_AFTER_EMPTY = 2


class ObjectPrompt(BaseModel):
    """One object of a multi-object item: its own box on its own key slice."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    id: int = Field(ge=1, le=65535, description="label value of this object in the output mask")
    bbox: Box
    key_slice_idx: int


class VolumeColumns(BaseModel):
    """Columns of the 3D route; optional columns may be omitted or hold null entries."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    nii_image: list[StrictStr] = Field(min_length=1, description="base64 of a .nii/.nii.gz file, or an https URL")
    bbox: list[Box | None] | None = Field(default=None, description="[x_min, y_min, x_max, y_max] on the key slice, original pixel indices")
    key_slice_idx: list[int | None] | None = Field(default=None, description="key slice index in the full series")
    objects: list[list[ObjectPrompt] | None] | None = Field(default=None, description="several objects per item (instead of bbox/key_slice_idx)")
    dicom_window: list[Window | None] | None = Field(default=None, description="[lower, upper] intensity window")
    modality: list[Modality | None] | None = Field(
        default=None, description="CT or MR; without a dicom_window, MR is windowed to the 0.5-99.5th percentiles of its nonzero voxels")
    slice_offset: list[int | None] | None = Field(default=None, description="index of the volume's first slice in the series")
    model: list[StrictStr | None] | None = Field(default=None, description="registry name of the model")
    mask_format: list[MaskFormat | None] | None = Field(default=None, description="list (default), rle or nifti")
    propagation: list[Direction | None] | None = Field(default=None, description="both (default), up (higher z) or down")
    stop_after_empty: list[Annotated[int, Field(ge=0)] | None] | None = Field(
        default=None, description=f"stop a direction after this many consecutive empty slices (default {DEFAULT_STOP_AFTER_EMPTY}; 0 = never)"
    )
    max_slices: list[Annotated[int, Field(ge=1)] | None] | None = Field(default=None, description="at most this many slices per direction")


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_data: VolumeColumns


@dataclass(frozen=True)
class ObjectSpec:
    id: int
    bbox: list[float]
    key_slice_idx: int
    bbox_field: str  # where each came from, for error messages: "input_data.bbox[0]" or "input_data.objects[0][1].bbox"
    key_field: str


@dataclass(frozen=True)
class VolumeItem:
    """One validated 3D item, still undecoded. `objects` has one entry (id 1) for a plain bbox item."""

    index: int
    image: str
    objects: tuple[ObjectSpec, ...]
    multi_object: bool
    dicom_window: tuple[float, float] | None
    modality: str | None
    slice_offset: int
    model: str | None
    mask_format: str
    propagation: Direction
    stop_after_empty: int | None
    max_slices: int | None

    def field(self, column: str) -> str:
        return f"input_data.{column}[{self.index}]"


def _allowed(loc: tuple[Any, ...]) -> str:
    parent = ObjectPrompt if "objects" in loc else VolumeColumns if len(loc) == 2 else ScoreRequest
    return ", ".join(parent.model_fields)


def parse_request(body: Any, *, max_items: int) -> list[VolumeItem]:
    """Validate the whole request (every item) before anything runs."""
    request, count = validate_columns(body, ScoreRequest, first="nii_image", max_items=max_items, allowed=_allowed)
    cols = request.input_data
    items = []
    for i in range(count):
        objects = _objects(cols, i)
        window = cols.dicom_window[i] if cols.dicom_window else None
        if window is not None and not window[0] < window[1]:
            raise InvalidRequest(
                f"input_data.dicom_window[{i}]: lower bound {window[0]} must be below upper bound {window[1]}"
            )
        given = cols.slice_offset[i] if cols.slice_offset else None
        offset = given if given is not None else 0
        if offset < 0:
            raise InvalidRequest(f"input_data.slice_offset[{i}]: must be 0 or more, got {offset}")
        stop = _entry(cols.stop_after_empty, i)
        items.append(
            VolumeItem(
                index=i,
                image=cols.nii_image[i],
                objects=objects,
                multi_object=_entry(cols.objects, i) is not None,
                dicom_window=(float(window[0]), float(window[1])) if window is not None else None,
                modality=_entry(cols.modality, i),
                slice_offset=offset,
                model=_entry(cols.model, i),
                mask_format=_entry(cols.mask_format, i) or "list",
                propagation=_entry(cols.propagation, i) or "both",
                stop_after_empty=DEFAULT_STOP_AFTER_EMPTY if stop is None else (stop or None),
                max_slices=_entry(cols.max_slices, i),
            )
        )
    return items


def _entry(column: list[Any] | None, i: int) -> Any:
    return column[i] if column is not None else None


def _objects(cols: VolumeColumns, i: int) -> tuple[ObjectSpec, ...]:
    """Either `objects[i]` or the pair `bbox[i]` + `key_slice_idx[i]`, never both."""
    bbox, key, objects = _entry(cols.bbox, i), _entry(cols.key_slice_idx, i), _entry(cols.objects, i)
    if objects is not None:
        if bbox is not None or key is not None:
            raise InvalidRequest(f"input_data.objects[{i}]: give either objects or bbox + key_slice_idx for an item, not both")
        if not objects:
            raise InvalidRequest(f"input_data.objects[{i}]: the list is empty; give at least one {{id, bbox, key_slice_idx}}")
        ids = [o.id for o in objects]
        if len(set(ids)) != len(ids):
            raise InvalidRequest(f"input_data.objects[{i}]: object ids must be unique, got {ids}")
        return tuple(
            ObjectSpec(o.id, list(o.bbox), o.key_slice_idx, f"input_data.objects[{i}][{j}].bbox", f"input_data.objects[{i}][{j}].key_slice_idx")
            for j, o in enumerate(objects)
        )
    if bbox is None or key is None:
        missing = "bbox" if bbox is None else "key_slice_idx"
        raise InvalidRequest(f"input_data.{missing}[{i}]: required (or give input_data.objects[{i}] with several objects)")
    return (ObjectSpec(1, list(bbox), key, f"input_data.bbox[{i}]", f"input_data.key_slice_idx[{i}]"),)
