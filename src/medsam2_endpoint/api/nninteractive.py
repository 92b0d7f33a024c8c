"""The 3D Slicer nnInteractive plugin's protocol (nninteractive-client 2.x, REFERENCE.md F) under /nninteractive.

The plugin's Server URL is `http://HOST:PORT/nninteractive`. Transport only: leases (`X-Lease-Token`), an
optional bearer key, NNIA array bodies (`nnInteractive.inference.remote.serialization`, imported from
nninteractive-client, not rewritten) with JSON metadata in `X-Meta`; every answer to an interaction is
`X-Meta {"ran_prediction", "bbox", ...}` and the label map's changed sub-box as NNIA (empty, bbox null, when
nothing changed). What each interaction does is core/interactive3d.py; sessions are core/sessions.py.
"""

from __future__ import annotations

import hmac
import json
import struct
from collections.abc import Callable
from typing import Annotated, Any, TypeVar, cast

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from nnInteractive.inference.remote.serialization import pack_array, unpack_array
from starlette.concurrency import run_in_threadpool

from medsam2_endpoint.api.cancel import run_until_disconnected
from medsam2_endpoint.base.errors import InvalidRequest, PayloadTooLarge, Unauthorized
from medsam2_endpoint.core.interactive3d import Change, SegmentSession
from medsam2_endpoint.core.service import Service
from medsam2_endpoint.core.slicer import SlicerSessions

PREFIX = "/nninteractive"
LEASE_HEADER = "X-Lease-Token"
META_HEADER = "X-Meta"
T = TypeVar("T")


def attach(app: FastAPI, service: Service) -> SlicerSessions:
    """Build the sessions for `service` (at start-up) and start their reaper."""
    sessions = SlicerSessions(service)
    sessions.store.start_reaper()
    app.state.slicer = sessions
    return sessions


def get_sessions(request: Request) -> SlicerSessions:
    return cast(SlicerSessions, request.app.state.slicer)


Sessions = Annotated[SlicerSessions, Depends(get_sessions)]


def require_key(request: Request, sessions: Sessions) -> None:
    """`Authorization: Bearer <key>` when MEDSAM2_NNINTERACTIVE_TOKEN (or MEDSAM2_SAMAPI_TOKEN) is set."""
    if sessions.token is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {sessions.token}".encode()):
        raise Unauthorized("missing or wrong API key; enter the server's key in the nnInteractive module's API key field")


open_router = APIRouter(prefix=PREFIX)
router = APIRouter(prefix=PREFIX, dependencies=[Depends(require_key)])


def _json(payload: Any) -> Response:
    return Response(json.dumps(payload, separators=(",", ":")), media_type="application/json")


