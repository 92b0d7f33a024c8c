"""Domain errors -> HTTP, for every adapter: one table of status codes and one JSON error body.

Body: `{"error": "<what is wrong and how to fix it>", "status": <HTTP status>, "code": "<kind>"}`. The
status is in the body too because a managed online endpoint turns every non-200 into a 424.
"""

from __future__ import annotations

from typing import Any

from medsam2_endpoint.base.errors import ServiceError

STATUS_OF_CODE: dict[str, int] = {
    "invalid_request": 400,
    "fetch_refused": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "conflict": 409,
    "volume_not_held": 409,
    "lease_gone": 410,
    "too_large": 413,
    "unsupported_media": 415,
    "fetch_failed": 502,
    "model_unavailable": 503,
    "busy": 503,
    "deadline": 503,
    "fetch_timeout": 504,
    "cancelled": 503,
    "internal": 500,
}


def http_status(exc: ServiceError) -> int:
    return STATUS_OF_CODE.get(exc.code, 500)


def error_body(message: str, status: int, code: str) -> dict[str, Any]:
    return {"error": message, "status": status, "code": code}


def body_of(exc: ServiceError) -> dict[str, Any]:
    body = error_body(exc.message, http_status(exc), exc.code)
    if exc.detail:
        body["detail"] = exc.detail
    return body


def headers_of(exc: ServiceError) -> dict[str, str]:
    """HTTP headers an error needs: Retry-After for `busy`."""
    if exc.code == "busy":
        return {"Retry-After": str(int(exc.detail.get("retry_after_s", 5)))}
    return {}
