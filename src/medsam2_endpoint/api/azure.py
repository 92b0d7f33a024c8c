"""The Azure ML online endpoint's `/score`, behind `score.py` (azmlinfsrv's entry script). Transport only.

Parse the body (contract), call one Service method, map typed errors to HTTP (api/errors) here and
nowhere else. Each request gets one log line `request_id=... route=... status=... items=... ms=...`
(no image data, no URLs); the Service's own lines during that request carry the same `request_id=`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from typing import Any

import flask
from azureml_inference_server_http.api.aml_request import AMLRequest
from azureml_inference_server_http.api.aml_response import AMLResponse

from medsam2_endpoint.api.bodies import BodyCap, read_capped
from medsam2_endpoint.api.errors import body_of, error_body, headers_of, http_status
from medsam2_endpoint.api.shutdown import cancel_on_signals
from medsam2_endpoint.base.errors import PayloadTooLarge, ServiceError
from medsam2_endpoint.base.log import log
from medsam2_endpoint.contract.score2d import parse_image_request
from medsam2_endpoint.contract.score3d import parse_request
from medsam2_endpoint.core.service import Service
from medsam2_endpoint.core.settings import Settings
from medsam2_endpoint.io.encode import dumps

JSON = {"Content-Type": "application/json"}
_UNSAFE_ID = re.compile(r"[^A-Za-z0-9._:-]")  # request ids are client-chosen: keep log lines one line each
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


class RequestIdFilter(logging.Filter):
    """Prefix the Service's log lines with the current request's id (none outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = _REQUEST_ID.get()
        if request_id is not None:
            record.msg = f"request_id={request_id} {record.msg}"
        return True


if not any(isinstance(f, RequestIdFilter) for f in log.filters):  # once, even if imported twice
    log.addFilter(RequestIdFilter())


def _error(status: int, message: str, code: str) -> AMLResponse:
    return AMLResponse(json.dumps(error_body(message, status, code)), status, JSON)


def _request_id(request: AMLRequest) -> str:
    """The caller's x-request-id, else the one azmlinfsrv generated (it echoes that one), made log-safe."""
    raw = request.headers.get("x-request-id") or (flask.g.get("request_id") if flask.has_app_context() else None)
    return _UNSAFE_ID.sub("?", raw or uuid.uuid4().hex)[:100]


def route_of(body: Any) -> tuple[str, int]:
    """(route, item count) for routing and the log line: the `image` column selects the 2D route, else 3D."""
    columns = body.get("input_data") if isinstance(body, dict) else None
    if not isinstance(columns, dict):
        return "-", 0
    route, first = ("2d", columns.get("image")) if "image" in columns else ("3d", columns.get("nii_image"))
    return route, len(first) if isinstance(first, list) else 0


def score(service: Service, body: Any) -> list[dict[str, Any]]:
    """One /score body through the Service: contract first (every item), then the route's method."""
    max_items = service.settings.limits.max_items
    if route_of(body)[0] == "2d":
        return service.score_2d(parse_image_request(body, max_items=max_items))
    return service.score_3d(parse_request(body, max_items=max_items))


class ScoreApp:
    """What `score.py` holds: the Service built in init(), used by run()."""

    def __init__(self) -> None:
        self.service: Service | None = None

    def init(self) -> None:
        log.setLevel(logging.INFO)
        self.service = Service.from_settings(Settings.from_env())
        cancel_on_signals(self.service.cancel_running)  # SIGTERM: running work stops, the worker exits within seconds
        log.info("ready: models %s, default %s", ", ".join(self.service.available_models()), self.service.default)

    def body_limit(self, service: Service) -> int:
        """The largest body the limits could accept (`Limits.max_body_bytes`): the request's base64 cap, plus 1 MiB
        per item for prompts, never more than every item at its own cap."""
        return service.settings.limits.max_body_bytes

    def answer(self, request: AMLRequest, request_id: str) -> tuple[AMLResponse, str, int, str]:
        """(response, route, items, error message for the log)."""
        if request.method != "POST":
            return _error(405, "use POST with a JSON body; see the README's request reference", "invalid_request"), "-", 0, "not POST"
        service = self.service
        if service is None:
            return _error(503, "the model is still loading; retry shortly", "model_unavailable"), "-", 0, "not ready"
        cap = BodyCap(self.body_limit(service), "MEDSAM2_MAX_REQUEST_MB plus 1 MiB per item of MEDSAM2_MAX_ITEMS, at most "
                      "MEDSAM2_MAX_ITEMS x MEDSAM2_MAX_BASE64_MB", "send fewer items per request, or URLs")
        try:  # refused from Content-Length unread, or (chunked) once more than the cap has arrived
            data = read_capped(request.stream, cap, request.content_length)
        except PayloadTooLarge as exc:
            return _error(413, exc.message, exc.code), "-", 0, exc.message
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            message = 'body: not valid JSON; send {"input_data": {...}} with Content-Type: application/json'
            return _error(400, message, "invalid_request"), "-", 0, message
        route, items = route_of(body)
        token = _REQUEST_ID.set(request_id)
        try:
            results = score(service, body)
        except ServiceError as exc:
            return AMLResponse(json.dumps(body_of(exc)), http_status(exc), {**JSON, **headers_of(exc)}), route, items, exc.message
        except TimeoutError:  # azmlinfsrv's SIGALRM (SCORING_TIMEOUT_MS) raised inside our code
            message = "the request ran past the server's time limit (SCORING_TIMEOUT_MS); send a smaller volume or fewer items"
            return _error(503, message, "deadline"), route, items, message
        except Exception:
            log.exception("route=%s failed with an internal error", route)  # the filter adds request_id=
            return _error(500, f"internal error; quote request id {request_id} when reporting it", "internal"), route, items, "internal error"
        finally:
            _REQUEST_ID.reset(token)
        return AMLResponse(dumps(results), 200, JSON), route, len(results), ""

    def run(self, request: AMLRequest) -> AMLResponse:
        started = time.perf_counter()
        request_id = _request_id(request)
        response, route, items, error = self.answer(request, request_id)
        response.headers["x-request-id"] = request_id
        ms = (time.perf_counter() - started) * 1000
        detail = f" error={json.dumps(_CONTROL.sub('?', error[:300]))}" if error else ""
        log.info("request_id=%s route=%s status=%d items=%d ms=%.0f%s", request_id, route, response.status_code, items, ms, detail)
        return response
