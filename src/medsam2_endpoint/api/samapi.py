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

The shared Service (model registry) is built once (by the lifespan, or by the caller for tests) and
reaches handlers through `Depends`; no module state changes while serving.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from medsam2_endpoint import __version__
from medsam2_endpoint.core.settings import Settings
from medsam2_endpoint.base.errors import InvalidRequest, PayloadTooLarge, ServiceError
from medsam2_endpoint.io.images import decode_base64, read_picture, to_grey_u8, to_rgb_u8
from medsam2_endpoint.io.polygons import mask_to_geometry
from medsam2_endpoint.pipeline.prompt2d import Prompt2D, Prompter, check_prompt
from medsam2_endpoint.core.registry import ModelTypes, SamapiSettings, WeightRegistrar
from medsam2_endpoint.contract.score2d import (
    SamAutomaskBody,
    SamPromptBody,
    SamType,
    SamVideoBody,
    SamWeightsBody,
    location,
    samapi_output_type,
)
from medsam2_endpoint.core.score2d import prompter_for
from medsam2_endpoint.pipeline.video import ObjectPrompt, frames_to_volume, plane_of, track_objects

log = logging.getLogger("azmlinfsrv.medsam2")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


class UploadStore:
    """Uploaded video frames under a private temporary root (mode 0700), one folder per `dirname`.

    Names are checked, never joined blindly: a dirname must be one plain name; a filename is reduced
    to its last path component (as browsers send it), then must be one plain name too.
    """

    def __init__(self, max_bytes: int, max_files: int) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="medsam2-samapi-uploads-")).resolve()
        self.max_bytes = max_bytes
        self.max_files = max_files

    def folder(self, dirname: str) -> Path:
        if not _SAFE_NAME.match(dirname or ""):
            raise InvalidRequest(f"dirname: {dirname!r} is not allowed; use one name of letters, digits, '.', '_' or '-'")
        path = (self.root / dirname).resolve()
        if path.parent != self.root:  # belt and braces: the pattern already excludes separators and ".."
            raise InvalidRequest(f"dirname: {dirname!r} is not allowed")
        return path

    def save(self, dirname: str, filename: str, stream: BinaryIO) -> str:
        name = re.split(r"[\\/]", filename or "")[-1]
        if not _SAFE_NAME.match(name):
            raise InvalidRequest(f"file: the file name {filename!r} is not allowed; use letters, digits, '.', '_' or '-'")
        folder = self.folder(dirname)
        folder.mkdir(exist_ok=True)
        if len(list(folder.iterdir())) >= self.max_files and not (folder / name).exists():
            raise PayloadTooLarge(f"file: {dirname!r} already holds {self.max_files} frames (MEDSAM2_SAMAPI_MAX_FRAMES)")
        size = 0
        with open(folder / name, "wb") as out:
            while chunk := stream.read(1 << 20):
                size += len(chunk)
                if size > self.max_bytes:
                    out.close()
                    (folder / name).unlink(missing_ok=True)
                    raise PayloadTooLarge(f"file: {name} exceeds {self.max_bytes} bytes (MEDSAM2_SAMAPI_MAX_UPLOAD_MB)")
                out.write(chunk)
        return name

    def frames(self, dirname: str) -> list[Path]:
        folder = self.folder(dirname)
        files = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
        if not files:
            raise InvalidRequest(f"dirname: nothing was uploaded under {dirname!r}; POST the frames to upload/ first")
        natural = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]  # noqa: E731
        return sorted(files, key=natural)

    def remove(self, dirname: str) -> None:
        shutil.rmtree(self.folder(dirname), ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class SamapiState:
    """What handlers share: built once per app, read by every request."""

    service: Any
    settings: SamapiSettings
    prompter: Prompter
    types: ModelTypes
    registrar: WeightRegistrar
    uploads: UploadStore

    @classmethod
    def build(cls, service: Any, settings: SamapiSettings) -> SamapiState:
        from medsam2_endpoint.core.service import choose_device

        types = ModelTypes(service, settings.weights_dir)
        registrar = WeightRegistrar(service, types, settings, choose_device(service.settings.device))
        registrar.load_recorded()
        uploads = UploadStore(settings.max_upload_bytes, settings.max_frames)
        return cls(service, settings, prompter_for(service), types, registrar, uploads)


def get_state(request: Request) -> SamapiState:
    return request.app.state.samapi


State = Annotated[SamapiState, Depends(get_state)]


def require_token(request: Request, state: State) -> None:
    """Bearer-token check when MEDSAM2_SAMAPI_TOKEN is set (constant-time comparison)."""
    token = state.settings.token
    if token is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise ServiceError("missing or wrong bearer token; send 'Authorization: Bearer <token>'", status=401)


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(payload, separators=(",", ":")), status_code=status, media_type="application/json", headers=headers)


