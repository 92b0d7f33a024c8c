"""Validation failures -> one message that names each field and the fix, for every route's contract."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

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


def describe(error: dict[str, Any], allowed: Callable[[tuple[Any, ...]], str]) -> str:
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
