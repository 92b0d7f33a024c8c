"""Typed domain errors. Each adapter maps them to its transport in one place."""

from __future__ import annotations


class ServiceError(Exception):
    """An error whose message is safe to show the caller (never contains secrets or image data)."""

    status: int = 500

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    def to_body(self) -> dict:
        return {"error": self.message, "status": self.status}


class InvalidRequest(ServiceError):
    """The caller's request is malformed or inconsistent (400). The message names the field and the fix."""

    status = 400


class PayloadTooLarge(ServiceError):
    """A payload, file, or decoded volume exceeds a configured limit (413)."""

    status = 413


class UnsupportedMedia(ServiceError):
    """The file is not of a supported kind (415)."""

    status = 415


class FetchRefused(ServiceError):
    """A user-supplied URL was refused or could not be fetched (400, or 502 for upstream failures)."""

    status = 400


class ModelUnavailable(ServiceError):
    """The requested model is not loaded or cannot be used right now (503)."""

    status = 503


class DeadlineExceeded(ServiceError):
    """The per-request time budget ran out (503); the message says how far the work got."""

    status = 503
