"""One 3D segment edited by interactions (the 3D Slicer nnInteractive plugin's session): what each does.

A session holds the windowed volume (K, J, I) uint8, the window chosen for it, the current label map
(uint8 0/1), the prompts so far per view axis, the slices a lasso or a negative interaction fixed
("pins"), and an undo history (the label map's changed sub-box before each interaction). Every
interaction answers the sub-box of the label map it changed (`Change`).

- a box flat along k (axial), j (coronal) or i (sagittal): in that view (pipeline/views.py; a coronal or
  sagittal view at its physical aspect, its rows stretched by the slice spacing, as Slicer shows it), the first
  box walks up and down from its slice (pipeline/propagate.segment_object, the JSON route's single box);
  later ones are corrections of the current label map (pipeline/interactive.segment_prompts with
  `previous`: the view's earlier prompts and this one, a prompt replacing an earlier one on its slice);
- a 3D box (no flat axis): the axial walk from its middle slice, bounded by its k range;
- a lasso: its filled crop becomes that slice's mask exactly as drawn, after the walk from its
  bounding box (as a box would; an object's first lasso on MedSAM2: from the lasso itself, a mask prompt);
- negative box or lasso: erases that region on its slice (a 3D box: in the box), no walk;
- points (only where the model takes them): a SAM point on its axial slice, joined with that slice's box;
- initial segment: becomes the label map (prompts and pins cleared);
- undo: the label map, prompts and pins before the last interaction.

Each walk is bounded in time (`Pacing.stop_s`): it stops after the slice where time ran out and the
answer says so (`partial`); the next interaction goes on from the label map as it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from medsam2_endpoint.base.budget import Budget
from medsam2_endpoint.base.errors import InvalidRequest
from medsam2_endpoint.base.log import log
from medsam2_endpoint.contract.score3d import DEFAULT_STOP_AFTER_EMPTY
from medsam2_endpoint.core.volumes import volume_key
from medsam2_endpoint.engines.base import ModelInfo, PromptedVolumeEngine, SlicePrompt, VolumeEngine
from medsam2_endpoint.pipeline.interactive import segment_prompts
from medsam2_endpoint.pipeline.propagate import PropagationOptions, segment_object, walk_from_box
from medsam2_endpoint.pipeline.tracking import current_rule, using_rule
from medsam2_endpoint.pipeline.views import (
    VIEW_NAMES,
    from_view,
    shrink_rows,
    stretch_box,
    stretch_rows,
    to_view,
    view_rows,
)
from medsam2_endpoint.pipeline.window import (
    CT_BONE,
    CT_SOFT_TISSUE,
    BoneAlternative,
    auto_window,
    window_to_uint8,
)

OPTIONS = PropagationOptions(stop_after_empty=DEFAULT_STOP_AFTER_EMPTY, keep_logits=False)
MAX_UNDO = 16  # interactions kept for undo (each keeps only the sub-box it changed)

Box = list[list[int]]  # half-open [[k0, k1], [j0, j1], [i0, i1]]


@dataclass(frozen=True)
class Pin:
    """A slice an interaction fixed: value 1 sets the slice to `mask` (a lasso), 0 erases `mask` on it."""

    axis: int
    z: int
    mask: np.ndarray  # bool, the view's slice shape
    value: int


@dataclass
class _Undo:
    bbox: Box | None
    before: np.ndarray | None
    prompts: dict[int, list[SlicePrompt]]
    pins: list[Pin]

    @property
    def nbytes(self) -> int:
        return 0 if self.before is None else int(self.before.nbytes)


@dataclass(frozen=True)
class Change:
    """What an interaction changed: `bbox` (half-open, None when nothing) and the label map inside it."""

    ran: bool
    bbox: Box | None = None
    patch: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Windowed:
    image: np.ndarray  # uint8 (K, J, I)
    window: tuple[float, float] | None
    reason: str


@dataclass
class SegmentSession:
    """A lease's payload (core/sessions.py): empty until `set_image`."""

    image: np.ndarray | None = None  # windowed uint8 (K, J, I)
    window: tuple[float, float] | None = None
    window_reason: str = ""
    spacing: list[float] | None = None
    labels: np.ndarray | None = None  # uint8 (K, J, I), 0/1
    engine_name: str = ""
    volume_key: str = ""
    prompts: dict[int, list[SlicePrompt]] = field(default_factory=dict)
    pins: list[Pin] = field(default_factory=list)
    history: list[_Undo] = field(default_factory=list)
    views: dict[int, np.ndarray] = field(default_factory=dict)  # contiguous coronal/sagittal copies of `image`
    states: dict[int, Any] = field(default_factory=dict)  # engine state per view axis
    do_autozoom: bool = True  # accepted and reported; our walks zoom per slice anyway
    # a CT volume in both windows: each object's first prompt picks soft tissue or bone by where it is drawn
    # (`settle_window`)
    bone: BoneAlternative | None = None
    soft: _Windowed | None = None

    @property
    def nbytes(self) -> int:
        other = [w.image for w in (self.bone, self.soft) if w is not None and w.image is not self.image]
        held = [self.image, self.labels, *self.views.values(), *other]
        return sum(int(a.nbytes) for a in held if a is not None) + sum(u.nbytes for u in self.history)

    @staticmethod
    def bytes_for(shape: tuple[int, int, int], spacing: list[float] | None = None) -> int:
        """What a volume of this shape may come to hold, reserved at `set_image`: its windowed voxels, its label
        map, a CT's other window, and the coronal and sagittal copies a box in those views makes (at their
        physical aspect, so taller than the volume where its slices are thick); undo patches come on top."""
        k, j, i = shape
        return 3 * k * j * i + (view_rows(shape, spacing, 1) + view_rows(shape, spacing, 2)) * j * i

    # ------------------------------------------------------------ set-up

    def set_image(self, raw: np.ndarray, spacing: list[float] | None, engine_name: str) -> dict[str, Any]:
        """Window raw (K, J, I) voxels of any numeric type automatically; a fresh label map; its report."""
        window, reason = auto_window(raw)
        image = window_to_uint8(raw, window, field="set_image")
        # a new volume: nothing of the last one stays
        self.prompts, self.pins, self.history, self.views, self.states = {}, [], [], {}, {}
        self.image, self.window, self.window_reason, self.spacing = image, window, reason, spacing
        self.labels = np.zeros(image.shape, dtype=np.uint8)
        ct = window == CT_SOFT_TISSUE
        self.bone = BoneAlternative.of(raw) if ct else None
        self.soft = _Windowed(image, window, reason) if ct else None
        self.engine_name = engine_name
        self.volume_key = volume_key(image)  # the JSON route's key: both share the engine's features of these voxels
        log.info("route=nninteractive set_image shape=%s dtype=%s window=%s (%s)", "x".join(map(str, raw.shape)),
                 raw.dtype, list(window) if window else "min-max", reason)
        return self.window_report()

    def settle_window(self, region: tuple[slice, ...]) -> bool:
        """An object's first prompt on a CT, in `region` (K, J, I): the bone window when the region is mostly dense
        bone (pipeline/window.BoneAlternative), else soft tissue. True when the image changed (its features are the
        other window's: the background encoding starts again)."""
        if self.bone is None or self.soft is None:
            return False
        why = self.bone.wanted(region)
        image, window, reason = (self.bone.image, CT_BONE, why) if why else (self.soft.image, self.soft.window, self.soft.reason)
        if image is self.image:
            return False
        self.image, self.window, self.window_reason = image, window, reason
        self.views, self.states = {}, {}
        self.volume_key = volume_key(image)
        log.info("route=nninteractive window=%s (%s)", list(window) if window else "min-max", reason)
        return True

    def window_report(self) -> dict[str, Any]:
        return {"window": list(self.window) if self.window else None, "window_reason": self.window_reason}

    def require_image(self) -> tuple[np.ndarray, np.ndarray]:
        if self.image is None or self.labels is None:
            raise InvalidRequest("set_image: no image in this session yet; upload the volume first (POST /set_image)")
        return self.image, self.labels

    def reset(self) -> None:
        if self.labels is not None:
            self.labels[:] = 0
        self.prompts, self.pins, self.history = {}, [], []

    # ------------------------------------------------------------ undo

    def _snapshot(self) -> _Undo:
        return _Undo(None, None, {a: list(p) for a, p in self.prompts.items()}, list(self.pins))

    def _commit(self, undo: _Undo, new_labels: np.ndarray, *, ran: bool = True, meta: dict[str, Any] | None = None) -> Change:
        """Store `new_labels` (K, J, I), remember what it replaced, answer the changed sub-box."""
        _, labels = self.require_image()
        bbox = changed_box(labels, new_labels)
        if bbox is not None:
            region = tuple(slice(a, b) for a, b in bbox)
            undo.bbox, undo.before = bbox, labels[region].copy()
            labels[region] = new_labels[region]
        self.history.append(undo)
        del self.history[:-MAX_UNDO]
        patch = None if bbox is None else labels[tuple(slice(a, b) for a, b in bbox)].copy()
        return Change(ran, bbox, patch, meta or {})

    def undo(self) -> Change:
        _, labels = self.require_image()
        if not self.history:
            return Change(False, meta={"note": "nothing to undo"})
        last = self.history.pop()
        self.prompts, self.pins = last.prompts, last.pins
        if last.bbox is None or last.before is None:
            return Change(True)
        region = tuple(slice(a, b) for a, b in last.bbox)
        labels[region] = last.before
        return Change(True, last.bbox, labels[region].copy())

    def initial_seg(self, seg: np.ndarray) -> Change:
        image, labels = self.require_image()
        if seg.shape != image.shape:
            raise InvalidRequest(f"add_initial_seg_interaction: the segment's shape {list(seg.shape)} is not the image's "
                                 f"{list(image.shape)}; send the segment of the uploaded volume")
        undo = self._snapshot()
        self.prompts, self.pins = {}, []
        self._commit(undo, (seg > 0).astype(np.uint8))
        return Change(False, meta={"note": "the segment is now the label map"})  # the client already shows it

    # ------------------------------------------------------------ views and engines

    def view(self, axis: int) -> np.ndarray:
        image, _ = self.require_image()
        if axis == 0:
            return image
        if axis not in self.views:
            self.views[axis] = stretch_rows(np.ascontiguousarray(to_view(image, axis)), self.rows(axis))
        return self.views[axis]

    def rows(self, axis: int) -> int:
        """The rows (k) of view `axis` as the model sees it: its physical aspect (pipeline/views.view_rows)."""
        image, _ = self.require_image()
        return view_rows(image.shape, self.spacing, axis)

    def state(self, engine: VolumeEngine, axis: int) -> Any:
        if axis not in self.states:
            # axial: the JSON route's key, so both share the engine's per-slice features of this volume
            key = self.volume_key if axis == 0 else f"{self.volume_key}:{VIEW_NAMES[axis]}:{self.rows(axis)}"
            self.states[axis] = engine.start(self.view(axis), key)
        return self.states[axis]

    def apply_pins(self, labels: np.ndarray) -> None:
        """Fixed slices stay as the user drew them, whatever a later walk found there."""
        for pin in self.pins:
            plane = to_view(labels, pin.axis)[pin.z]
            if pin.value:
                plane[...] = pin.mask
            else:
                plane[pin.mask] = 0

    # ------------------------------------------------------------ interactions

    def walk(self, engine: VolumeEngine, axis: int, prompt: SlicePrompt, *, pacing: Pacing, budget: Budget,
             pin: Pin | None = None, z_range: tuple[int, int] | None = None,
             options: PropagationOptions = OPTIONS, lasso: np.ndarray | None = None) -> Change:
        """A prompt on slice `prompt.z` of view `axis`: first walk or correction; its answer. `lasso` (bool, the
        view's slice): a lasso's region, from which a first walk starts where the model takes a mask prompt
        (MedSAM2's `add_new_mask`); elsewhere the walk starts from the prompt's box."""
        _, labels = self.require_image()
        timed = pacing.wrap(engine)
        undo = self._snapshot()
        view_shape = self.view(axis).shape
        rows, depth = view_shape[1], labels.shape[0]
        if axis != 0 and rows != depth:  # the view at its physical aspect: the prompt's rows stretched with it
            prompt = replace(prompt, box=None if prompt.box is None else stretch_box(prompt.box, rows / depth))
            lasso = None if lasso is None else stretch_rows(lasso[None], rows, labels=True)[0]
        earlier = [p for p in self.prompts.get(axis, []) if p.z != prompt.z or prompt.box is None or p.box is None]
        started = time.perf_counter()
        previous = to_view(labels, axis) if axis == 0 else stretch_rows(to_view(labels, axis), rows, labels=True)
        # in a coronal or sagittal view the key slice is also answered zoomed (pipeline/tracking.TrackRule.key_zoom)
        with using_rule(replace(current_rule(), key_zoom=axis != 0)):
            if not labels.any() and prompt.points is None and prompt.box is not None:
                result = segment_object(timed, self.state(engine, axis), key_index=prompt.z, box=prompt.box, shape=view_shape,
                                        options=options, budget=budget,
                                        track=timed.from_mask(lasso) if lasso is not None else None)
            else:
                result = segment_prompts(timed, self.state(engine, axis), prompts=[*earlier, prompt], shape=view_shape,
                                         options=options, budget=budget, previous=previous.astype(bool))
        mask = result.mask
        new = np.array(from_view(mask if axis == 0 else shrink_rows(mask, depth), axis), dtype=np.uint8)
        if z_range is not None:  # a 3D box: its k range is the answer's, the rest stays
            outside = np.ones(new.shape[0], dtype=bool)
            outside[z_range[0]:z_range[1]] = False
            new[outside] = labels[outside]
        self.prompts[axis] = [*earlier, prompt]
        # a new prompt on a slice overrides what earlier lassos or erasures fixed there
        self.pins = [p for p in self.pins if (p.axis, p.z) != (axis, prompt.z)] + ([pin] if pin is not None else [])
        self.apply_pins(new)
        meta = {"view": VIEW_NAMES[axis], "slice": prompt.z, "slices_processed": result.slices_processed,
                "ms": round((time.perf_counter() - started) * 1000), "partial": timed.cut, **self.window_report()}
        if timed.cut:
            meta["not_done"] = (f"the walk stopped after {pacing.stop_s:g} s (MEDSAM2_NNINTERACTIVE_PREDICTION_S); "
                                "slices beyond it keep their earlier labels: prompt there to go on")
        log.info("route=nninteractive interaction view=%s slice=%d model=%s slices_processed=%d partial=%s ms=%d",
                 meta["view"], prompt.z, engine.info.name, result.slices_processed, timed.cut, meta["ms"])
        return self._commit(undo, new, meta=meta)

    def erase(self, axis: int, z: int, region: np.ndarray) -> Change:
        """A negative box or lasso on slice z of view `axis`: its region (bool, the view's slice) erased there."""
        _, labels = self.require_image()
        undo = self._snapshot()
        self.prompts[axis] = [p for p in self.prompts.get(axis, []) if p.z != z]
        pin = Pin(axis, z, region, 0)
        self.pins = [*self.pins, pin]
        new = labels.copy()
        self.apply_pins(new)
        return self._commit(undo, new, meta={"view": VIEW_NAMES[axis], "slice": z, "erased": int(region.sum())})

    def erase_box(self, bbox: Box) -> Change:
        _, labels = self.require_image()
        undo = self._snapshot()
        new = labels.copy()
        new[tuple(slice(a, b) for a, b in bbox)] = 0
        return self._commit(undo, new, meta={"erased_box": bbox})