def feature(mask: np.ndarray, *, object_idx: int, sam_model: str, quality: float | None = None,
            plane: dict[str, int] | None = None) -> dict[str, Any]:
    """A GeoJSON Feature as samapi's, with pixel-corner polygons (holes and all parts kept)."""
    geometry = mask_to_geometry(mask)
    if plane is not None:
        geometry["plane"] = plane
    properties: dict[str, Any] = {"object_idx": int(object_idx), "label": "object"}
    if quality is not None:
        properties["quality"] = float(quality)
    properties["sam_model"] = sam_model
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def _rgb(state: SamapiState, b64: str, field: str) -> np.ndarray:
    limits = state.service.settings.limits
    picture = read_picture(decode_base64(b64, field=field, limits=limits), field=field, limits=limits)
    return to_rgb_u8(picture, None, field=field)


router = APIRouter(prefix="/sam", dependencies=[Depends(require_token)])


@router.get("/version/", response_class=PlainTextResponse)
def version() -> str:
    return __version__


@router.get("/weights/")
def list_weights(state: State, type: Annotated[SamType | None, Query()] = None) -> Response:
    return _json(state.types.weights(type))


@router.post("/weights/", response_class=PlainTextResponse)
def register_weights(body: SamWeightsBody, state: State) -> str:
    return state.registrar.register(body.type, body.name, body.url)


@router.get("/weights/cancel/", response_class=PlainTextResponse)
def cancel_registration(state: State) -> str:
    return state.registrar.cancel()


@router.get("/progress/")
def progress(state: State) -> Response:
    return _json(state.registrar.progress())


@router.post("/")
def predict(body: SamPromptBody, state: State) -> Response:
    """One prompt object on the field of view: one Feature per mask (1, or 3 with multimask_output)."""
    sam_type, name = state.types.resolve(body.type, body.checkpoint_url)
    rgb = _rgb(state, body.b64img, "b64img")
    engine = state.prompter.image_engine(name)
    mask_input = None
    if body.b64mask is not None:
        mask = to_grey_u8(_rgb(state, body.b64mask, "b64mask")) > 0
        if mask.shape != rgb.shape[:2]:
            raise InvalidRequest(f"b64mask: the mask is {mask.shape[1]} x {mask.shape[0]} pixels, the image {rgb.shape[1]} x {rgb.shape[0]}")
        mask_input = engine.low_res_from_mask(mask)
    prompt = Prompt2D(
        points=np.asarray(body.point_coords, dtype=np.float64) if body.point_coords else None,
        labels=np.asarray(body.point_labels, dtype=np.int64) if body.point_labels else None,
        box=np.asarray(body.bbox, dtype=np.float64) if body.bbox else None,
        mask_input=mask_input,
        output_type="all" if body.multimask_output else "single",
    )
    check_prompt(prompt, width=rgb.shape[1], height=rgb.shape[0], engine=engine, where=lambda column: column,
                 models_with_points=state.prompter.models_with_points())
    started = time.perf_counter()
    result = state.prompter.segment(name, rgb, prompt)
    log.info("route=samapi model=%s size=%dx%d masks=%d embedding_cached=%s ms=%.0f", name, rgb.shape[1], rgb.shape[0],
             len(result.masks), result.embedding_cached, (time.perf_counter() - started) * 1000)
    # Empty masks have no outline: they are left out, and object_idx keeps each mask's own index.
    return _json([feature(m.mask, object_idx=m.index, quality=m.quality, sam_model=sam_type) for m in result.masks if m.area])


@router.post("/automask/")
def automask(body: SamAutomaskBody, state: State) -> Response:
    """Masks of everything in the field of view; output_type picks among each grid point's masks."""
    sam_type, name = state.types.resolve(body.type, body.checkpoint_url)
    rgb = _rgb(state, body.b64img, "b64img")
    params = body.params(samapi_output_type(body.output_type))
    started = time.perf_counter()
    result = state.prompter.automask(name, rgb, params, where=lambda column: column)
    log.info("route=samapi-automask model=%s size=%dx%d masks=%d ms=%.0f", name, rgb.shape[1], rgb.shape[0],
             len(result.masks), (time.perf_counter() - started) * 1000)
    return _json([feature(m.mask, object_idx=m.index, quality=m.quality, sam_model=sam_type) for m in result.masks])


@router.post("/upload/")
def upload(state: State, dirname: Annotated[str, Form()], file: Annotated[UploadFile, File()]) -> Response:
    return _json({"filename": state.uploads.save(dirname, file.filename or "", file.file)})


def _video_frames(state: SamapiState, body: SamVideoBody) -> list[np.ndarray]:
    if body.b64imgs:
        if len(body.b64imgs) > state.settings.max_frames:
            raise PayloadTooLarge(f"b64imgs: {len(body.b64imgs)} frames exceed {state.settings.max_frames} (MEDSAM2_SAMAPI_MAX_FRAMES)")
        return [_rgb(state, b64, f"b64imgs[{k}]") for k, b64 in enumerate(body.b64imgs)]
    if body.dirname:
        limits = state.service.settings.limits
        return [
            to_rgb_u8(read_picture(path.read_bytes(), field=f"dirname/{path.name}", limits=limits), None, field=f"dirname/{path.name}")
            for path in state.uploads.frames(body.dirname)
        ]
    raise InvalidRequest("dirname: give dirname (frames sent to upload/ first) or b64imgs")


