"""Azure ML entry script (online endpoint): builds one Service in init(), answers POST /score in run().

Thin adapter: parse the body, call the Service, map domain errors to HTTP. Logic lives in src/medsam2_endpoint.
Each request gets one log line `request_id=... route=... status=... items=... ms=...` (no image data, no URLs),
and the Service's own lines during that request carry the same `request_id=` prefix.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any

# On Azure the code folder is shipped as-is (not pip-installed): make the package importable.
sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

import flask  # noqa: E402
from azureml_inference_server_http.api.aml_request import AMLRequest, rawhttp  # noqa: E402
from azureml_inference_server_http.api.aml_response import AMLResponse  # noqa: E402

from medsam2_endpoint.core.settings import Settings  # noqa: E402
from medsam2_endpoint.io.encode import dumps  # noqa: E402
from medsam2_endpoint.base.errors import ServiceError  # noqa: E402
from medsam2_endpoint.core.service import Service  # noqa: E402

log = logging.getLogger("azmlinfsrv.medsam2")
JSON = {"Content-Type": "application/json"}
service: Service | None = None  # the entry-script contract: init() builds it, run() uses it

_UNSAFE_ID = re.compile(r"[^A-Za-z0-9._:-]")  # request ids are client-chosen: keep log lines one line each
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


class _RequestIdFilter(logging.Filter):
    """Prefix the Service's log lines with the current request's id (none outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = _REQUEST_ID.get()
        if request_id is not None:
            record.msg = f"request_id={request_id} {record.msg}"
        return True


def init() -> None:
    global service
    logging.getLogger("azmlinfsrv.medsam2").setLevel(logging.INFO)
    service = Service.from_settings(Settings.from_env())
    log.info("ready: models %s, default %s", ", ".join(service.available_models()), service.default)


if not any(type(f).__name__ == "_RequestIdFilter" for f in log.filters):  # once, even if imported twice
    log.addFilter(_RequestIdFilter())


def _error(status: int, message: str) -> AMLResponse:
    return AMLResponse(json.dumps({"error": message, "status": status}), status, JSON)


def _request_id(request: AMLRequest) -> str:
    """The caller's x-request-id, else the one azmlinfsrv generated (it echoes that one), made log-safe."""
    raw = request.headers.get("x-request-id") or (flask.g.get("request_id") if flask.has_app_context() else None)
    return _UNSAFE_ID.sub("?", raw or uuid.uuid4().hex)[:100]


def _describe(body: Any) -> tuple[str, int]:
    """(route, item count) for the log line: the route is chosen by the columns, as Service.score does."""
    columns = body.get("input_data") if isinstance(body, dict) else None
    if not isinstance(columns, dict):
        return "-", 0
    route, first = ("2d", columns.get("image")) if "image" in columns else ("3d", columns.get("nii_image"))
    return route, len(first) if isinstance(first, list) else 0


def _body_limit(current: Service) -> int:
    """The largest body the limits could accept: every item at the base64 cap, plus 1 MiB per item for prompts."""
    limits = current.settings.limits
    return limits.max_items * (limits.max_base64_bytes + (1 << 20))


def _answer(request: AMLRequest, request_id: str) -> tuple[AMLResponse, str, int, str]:
    """(response, route, items, error message for the log)."""
    if request.method != "POST":
        return _error(405, "use POST with a JSON body; see the README's request reference"), "-", 0, "not POST"
    current = service
    if current is None:
        return _error(503, "the model is still loading; retry shortly"), "-", 0, "not ready"
    limit = _body_limit(current)
    if request.content_length is not None and request.content_length > limit:
        message = f"body: {request.content_length} bytes exceed the limit of {limit} (MEDSAM2_MAX_ITEMS x MEDSAM2_MAX_BASE64_MB); send URLs"
        return _error(413, message), "-", 0, message
    try:
        body = json.loads(request.get_data(cache=False))
    except (ValueError, UnicodeDecodeError, RecursionError):
        message = 'body: not valid JSON; send {"input_data": {...}} with Content-Type: application/json'
        return _error(400, message), "-", 0, message
    route, items = _describe(body)
    token = _REQUEST_ID.set(request_id)
    try:
        results = current.score(body)
    except ServiceError as exc:
        return _error(exc.status, exc.message), route, items, exc.message
    except TimeoutError:  # azmlinfsrv's SIGALRM (SCORING_TIMEOUT_MS) raised inside our code
        message = "the request ran past the server's time limit (SCORING_TIMEOUT_MS); send a smaller volume or fewer items"
        return _error(503, message), route, items, message
    except Exception:
        log.exception("route=%s failed with an internal error", route)  # the filter adds request_id=
        return _error(500, f"internal error; quote request id {request_id} when reporting it"), route, items, "internal error"
    finally:
        _REQUEST_ID.reset(token)
    return AMLResponse(dumps(results), 200, JSON), route, len(results), ""


@rawhttp
def run(request: AMLRequest) -> AMLResponse:
    started = time.perf_counter()
    request_id = _request_id(request)
    response, route, items, error = _answer(request, request_id)
    response.headers["x-request-id"] = request_id
    ms = (time.perf_counter() - started) * 1000
    detail = f" error={json.dumps(_CONTROL.sub('?', error[:300]))}" if error else ""
    log.info("request_id=%s route=%s status=%d items=%d ms=%.0f%s", request_id, route, response.status_code, items, ms, detail)
    return response