class Pacing:
    """A walk's time bound: `wrap(engine)` stops each of its walks after the first slice past `stop_s`."""

    def __init__(self, stop_s: float, clock: Any = time.monotonic) -> None:
        self.stop_s = stop_s
        self._clock = clock
        self.stop_at = clock() + stop_s

    def wrap(self, engine: VolumeEngine) -> _Timed:
        if isinstance(engine, PromptedVolumeEngine):
            return _TimedPrompted(engine, self)
        return _Timed(engine, self)

    def over(self) -> bool:
        return bool(self._clock() > self.stop_at)


class _Timed:
    """The engine, its walks cut when the pacing's time is up (`cut` says whether one was)."""

    def __init__(self, engine: VolumeEngine, pacing: Pacing) -> None:
        self.engine = engine
        self.info: ModelInfo = engine.info
        self.pacing = pacing
        self.cut = False

    def start(self, volume_u8: np.ndarray, volume_key: str | None = None) -> Any:
        return self.engine.start(volume_u8, volume_key)

    def image_engine(self) -> Any:
        return self.engine.image_engine()

    def track(self, state: Any, *, key_index: int, box: np.ndarray, reverse: bool) -> Iterator[tuple[int, np.ndarray]]:
        return self._bounded(walk_from_box(self.engine, state, key_index=key_index, box=box, reverse=reverse))

    def from_mask(self, mask: np.ndarray) -> Callable[..., Iterator[tuple[int, np.ndarray]]] | None:
        """Walks from `mask` on the key slice instead of the box, where the model takes a mask prompt and starts a
        walk from one (MedSAM2's `track_mask`); None elsewhere (LiteMedSAM: its box)."""
        track_mask = getattr(self.engine, "track_mask", None)
        if track_mask is None or not self.info.capabilities.mask_prompts:
            return None

        def track(state: Any, *, key_index: int, box: np.ndarray, reverse: bool) -> Iterator[tuple[int, np.ndarray]]:
            return self._bounded(track_mask(state, key_index=key_index, mask=mask, reverse=reverse))

        return track

    def _bounded(self, steps: Iterator[tuple[int, np.ndarray]]) -> Iterator[tuple[int, np.ndarray]]:
        try:
            for step in steps:
                yield step
                if self.pacing.over():
                    self.cut = True
                    return
        finally:
            close = getattr(steps, "close", None)
            if close is not None:
                close()


class _TimedPrompted(_Timed):
    def track_prompts(self, state: Any, *, prompts: Any, reverse: bool, mask_prompt: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        engine = self.engine
        assert isinstance(engine, PromptedVolumeEngine)  # chosen by Pacing.wrap
        return self._bounded(engine.track_prompts(state, prompts=prompts, reverse=reverse, mask_prompt=mask_prompt))


def changed_box(old: np.ndarray, new: np.ndarray) -> Box | None:
    """The half-open box around every voxel where `new` differs from `old`; None when none does."""
    diff = old != new
    if not diff.any():
        return None
    box = []
    for axes in ((1, 2), (0, 2), (0, 1)):
        idx = np.flatnonzero(diff.any(axis=axes))
        box.append([int(idx[0]), int(idx[-1]) + 1])
    return box
