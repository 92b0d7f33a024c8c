"""Back-pressure: inference on a model runs under that model's semaphore; a request that cannot get a slot
within a short wait is refused (Busy, answered 503 with Retry-After) instead of queueing without bound.

Background work (core/background.py) takes a slot only through `spare`: when no request holds or waits for
one, and a step at a time. A request arriving meanwhile waits for that one step, however long it takes: time a
slot spends on background work never makes a request Busy."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from medsam2_endpoint.base.errors import Busy


class InferenceSlots:
    def __init__(self, slots: int, wait_s: float, retry_after_s: float) -> None:
        self.slots = max(1, slots)
        self.wait_s = wait_s
        self.retry_after_s = retry_after_s
        self._semaphores: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()
        self._requests = 0  # requests holding or waiting for a slot, of any model
        self._spared: dict[str, int] = {}  # slots per model held by background work now

    def _semaphore(self, model: str) -> threading.BoundedSemaphore:
        with self._lock:
            if model not in self._semaphores:
                self._semaphores[model] = threading.BoundedSemaphore(self.slots)
            return self._semaphores[model]

    @contextmanager
    def hold(self, model: str) -> Iterator[None]:
        """A request's slot on `model`: Busy when none came free within `wait_s`, not counting the wait for a
        background step in progress."""
        semaphore = self._semaphore(model)
        with self._lock:
            self._requests += 1
        try:
            # background work gives its slot back after its step and takes none while this request waits
            while not semaphore.acquire(timeout=self.wait_s):
                with self._lock:
                    if self._spared.get(model, 0):
                        continue
                retry = max(1, math.ceil(self.retry_after_s))
                raise Busy(
                    f"model {model} is busy ({self.slots} request(s) running, none finished within {self.wait_s:g} s); retry in {retry} s",
                    detail={"retry_after_s": retry},
                )
            try:
                yield
            finally:
                semaphore.release()
        finally:
            with self._lock:
                self._requests -= 1

    @contextmanager
    def spare(self, model: str) -> Iterator[bool]:
        """A slot on `model` for background work, never waited for: yields True (the slot held until the block
        ends) only when no request holds or waits for a slot of any model, else False at once. Keep the block to
        one short step: a request arriving meanwhile waits for it."""
        semaphore = self._semaphore(model)
        with self._lock:
            got = self._requests == 0 and semaphore.acquire(blocking=False)
            if got:
                self._spared[model] = self._spared.get(model, 0) + 1
        try:
            yield got
        finally:
            if got:
                semaphore.release()  # then the count: a request timing out meanwhile still sees the slot coming back
                with self._lock:
                    self._spared[model] -= 1

    @property
    def requests(self) -> int:
        """Requests holding or waiting for a slot now."""
        with self._lock:
            return self._requests
