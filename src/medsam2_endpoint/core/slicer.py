"""The 3D Slicer nnInteractive plugin's sessions over the Service: leases, checks, capabilities, interactions.

What the served default model can do comes from its `engine.info.capabilities`: boxes (2D in any view, and
3D), lassos, an initial segment and undo with every model; points only where the model takes them;
scribbles never. An interaction the model cannot take is refused (400) naming it and the model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medsam2_endpoint import __version__
from medsam2_endpoint.base.budget import Budget
from medsam2_endpoint.base.errors import InvalidRequest, PayloadTooLarge
from medsam2_endpoint.core.background import BackgroundEncoder
from medsam2_endpoint.core.interactive3d import OPTIONS, Box, Change, Pacing, Pin, SegmentSession
from medsam2_endpoint.core.service import Service
from medsam2_endpoint.core.sessions import SessionStore
from medsam2_endpoint.engines.base import SlicePrompt, VolumeEngine
from medsam2_endpoint.pipeline.propagate import PropagationOptions
from medsam2_endpoint.pipeline.views import box_in_view, to_view

LICENSE = ("Apache-2.0 server (medsam2-endpoint); model weights: LiteMedSAM (Apache-2.0) or MedSAM2 (its own licence); "
           "research use, not a medical device")


class SlicerSessions:
    def __init__(self, service: Service) -> None:
        settings = service.settings
        self.service = service
        self.store: SessionStore[SegmentSession] = service.sessions  # the worker's one store (core/sessions.py)
        self.limits = self.store.limits
        token = settings.nninteractive_token or settings.samapi_token
        self.token = token.get_secret_value().strip() if token is not None else None
        self.prediction_s = settings.nninteractive_prediction_s
        # the latest image's slices, encoded while no request computes (core/background.py)
        self.encoder = BackgroundEncoder(service.slots, service.running, enabled=settings.nninteractive_background_encode)

    def close(self) -> None:
        """The server stops: the background encoding, then every session."""
        self.encoder.close()
        self.store.close()

    # ------------------------------------------------------------ model

    def engine(self) -> tuple[str, VolumeEngine]:
        name = self.service.default
        return name, self.service.registry.get(name)

    def capabilities(self) -> dict[str, Any]:
        name, engine = self.engine()
        caps = engine.info.capabilities
        return {
            "supported_interactions": {"points": caps.points, "bbox2d": True, "bbox3d": True, "lasso": True, "scribble": False},
            "channel_mapping": {},
            "num_interaction_channels": 0,
            "supports_initial_label": True,
            "supports_zero_shot_label_refinement": False,
            "preferred_scribble_thickness": [2, 2, 2],
            "interaction_decay": None,
            "inference_session_version": f"medsam2-endpoint {__version__}",
            "license": LICENSE,
            "supports_undo": True,
            "do_autozoom": True,
            "patch_size": None,
            "model": engine.info.as_metadata(),
            "model_capabilities": caps.as_metadata(),
        }

    def refuse(self, interaction: str, why: str) -> InvalidRequest:
        name, _ = self.engine()
        return InvalidRequest(f"{interaction}: the served model {name} does not take {why}; "
                              "use a box or a lasso (GET /capabilities lists what it takes)")

    # ------------------------------------------------------------ set-up

    def check_upload(self, session: SegmentSession, shape: tuple[int, ...], dtype: np.dtype[Any],
                     spacing: Any = None) -> tuple[int, int, int]:
        """Refuse an image before it is decompressed: (1, K, J, I) numeric, within the voxel and memory caps."""
        limits = self.service.settings.limits
        if len(shape) != 4 or shape[0] != 1 or min(shape) < 1:
            raise InvalidRequest(f"set_image: expected one channel (1, K, J, I), got shape {list(shape)}")
        if dtype.kind not in "iuf" or dtype.itemsize > 8:
            raise InvalidRequest(f"set_image: voxels of type {dtype} cannot be windowed; send integer or float voxels")
        k, j, i = (int(v) for v in shape[1:])
        if k * j * i > limits.max_voxels or j * i > limits.max_slice_pixels:
            raise PayloadTooLarge(f"set_image: {k} x {j} x {i} voxels is over the limit of {limits.max_voxels} voxels "
                                  f"({limits.max_slice_pixels} per slice) (MEDSAM2_MAX_VOXELS); crop or resample the volume")
        self.store.make_room(session, SegmentSession.bytes_for((k, j, i), _spacing(spacing)), field_name="set_image")
        return k, j, i

    def set_image(self, session: SegmentSession, raw: np.ndarray, spacing: Any) -> dict[str, Any]:
        """The session's new image, windowed; its slices then encoded in the background (the answer says whether)."""
        name, _ = self.engine()
        report = session.set_image(np.ascontiguousarray(raw[0]), _spacing(spacing), name)
        return {"original_image_shape": list(raw.shape), **report, "background_encoding": self._encode_ahead(session)}

    def _encode_ahead(self, session: SegmentSession) -> bool:
        """The session's image encoded in the background until it changes (core/background.py); whether it runs."""
        name, engine = self.engine()
        image, _ = session.require_image()
        key = session.volume_key
        run = self.encoder.start(name, engine, image, key,
                                 alive=lambda: session.volume_key == key and self.store.holds(session))
        return run is not None

    def _settle_window(self, session: SegmentSession, box: Box) -> None:
        """On a CT, an object's first prompt (no prompt yet, an empty label map) picks the window, soft tissue or
        bone, from the voxels it is drawn on."""
        _, labels = session.require_image()
        if session.bone is None or session.prompts or labels.any():
            return
        if session.settle_window(tuple(slice(a, b) for a, b in box)):
            self._encode_ahead(session)

    def set_target_buffer(self, session: SegmentSession, shape: Any) -> None:
        image, _ = session.require_image()
        if list(shape or [])[-3:] != list(image.shape):
            raise InvalidRequest(f"set_target_buffer: shape {shape} is not the image's {list(image.shape)}")

    # ------------------------------------------------------------ interactions

    def box(self, session: SegmentSession, bbox: Any, include: bool, budget: Budget) -> Change:
        image, _ = session.require_image()
        box = check_box(bbox, image.shape, "add_bbox_interaction: bbox_coords")
        # one voxel thick along k, j or i: a box drawn in that view; a box one voxel wide along several axes
        # (a one-pixel structure's box) is taken as drawn on the axial slice when it can be
        flat = sorted((a for a in range(3) if box[a][1] - box[a][0] == 1), key=lambda a: a != 0)
        if not include:
            if flat:
                axis = flat[0]
                z, region = _region(box, axis, to_view(image, axis).shape[1:])
                return session.erase(axis, z, region)
            return session.erase_box(box)
        self._settle_window(session, box)
        if flat:
            axis = flat[0]
            z, view_box = box_in_view(box, axis)
            return self._walk(session, axis, SlicePrompt(z, box=view_box), budget)
        # a 3D box: the axial walk from its middle slice, within its k range
        (k0, k1), (j0, j1), (i0, i1) = box
        key = (k0 + k1 - 1) // 2
        reach = max(k1 - key, key - k0 + 1)
        options = PropagationOptions(stop_after_empty=OPTIONS.stop_after_empty, max_slices=reach, keep_logits=False)
        prompt = SlicePrompt(key, box=np.array([i0, j0, i1, j1], dtype=np.int64))
        return self._walk(session, 0, prompt, budget, z_range=(k0, k1), options=options)

    def lasso(self, session: SegmentSession, crop: np.ndarray, bbox: Any, include: bool, budget: Budget) -> Change:
        image, _ = session.require_image()
        box = check_box(bbox, image.shape, "add_lasso_interaction: interaction_bbox")
        if list(crop.shape) != [b - a for a, b in box]:
            raise InvalidRequest(f"add_lasso_interaction: the lasso crop's shape {list(crop.shape)} does not match "
                                 f"interaction_bbox {box}")
        flat = sorted((a for a in range(3) if box[a][1] - box[a][0] == 1), key=lambda a: a != 0)
        if not flat:
            raise InvalidRequest(f"add_lasso_interaction: interaction_bbox {box} spans several slices in every axis; "
                                 "draw the lasso on one slice")
        axis = flat[0]
        z, region = _region(box, axis, to_view(image, axis).shape[1:], crop)
        if not region.any():
            raise InvalidRequest("add_lasso_interaction: the lasso encloses no voxel")
        if not include:
            return session.erase(axis, z, region)
        self._settle_window(session, box)
        rows, cols = np.nonzero(region)
        view_box = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=np.int64)
        return self._walk(session, axis, SlicePrompt(z, box=view_box), budget, pin=Pin(axis, z, region, 1), lasso=region)

    def points(self, session: SegmentSession, coordinates: Any, include: bool, budget: Budget) -> Change:
        name, engine = self.engine()
        caps = engine.info.capabilities
        if not caps.points:
            raise self.refuse("add_point_interaction", "points")
        if not include and not caps.negative_points:
            raise self.refuse("add_point_interaction", "negative points")
        image, _ = session.require_image()
        if not (isinstance(coordinates, list | tuple) and len(coordinates) == 3):
            raise InvalidRequest("add_point_interaction: coordinates must be [k, j, i]")
        k, j, i = (int(round(float(v))) for v in coordinates)
        if not all(0 <= v < n for v, n in zip((k, j, i), image.shape, strict=True)):
            raise InvalidRequest(f"add_point_interaction: coordinates {[k, j, i]} are outside the volume {list(image.shape)}")
        prompt = SlicePrompt(k, points=np.array([[i, j]], dtype=np.float64), labels=np.array([1 if include else 0]))
        earlier = [p for p in session.prompts.get(0, []) if p.z == k]
        if earlier and earlier[-1].box is not None:  # a point joins its slice's box (SAM's box + points)
            prompt = SlicePrompt(k, box=earlier[-1].box, points=prompt.points, labels=prompt.labels)
        return self._walk(session, 0, prompt, budget)

    def _walk(self, session: SegmentSession, axis: int, prompt: SlicePrompt, budget: Budget, **kwargs: Any) -> Change:
        name = session.engine_name or self.engine()[0]
        engine = self.service.registry.get(name)
        with self.service.slots.hold(name):
            return session.walk(engine, axis, prompt, pacing=Pacing(self.prediction_s), budget=budget, **kwargs)


