"""The walk of a 2D box model (LiteMedSAM) through a volume: when it goes on, and with which box.

Every stop rule of a 3D walk lives in the pipeline: this module's for a box model walked slice by slice
(`walk_slices`), propagate.py's for any engine's steps (empty run, slice count, budget). The engine only
answers one slice from one box (`SliceEngine.slice_logits`).

A box model fills any box it is given, so past a structure's end it still returns a mask; and a box
grown from the previous mask can walk into a neighbour of the same intensity. Each step is judged
from signals measured on that slice against the key slice and the previous accepted slice:

- the decoder's predicted IoU: below an absolute floor, or below a share of the key slice's;
- the mask's area against the previous slice's (a jump is a leak, a collapse an end);
- the mask's centroid shift against the previous slice's size (a jump sideways is a neighbour);
- the mean intensity inside the mask against the key slice's object (in the key's spread, or in the
  pooled spread of the key's and this slice's object); with `intensity_core`, the mean over the mask's
  core (its surest pixels) against the key's core.

A rejected slice ends the walk unless `lookahead` later slices, prompted with the last accepted box,
are accepted: then the walk goes on (the structure was only unclear there) and the rejected slices
keep their masks. With `end_area_ratio`, a slice rejected by intensity alone whose mask shrank is taken
for the structure's tapering tip: it is kept, and the walk ends after it (off by default). A key mask that covers little of the caller's box is a
part of the object: the walk starts from the caller's box and takes its reference from the first
tracked slice.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial

import numpy as np

from medsam2_endpoint.engines.base import SliceEngine
from medsam2_endpoint.pipeline.zoom import zoomed_logits


@dataclass(frozen=True)
class SliceStats:
    iou: float
    area: int
    centroid: tuple[float, float]  # (y, x)
    mean: float  # intensity inside the mask
    std: float
    core_mean: float = 0.0  # intensity inside the mask's core (see `of`); the mean when no core was asked for

    @classmethod
    def of(cls, mask: np.ndarray, image: np.ndarray, iou: float, logits: np.ndarray | None = None,
           core_quantile: float | None = None) -> SliceStats:
        """With logits and core_quantile: core_mean over the mask's pixels whose logits reach that quantile
        of the mask's logits (the model's surest part; fewer than 3 such pixels: the whole mask)."""
        area = int(mask.sum())
        if area == 0:
            return cls(iou, 0, (0.0, 0.0), 0.0, 0.0, 0.0)
        ys, xs = np.nonzero(mask)
        values = image[mask].astype(np.float64)
        mean = float(values.mean())
        core_mean = mean
        if logits is not None and core_quantile is not None:
            inside = logits[mask]
            core = inside >= np.quantile(inside, core_quantile)
            if int(core.sum()) >= 3:
                core_mean = float(values[core].mean())
        return cls(iou, area, (float(ys.mean()), float(xs.mean())), mean, float(values.std()), core_mean)


@dataclass(frozen=True)
class TrackRule:
    """Acceptance of one tracked slice. None switches a test off."""

    min_iou: float = 0.8  # absolute predicted-IoU floor
    relative_iou: float | None = None  # reject when iou < relative_iou * the key slice's iou
    max_area_growth: float | None = None  # reject when area > growth x the previous accepted slice's
    min_area_ratio: float | None = None  # reject when area < ratio x the previous accepted slice's
    max_shift: float | None = None  # reject when the centroid moves more than this x sqrt(previous area)
    intensity_z: float | None = None  # reject when |mean - key mean| > intensity_z x the key's std
    # reject when |mean - key mean| > z x the pooled std of the key's and this slice's object: a key slice
    # whose object is uniform (small std) must not stop a walk into slices where it is textured
    pooled_intensity_z: float | None = None
    # when the key slice's mask covers less than this share of the caller's box, the model answered a part
    # of the object (a bright core, say): the first tracked slices are prompted with the caller's box
    min_key_fill: float | None = None
    # judge intensity_z on the mask's core, the pixels whose logits reach this quantile of the mask's, against
    # the key's core: a slice where the object tapers gets a mask grown into its surroundings (partial
    # volume, a small object upsampled), whose whole mean drifts off while its core stays on the object
    intensity_core: float | None = None
    # a key mask the model itself rates below this predicted IoU is no reference either (an organ's edge, say): the
    # walk starts from the caller's box as with min_key_fill
    min_key_iou: float | None = None
    lookahead: int = 0  # slices tried past a rejected one before the walk ends
    # the key slice also answered on a zoomed crop around the caller's box (pipeline/zoom.py), the answer the
    # model rates higher kept: a coronal or sagittal slice of a short volume is a flat image the model sees poorly
    # whole (benchmarks/zoom_keys.py, 15 real structures' largest slices, whole against chosen with ZOOM_MARGIN:
    # coronal 0.671 -> 0.827, sagittal 0.686 -> 0.759; axial 0.827 -> 0.856, where it stays off to keep the JSON
    # route the reference's)
    key_zoom: bool = False
    # A structure's last slice is partial (partial volume, a tapering tip): its mean drifts towards the
    # neighbour's and the intensity tests reject it. A slice rejected by intensity alone whose mask shrank
    # to at most this share of the previous accepted slice's is kept as the walk's last slice.
    end_area_ratio: float | None = None

    def accepts(self, step: SliceStats, key: SliceStats, previous: SliceStats, *, intensity: bool = True) -> bool:
        """intensity=False judges the slice by IoU, area and shift alone (no trusted intensity reference yet)."""
        return self._shape_accepts(step, key, previous) and (not intensity or self._intensity_accepts(step, key))

    def ends_at(self, step: SliceStats, key: SliceStats, previous: SliceStats) -> bool:
        """Whether a rejected slice is the structure's tapering last slice, kept before the walk stops."""
        return (self.end_area_ratio is not None and self._shape_accepts(step, key, previous)
                and step.area <= self.end_area_ratio * previous.area)

    def _shape_accepts(self, step: SliceStats, key: SliceStats, previous: SliceStats) -> bool:
        if step.area == 0:
            return False
        if step.iou < self.min_iou:
            return False
        if self.relative_iou is not None and step.iou < self.relative_iou * key.iou:
            return False
        if self.max_area_growth is not None and step.area > self.max_area_growth * previous.area:
            return False
        if self.min_area_ratio is not None and step.area < self.min_area_ratio * previous.area:
            return False
        if self.max_shift is not None:
            shift = float(np.hypot(step.centroid[0] - previous.centroid[0], step.centroid[1] - previous.centroid[1]))
            if shift > self.max_shift * float(np.sqrt(max(previous.area, 1))):
                return False
        return True

    def _intensity_accepts(self, step: SliceStats, key: SliceStats) -> bool:
        if self.intensity_z is not None:
            step_mean, key_mean = (step.core_mean, key.core_mean) if self.intensity_core is not None else (step.mean, key.mean)
            if abs(step_mean - key_mean) > self.intensity_z * max(key.std, 1.0):
                return False
        if self.pooled_intensity_z is not None:
            pooled = float(np.sqrt((key.std**2 + step.std**2) / 2))
            if abs(step.mean - key.mean) > self.pooled_intensity_z * max(pooled, 1.0):
                return False
        return True

    def keeps_caller_box(self, key: SliceStats, box: np.ndarray) -> bool:
        """Whether the walk's first prompt is the caller's box rather than the key mask's."""
        if self.min_key_iou is not None and key.iou < self.min_key_iou:
            return True
        if self.min_key_fill is None:
            return False
        box_area = float(max(box[2] - box[0], 1.0) * max(box[3] - box[1], 1.0))
        return key.area < self.min_key_fill * box_area


