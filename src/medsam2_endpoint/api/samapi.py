"""The samapi-compatible HTTP server (ksugar/samapi 0.7 protocol) for the QuPath SAM extension. HTTP only.

Routes, all under /sam/ with trailing slashes, as the extension calls them (REFERENCE.md C):
GET version/, GET weights/?type=, POST weights/, GET weights/cancel/, GET progress/,
POST "" (prompt), POST automask/, POST upload/ (multipart), POST video/.

Fixed samapi defects: each mask reports its own quality (samapi shifted it by one) and its own
index as object_idx; polygons keep holes and every part, with vertices on pixel corners (samapi kept
the largest outer contour on pixel centres); grey, grey+alpha, RGBA, 16-bit and palette PNGs are
accepted; upload names cannot leave a private upload folder; handlers are plain functions that
FastAPI runs in its thread pool, so one slow request never blocks the event loop; an optional
bearer token (MEDSAM2_SAMAPI_TOKEN); validation errors are 400 with the field's name, not 404/422.

What the QuPath extension (v0.9.1) needs beyond samapi's routes: a prompt rectangle reaching past the
field of view is clipped to it (the Feature's `bbox_clipped_to` says so); `POST weights/` answers 200
with a text message for every outcome, because the extension shows only "Registration request failed"
for any other status (the outcome is also in the X-MedSAM2-Status / X-MedSAM2-Code headers);
`sam3/` and `sam3video/` (SAM 3, never served here) answer a 404 naming the served types.

The shared Service (model registry) is built once (by the lifespan, or by the caller for tests) and
reaches handlers through `Depends`; no module state changes while serving.
"""

from __future__ import annotations

import hmac
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, cast

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from medsam2_endpoint import __version__
from medsam2_endpoint.api import medsam2_plugin, nninteractive
from medsam2_endpoint.api.bodies import EXTRA_BYTES, BodyCap, BodyLimit, Scope
from medsam2_endpoint.api.cancel import run_until_disconnected
from medsam2_endpoint.api.errors import body_of, error_body, headers_of, http_status
from medsam2_endpoint.api.samapi_types import ModelTypes
from medsam2_endpoint.api.shutdown import CancellingServer
from medsam2_endpoint.api.uploads import UploadStore
from medsam2_endpoint.base.errors import InvalidRequest, NotFound, ServiceError, Unauthorized
from medsam2_endpoint.base.log import log
from medsam2_endpoint.contract.messages import validation_message
from medsam2_endpoint.contract.samapi import (
    SAMAPI_PROTOCOL_VERSION,
    SamAutomaskBody,
    SamPromptBody,
    SamType,
    SamVideoBody,
    SamWeightsBody,
    samapi_output_type,
    video_prompts,
)
from medsam2_endpoint.contract.score2d import ImagePrompt
from medsam2_endpoint.core.images import Frame
from medsam2_endpoint.core.service import Service
from medsam2_endpoint.core.settings import SamapiOptions, Settings
from medsam2_endpoint.io.polygons import mask_to_geometry

ROUTES = ("GET version/, GET weights/?type=, POST weights/, GET weights/cancel/, GET progress/, POST (prompt), "
          "POST automask/, POST upload/, POST video/")


PARTIAL_HEADER = "X-Automask-Partial"  # "decoded/planned" grid prompts, only on a partial automask answer


@dataclass
class SamapiState:
    """What handlers share: built once per app, read by every request."""

    service: Service
    options: SamapiOptions
    types: ModelTypes
    uploads: UploadStore

    @classmethod
    def build(cls, service: Service) -> SamapiState:
        options = service.settings.samapi
        uploads = UploadStore(options.max_upload_bytes, options.max_frames, store_bytes=options.upload_store_bytes,
                              store_files=options.upload_store_files, ttl_s=options.upload_ttl_s)
        return cls(service, options, ModelTypes(service), uploads)


def get_state(request: Request) -> SamapiState:
    return cast(SamapiState, request.app.state.samapi)


State = Annotated[SamapiState, Depends(get_state)]


