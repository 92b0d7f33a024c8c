"""The 3D algorithm, independent of the engine: both directions from the key slice, OR, largest component.

Every stop rule of a walk is in the pipeline: `walk_from_box` hands a box model to pipeline/tracking.py's judged walk and
a tracking engine's steps through as they come; `_walk` below applies the caller's options (empty run, slice
count, budget) to either."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse import csgraph

from medsam2_endpoint.base.budget import Budget
from medsam2_endpoint.base.heap import release_if_grown
from medsam2_endpoint.engines.base import SliceEngine, TrackingEngine, VolumeEngine
from medsam2_endpoint.pipeline.tracking import walk_slices

Direction = Literal["both", "up", "down"]
FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)

ADVICE = "send a smaller volume, set max_slices, or raise MEDSAM2_REQUEST_DEADLINE_S"


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
    keep_logits: bool = True  # per-slice logits for `merge_objects`; a single object does not need them (1 MB a slice)


@dataclass
class ObjectResult:
    mask: np.ndarray  # uint8 (Z, Y, X), 1 = object
    slices_processed: int  # engine steps, both directions (the key slice counts once per direction)
    logits: dict[int, np.ndarray] = field(default_factory=dict)  # z -> float32 (Y, X) max logit, slices with foreground (keep_logits)


def walk_from_box(engine: VolumeEngine, state: Any, *, key_index: int, box: np.ndarray, reverse: bool) -> Iterator[tuple[int, np.ndarray]]:
    """One direction's steps from a box on the key slice: (z, float32 logits), the key slice first."""
    if isinstance(engine, SliceEngine):
        return walk_slices(engine, state, key_index=key_index, box=box, reverse=reverse)
    return cast(TrackingEngine, engine).track(state, key_index=key_index, box=box, reverse=reverse)


def as_logits(step: np.ndarray) -> np.ndarray:
    """Engines yield logits (mask = logits > 0); a bool mask is accepted as logits of +-1."""
    return np.where(step, np.float32(1.0), np.float32(-1.0)) if step.dtype == bool else step


def _walk(
    steps: Iterator[tuple[int, np.ndarray]],
    mask: np.ndarray,
    logits: dict[int, np.ndarray],
    options: PropagationOptions,
    check_deadline: Callable[[int], None],
    done: int,
) -> int:
    """Consume one direction's steps into `mask` (OR) and `logits` (max), honouring the stop rules."""
    count = 0
    empty_run = 0
    try:
        for z, step in steps:
            slice_logits = as_logits(step)
            foreground = slice_logits > 0
            mask[z] |= foreground
            count += 1
            has_object = bool(foreground.any())
            if has_object and options.keep_logits:
                logits[z] = np.maximum(logits[z], slice_logits) if z in logits else slice_logits
            empty_run = 0 if has_object else empty_run + 1
            release_if_grown()  # freed tensors glibc keeps instead of reusing (over 1 GB in 300 MedSAM2 slices)
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


LABEL_SLAB_VOXELS = 4 * 1024 * 1024  # int32 labels of at most this many voxels at once (16 MB)


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    return tuple(slice(int(idx[0]), int(idx[-1]) + 1) for idx in (np.flatnonzero(mask.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1))))