# Chosen on real scans (benchmarks/real_anatomy.py, BENCHMARKS.md "Real anatomy"): a predicted-IoU floor of 0.5;
# the mean intensity of the mask's core (its pixels at or above the median logit) within 1.5 standard deviations
# of the key slice's object from the key's core; and a key mask covering under 0.3 of the caller's box (a part of
# the object) replaced, for the walk, by the caller's box. Mean Dice 0.700 (IoU floor 0.8 alone) -> 0.739 (floor
# 0.5 + intensity) -> 0.781 (+ key fill); the core keeps 0.781 and finds 12 of 15 structures' ends within a slice
# instead of 9 (a tapering slice's mask grows into its surroundings, whose intensity moved the whole mask's mean;
# its core stays on the object). Keeping a tapering tip (`end_area_ratio` 0.75) found the lesions' ends but cost
# the CT pancreas 0.09 and each phantom about 0.02, so it stays an option. The key slice is exempt (the caller
# drew that box). A key slice whose mask the model rates under the same 0.5 floor (an organ's edge: the MR spleen's
# largest slice, predicted IoU 0.552 in fp32 and 0.498 in bf16) is no reference either (`min_key_iou`): in bf16
# that walk otherwise took its part-mask's box and intensity and stopped after one slice (Dice 0.836 -> 0.197).
DEFAULT_RULE = TrackRule(min_iou=0.5, intensity_z=1.5, min_key_fill=0.3, intensity_core=0.5, min_key_iou=0.5)
# With `key_zoom`, the zoomed answer replaces the whole-slice one when the model rates it this much higher: when both
# are good their predicted IoUs differ by noise (on the 15 real structures' sagittal largest slices, the MR kidney's
# and spleen's whole-slice answers were better, 0.918 and 0.919, rated 0.02 and 0.04 lower than the zoomed ones).
ZOOM_MARGIN = 0.03
# The rule served walks use; benchmarks that compare rules set another for a block (`using_rule`).
_RULE: ContextVar[TrackRule] = ContextVar("medsam2_track_rule", default=DEFAULT_RULE)