def require_token(request: Request, state: State) -> None:
    """Bearer-token check when MEDSAM2_SAMAPI_TOKEN is set (constant-time comparison)."""
    token = state.options.token
    if token is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise Unauthorized("missing or wrong bearer token; send 'Authorization: Bearer <token>'")


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(payload, separators=(",", ":")), status_code=status, media_type="application/json", headers=headers)


def feature(mask: np.ndarray, *, object_idx: int, sam_model: str, quality: float | None = None,
            plane: dict[str, int] | None = None, bbox_clipped_to: list[float] | None = None) -> dict[str, Any]:
    """A GeoJSON Feature as samapi's, with pixel-corner polygons (holes and all parts kept).
    `bbox_clipped_to`: the box used when the one sent reached past the image (QuPath ignores the property)."""
    geometry = mask_to_geometry(mask)
    if plane is not None:
        geometry["plane"] = plane
    properties: dict[str, Any] = {"object_idx": int(object_idx), "label": "object"}
    if quality is not None:
        properties["quality"] = float(quality)
    properties["sam_model"] = sam_model
    if bbox_clipped_to is not None:
        properties["bbox_clipped_to"] = [float(v) for v in bbox_clipped_to]
    return {"type": "Feature", "geometry": geometry, "properties": properties}


router = APIRouter(prefix="/sam", dependencies=[Depends(require_token)])


#: GET version/: the samapi protocol version, with this package's version as semver/PEP 440 build metadata
#: ("0.7.1+medsam2-endpoint.0.1.0"), so a client comparing versions reads 0.7.1.
VERSION_TEXT = f"{SAMAPI_PROTOCOL_VERSION}+medsam2-endpoint.{__version__}"


@router.get("/version/", response_class=PlainTextResponse)
def version() -> Response:
    return PlainTextResponse(VERSION_TEXT, headers={"X-MedSAM2-Version": __version__,
                                                    "X-Samapi-Protocol-Version": SAMAPI_PROTOCOL_VERSION})


@router.get("/weights/")
def list_weights(state: State, type: Annotated[SamType | None, Query()] = None) -> Response:
    return _json(state.types.weights(type))


def _registration_answer(message: str, status: int, code: str) -> Response:
    return PlainTextResponse(message, headers={"X-MedSAM2-Status": str(status), "X-MedSAM2-Code": code})


@router.post("/weights/")
async def register_weights(state: State, request: Request) -> Response:
    """Register weights from a URL. Always 200 with a text message (samapi's answer, which the extension
    shows); a refusal starts "Registration refused:" and says what to do, its status/code in headers."""
    try:
        try:
            body = SamWeightsBody.model_validate_json(await request.body())
        except ValidationError as exc:
            raise InvalidRequest(validation_message(exc)) from None
        message = await run_in_threadpool(state.service.register_weights, body.type, body.name, body.url)
    except ServiceError as exc:
        status = http_status(exc)
        log.info("route=samapi path=%s status=%d code=%s error=%s (answered 200)", request.url.path, status, exc.code, exc.message)
        return _registration_answer(f"Registration refused: {exc.message}", status, exc.code)
    return _registration_answer(message, 200, "ok")


@router.get("/weights/cancel/", response_class=PlainTextResponse)
def cancel_registration(state: State) -> str:
    return state.service.cancel_registration()


@router.get("/progress/")
def progress(state: State) -> Response:
    return _json(state.service.registration_progress())


@router.post("/")
async def predict(body: SamPromptBody, state: State, request: Request) -> Response:
    """One prompt object on the field of view: one Feature per mask (1, or 3 with multimask_output)."""
    sam_type, name = state.types.resolve(body.type, body.checkpoint_url)
    prompt = ImagePrompt(points=body.point_coords, labels=body.point_labels, box=body.bbox,
                         output_type="all" if body.multimask_output else "single")
    budget = state.service.budget()
    result = await run_until_disconnected(
        request, budget, lambda: state.service.segment_image(name, body.b64img, prompt, mask_b64=body.b64mask, budget=budget))
    # Empty masks have no outline: they are left out, and object_idx keeps each mask's own index.
    return _json([feature(m.mask, object_idx=m.index, quality=m.quality, sam_model=sam_type, bbox_clipped_to=result.box_clipped_to)
                  for m in result.masks if m.area])