def _touching_pairs(below: np.ndarray, above: np.ndarray) -> np.ndarray:
    """Unique (label below, label above) pairs of foreground voxels that touch across two adjacent planes
    (26-connectivity: the voxel straight above and its 8 neighbours). Labels are positive int32."""
    height, width = below.shape
    base = np.int64(above.max()) + 1
    keys = []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            a = below[max(0, -dy) : height - max(0, dy), max(0, -dx) : width - max(0, dx)]
            b = above[max(0, dy) : height - max(0, -dy), max(0, dx) : width - max(0, -dx)]
            both = (a > 0) & (b > 0)
            keys.append(np.unique(a[both].astype(np.int64) * base + b[both]))  # one sortable number per pair
    unique = np.unique(np.concatenate(keys))
    return np.stack([unique // base, unique % base], axis=1)


def keep_largest_component(mask: np.ndarray, slab_voxels: int = LABEL_SLAB_VOXELS) -> np.ndarray:
    """Largest 26-connected component (uint8); an empty mask stays empty. Ties: the component met first in
    (z, y, x) order, as `ndimage.label` + argmax over the whole mask would choose.

    Labelled inside the mask's bounding box only: a small lesion in a whole CT costs a small crop. A crop
    larger than `slab_voxels` is labelled a slab of slices at a time (int32 labels of the whole crop would
    take 4 bytes a voxel: 300 MB for a 512 x 512 x 300 mask) and the slabs' components are joined where they
    touch; a second pass labels each slab again and keeps the winner's voxels.
    """
    if not mask.any():
        return mask
    crop = _bounding_box(mask)
    region = mask[crop]
    depth, height, width = region.shape
    step = max(1, slab_voxels // (height * width))
    if depth <= step:
        labels, count = ndimage.label(region, structure=FULL_CONNECTIVITY)
        if count <= 1:
            return mask
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        kept = np.zeros_like(mask)
        kept[crop] = labels == int(sizes.argmax())
        return kept
    # First pass: per-slab components, numbered globally in (z, y, x) order of their first voxel.
    sizes_per_slab, edges, offsets = [], [], []
    offset = 0
    previous_top = None
    for start in range(0, depth, step):
        labels, count = ndimage.label(region[start : start + step], structure=FULL_CONNECTIVITY)
        sizes_per_slab.append(np.bincount(labels.ravel(), minlength=count + 1)[1:])
        labels[labels > 0] += offset
        if previous_top is not None:
            edges.append(_touching_pairs(previous_top, labels[0]))
        previous_top = labels[-1].copy()
        offsets.append(offset)
        offset += count
        del labels  # before the next slab's labels exist
    sizes = np.concatenate(sizes_per_slab)
    pairs = np.concatenate(edges) - 1  # component numbers from 0
    graph = sparse.coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(offset, offset))
    count, root = csgraph.connected_components(graph, directed=False)
    if count <= 1:
        return mask
    totals = np.bincount(root, weights=sizes, minlength=count)
    _, first_member = np.unique(root, return_index=True)  # each joined component's first slab component
    winner = int(root[first_member[totals == totals.max()].min()])
    kept = np.zeros_like(mask)
    kept_region = kept[crop]
    # Second pass: the same labelling again, each slab's components mapped to whether they join the winner.
    for start, slab_offset in zip(range(0, depth, step), offsets, strict=True):
        labels, count = ndimage.label(region[start : start + step], structure=FULL_CONNECTIVITY)
        keep = np.concatenate([[False], root[slab_offset : slab_offset + count] == winner])
        kept_region[start : start + step] = keep[labels]
        del labels
    return kept


def segment_object(
    engine: VolumeEngine,
    state: Any,
    *,
    key_index: int,
    box: np.ndarray,
    shape: tuple[int, int, int],
    options: PropagationOptions = PropagationOptions(),
    budget: Budget | None = None,
    track: Callable[..., Iterator[tuple[int, np.ndarray]]] | None = None,
) -> ObjectResult:
    """Propagate one box prompt through the volume, checking `budget` before every slice.

    track: what yields each direction's steps, called as `walk_from_box` is without its engine (default: `walk_from_box`): a recording
    wrapper (pipeline/interactive.WalkMemo) lets a later correction round replay them."""
    mask = np.zeros(shape, dtype=np.uint8)
    processed = 0

    def check_deadline(done: int) -> None:
        if budget is not None:
            budget.check(done, "slices_processed", advice=ADVICE)

    bool_view = mask.view(bool)
    logits: dict[int, np.ndarray] = {}
    for direction, reverse in (("up", False), ("down", True)):
        if options.direction in ("both", direction):
            steps = (track(state, key_index=key_index, box=box, reverse=reverse) if track is not None
                     else walk_from_box(engine, state, key_index=key_index, box=box, reverse=reverse))
            processed += _walk(steps, bool_view, logits, options, check_deadline, processed)
    if options.largest_component:
        mask = keep_largest_component(mask)
    return ObjectResult(mask=mask, slices_processed=processed, logits=logits)


def merge_objects(results: list[tuple[int, ObjectResult]], shape: tuple[int, int, int]) -> np.ndarray:
    """Label map (value = object id; uint8, or uint16 for ids above 255); overlaps go to the highest logit."""
    dtype = np.uint8 if max(obj_id for obj_id, _ in results) <= 255 else np.uint16
    labels = np.zeros(shape, dtype=dtype)
    for z in range(shape[0]):
        present = [(obj_id, r) for obj_id, r in results if r.mask[z].any()]
        if not present:
            continue
        best = np.full(shape[1:], -np.inf, dtype=np.float32)
        for obj_id, result in present:
            score = np.where(result.mask[z] > 0, result.logits.get(z, np.float32(1.0)), -np.inf)
            wins = score > best
            labels[z][wins] = obj_id
            best = np.maximum(best, score)
    return labels
