"""The 3D algorithm, independent of the engine: both directions from the key slice, OR, largest component."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from .engines.base import VolumeEngine
from .errors import DeadlineExceeded

Direction = Literal["both", "up", "down"]
FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class PropagationOptions:
    """direction: "up" = towards higher z, "down" = towards lower z.

    stop_after_empty: stop a direction after this many consecutive empty slices (None = never,
    which is the reference's behaviour). max_slices: at most this many slices per direction,
    the key slice included (None = to the volume's end).
    """

    direction: Direction = "both"
    stop_after_empty: int | None = None
    max_slices: int | None = None
    largest_component: bool = True


@dataclass
class ObjectResult:
    mask: np.ndarray  # uint8 (Z, Y, X), 1 = object
    slices_processed: int  # engine steps, both directions (the key slice counts once per direction)


def _walk(steps: Iterator[tuple[int, np.ndarray]], mask: np.ndarray, options: PropagationOptions, check_deadline: Callable[[int], None], done: int) -> int:
    """Consume one direction's steps into `mask` (OR), honouring the stop rules; returns the number of steps."""
    count = 0
    empty_run = 0
    try:
        for z, slice_mask in steps:
            mask[z] |= slice_mask
            count += 1
            empty_run = 0 if slice_mask.any() else empty_run + 1
            if options.stop_after_empty is not None and empty_run >= options.stop_after_empty:
                break
            if options.max_slices is not None and count >= options.max_slices:
                break
            check_deadline(done + count)
    finally:
        close = getattr(steps, "close", None)
        if close is not None:
            close()  # lets the engine reset its state when we stop early
    return count


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 26-connected component (uint8); an empty mask stays empty."""
    if not mask.any():
        return mask
    labels, count = ndimage.label(mask, structure=FULL_CONNECTIVITY)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return (labels == int(sizes.argmax())).astype(np.uint8)


def segment_object(
    engine: VolumeEngine,
    state: Any,
    *,
    key_index: int,
    box: np.ndarray,
    shape: tuple[int, int, int],
    options: PropagationOptions = PropagationOptions(),
    deadline: float | None = None,
) -> ObjectResult:
    """Propagate one box prompt through the volume. `deadline` is a time.monotonic() value."""
    mask = np.zeros(shape, dtype=np.uint8)
    processed = 0

    def check_deadline(done: int) -> None:
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded(
                f"the request's time budget ran out after {done} slices (slices_processed={done}); "
                "send a smaller volume, set max_slices, or raise MEDSAM2_REQUEST_DEADLINE_S"
            )

    bool_view = mask.view(bool)
    if options.direction in ("both", "up"):
        processed += _walk(engine.track(state, key_index=key_index, box=box, reverse=False), bool_view, options, check_deadline, processed)
    if options.direction in ("both", "down"):
        processed += _walk(engine.track(state, key_index=key_index, box=box, reverse=True), bool_view, options, check_deadline, processed)
    if options.largest_component:
        mask = keep_largest_component(mask)
    return ObjectResult(mask=mask, slices_processed=processed)
