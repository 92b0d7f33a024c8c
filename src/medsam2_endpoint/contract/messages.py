"""Validation failures -> one message that names each field and the fix, for every route's contract."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from medsam2_endpoint.base.errors import InvalidRequest

# What a list-shaped field must hold, for too-short/too-long errors.
EXPECTED = {
    "bbox": "4 numbers [x_min, y_min, x_max, y_max]",
    "point_coords": "2 numbers [x, y] per point",
    "dicom_window": "2 numbers [lower, upper]",
}
SHOWN = 5


def location(loc: Sequence[Any]) -> str:
    """('input_data', 'bbox', 0, 1) -> 'input_data.bbox[0][1]'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def describe(error: Mapping[str, Any], allowed: Callable[[tuple[Any, ...]], str]) -> str:
    loc = tuple(error["loc"])
    where = location(loc) or "body"
    kind = error["type"]
    if kind == "json_invalid":
        return f"{where}: not valid JSON; send a JSON object with Content-Type: application/json"
    if kind == "extra_forbidden":
        return f"{where}: unknown field; allowed fields are {allowed(loc)}"
    if kind == "missing":
        return f"{where}: required field is missing"
    names = [p for p in loc if isinstance(p, str)]
    if kind in ("too_short", "too_long") and names and names[-1] in EXPECTED:
        return f"{where}: expected {EXPECTED[names[-1]]}"
    return f"{where}: {error['msg']}"


def validation_message(errors: ValidationError | Sequence[dict[str, Any]],
                       allowed: Callable[[tuple[Any, ...]], str] = lambda loc: "") -> str:
    """The first few errors, each naming its field; `allowed(loc)` lists the fields valid where an unknown one was."""
    found = errors.errors(include_url=False) if isinstance(errors, ValidationError) else list(errors)
    shown = "; ".join(describe(e, allowed) for e in found[:SHOWN])
    return shown + (f" (and {len(found) - SHOWN} more)" if len(found) > SHOWN else "")


RequestT = TypeVar("RequestT", bound=BaseModel)


def validate_columns(body: Any, model: type[RequestT], *, first: str | tuple[str, ...], max_items: int,
                     allowed: Callable[[tuple[Any, ...]], str]) -> tuple[RequestT, int]:
    """A column-format body `{"input_data": {...}}` validated by `model`: (request, item count).

    Every column must have one entry per item; the first of `first` that the body gives sets the count (the
    3D route's items name their volume by nii_image or by volume_id, so either may be the one given)."""
    if not isinstance(body, dict):
        raise InvalidRequest('body: expected a JSON object {"input_data": {...}}')
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        raise InvalidRequest(validation_message(exc, allowed)) from None
    cols = dict(request)["input_data"]  # each route's model has its columns there
    candidates = (first,) if isinstance(first, str) else first
    first = next((name for name in candidates if getattr(cols, name) is not None), None) or ""
    if not first:
        raise InvalidRequest(f"input_data: give {' or '.join(candidates)} (one entry per item)")
    count = len(getattr(cols, first))
    if count > max_items:
        raise InvalidRequest(
            f"input_data.{first}: {count} items exceed the limit of {max_items} per request (MEDSAM2_MAX_ITEMS); split the request"
        )
    for name in type(cols).model_fields:
        column = getattr(cols, name)
        if column is not None and len(column) != count:
            raise InvalidRequest(
                f"input_data.{name}: has {len(column)} entries but {first} has {count}; give one entry per item in every column"
            )
    return request, count
