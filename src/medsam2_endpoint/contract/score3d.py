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
Point = Annotated[list[Coordinate], Field(min_length=2, max_length=2)]
Line = Annotated[list[Point], Field(min_length=2, max_length=2)]
# How a RECIST mark becomes a prompt (REFERENCE.md E, MedSAM2's CT-lesion inference): "box" the square around
# the long axis; "points" 5 points along it, "center" its midpoint, "three" midpoint and endpoints, "box_points"
# a 3 x 3 grid in the box (all positive). Default: "box" on LiteMedSAM, "points" on MedSAM2 (the script's default).
RecistMode = Literal["box", "points", "center", "three", "box_points"]
DEFAULT_STOP_AFTER_EMPTY = 2
MAX_PROMPTS_PER_OBJECT = 64
MAX_POINTS_PER_PROMPT = 64


class SlicePromptBody(BaseModel):
    """One prompt on one slice of an object: a box, points with labels, or a RECIST mark (a box or points may be combined)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    slice: int = Field(description="slice index in the full series, as key_slice_idx (the volume's index is slice - slice_offset)")
    box: Box | None = Field(default=None, description="[x_min, y_min, x_max, y_max] on this slice")
    points: Annotated[list[Point], Field(min_length=1, max_length=MAX_POINTS_PER_PROMPT)] | None = Field(
        default=None, description="[[x, y], ...] on this slice (MedSAM2 only)")
    labels: Annotated[list[Literal[0, 1]], Field(min_length=1, max_length=MAX_POINTS_PER_PROMPT)] | None = Field(
        default=None, description="1 = inside (positive), 0 = outside (negative), one per point")
    recist: Line | None = Field(default=None, description="RECIST long axis [[x1, y1], [x2, y2]] on this slice")
    recist_short: Line | None = Field(default=None, description="optional RECIST short axis [[x1, y1], [x2, y2]]")


class ObjectBody(BaseModel):
    """One object of an item: a box on a key slice, a RECIST mark on a key slice, or prompts on several slices."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    id: int = Field(ge=1, le=65535, description="label value of this object in the output mask")
    bbox: Box | None = None
    key_slice_idx: int | None = None
    recist: Line | None = Field(default=None, description="RECIST long axis [[x1, y1], [x2, y2]] on key_slice_idx, instead of bbox")
    recist_short: Line | None = Field(default=None, description="optional RECIST short axis on key_slice_idx")
    recist_mode: RecistMode | None = Field(default=None, description="how a RECIST mark becomes a prompt (box default on LiteMedSAM, points on MedSAM2)")
    prompts: Annotated[list[SlicePromptBody], Field(min_length=1, max_length=MAX_PROMPTS_PER_OBJECT)] | None = Field(
        default=None, description="prompts on one or several slices (instead of bbox/recist + key_slice_idx)")


