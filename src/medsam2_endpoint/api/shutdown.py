"""Clean shutdown: one SIGTERM (or Ctrl-C) cancels every running request's budget, so the work stops at its
next check (a slice, a grid batch, a frame) and the server exits within seconds instead of finishing it.

Two servers, two hooks: uvicorn (the samapi server) through its own exit handler, and each azmlinfsrv
(gunicorn sync) worker by chaining gunicorn's SIGTERM/SIGINT handlers, which only let the worker finish its
current request and then exit.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn


class CancellingServer(uvicorn.Server):
    """uvicorn that, told to exit, also cancels the running requests (`cancel()` returns how many)."""

    def __init__(self, config: uvicorn.Config, cancel: Callable[[], int]) -> None:
        super().__init__(config)
        self._cancel_running = cancel

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # Only set flags here (a signal handler); the worker threads raise Cancelled at their next check.
        self._cancel_running()


def cancel_on_signals(cancel: Callable[[], int], signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)) -> bool:
    """Chain `cancel` before the handlers already installed (gunicorn's worker ones). Only possible in the main
    thread (where azmlinfsrv runs init()); False elsewhere."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for signum in signals:
        previous = signal.getsignal(signum)

        def handler(sig: int, frame: FrameType | None, previous: Any = previous) -> None:
            cancel()
            if callable(previous):
                previous(sig, frame)
            elif previous == signal.SIG_DFL:
                signal.default_int_handler(sig, frame) if sig == signal.SIGINT else _exit_default(sig)

        signal.signal(signum, handler)
        if signum == signal.SIGTERM:
            signal.siginterrupt(signum, False)  # as gunicorn: do not interrupt the request's system calls
    return True


def _exit_default(sig: int) -> None:
    """The default action of a signal we chained before (no previous handler): terminate as it would have."""
    signal.signal(sig, signal.SIG_DFL)
    signal.raise_signal(sig)
