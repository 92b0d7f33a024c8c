"""Work that stops when its client goes away: the Service call runs in a worker thread while the event
loop watches the connection; a disconnect sets the request's cancel flag, and the work stops at its next
budget check (a slice, a grid batch, a frame)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from medsam2_endpoint.base.budget import Budget

T = TypeVar("T")
POLL_S = 0.25


async def run_until_disconnected(request: Request, budget: Budget, work: Callable[[], T]) -> T:
    task = asyncio.ensure_future(run_in_threadpool(work))
    while True:
        done, _ = await asyncio.wait({task}, timeout=POLL_S)
        if done:
            return task.result()
        if not budget.cancelled and await request.is_disconnected():
            budget.cancel()  # the thread raises Cancelled at its next check; wait for it so no work outlives us
