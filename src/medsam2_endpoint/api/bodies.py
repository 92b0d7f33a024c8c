"""Request bodies read within their cap as they arrive, with or without a Content-Length.

A declared length over the cap is refused before a byte of the body is read; a chunked body (no length)
is read in pieces and refused as soon as the bytes received pass the cap, so a client cannot make a
worker hold more than the cap by leaving the length out. Both adapters use it: azmlinfsrv's `/score`
(a WSGI stream, `read_capped`) and the samapi server (an ASGI middleware, `BodyLimit`).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from starlette.exceptions import HTTPException

from medsam2_endpoint.api.errors import error_body
from medsam2_endpoint.base.errors import PayloadTooLarge
from medsam2_endpoint.base.log import log
from medsam2_endpoint.io.limits import MB

_PIECE = 1 << 20


@dataclass(frozen=True)
class BodyCap:
    """The most bytes a body may hold, and how a refusal explains it: `setting` names what sets the cap,
    `advice` what the caller can do instead."""

    limit: int
    setting: str
    advice: str

    def refuse(self, declared: int | None = None) -> PayloadTooLarge:
        size = f"{declared} bytes exceed" if declared is not None else f"more than {self.limit} bytes arrived, over"
        return PayloadTooLarge(f"body: {size} the limit of {self.limit} ({self.setting}); {self.advice}",
                               detail={"limit": self.limit})


def read_capped(stream: BinaryIO, cap: BodyCap, declared: int | None = None) -> bytes:
    """The whole body from a WSGI input stream, refused before reading when `declared` (Content-Length) is over
    the cap, else read a piece at a time and refused once more than the cap has arrived."""
    if declared is not None and declared > cap.limit:
        raise cap.refuse(declared)
    pieces, total = [], 0
    while piece := stream.read(min(_PIECE, cap.limit + 1 - total)):
        pieces.append(piece)
        total += len(piece)
        if total > cap.limit:
            raise cap.refuse()
    return b"".join(pieces)


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _OverCap(HTTPException):
    """Raised into the app from `receive`: its body reader stops there (FastAPI passes HTTP exceptions from
    the body reader on untouched), and the middleware answers."""

    def __init__(self) -> None:
        super().__init__(413)


class BodyLimit:
    """ASGI middleware: each HTTP request's body capped by `cap_of(scope)` (None: no cap) as it arrives.

    Over the cap the app's own answer (to the exception its body reader got) is dropped and a 413 JSON error
    naming the cap and its setting goes out instead, with `Connection: close` (the rest is never read)."""

    def __init__(self, app: ASGIApp, cap_of: Callable[[Scope], BodyCap | None]) -> None:
        self.app, self.cap_of = app, cap_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cap = self.cap_of(scope) if scope["type"] == "http" else None
        if cap is None:
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > cap.limit:
            await _answer(send, cap.refuse(int(length)), scope)
            return
        received, over, started = 0, False, False

        async def capped_receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap.limit:
                    over = True
                    raise _OverCap()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over:
                return  # the app's answer to the exception it got from capped_receive
            started = True
            await send(message)

        try:
            await self.app(scope, capped_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not started:
            await _answer(send, cap.refuse(), scope)


async def _answer(send: Send, exc: PayloadTooLarge, scope: Scope) -> None:
    log.info("route=samapi path=%s status=413 code=%s error=%s", scope.get("path"), exc.code, exc.message)
    body = json.dumps(error_body(exc.message, 413, exc.code), separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


#: The prompts, options and form fields a body may hold besides its images.
EXTRA_BYTES = MB
