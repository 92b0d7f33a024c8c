"""samapi's request bodies (ksugar/samapi 0.7), as the QuPath SAM extension sends them.

Field names and defaults are samapi's; unknown fields are ignored, as samapi does, because client
versions differ (one sends `checkpointUrl`, the video body a stray `builderAsGroovyScript`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StrictStr

from medsam2_endpoint.base.errors import InvalidRequest
from medsam2_endpoint.contract.score2d import OUTPUT_TYPES, AutomaskOptions, Box, Point

# samapi 0.7.1's types; `sam3` (text prompts, SAM 3) is a known type this server never serves: asking for
# it is answered like any other unserved type (404 naming the served ones), not as a malformed body.
SamType = Literal["vit_h", "vit_l", "vit_b", "vit_t", "sam2_l", "sam2_bp", "sam2_s", "sam2_t", "sam3"]
SAM_TYPES: tuple[str, ...] = SamType.__args__  # type: ignore[attr-defined]
#: The samapi protocol version this server speaks (ksugar/samapi 0.7.1, as qupath-extension-sam v0.9.1 expects).
SAMAPI_PROTOCOL_VERSION = "0.7.1"


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


@dataclass(frozen=True)
class VideoPrompt:
    """One object on one frame of a video body (plain values); `where` names its fields in errors."""

    obj_id: int
    frame: int  # index into the frames as sent (before start_frame_idx is applied)
    box: list[float] | None
    points: list[list[float]] | None
    labels: list[int] | None
    where: str


def video_prompts(body: SamVideoBody) -> list[VideoPrompt]:
    """The body's `objs` as prompts, frames in order."""
    prompts = [
        VideoPrompt(obj.obj_id, frame, obj.bbox, obj.point_coords, obj.point_labels, f"objs.{frame}[{j}]")
        for frame, objects in sorted(body.objs.items())
        for j, obj in enumerate(objects)
    ]
    if not prompts:
        raise InvalidRequest("objs: no prompts; give at least one object on one frame")
    return prompts