@router.post("/video/")
def video(body: SamVideoBody, state: State) -> Response:
    """Objects tracked through a z-stack (axes XYZ) or time series (XYT) from prompts on some frames."""
    try:
        sam_type, name = state.types.resolve(body.type, body.checkpoint_url)
        frames = _video_frames(state, body)
    finally:
        if body.dirname and not body.b64imgs:
            state.uploads.remove(body.dirname)  # as samapi: an uploaded sequence is used once
    depth, height, width = len(frames), *frames[0].shape[:2]
    if depth * height * width > state.service.settings.limits.max_voxels:
        raise PayloadTooLarge(f"b64imgs: {depth} frames of {width} x {height} exceed {state.service.settings.limits.max_voxels} voxels (MEDSAM2_MAX_VOXELS)")
    volume = frames_to_volume(frames, field="b64imgs")
    start = body.start_frame_idx or 0
    if start >= depth:
        raise InvalidRequest(f"start_frame_idx: {start} is beyond the {depth} frames")
    prompts = []
    for frame, objects in sorted(body.objs.items()):
        for j, obj in enumerate(objects):
            where = f"objs.{frame}[{j}]"
            if frame < start:
                raise InvalidRequest(f"{where}: prompt on frame {frame}, before start_frame_idx {start}")
            prompts.append(ObjectPrompt(
                obj.obj_id, frame - start,
                np.asarray(obj.bbox, dtype=np.float64) if obj.bbox else None,
                np.asarray(obj.point_coords, dtype=np.float64) if obj.point_coords else None,
                np.asarray(obj.point_labels, dtype=np.int64) if obj.point_labels else None,
                where,
            ))
    if not prompts:
        raise InvalidRequest("objs: no prompts; give at least one object on one frame")
    deadline = time.monotonic() + state.service.settings.request_deadline_s
    masks = track_objects(state.prompter, name, volume[start:], prompts,
                          max_frames_per_direction=body.max_frame_num_to_track, deadline=deadline)
    features = []
    for z in range(depth - start):
        for obj_id, mask in masks.items():
            if mask[z].any():
                features.append(feature(mask[z], object_idx=obj_id, sam_model=sam_type, plane=plane_of(body.axes, z + start, body.plane_position)))
    return _json(features)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = location(tuple(error["loc"])) or "body"
        if error["type"] == "json_invalid":
            parts.append(f"{where}: not valid JSON; send a JSON object with Content-Type: application/json")
        elif error["type"] == "missing":
            parts.append(f"{where}: required field is missing")
        else:
            parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def _install_error_handlers(app: FastAPI) -> None:
    """Every error is JSON {"error", "status"} with that status, as the rest of this project."""

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        log.info("route=samapi path=%s status=%d error=%s", request.url.path, exc.status, exc.message)
        return _json(exc.to_body(), exc.status, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return _json({"error": _validation_message(exc), "status": 400}, 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return _json({"error": str(exc.detail), "status": exc.status_code}, exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        request_id = uuid.uuid4().hex
        log.error("route=samapi path=%s request_id=%s internal error", request.url.path, request_id, exc_info=exc)
        return _json({"error": f"internal error; quote request id {request_id} when reporting it", "status": 500}, 500)


def create_app(
    service: Any | None = None,
    settings: SamapiSettings | None = None,
    *,
    build_service: Callable[[], Any] | None = None,
) -> FastAPI:
    """The samapi app around an already-built Service (tests), or one `build_service()` makes at start-up.

    settings: None reads SamapiSettings from the environment at start-up.
    """
    if service is None and build_service is None:
        raise ValueError("give a Service or a build_service callable")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc = service if service is not None else build_service()
        cfg = settings or SamapiSettings.from_env(model_dir=svc.settings.model_dir)
        state = SamapiState.build(svc, cfg)
        app.state.samapi = state
        log.info("samapi ready: types %s; models %s; auth %s; weight registration %s",
                 ", ".join(state.types.available()), ", ".join(svc.engines), "on" if cfg.token else "off",
                 "on" if cfg.allow_weight_registration else "off")
        try:
            yield
        finally:
            state.uploads.close()

    app = FastAPI(title="medsam2-endpoint samapi", version=__version__, lifespan=lifespan)
    _install_error_handlers(app)
    app.include_router(router)
    return app


def serve(host: str, port: int, model_dir: str | None) -> int:
    """`medsam2-endpoint serve-samapi`: build the Service from the environment and the model folder, serve."""
    import uvicorn

    from medsam2_endpoint.core.service import Service

    logger = logging.getLogger("azmlinfsrv.medsam2")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    app = create_app(build_service=lambda: Service.from_settings(Settings.from_env(model_dir=model_dir)))
    uvicorn.run(app, host=host, port=port, log_level="info")
    return 0