class VolumeColumns(BaseModel):
    """Columns of the 3D route; optional columns may be omitted or hold null entries. Each item names its volume
    by nii_image or by volume_id, so one of those two columns must be given."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra={
        "anyOf": [{"required": ["nii_image"]}, {"required": ["volume_id"]}]})

    nii_image: list[StrictStr | None] | None = Field(
        default=None, min_length=1,
        description="base64 of a .nii/.nii.gz file, or an https URL; null (or the column omitted) with a volume_id the worker holds")
    bbox: list[Box | None] | None = Field(default=None, description="[x_min, y_min, x_max, y_max] on the key slice, original pixel indices")
    key_slice_idx: list[int | None] | None = Field(default=None, description="key slice index in the full series")
    objects: list[list[ObjectBody] | None] | None = Field(default=None, description="several objects per item (instead of bbox/key_slice_idx)")
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
    volume_id: list[StrictStr | None] | None = Field(
        default=None, min_length=1, description="metadata.volume_id of an earlier answer: the worker's held copy is used instead of nii_image")
    previous_mask: list[dict[str, Any] | StrictStr | None] | None = Field(
        default=None, description="the earlier answer's mask (its rle object or nifti base64): slices the new prompts do not reach keep it")


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_data: VolumeColumns


@dataclass(frozen=True)
class PromptSpec:
    """One validated slice prompt, still in request coordinates; `field` names it in errors."""

    slice: int
    box: list[float] | None
    points: list[list[float]] | None
    labels: list[int] | None
    recist: list[list[float]] | None
    recist_short: list[list[float]] | None
    field: str  # the prompt's main field (its box, points or recist) for error messages
    slice_field: str
    where: str = ""  # the prompt (or plain object) itself: "<where>.points", "<where>.labels"


@dataclass(frozen=True)
class ObjectSpec:
    id: int
    bbox: list[float] | None  # the plain form's box (None for RECIST or several prompts)
    key_slice_idx: int  # the first prompt's slice
    bbox_field: str  # where each came from, for error messages: "input_data.bbox[0]" or "input_data.objects[0][1].bbox"
    key_field: str
    prompts: tuple[PromptSpec, ...] = ()  # every prompt of the object (the plain form: one box)
    recist_mode: RecistMode | None = None

    @property
    def plain_box(self) -> bool:
        """One box on one slice: the route as it was before corrections (the reference's path)."""
        return len(self.prompts) == 1 and self.prompts[0].box is not None and self.prompts[0].points is None \
            and self.prompts[0].recist is None


@dataclass(frozen=True)
class VolumeItem:
    """One validated 3D item, still undecoded. `objects` has one entry (id 1) for a plain bbox item."""

    index: int
    image: str | None  # None: use the held volume `volume_id`
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
    volume_id: str | None = None
    previous_mask: dict[str, Any] | str | None = None

    def field(self, column: str) -> str:
        return f"input_data.{column}[{self.index}]"


def _allowed(loc: tuple[Any, ...]) -> str:
    parent = (SlicePromptBody if "prompts" in loc else ObjectBody) if "objects" in loc else VolumeColumns if len(loc) == 2 else ScoreRequest
    return ", ".join(parent.model_fields)


def parse_request(body: Any, *, max_items: int) -> list[VolumeItem]:
    """Validate the whole request (every item) before anything runs."""
    request, count = validate_columns(body, ScoreRequest, first=("nii_image", "volume_id"), max_items=max_items, allowed=_allowed)
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
        image, volume_id = _entry(cols.nii_image, i), _entry(cols.volume_id, i)
        if image is None and volume_id is None:
            raise InvalidRequest(f"input_data.nii_image[{i}]: required (or give input_data.volume_id[{i}] from an earlier answer)")
        items.append(
            VolumeItem(
                index=i,
                image=image,
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
                volume_id=volume_id,
                previous_mask=_entry(cols.previous_mask, i),
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
        return tuple(_object_spec(o, f"input_data.objects[{i}][{j}]") for j, o in enumerate(objects))
    if bbox is None or key is None:
        missing = "bbox" if bbox is None else "key_slice_idx"
        raise InvalidRequest(f"input_data.{missing}[{i}]: required (or give input_data.objects[{i}] with several objects)")
    box = PromptSpec(key, list(bbox), None, None, None, None, f"input_data.bbox[{i}]", f"input_data.key_slice_idx[{i}]")
    return (ObjectSpec(1, list(bbox), key, f"input_data.bbox[{i}]", f"input_data.key_slice_idx[{i}]", (box,)),)


def _line(line: list[list[float]] | None) -> list[list[float]] | None:
    return None if line is None else [list(p) for p in line]


def _object_spec(o: ObjectBody, where: str) -> ObjectSpec:
    """One object in its three forms: bbox + key_slice_idx, recist + key_slice_idx, or prompts."""
    if o.prompts is not None:
        extra = [name for name in ("bbox", "key_slice_idx", "recist", "recist_short") if getattr(o, name) is not None]
        if extra:
            raise InvalidRequest(f"{where}: give prompts, or {extra[0]} with key_slice_idx, not both; put the {extra[0]} in a prompt")
        prompts = tuple(_prompt_spec(p, f"{where}.prompts[{k}]") for k, p in enumerate(o.prompts))
        return ObjectSpec(o.id, None, prompts[0].slice, prompts[0].field, prompts[0].slice_field, prompts, o.recist_mode)
    if o.key_slice_idx is None:
        raise InvalidRequest(f"{where}.key_slice_idx: required with bbox or recist (or give prompts: [{{slice, box}}, ...])")
    if (o.bbox is None) == (o.recist is None):
        raise InvalidRequest(f"{where}: give one of bbox [x_min, y_min, x_max, y_max] or recist [[x1, y1], [x2, y2]] (or prompts)")
    if o.recist_short is not None and o.recist is None:
        raise InvalidRequest(f"{where}.recist_short: needs recist (the long axis) as well")
    field = f"{where}.bbox" if o.bbox is not None else f"{where}.recist"
    prompt = PromptSpec(o.key_slice_idx, list(o.bbox) if o.bbox is not None else None, None, None, _line(o.recist),
                        _line(o.recist_short), field, f"{where}.key_slice_idx", where)
    return ObjectSpec(o.id, prompt.box, o.key_slice_idx, field, f"{where}.key_slice_idx", (prompt,), o.recist_mode)


def _prompt_spec(p: SlicePromptBody, where: str) -> PromptSpec:
    if p.box is None and p.points is None and p.recist is None:
        raise InvalidRequest(f"{where}: give a box, points with labels, or a recist mark on slice {p.slice}")
    if (p.points is None) != (p.labels is None):
        raise InvalidRequest(f"{where}: points and labels go together (one label per point: 1 inside, 0 outside)")
    if p.points is not None and p.labels is not None and len(p.points) != len(p.labels):
        raise InvalidRequest(f"{where}.labels: {len(p.labels)} labels for {len(p.points)} points; give one label per point")
    if p.recist is not None and (p.box is not None or p.points is not None):
        raise InvalidRequest(f"{where}: a recist mark stands alone; put the box or points in another prompt")
    if p.recist_short is not None and p.recist is None:
        raise InvalidRequest(f"{where}.recist_short: needs recist (the long axis) as well")
    field = f"{where}.box" if p.box is not None else f"{where}.points" if p.points is not None else f"{where}.recist"
    return PromptSpec(p.slice, list(p.box) if p.box is not None else None, _line(p.points),
                      list(p.labels) if p.labels is not None else None, _line(p.recist), _line(p.recist_short),
                      field, f"{where}.slice", where)