@router.post("/automask/")
async def automask(body: SamAutomaskBody, state: State, request: Request) -> Response:
    """Masks of everything in the field of view; output_type picks among each grid point's masks."""
    sam_type, name = state.types.resolve(body.type, body.checkpoint_url)
    output_type = samapi_output_type(body.output_type)
    budget = state.service.budget()
    result = await run_until_disconnected(
        request, budget, lambda: state.service.automask_image(name, body.b64img, body, output_type, budget=budget))
    features = [feature(m.mask, object_idx=m.index, quality=m.quality, sam_model=sam_type) for m in result.masks]
    coverage = result.coverage
    # samapi's answer is a bare Feature list; a partial one (the budget ran out) says so in a header
    headers = {PARTIAL_HEADER: f"{coverage.decoded}/{coverage.planned}"} if coverage is not None and coverage.partial else None
    return _json(features, headers=headers)


@router.post("/upload/")
def upload(state: State, dirname: Annotated[str, Form()], file: Annotated[UploadFile, File()]) -> Response:
    return _json({"filename": state.uploads.save(dirname, file.filename or "", file.file)})


def _video_frames(state: SamapiState, body: SamVideoBody) -> list[Frame]:
    if body.b64imgs:
        return [Frame(f"b64imgs[{k}]", b64=b64) for k, b64 in enumerate(body.b64imgs)]
    if body.dirname:
        return [Frame(f"dirname/{path.name}", data=path.read_bytes()) for path in state.uploads.frames(body.dirname)]
    raise InvalidRequest("dirname: give dirname (frames sent to upload/ first) or b64imgs")


@router.post("/video/")
async def video(body: SamVideoBody, state: State, request: Request) -> Response:
    """Objects tracked through a z-stack (axes XYZ) or time series (XYT) from prompts on some frames."""
    try:
        sam_type, name = state.types.resolve(body.type, body.checkpoint_url)
        frames = await run_in_threadpool(_video_frames, state, body)
    finally:
        if body.dirname and not body.b64imgs:
            state.uploads.remove(body.dirname)  # as samapi: an uploaded sequence is used once
    start = body.start_frame_idx or 0
    prompts = video_prompts(body)
    budget = state.service.budget()
    masks = await run_until_disconnected(request, budget, lambda: state.service.track_video(
        name, frames, prompts, start=start, max_frames_per_direction=body.max_frame_num_to_track, budget=budget))
    depth = next(iter(masks.values())).shape[0] if masks else 0
    features = []
    for z in range(depth):
        for obj_id, mask in masks.items():
            if mask[z].any():
                features.append(feature(mask[z], object_idx=obj_id, sam_model=sam_type, plane=plane_of(body.axes, z + start, body.plane_position)))
    return _json(features)


@router.post("/sam3/")
@router.post("/sam3video/")
def sam3(state: State, request: Request) -> Response:
    """samapi 0.7.1's SAM 3 routes (text prompts): never served here; the answer names what is."""
    raise NotFound(
        f"{request.url.path.rstrip('/').rsplit('/', 1)[-1]}/: SAM 3 (type sam3) is not available on this server; "
        f"available types: {state.types.offered()}; choose one of them in the SAM dialog"
    )


def plane_of(axes: str, frame: int, plane_position: int) -> dict[str, int]:
    """samapi's geometry.plane for a frame: XYZ frames are z positions, XYT frames are time points."""
    if axes == "XYZ":
        return {"c": -1, "z": frame, "t": plane_position}
    return {"c": -1, "z": plane_position, "t": frame}