def _spacing(spacing: Any) -> list[float] | None:
    """The image's (k, j, i) spacing as the plugin sends it in `image_properties`, when it is three positive numbers."""
    try:
        values = [float(v) for v in spacing]
    except (TypeError, ValueError):
        return None
    return values if len(values) == 3 and all(np.isfinite(v) and v > 0 for v in values) else None


def check_box(bbox: Any, shape: tuple[int, ...], field: str) -> Box:
    """A half-open [[k0, k1], [j0, j1], [i0, i1]] inside the volume, each range non-empty."""
    try:
        box = [[int(a), int(b)] for a, b in bbox]
    except (TypeError, ValueError):
        raise InvalidRequest(f"{field}: expected [[k0, k1], [j0, j1], [i0, i1]], got {str(bbox)[:80]}") from None
    if len(box) != 3:
        raise InvalidRequest(f"{field}: expected 3 ranges [[k0, k1], [j0, j1], [i0, i1]], got {len(box)}")
    clipped = [[max(0, a), min(n, b)] for (a, b), n in zip(box, shape, strict=True)]
    if any(a >= b for a, b in clipped):
        raise InvalidRequest(f"{field}: {box} holds no voxel of the volume {list(shape)} (half-open ranges, each end > start)")
    return clipped


def _region(box: Box, axis: int, plane_shape: tuple[int, ...], crop: np.ndarray | None = None) -> tuple[int, np.ndarray]:
    """(slice index, bool mask on the view's slice) of a flat box, or of a lasso crop inside it."""
    inside = np.ones([b - a for a, b in box], dtype=bool) if crop is None else crop > 0
    volume_region = to_view(inside, axis)[0]  # the crop in the view's order, its one slice
    z, view_box = box_in_view(box, axis)
    x0, y0, x1, y1 = (int(v) for v in view_box)
    region = np.zeros(plane_shape, dtype=bool)
    region[y0:y1, x0:x1] = volume_region
    return z, region
