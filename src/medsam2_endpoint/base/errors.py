"""Typed domain errors, each with a machine-readable `code`. No HTTP here: each adapter maps codes to its
transport in one place (`api/errors.py`). Messages are safe to show the caller: they name the field and
the fix, and never hold secrets (URL queries, keys) or image data."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of every error a caller may see. `code` says what kind of failure it is."""

    code: str = "internal"

    def __init__(self, message: str, *, code: str | None = None, detail: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.detail = detail or {}  # machine-readable extras (e.g. how far the work got), safe to show


class InvalidRequest(ServiceError):
    """The caller's request is malformed or inconsistent. The message names the field and the fix."""

    code = "invalid_request"


class PayloadTooLarge(ServiceError):
    """A payload, file, or decoded volume exceeds a configured limit; the message quotes the limit."""

    code = "too_large"


class UnsupportedMedia(ServiceError):
    """The file is not of a supported kind."""

    code = "unsupported_media"


class FetchRefused(ServiceError):
    """A user-supplied URL was refused (its address, scheme or host) before anything was sent."""

    code = "fetch_refused"


class FetchFailed(FetchRefused):
    """A user-supplied URL could not be fetched: the remote server failed, or was too slow (`fetch_timeout`)."""

    code = "fetch_failed"


class NotFound(ServiceError):
    """A named thing (model type, checkpoint, upload) this server does not have."""

    code = "not_found"


class Forbidden(ServiceError):
    """The operation is switched off on this server."""

    code = "forbidden"


class Unauthorized(ServiceError):
    """Missing or wrong credentials."""

    code = "unauthorized"


class Conflict(ServiceError):
    """The operation clashes with one already running."""

    code = "conflict"


class VolumeNotHeld(ServiceError):
    """A request named a `volume_id` this worker no longer holds (or never did): send the volume again."""

    code = "volume_not_held"


class ModelUnavailable(ServiceError):
    """The requested model is not loaded or cannot be used right now."""

    code = "model_unavailable"


class DeadlineExceeded(ServiceError):
    """The per-request time budget ran out; the message (and `detail`) say how far the work got."""

    code = "deadline"


class Busy(ServiceError):
    """Every inference slot of the model is taken; `detail["retry_after_s"]` says when to try again."""

    code = "busy"


class LeaseGone(ServiceError):
    """A session lease that this server does not hold (never issued, released, or reaped after its timeout): claim again."""

    code = "lease_gone"