def _answer(change: Change) -> Response:
    """X-Meta {"ran_prediction", "bbox", ...} and the changed sub-box as NNIA (empty when nothing changed)."""
    meta = {"ran_prediction": change.ran, "bbox": change.bbox, **change.meta}
    body = b"" if change.patch is None or change.bbox is None else pack_array(np.ascontiguousarray(change.patch, dtype=np.uint8))
    return Response(body, media_type="application/octet-stream",
                    headers={META_HEADER: json.dumps(meta, separators=(",", ":"))})


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        raise InvalidRequest(f"{request.url.path}: the body is not JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"{request.url.path}: the body must be a JSON object")
    return body


def _meta(request: Request) -> dict[str, Any]:
    raw = request.headers.get(META_HEADER, "{}")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise InvalidRequest(f"{META_HEADER}: not JSON") from None
    if not isinstance(meta, dict):
        raise InvalidRequest(f"{META_HEADER}: must be a JSON object")
    return meta


def peek(buf: bytes, field: str) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """The shape and dtype an NNIA body declares (its header), read before anything is decompressed."""
    try:
        magic, _, _, ndim, name_len = struct.unpack_from("<4sBBBB", buf, 0)
        dtype = np.dtype(buf[8:8 + name_len].decode("ascii"))
        shape = struct.unpack_from(f"<{ndim}q", buf, 8 + name_len)
    except (struct.error, TypeError, ValueError, UnicodeDecodeError):
        raise InvalidRequest(f"{field}: the body is not an NNIA array (nninteractive-client's pack_array)") from None
    if magic != b"NNIA" or any(v < 0 for v in shape):
        raise InvalidRequest(f"{field}: the body is not an NNIA array (nninteractive-client's pack_array)")
    return tuple(int(v) for v in shape), dtype


def unpack(buf: bytes, field: str, max_voxels: int) -> np.ndarray:
    shape, _ = peek(buf, field)
    if int(np.prod(shape, dtype=np.int64)) > max_voxels:
        raise PayloadTooLarge(f"{field}: {list(shape)} is over the limit of {max_voxels} voxels (MEDSAM2_MAX_VOXELS)")
    try:
        array: np.ndarray = unpack_array(buf)
    except (ValueError, RuntimeError) as exc:
        raise InvalidRequest(f"{field}: the NNIA array cannot be read ({exc})") from None
    return array


async def _in_session(request: Request, sessions: SlicerSessions, work: Callable[[SegmentSession], T], *,
                      action: bool = True) -> T:
    """`work(session)` in a worker thread, the lease's lock held; cancelled if the client goes away."""
    token = request.headers.get(LEASE_HEADER)

    def run() -> T:
        with sessions.store.use(token, action=action) as session:
            return work(session)

    return await run_in_threadpool(run)


async def _predict(request: Request, sessions: SlicerSessions, work: Callable[[SegmentSession, Any], Change]) -> Response:
    budget = sessions.service.budget()
    token = request.headers.get(LEASE_HEADER)

    def run() -> Change:
        with sessions.store.use(token) as session:
            return work(session, budget)

    return _answer(await run_until_disconnected(request, budget, run))


@open_router.get("/healthz")
def healthz() -> Response:
    return _json({"status": "ok"})


@router.post("/claim")
def claim(sessions: Sessions) -> Response:
    lease = sessions.store.claim()
    limits = sessions.limits
    return _json({"lease_token": lease.token, "idle_timeout_seconds": limits.idle_s,
                  "liveness_timeout_seconds": limits.liveness_s, "max_sessions": limits.max_sessions})


@router.get("/capabilities")
def capabilities(sessions: Sessions) -> Response:
    return _json(sessions.capabilities())


@router.post("/heartbeat")
async def heartbeat(request: Request, sessions: Sessions) -> Response:
    lease = sessions.store.get(request.headers.get(LEASE_HEADER), action=False)
    return _json({"remaining_seconds": sessions.store.remaining_s(lease)})


@router.get("/lease_status")
async def lease_status(request: Request, sessions: Sessions) -> Response:
    lease = sessions.store.get(request.headers.get(LEASE_HEADER), action=False)
    return _json({"remaining_seconds": sessions.store.remaining_s(lease), "idle_timeout_seconds": sessions.limits.idle_s})


@router.post("/release")
def release(request: Request, sessions: Sessions) -> Response:
    sessions.store.release(request.headers.get(LEASE_HEADER))
    return _json({"released": True})


@router.post("/set_do_autozoom")
async def set_do_autozoom(request: Request, sessions: Sessions) -> Response:
    body = await _json_body(request)

    def work(session: SegmentSession) -> None:
        session.do_autozoom = bool(body.get("do_autozoom", True))

    await _in_session(request, sessions, work)
    return _json({"do_autozoom": bool(body.get("do_autozoom", True))})


@router.post("/set_image")
async def set_image(request: Request, sessions: Sessions) -> Response:
    limits = sessions.service.settings.limits
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_file_bytes:
        raise PayloadTooLarge(f"set_image: the body of {declared} bytes is over {limits.max_file_bytes} (MEDSAM2_MAX_FILE_MB)")
    meta = _meta(request)
    buf = await request.body()
    spacing = (meta.get("image_properties") or {}).get("spacing")

    def work(session: SegmentSession) -> dict[str, Any]:
        shape, dtype = peek(buf, "set_image")
        sessions.check_upload(session, shape, dtype, spacing)
        return sessions.set_image(session, unpack(buf, "set_image", limits.max_voxels), spacing)

    return _json(await _in_session(request, sessions, work))


@router.post("/set_target_buffer")
async def set_target_buffer(request: Request, sessions: Sessions) -> Response:
    body = await _json_body(request)
    await _in_session(request, sessions, lambda s: sessions.set_target_buffer(s, body.get("shape")))
    return _json({"ok": True})


@router.post("/reset_interactions")
async def reset_interactions(request: Request, sessions: Sessions) -> Response:
    await _in_session(request, sessions, lambda s: s.reset())
    return _json({"ok": True})


@router.post("/add_bbox_interaction")
async def add_bbox(request: Request, sessions: Sessions) -> Response:
    body = await _json_body(request)
    include = bool(body.get("include_interaction", True))
    return await _predict(request, sessions, lambda s, b: sessions.box(s, body.get("bbox_coords"), include, b))


@router.post("/add_point_interaction")
async def add_point(request: Request, sessions: Sessions) -> Response:
    body = await _json_body(request)
    include = bool(body.get("include_interaction", True))
    return await _predict(request, sessions, lambda s, b: sessions.points(s, body.get("coordinates"), include, b))


@router.post("/add_lasso_interaction")
async def add_lasso(request: Request, sessions: Sessions) -> Response:
    meta = _meta(request)
    crop = unpack(await request.body(), "add_lasso_interaction", sessions.service.settings.limits.max_voxels)
    include = bool(meta.get("include_interaction", True))
    return await _predict(request, sessions, lambda s, b: sessions.lasso(s, crop, meta.get("interaction_bbox"), include, b))


@router.post("/add_scribble_interaction")
def add_scribble(sessions: Sessions) -> Response:
    raise sessions.refuse("add_scribble_interaction", "scribbles")


@router.post("/add_initial_seg_interaction")
async def add_initial_seg(request: Request, sessions: Sessions) -> Response:
    seg = unpack(await request.body(), "add_initial_seg_interaction", sessions.service.settings.limits.max_voxels)
    return _answer(await _in_session(request, sessions, lambda s: s.initial_seg(seg)))


@router.post("/undo")
async def undo(request: Request, sessions: Sessions) -> Response:
    return _answer(await _in_session(request, sessions, lambda s: s.undo()))


@router.post("/predict")
async def predict(request: Request, sessions: Sessions) -> Response:
    """Every interaction runs its prediction when it arrives: nothing is ever queued here."""
    await _in_session(request, sessions, lambda s: None)
    return _answer(Change(False, meta={"note": "every interaction predicts when it arrives; nothing was queued"}))