def _install_error_handlers(app: FastAPI) -> None:
    """Every error is JSON {"error", "status"} with that status, as the rest of this project."""

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        status = http_status(exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else headers_of(exc)
        log.info("route=samapi path=%s status=%d code=%s error=%s", request.url.path, status, exc.code, exc.message)
        return _json(body_of(exc), status, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        if request.url.path.rstrip("/").endswith("/video") and isinstance(exc.body, dict):
            # a refused video request ends its uploaded sequence too, at once rather than at its TTL
            get_state(request).uploads.discard(exc.body.get("dirname"))
        return _json(error_body(validation_message(list(exc.errors())), 400, "invalid_request"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = "not_found" if exc.status_code == 404 else "invalid_request"
        message = str(exc.detail)
        if exc.status_code in (404, 405):  # name the routes, not a bare "Not Found"
            message = f"{request.method} {request.url.path}: {message.lower()}; samapi routes (under /sam/): {ROUTES}"
        return _json(error_body(message, exc.status_code, code), exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        request_id = uuid.uuid4().hex
        log.error("route=samapi path=%s request_id=%s internal error", request.url.path, request_id, exc_info=exc)
        return _json(error_body(f"internal error; quote request id {request_id} when reporting it", 500, "internal"), 500)


def body_cap(scope: Scope) -> BodyCap | None:
    """Every body capped as it arrives (chunked ones too): an upload at one frame's cap, a JSON body at the
    request's base64 cap (one image, or a video's inline frames), each plus 1 MiB for the other fields."""
    state: SamapiState | None = getattr(scope["app"].state, "samapi", None)
    if state is None:
        return None
    plugin_cap = medsam2_plugin.body_cap(scope.get("path", ""), state.service)
    if plugin_cap is not None:
        return plugin_cap
    if scope.get("path", "").rstrip("/").endswith("/upload"):
        return BodyCap(state.options.max_upload_bytes + EXTRA_BYTES, "MEDSAM2_SAMAPI_MAX_UPLOAD_MB plus 1 MiB for the form",
                       "upload one frame per request, or smaller frames")
    limits = state.service.settings.limits
    return BodyCap(limits.max_request_base64_bytes + EXTRA_BYTES, "MEDSAM2_MAX_REQUEST_MB plus 1 MiB for the prompts",
                   "send smaller images, or a video's frames through upload/")


def create_app(service: Service | None = None, *, build_service: Callable[[], Service] | None = None) -> FastAPI:
    """The samapi app around an already-built Service (tests), or one `build_service()` makes at start-up.
    Its options are the Service's settings (MEDSAM2_SAMAPI_*)."""
    if service is None and build_service is None:
        raise ValueError("give a Service or a build_service callable")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc = service if service is not None else build_service()  # type: ignore[misc]
        state = SamapiState.build(svc)
        app.state.samapi = state
        slicer = nninteractive.attach(app, svc)  # the 3D Slicer nnInteractive plugin's routes, /nninteractive/...
        cfg = state.options
        log.info("samapi ready: types %s; models %s; auth %s; weight registration %s",
                 ", ".join(state.types.available()), ", ".join(svc.available_models()), "on" if cfg.token else "off",
                 "on" if cfg.allow_weight_registration else "off")
        try:
            yield
        finally:
            state.uploads.close()
            slicer.close()

    app = FastAPI(title="medsam2-endpoint samapi", version=__version__, lifespan=lifespan)
    _install_error_handlers(app)
    app.include_router(router)
    app.include_router(medsam2_plugin.router, dependencies=[Depends(require_token)])  # MedSAM2's Slicer plugin, at the root
    app.add_middleware(BodyLimit, cap_of=body_cap)
    app.include_router(nninteractive.open_router)
    app.include_router(nninteractive.router)
    return app


def serve(host: str, port: int, model_dir: str | None) -> int:
    """`medsam2-endpoint serve-samapi`: build the Service from the environment and the model folder, serve."""
    import uvicorn

    logger = log
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    built: list[Service] = []

    def build() -> Service:
        built.append(Service.from_settings(Settings.from_env(model_dir=model_dir)))
        return built[0]

    def cancel_running() -> int:
        return built[0].cancel_running() if built else 0

    app = create_app(build_service=build)
    # One SIGTERM/Ctrl-C cancels the running work, then uvicorn waits at most a few seconds for the answers.
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    CancellingServer(config, cancel_running).run()
    return 0
