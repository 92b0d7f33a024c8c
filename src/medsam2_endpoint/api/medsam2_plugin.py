"""MedSAM2's own 3D Slicer plugin's routes, at the interactive server's root (the plugin builds
`http://<ip>:<port>/<route>`, no prefix possible; REFERENCE.md G). HTTP only: core/plugin.py decides.

    POST /upload          multipart `file`: img_data.npz (step 1) or gts.npz (step 2)
    POST /run_script      form: checkpoint, input, gts, propagate (N | Y), size (tiny | small | base_plus | large)
    GET  /download_file   form body `output=...` (ignored): the last result of this client address
    POST /upload_model    multipart `file`: a checkpoint, registered under weight registration's rules

State is per client address, in memory, with expiry (core/plugin_state.py): nothing from a request is
ever used as a path, and /download_file only answers bytes this server wrote for that address. Errors
are the project's JSON 4xx (the plugin checks no status; its users see a failed np.load instead).
"""

from __future__ import annotations

import threading
from pathlib import PurePosixPath
from typing import Annotated, cast

import numpy as np
from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile as StarletteUpload

from medsam2_endpoint.api.bodies import EXTRA_BYTES, BodyCap
from medsam2_endpoint.api.cancel import run_until_disconnected
from medsam2_endpoint.base.errors import InvalidRequest, NotFound, PayloadTooLarge
from medsam2_endpoint.base.log import log
from medsam2_endpoint.core import plugin
from medsam2_endpoint.core.plugin_state import PluginStore, PluginVolume
from medsam2_endpoint.core.service import Service
from medsam2_endpoint.io.limits import MB

router = APIRouter(tags=["MedSAM2 Slicer plugin"])
_BUILD = threading.Lock()
CHUNK = 1 << 20


def _service(request: Request) -> Service:
    return cast(Service, request.app.state.samapi.service)


def plugin_store(request: Request) -> PluginStore:
    """The app's store, built from the settings on first use (tests may set `app.state.medsam2_plugin`)."""
    with _BUILD:
        store = getattr(request.app.state, "medsam2_plugin", None)
        if store is None:
            settings = _service(request).settings
            store = PluginStore(settings.plugin_state_mb * MB, settings.plugin_ttl_s)
            request.app.state.medsam2_plugin = store
    return cast(PluginStore, store)


def body_cap(path: str, service: Service) -> BodyCap | None:
    """The plugin's bodies capped as they arrive (api/bodies.BodyLimit); None: not one of its routes."""
    settings = service.settings
    if path == "/upload":
        limit = min(settings.limits.max_file_bytes, settings.plugin_state_mb * MB)
        return BodyCap(limit + EXTRA_BYTES, "MEDSAM2_MAX_FILE_MB or MEDSAM2_PLUGIN_STATE_MB, plus 1 MiB for the form",
                       "send a smaller volume (crop it to the structure's slices)")
    if path == "/upload_model":
        return BodyCap(settings.samapi.max_weight_bytes + EXTRA_BYTES, "MEDSAM2_SAMAPI_MAX_WEIGHT_MB plus 1 MiB for the form",
                       "upload a MedSAM2 checkpoint")
    if path in ("/run_script", "/download_file"):
        return BodyCap(EXTRA_BYTES, "1 MiB of form fields", "send the plugin's form fields only")
    return None


def client_of(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def _read(file: StarletteUpload, limit: int, setting: str) -> bytes:
    """The uploaded file within `limit` (the body cap, api/bodies.py, already bounds the whole form as it arrives)."""
    parts, total = [], 0
    while chunk := await file.read(CHUNK):
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"file: over the limit of {limit} bytes ({setting})", detail={"limit": limit})
        parts.append(chunk)
    return b"".join(parts)


@router.post("/upload")
async def upload(request: Request, file: Annotated[UploadFile, File()]) -> Response:
    """img_data.npz (a new volume: earlier masks and results of this address are dropped) or gts.npz."""
    service, store = _service(request), plugin_store(request)
    limits = service.settings.limits
    limit = min(limits.max_file_bytes, store.max_bytes)
    data = await _read(file, limit, "MEDSAM2_MAX_FILE_MB, MEDSAM2_PLUGIN_STATE_MB")
    parsed = await run_in_threadpool(plugin.read_upload, data, limits=limits)
    del data
    client = client_of(request)
    if isinstance(parsed, PluginVolume):
        store.update(client, volume=parsed, gts=None, result=None)
        answer = {"received": "img_data.npz", "shape": list(parsed.imgs.shape), "objects": len(parsed.boxes),
                  "z_range": list(parsed.z_range)}
    else:
        store.update(client, gts=parsed, result=None)
        answer = {"received": "gts.npz", "shape": list(parsed.shape), "objects": int(np.count_nonzero(np.bincount(parsed.ravel(), minlength=256)[1:]))}
    log.info("route=medsam2-plugin path=/upload client=%s %s", client, answer)
    return JSONResponse(answer)


@router.post("/run_script")
async def run_script(request: Request, propagate: Annotated[str, Form()], size: Annotated[str, Form()],
                     checkpoint: Annotated[str, Form()] = "", input: Annotated[str, Form()] = "",
                     gts: Annotated[str, Form()] = "") -> Response:
    """Step 1 (propagate=N) or step 2 (propagate=Y) on what this address uploaded; `input` and `gts` name the
    plugin's files, which this server already holds by address (never read as paths)."""
    service, store = _service(request), plugin_store(request)
    run = plugin.parse_run(checkpoint=checkpoint, propagate=propagate, size=size)
    client = client_of(request)
    state = store.get(client)
    budget = service.budget()
    result, text = await run_until_disconnected(request, budget, lambda: plugin.run(service, state, run, budget))
    store.update(client, result=result)
    log.info("route=medsam2-plugin path=/run_script client=%s propagate=%s size=%s: %s", client, run.propagate, run.size, text)
    return PlainTextResponse(text)


@router.get("/download_file")
def download_file(request: Request) -> Response:
    """This address's last result, whatever the form's `output` names (the body is not read)."""
    result = plugin_store(request).get(client_of(request)).result
    if result is None:
        raise NotFound("output: no result for this address (none computed, or expired); run_script first")
    return Response(result, media_type="application/octet-stream",
                    headers={"Content-Disposition": 'attachment; filename="img_data.npz"'})


@router.post("/upload_model")
async def upload_model(request: Request) -> Response:
    """A checkpoint from the plugin's model picker: refused unless weight registration is enabled, then the
    registration's own checks (a MedSAM2 checkpoint, the size cap, a safe name) before it is served."""
    service = _service(request)
    limit = service.settings.samapi.max_weight_bytes
    try:
        service.registrar.check_allowed()
    except Exception:
        drained = 0  # read the body the plugin is sending, so it gets the answer instead of a reset connection
        async for chunk in request.stream():
            drained += len(chunk)
            if drained > limit:
                break
        raise
    form = await request.form()
    upload = form.get("file")
    if not isinstance(upload, StarletteUpload):
        raise InvalidRequest("file: send the checkpoint as the multipart file field `file`")
    data = await _read(upload, limit, "MEDSAM2_SAMAPI_MAX_WEIGHT_MB")
    name = PurePosixPath((upload.filename or "").replace("\\", "/")).name.split(".")[0]  # as the plugin names it
    message = await run_in_threadpool(service.registrar.register_upload, name, data, f"upload from {client_of(request)}")
    return PlainTextResponse(message)