def current_rule() -> TrackRule:
    return _RULE.get()


@contextmanager
def using_rule(rule: TrackRule) -> Iterator[None]:
    """Walks started inside this block (in this thread or task) are judged by `rule`."""
    token = _RULE.set(rule)
    try:
        yield
    finally:
        _RULE.reset(token)


def mask_box(mask: np.ndarray, margin: int) -> np.ndarray | None:
    """Bounding box [x_min, y_min, x_max, y_max] of a bool (Y, X) mask, grown by `margin` px and
    clipped to the slice; None when the mask is empty."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    h, w = mask.shape
    return np.array(
        [
            max(xs.min() - margin, 0),
            max(ys.min() - margin, 0),
            min(xs.max() + margin, w - 1),
            min(ys.max() + margin, h - 1),
        ],
        dtype=np.float64,
    )


def walk_slices(engine: SliceEngine, state: object, *, key_index: int, box: np.ndarray, reverse: bool,
                rule: TrackRule | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Segment the key slice from `box`, then walk one slice at a time towards lower z (reverse=True) or
    higher z, each slice prompted with the last accepted mask's bounding box grown by the engine's
    `walk_margin`. Yields (z, float32 (Y, X) logits), the key slice first. Each later slice is judged by
    `rule` (default: `current_rule()` when the walk is created); the walk ends at the volume's edge or at a
    rejected slice not followed by an accepted one within `rule.lookahead` slices. Rejected slices at the
    end are yielded as empty (logits of -1)."""
    depth, h, w = engine.volume_shape(state)
    if not 0 <= key_index < depth:
        raise ValueError(f"key_index {key_index} is outside the volume's {depth} slices")
    return _walk(engine, state, key_index, np.asarray(box, dtype=np.float64), -1 if reverse else 1,
                 rule or current_rule(), engine.walk_margin(h, w), depth)


def _walk(engine: SliceEngine, state: object, key_index: int, box: np.ndarray, step: int, rule: TrackRule,
          margin: int, depth: int) -> Iterator[tuple[int, np.ndarray]]:
    logits, iou = engine.slice_logits(state, key_index, box)
    empty = not (logits > 0).any()  # the caller's box answered with nothing: too small for the model whole-slice
    answer = engine.slice_logits
    if empty or rule.key_zoom:
        zoomed, zoomed_iou = zoomed_logits(engine, state, key_index, box)
        if empty or zoomed_iou > iou + ZOOM_MARGIN:
            # a structure the model sees better zoomed is walked zoomed: each slice on a crop around its prompt
            # (choosing per slice instead measured worse: coronal 0.516 / sagittal 0.456 against 0.550 / 0.490)
            logits, iou, answer = zoomed, zoomed_iou, partial(zoomed_logits, engine)
    yield key_index, logits
    mask = logits > 0
    core = rule.intensity_core
    key = previous = SliceStats.of(mask, engine.slice_pixels(state, key_index), iou, logits, core)
    # a key mask that fills little of the caller's box is a part of the object: the walk starts from the
    # caller's box, and the first accepted slice (judged without intensity), not that part, becomes the
    # reference of what the object looks like
    rebase = rule.keeps_caller_box(key, box)
    prompt = box if rebase else mask_box(mask, margin)
    pending: list[tuple[int, np.ndarray]] = []  # rejected slices awaiting the look-ahead's verdict
    z = key_index + step
    while prompt is not None and 0 <= z < depth:
        logits, iou = answer(state, z, prompt)
        mask = logits > 0
        stats = SliceStats.of(mask, engine.slice_pixels(state, z), iou, logits, core)
        if rule.accepts(stats, key, previous, intensity=not rebase):
            yield from pending
            pending = []
            yield z, logits
            previous, prompt = stats, mask_box(mask, margin)
            if rebase:
                key, rebase = stats, False
        elif not pending and rule.ends_at(stats, key, previous):
            yield z, logits
            prompt = None
        else:
            pending.append((z, logits))
            if len(pending) > rule.lookahead:
                break
        z += step
    for z, logits in pending:
        yield z, np.full_like(logits, -1.0)
